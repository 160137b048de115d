"""Tiny real CNNs loaded by the job through `tests/tiny_models.py:<callable>` specs.

EXPLAIN_TEST_SLEEP (seconds per image, read when the transform runs) makes the job deterministically slow,
for the kill -9 test: the sleep sits in preprocessing, which the job runs for every image.
EXPLAIN_TEST_DIE_AFTER=N makes the process kill itself (SIGKILL, as kill -9 would) when the transform is about
to run for the (N+1)-th time: a job stopped half-way, at once and without a timing loop. With
EXPLAIN_TEST_SHARDS=DIR/shards only the calls made once that folder exists count (the job's set-up runs the
transform too, more often for a transform whose geometry it measures), and the kill first waits for a committed
shard there (the writer thread's speed on a loaded machine then does not matter).
EXPLAIN_TEST_STALL_AFTER=N makes the transform stall (sleep STALL_SECONDS) from its (N+1)-th call in a process on,
counted as for EXPLAIN_TEST_DIE_AFTER: a DataLoader worker stuck in a slow read, which outlives its killed parent.
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


STALL_SECONDS = 120.0


class SlowToTensor(T.ToTensor):
    """ToTensor that sleeps EXPLAIN_TEST_SLEEP seconds per image (0 when unset); still a value-only step, so
    the job can place masks through this transform."""

    calls = 0  # in this process

    def __call__(self, image):
        delay = float(os.environ.get("EXPLAIN_TEST_SLEEP", "0") or 0)
        if delay:
            time.sleep(delay)
        die_after = os.environ.get("EXPLAIN_TEST_DIE_AFTER")
        stall_after = os.environ.get("EXPLAIN_TEST_STALL_AFTER")
        shards_dir = os.environ.get("EXPLAIN_TEST_SHARDS")
        if (die_after or stall_after) and (not shards_dir or os.path.isdir(shards_dir)):  # set-up calls do not count
            SlowToTensor.calls += 1
            if die_after and SlowToTensor.calls > int(die_after):
                _wait_for_a_commit(shards_dir)
                os.kill(os.getpid(), signal.SIGKILL)
            if stall_after and SlowToTensor.calls > int(stall_after):
                time.sleep(STALL_SECONDS)
        return super().__call__(image)


def _wait_for_a_commit(shards_dir: str | None, timeout: float = 120.0) -> None:
    """Before the kill: wait until the job's writer thread has committed a shard into ``shards_dir`` (when
    given), so "killed half-way" never depends on how fast that thread runs on a loaded machine."""
    if not shards_dir:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.isdir(shards_dir) and any(n.startswith("shard-") for n in os.listdir(shards_dir)):
            return
        time.sleep(0.05)


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
    """A plain function: the job cannot read its steps, and measures its geometry with probe images."""
    return _model(), (lambda image: T.functional.to_tensor(image.resize((20, 20))))


def tiny_cnn_random_transform():
    """A random crop: no crop box can be known (the job must say so, and refuse masks it cannot place)."""
    return _model(), T.Compose([T.RandomResizedCrop(20), T.ToTensor()])


def not_a_model():
    return "hello"


class _RunningSum(nn.Module):
    """A block whose forward calls an op FG-CAM has no rule for (a cumulative sum mixes pixels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(self.conv(x), dim=3)


def cnn_with_unsupported_op():
    """TinyCNN with a cumulative sum inside `features.2` (for check-model's 'no rule' report)."""
    model = _model()
    model.features[2] = _RunningSum()
    return model


class BrightnessCNN(nn.Module):
    """Hand-weighted, no training: output 0's logit is the mean over the image of relu(brightness - 0.5)
    (brightness: the mean of the three channels in 0..1), output 1's the negative. Its evidence for class 0 is
    exactly the bright pixels, so its map must peak on a bright marker wherever the preprocessing puts it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 1, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.features[0].weight.fill_(1.0 / 3.0)
            self.features[0].bias.fill_(-0.5)
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


def _crop_and_shrink(image):
    """A user's own preprocessing as a plain function (the job measures its geometry): the region x 100..400,
    y 30..270 of a 500 x 300 image, shrunk to 150 x 120 (an aspect change)."""
    return T.functional.to_tensor(image.crop((100, 30, 400, 270)).resize((150, 120)))


def brightness_center_crop():
    return BrightnessCNN(), T.Compose([T.CenterCrop(200), T.ToTensor()])


def brightness_resize_square():
    return BrightnessCNN(), T.Compose([T.Resize((160, 160)), T.ToTensor()])


def brightness_resize_short_side():
    return BrightnessCNN(), T.Compose([T.Resize(150), T.ToTensor()])


def brightness_padding_crop():
    """A centre crop taller than a 500 x 300 image: torchvision pads 10 rows above and below."""
    return BrightnessCNN(), T.Compose([T.CenterCrop((320, 480)), T.ToTensor()])


def brightness_own_function():
    return BrightnessCNN(), _crop_and_shrink


def brightness_crop30():
    """CenterCrop(30): a 60 x 30 image loses 15 columns on each side."""
    return BrightnessCNN(), T.Compose([T.CenterCrop(30), T.ToTensor()])


def tiny_vit():
    """A one-layer torchvision VisionTransformer on 20 px images: its CAM layer outputs tokens [N, 17, 8], not a
    feature map (check-model and explain must refuse it in one line)."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=20, patch_size=5, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                             num_classes=3).eval()
