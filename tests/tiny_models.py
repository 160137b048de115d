"""Tiny real CNNs loaded by the job through `tests/tiny_models.py:<callable>` specs.

EXPLAIN_TEST_SLEEP (seconds per image, read when the transform runs) makes the job deterministically slow,
for the kill -9 test: the sleep sits in preprocessing, which the job runs for every image.
EXPLAIN_TEST_DIE_AFTER=N makes the process kill itself (SIGKILL, as kill -9 would) when the transform is about
to run for the (N+1)-th time: a job stopped half-way, at once and without a timing loop.
"""
from __future__ import annotations

import os
import signal
import time

import torch
from torch import nn
from torchvision import transforms as T


class TinyCNN(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 3, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


class SlowToTensor(T.ToTensor):
    """ToTensor that sleeps EXPLAIN_TEST_SLEEP seconds per image (0 when unset); still a value-only step, so
    the job can place masks through this transform."""

    calls = 0  # in this process

    def __call__(self, image):
        delay = float(os.environ.get("EXPLAIN_TEST_SLEEP", "0") or 0)
        if delay:
            time.sleep(delay)
        die_after = os.environ.get("EXPLAIN_TEST_DIE_AFTER")
        if die_after:
            SlowToTensor.calls += 1
            if SlowToTensor.calls > int(die_after):
                os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(image)


def _model(in_channels: int = 3, num_classes: int = 3) -> TinyCNN:
    torch.manual_seed(0)  # the same weights in every process (ranks, resumed runs)
    return TinyCNN(in_channels, num_classes)


def tiny_cnn():
    """3-channel model with its own transform (resize to 20 x 20)."""
    return _model(), T.Compose([T.Resize((20, 20)), SlowToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])


def tiny_cnn_bare():
    """Model only: the job's --image-size/--mean/--std preprocessing applies."""
    return _model()


def tiny_cnn_gray():
    """1-channel model (images are converted to L)."""
    return _model(in_channels=1), T.Compose([T.Resize((20, 20)), T.ToTensor()])


def tiny_cnn_ten():
    """10 outputs, for the class-count mismatch check."""
    return _model(num_classes=10)


def tiny_cnn_opaque_transform():
    """A transform the job cannot mirror on masks (a plain function)."""
    return _model(), (lambda image: T.functional.to_tensor(image.resize((20, 20))))


def not_a_model():
    return "hello"
