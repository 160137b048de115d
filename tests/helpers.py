"""Test and benchmark helpers: synthetic cache records, small generated datasets, and `make_small_cache`.

Everything here writes real files and, for `make_small_cache`, runs the real job (real FG-CAM engine on a
tiny real CNN) in a subprocess-free, in-process call of `analysis.pipeline.job.run_job`.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from analysis.cache import CacheWriter, ShardRecords

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_FILE = Path(__file__).resolve().parent / "tiny_models.py"
IMAGENET_MODEL_FILE = Path(__file__).resolve().parent / "imagenet_models.py"
CLASS_NAMES = ("cat", "dog", "fox")


# ----------------------------------------------------------------------------------------------------------
# Synthetic shard records (for cache tests and the 100k-row benchmark; no model involved)
# ----------------------------------------------------------------------------------------------------------

def synthetic_records(ids: Sequence[int], map_size: int = 8, descriptor_size: int = 4, num_classes: int = 3,
                      seed: int = 0, with_foreground: bool = True, magnitude: float = 1e-7) -> ShardRecords:
    """Deterministic ShardRecords for `ids`: every third image is misclassified; maps of tiny magnitude."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    rng = np.random.default_rng(seed + (int(ids[0]) if n else 0))
    label = ids % num_classes
    correct = ids % 3 != 0
    pred = np.where(correct, label, (label + 1) % num_classes)
    probs = rng.dirichlet(np.ones(num_classes), size=n).astype(np.float32)
    order = np.argsort(-probs, axis=1)[:, :5]
    rows = pd.DataFrame({
        "id": ids,
        "path": [f"{CLASS_NAMES[i % 3]}/img_{i:07d}.png" for i in ids],
        "label": label,
        "pred": pred,
        "label_name": [CLASS_NAMES[i % 3] for i in label],
        "pred_name": [CLASS_NAMES[i % 3] for i in pred],
        "confidence": probs.max(axis=1),
        "top5_classes": [list(map(int, r)) for r in order],
        "top5_probs": [list(map(float, p[r])) for p, r in zip(probs, order)],
        "correct": correct,
        "background_share": rng.random(n).astype(np.float32),
        "background_hotspot": rng.random(n).astype(np.float32),
        "border_share": rng.random(n).astype(np.float32),
        "concentration": rng.random(n).astype(np.float32),
        "has_foreground": np.full(n, with_foreground),
    })
    maps_pred = (rng.standard_normal((n, map_size, map_size)) * magnitude).astype(np.float32)
    maps_true = (rng.standard_normal((int((~correct).sum()), map_size, map_size)) * magnitude).astype(np.float32)
    desc = rng.random((n, descriptor_size * descriptor_size)).astype(np.float32)
    desc /= desc.sum(axis=1, keepdims=True)
    fg = rng.random((n, map_size, map_size)) > 0.5 if with_foreground else None
    return ShardRecords(rows=rows, maps_pred=maps_pred, maps_true=maps_true, descriptors_positive=desc,
                        descriptors_absolute=np.sqrt(desc) / np.sqrt(desc).sum(axis=1, keepdims=True),
                        foreground=fg, errors=pd.DataFrame({"id": [], "path": [], "reason": []}))


def synthetic_manifest(root: Path, n_images: int, map_size: int = 8, finished: bool = True) -> dict:
    return {
        "format_version": 1, "created": "2024-01-01T00:00:00", "updated": "2024-01-01T00:00:00",
        "finished": "2024-01-01T00:00:00" if finished else None,
        "model": {"spec": "synthetic", "weights_sha256": "0" * 64, "checkpoint": None, "num_classes": 3},
        "dataset": {"root": str(root), "kind": "imagefolder", "fingerprint": "x", "n_images": n_images},
        "options": {"map_size": map_size, "descriptor_size": 4, "masks": None, "boxes": None},
        "class_names": list(CLASS_NAMES),
        "counts": {"images": n_images}, "software": {},
    }


def write_synthetic_cache(out_dir: Path, n_images: int, shard_size: int, map_size: int = 8,
                          compact: bool = True) -> CacheWriter:
    writer = CacheWriter(out_dir)
    writer.initialise()
    writer.write_manifest(synthetic_manifest(out_dir / "images", n_images, map_size))
    for shard in range((n_images + shard_size - 1) // shard_size):
        ids = np.arange(shard * shard_size, min((shard + 1) * shard_size, n_images))
        writer.write_shard(shard, synthetic_records(ids, map_size=map_size))
    if compact:
        writer.compact()
    return writer


# ----------------------------------------------------------------------------------------------------------
# Generated image datasets
# ----------------------------------------------------------------------------------------------------------

def square_box(class_index: int, image_index: int, size: int = 20) -> tuple[int, int, int, int]:
    """The object of an image: a square of side size//3 at an image-dependent place (x0, y0, x1, y1)."""
    side = size // 3
    rng = np.random.default_rng(7919 * class_index + image_index)
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    return x0, y0, x0 + side, y0 + side


def class_image(class_index: int, image_index: int, size: int = 20, mode: str = "RGB",
                colour_index: int | None = None) -> Image.Image:
    """A small image whose class is the colour (red, green, blue) of a square object on a dark noisy ground.

    `colour_index` other than the class makes a mislabelled image (the model will predict the colour).
    """
    rng = np.random.default_rng(1000 * class_index + image_index)
    pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    x0, y0, x1, y1 = square_box(class_index, image_index, size)
    pixels[y0:y1, x0:x1] = 40
    pixels[y0:y1, x0:x1, (class_index if colour_index is None else colour_index) % 3] = 240
    image = Image.fromarray(pixels, "RGB")
    if mode == "RGB":
        return image
    if mode in ("I;16", "I"):
        gray = np.asarray(image.convert("L"), dtype=np.int32) * 257  # full 16-bit range
        return Image.fromarray(gray.astype(np.uint16)) if mode == "I;16" else Image.fromarray(gray, "I")
    return image.convert(mode)


def make_image_folder(root: Path, classes: Sequence[str] = CLASS_NAMES, per_class: int = 8, size: int = 20,
                      modes: Sequence[str] = ("RGB",), mislabelled: int = 0) -> list[str]:
    """Write root/<class>/img_<k>.png; mode cycles through `modes`; the last `mislabelled` images of each
    class show the next class's colour (so a trained model gets them wrong). Returns the sorted paths."""
    paths = []
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            mode = modes[(c * per_class + k) % len(modes)]
            relative = f"{name}/img_{k:03d}.{'tif' if mode == 'I' else 'png'}"  # PNG cannot hold mode I
            colour = (c + 1) % len(classes) if k >= per_class - mislabelled else c
            class_image(c, k, size, mode, colour).save(root / relative)
            paths.append(relative)
    return sorted(paths)


def cell_majority(mask: np.ndarray, size: int) -> np.ndarray:
    """bool [size, size]: the cells of a size x size grid over a whole square mask that the mask covers at
    least half of. Computed independently of analysis.pipeline.geometry: each pixel is repeated into an lcm x lcm
    block of sub-pixels, so that every cell is a whole number of them, and each cell's sub-pixels are averaged."""
    side = mask.shape[0]
    assert mask.shape == (side, side)
    fine = int(np.lcm(side, size))
    sub = np.kron(mask.astype(np.float64), np.ones((fine // side, fine // side)))
    step = fine // size
    return sub.reshape(size, step, size, step).mean(axis=(1, 3)) >= 0.5


def make_mask_folder(image_root: Path, mask_root: Path, size: int = 20) -> None:
    """One mask PNG per image, mirroring the tree: the object square (see `square_box`) is foreground."""
    classes = sorted(p.name for p in image_root.iterdir() if p.is_dir())
    for path in sorted(image_root.rglob("*")):
        if path.is_file() and path.stem.startswith("img_") and path.stem[4:].isdigit():  # generated images only
            relative = path.relative_to(image_root).with_suffix(".png")
            class_index = classes.index(relative.parts[0])
            image_index = int(path.stem.split("_")[-1])
            mask = np.zeros((size, size), np.uint8)
            x0, y0, x1, y1 = square_box(class_index, image_index, size)
            mask[y0:y1, x0:x1] = 255
            (mask_root / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask, "L").save(mask_root / relative)


# ----------------------------------------------------------------------------------------------------------
# The real job on a small dataset
# ----------------------------------------------------------------------------------------------------------

def job_arguments(data: Path, out: Path, *extra: str, model: str | None = None) -> list[str]:
    """`python -m analysis` ARGV of the explain job on `data` (the tiny CNN unless `model`), for run_command."""
    return ["explain", "--data", str(data), "--model", model or f"{TINY_MODEL_FILE}:tiny_cnn", "--out", str(out),
            "--device", "cpu", "--workers", "0", *extra]


def job_command(data: Path, out: Path, *extra: str, model: str | None = None) -> list[str]:
    """The explain job as a command line, for a test that needs its own process (killed, or run beside another)."""
    return [sys.executable, "-m", "analysis", *job_arguments(data, out, *extra, model=model)]


def train_tiny_cnn(image_root: Path, checkpoint: Path, steps: int = 60, seed: int = 0, lr: float = 0.02) -> Path:
    """Train tests/tiny_models.py:tiny_cnn briefly on an ImageFolder and save its state dict (for --checkpoint).

    A trained model gives maps with positive relevance on the class square (a random one often gives none).
    """
    import torch
    from torchvision.datasets import ImageFolder

    from tests.tiny_models import tiny_cnn

    model, transform = tiny_cnn()
    dataset = ImageFolder(str(image_root), transform=transform)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    fit(model, images, labels, steps, lr=lr, seed=seed, batch_size=16)
    torch.save(model.state_dict(), checkpoint)
    return checkpoint


def small_cache_arguments(out_dir: Path) -> list[str]:
    """The `python -m analysis` arguments `make_small_cache` runs (for tests that re-run them)."""
    return ["explain", "--data", str(out_dir / "images"), "--model", f"{TINY_MODEL_FILE}:tiny_cnn",
            "--checkpoint", str(out_dir / "tiny_cnn.pth"), "--out", str(out_dir / "cache"),
            "--masks", str(out_dir / "masks"), "--device", "cpu", "--workers", "0", "--batch-size", "8",
            "--map-size", "16", "--descriptor-size", "4", "--quiet"]


def blobs(centres: int, per: int, dim: int = 16, spread: float = 0.02, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`centres` tight groups of unit-mass descriptors (clustering tests), each concentrated on its own block of
    cells: (descriptors float32 [centres * per, dim], group of each row)."""
    rng = np.random.default_rng(seed)
    rows, truth = [], []
    block = dim // centres
    for c in range(centres):
        base = np.full(dim, 0.01)
        base[c * block:(c + 1) * block] = 1.0
        points = np.abs(base + rng.normal(0, spread, (per, dim)))
        rows.append(points / points.sum(axis=1, keepdims=True))
        truth += [c] * per
    return np.concatenate(rows).astype(np.float32), np.array(truth)


# Every test that trains a model asserts a property that must hold for another training run too (another CPU
# sums floats in another order, so its model differs). FGCAM_TEST_SEED=2 reruns them with other weights and
# batches (`fit`) and another small demo (tests/conftest.py): `FGCAM_TEST_SEED=2 make test` (the demo's tests are
# marked slow: `make test-quick` leaves them out). Unset: 0.
SEED_ENV = "FGCAM_TEST_SEED"


def seed_offset() -> int:
    """The FGCAM_TEST_SEED added to every training seed of the tests (0 when unset)."""
    return int(os.environ.get(SEED_ENV, "0"))


def fit(model: "torch.nn.Module", images: "torch.Tensor", labels: "torch.Tensor", steps: int, lr: float,
        seed: int = 0, batch_size: int = 32) -> "torch.nn.Module":
    """Train `model` for `steps` Adam steps on random batches of (images, labels), the batches drawn from a
    generator seeded with `seed`; returns it in eval mode (the small planted-data models of the tests).
    With FGCAM_TEST_SEED set, the weights are first drawn again and the batches drawn with another seed."""
    import torch
    import torch.nn.functional as F

    if seed_offset():
        torch.manual_seed(seed + seed_offset())
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed + seed_offset())
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(images), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def make_small_cache(out_dir: Path | str) -> Path:
    """Build a small real cache: a 3-class x 8-image ImageFolder with masks, a briefly trained tiny CNN, the
    real job (real FG-CAM engine, real files).

    Returns the cache directory (`out_dir/cache`). The images are in `out_dir/images`, masks in `out_dir/masks`,
    the model's state dict in `out_dir/tiny_cnn.pth`.
    """
    from analysis.__main__ import main as job_main

    out_dir = Path(out_dir)
    cache = out_dir / "cache"
    if not (cache / "manifest.json").exists():
        make_image_folder(out_dir / "images", per_class=8, size=20, mislabelled=1)
        make_mask_folder(out_dir / "images", out_dir / "masks", size=20)
        train_tiny_cnn(out_dir / "images", out_dir / "tiny_cnn.pth")
        code = job_main(small_cache_arguments(out_dir))
        if code != 0:
            raise RuntimeError(f"the explain job failed with exit code {code}")
    return cache


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """`python -m analysis ARGV` in this process (argparse errors exit through SystemExit, as the real
    command does) -> (exit code, stdout, stderr)."""
    capsys.readouterr()
    return run_command(*argv)


def run_command(*argv: str) -> tuple[int, str, str]:
    """`python -m analysis ARGV` in this process, for a fixture too (no capsys) -> (exit code, stdout, stderr).
    A child process would import torch, torchvision and scikit-learn again: 3-5 s a command."""
    from data.in_process import captured, run_analysis

    return captured(run_analysis, list(argv))


def run_demo(*argv: str) -> tuple[int, str, str]:
    """`python -m data.demo ARGV` in this process -> (exit code, stdout, stderr): a child would import torch,
    torchvision and scikit-learn again (3-5 s a build)."""
    from data import demo
    from data.in_process import captured

    return captured(demo.main, list(argv))


# ----------------------------------------------------------------------------------------------------------
# Real photos, a real pretrained ImageNet model, the real command
# ----------------------------------------------------------------------------------------------------------

# scikit-image's photos as an ImageFolder: (file, class folder = the true ImageNet class, skimage.data name,
# a box around the object in original pixels, judged by eye on the photo).
PHOTOS = (("espresso/coffee.png", "espresso", "coffee", (170, 15, 415, 305)),      # 600 x 400, the cup
          ("missile/rocket.png", "missile", "rocket", (300, 125, 340, 410)),      # 640 x 427, the rocket
          ("tabby/chelsea.png", "tabby", "chelsea", (0, 0, 390, 300)))            # 451 x 300, the cat's head


def imagenet_class_names() -> list[str]:
    """torchvision's ImageNet-1k category names (index = model output), made unique (two are listed twice)."""
    from torchvision.models import ResNet18_Weights

    names: list[str] = []
    for name in ResNet18_Weights.IMAGENET1K_V1.meta["categories"]:
        names.append(name if name not in names else f"{name} ({len(names)})")
    return names


def photo_job_arguments(out_dir: Path) -> list[str]:
    """`python -m analysis` arguments of the photo cache (see make_photo_cache)."""
    return ["explain", "--data", str(out_dir / "photos"), "--model", f"{IMAGENET_MODEL_FILE}:efficientnet_lite0",
            "--classes", str(out_dir / "imagenet_classes.txt"), "--boxes", str(out_dir / "boxes.csv"),
            "--out", str(out_dir / "cache"), "--device", "cpu", "--workers", "0", "--batch-size", "3",
            "--map-size", "28", "--descriptor-size", "4", "--quiet"]


def make_photo_cache(out_dir: Path | str) -> Path:
    """A real cache of real non-square photos (scikit-image's coffee, rocket, chelsea written as PNG files into
    an ImageFolder) explained by the real `python -m analysis explain` command (in this process) with a pretrained
    EfficientNet-Lite0 and torchvision's standard Resize(256) + CenterCrop(224), boxes around the objects,
    map size 28 (8 x 8 input pixels a cell). Returns `out_dir/cache`."""
    import skimage.data

    out_dir = Path(out_dir)
    cache = out_dir / "cache"
    if (cache / "manifest.json").exists():
        return cache
    for relative, _, name, _ in PHOTOS:
        (out_dir / "photos" / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(skimage.data, name)()).save(out_dir / "photos" / relative)
    (out_dir / "imagenet_classes.txt").write_text("\n".join(imagenet_class_names()) + "\n", encoding="utf-8")
    (out_dir / "boxes.csv").write_text("path,x0,y0,x1,y1\n" + "".join(
        f"{relative},{','.join(map(str, box))}\n" for relative, _, _, box in PHOTOS))
    code, _, err = run_command(*photo_job_arguments(out_dir))
    if code != 0:
        raise RuntimeError(f"the explain job failed ({code}): {err[-2000:]}")
    return cache


APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
PAGE_TEXT_KINDS = ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error", "exception")


def open_page(monkeypatch: "pytest.MonkeyPatch", cache_dir: Path, page: str,
              query: dict[str, object] | None = None) -> "AppTest":
    """The real dashboard (streamlit's AppTest) on `cache_dir`, at `page` (a file of dashboard/views without
    .py) with `query` in its URL, as a user's link opens it: one run of the shell, which registers its pages and
    runs the page the link names. Before a first run AppTest knows a page by its file name only, so a page whose
    URL path is another (per_class: per-class) is opened after a run that registers the pages (which draws the
    first page: 0.3 s more)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FGCAM_CACHE", str(cache_dir))
    at = AppTest.from_file(APP, default_timeout=300)
    if page not in _pages_named_by_their_file():
        at.run()
    at.switch_page(f"views/{page}.py")
    for name, value in (query or {}).items():
        at.query_params[name] = str(value)
    at.run()
    return at


@functools.cache
def _pages_named_by_their_file() -> frozenset[str]:
    """The dashboard's pages whose URL path is their file's name (read from dashboard/app.py's PAGES table)."""
    import ast

    tree = ast.parse(Path(APP).read_text(encoding="utf-8"))
    table = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "PAGES" for t in node.targets))
    rows = [row for section in ast.literal_eval(table).values() for row in section]
    return frozenset(file[:-3] for file, _, url, _ in rows if file[:-3] == url)


def page_texts(at: "AppTest") -> str:
    """Every text element of a page run, one per line."""
    return "\n".join(str(e.value) for kind in PAGE_TEXT_KINDS for e in at.get(kind))
