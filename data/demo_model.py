"""The demo's classifier: a small CNN for 28x28 grayscale Fashion-MNIST images, its training loop, and the
loaders the offline job calls:

    python -m analysis explain --model data/demo_model.py:demo_cnn --checkpoint OUT/model.pt ...

`demo_cnn()` is the architecture and transform; --checkpoint gives the weights (what `python -m data.demo` runs: the
cache's manifest then records where the weights are, and every page that runs the model finds them, whatever
--out was). `load_demo_model()` is the same model with the weights read from $DEMO_MODEL_WEIGHTS, else
demo_out/model.pt: for commands typed by hand. Output i of the model is class CLASS_NAMES[i]: the class folder names sorted, which is
the job's default class order for an ImageFolder, so no --classes file is needed.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from analysis.cache.files import file_replaced_atomically
from data.fashion_mnist import FOLDER_NAMES, IMAGE_SIDE

REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_ENV = "DEMO_MODEL_WEIGHTS"
DEFAULT_WEIGHTS = REPO_ROOT / "demo_out" / "model.pt"
CLASS_NAMES: tuple[str, ...] = tuple(sorted(FOLDER_NAMES))
# Fashion-MNIST label i (idx order) -> model output index (sorted folder names).
OUTPUT_OF_LABEL = np.array([CLASS_NAMES.index(name) for name in FOLDER_NAMES], dtype=np.int64)
# Pixel mean and std of the Fashion-MNIST training images (on 0..1); inputs are standardised with them.
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530


class DemoCNN(nn.Module):
    """Three conv-BN-ReLU blocks at 28, 14 and 7 pixels, global max pooling, one linear layer.

    The global max pooling head (as in weakly supervised localisation networks, Oquab et al. 2015) scores each
    feature by its strongest response anywhere in the image: a small but distinctive detail can decide the
    class, which is exactly the kind of model a shortcut catches. Grad-CAM at the last block is then the
    classic CAM (channel weights = the linear layer's), which FG-CAM refines down to the pixels.
    """

    def __init__(self, num_classes: int = len(CLASS_NAMES), width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def demo_transform() -> Callable[[Any], Tensor]:
    """PIL image -> float tensor [1, 28, 28], standardised. Only value-only steps and a resize, so the job
    can place foreground masks through it."""
    from torchvision import transforms as T   # here: loading the model for a test of its maps needs no torchvision

    return T.Compose([T.Grayscale(1), T.Resize((IMAGE_SIDE, IMAGE_SIDE)), T.ToTensor(),
                      T.Normalize([PIXEL_MEAN], [PIXEL_STD])])


def to_input(images: np.ndarray) -> Tensor:
    """uint8 [N, 28, 28] -> the same float tensor [N, 1, 28, 28] as demo_transform gives for each PNG."""
    return ((torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0 - PIXEL_MEAN) / PIXEL_STD)[:, None]


def weights_path() -> Path:
    return Path(os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS)


def save_weights(model: DemoCNN, path: Path, info: dict[str, Any]) -> None:
    """State dict plus class names, width and `info` (training facts); written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": model.state_dict(), "class_names": list(CLASS_NAMES),
               "width": model.features[0].out_channels, "info": info}
    with file_replaced_atomically(path) as tmp:
        torch.save(payload, tmp)


def load_weights(path: Path) -> tuple[DemoCNN, dict[str, Any]]:
    """The trained model (eval mode) and its saved info; a one-line error naming the fix when unusable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trained demo model at {path}: run `python -m data.demo --no-dashboard` "
                                f"(or `make demo`) first, or set {WEIGHTS_ENV} to the model file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if list(payload["class_names"]) != list(CLASS_NAMES):
            raise ValueError(f"its classes {payload['class_names']} are not {list(CLASS_NAMES)}")
        model = DemoCNN(width=int(payload["width"]))
        model.load_state_dict(payload["state_dict"])
    except Exception as error:
        raise ValueError(f"{path} is not a usable demo model ({type(error).__name__}: {error}); delete it and "
                         "rerun `python -m data.demo` to train it again") from None
    model.eval()
    return model, dict(payload.get("info", {}))


def demo_cnn() -> tuple[nn.Module, Callable[[Any], Tensor]]:
    """For the job's --model data/demo_model.py:demo_cnn --checkpoint OUT/model.pt: (an untrained DemoCNN,
    transform); the checkpoint (save_weights' file: its state dict is taken from it) holds the weights."""
    return DemoCNN(), demo_transform()


def load_demo_model() -> tuple[nn.Module, Callable[[Any], Tensor]]:
    """For the job's --model data/demo_model.py:load_demo_model: (trained DemoCNN in eval mode, transform)."""
    model, _ = load_weights(weights_path())
    return model, demo_transform()


@dataclass
class TrainingResult:
    model: DemoCNN
    seconds: float
    epochs: int
    images: int


def train(images: np.ndarray, labels: np.ndarray, epochs: int = 3, batch_size: int = 128, seed: int = 0,
          width: int = 16, max_lr: float = 1e-2, log: Callable[[str], None] | None = print) -> TrainingResult:
    """Train a DemoCNN from scratch on uint8 images [N, 28, 28] and Fashion-MNIST labels (idx order).

    AdamW with a one-cycle schedule: reaches ~90% test accuracy in 3 epochs (about a minute on 2 CPU cores).
    The high peak rate (1e-2) is ordinary for this schedule; it also makes the network lean on the easiest
    feature it finds, which is how real shortcuts get learned (with 3e-3 the planted mark flips ~10 points
    fewer of the tagged test images). Seeded: the same data and seed give the same weights on one machine.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (got {len(images)} images, {len(labels)} labels)")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = to_input(images)
    targets = torch.from_numpy(OUTPUT_OF_LABEL[np.asarray(labels, dtype=np.int64)])
    model = DemoCNN(width=width)
    optimiser = torch.optim.AdamW(model.parameters(), lr=max_lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(inputs) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=max_lr, total_steps=epochs * steps_per_epoch)
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        total_loss = 0.0
        for start in range(0, len(inputs), batch_size):
            batch = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total_loss += loss.detach().item() * len(batch)
        if log:
            log(f"  epoch {epoch + 1}/{epochs}: loss {total_loss / len(inputs):.3f} "
                f"({time.perf_counter() - started:.0f} s)")
    model.eval()
    return TrainingResult(model=model, seconds=time.perf_counter() - started, epochs=epochs, images=len(inputs))


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Model output indices (CLASS_NAMES order) for uint8 images [N, 28, 28]."""
    model.eval()
    inputs = to_input(images)
    return np.concatenate([model(inputs[i:i + batch_size]).argmax(1).numpy()
                           for i in range(0, len(inputs), batch_size)]) if len(inputs) else np.zeros(0, np.int64)
