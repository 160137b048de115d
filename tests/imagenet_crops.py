"""A real 1,000-class cache: scikit-image's photos cut into crops, filed under ImageNet class folders, explained
by the real `python -m analysis explain` with the pretrained EfficientNet-Lite0 (1,000 outputs).

Each photo's crops are spread over a few related ImageNet classes (a cat's crops over tabby / tiger cat /
Egyptian cat, ...), so the labels hold PHOTO_CLASSES' classes and the predictions many more: the setup of the
issue-24 report (a 1,000-output model, tens of classes occurring) at a size the browser tests build in minutes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import IMAGENET_MODEL_FILE, REPO_ROOT, imagenet_class_names, run_command

# skimage.data photo -> the ImageNet classes its crops are filed under (round robin).
PHOTO_CLASSES = {
    "coffee": ("espresso", "cup", "coffee mug"),
    "chelsea": ("tabby", "tiger cat", "Egyptian cat"),
    "rocket": ("missile", "projectile", "space shuttle"),
    "astronaut": ("suit", "lab coat", "mortarboard"),
    "horse": ("sorrel", "moped", "crash helmet"),
    "camera": ("reflex camera", "tripod", "lakeside"),
    "coins": ("coil", "jigsaw puzzle", "analog clock"),
    "page": ("web site", "book jacket", "wall clock"),
}
CROPS_PER_PHOTO = 8
CROP_SIDE = 160       # px of each saved crop (the model's Resize(256) + CenterCrop(224) scales it up)


def write_crops(root: Path, per_photo: int = CROPS_PER_PHOTO, seed: int = 0) -> int:
    """Square crops (a third to all of the photo's shorter side, at random places) of every photo of
    PHOTO_CLASSES as an ImageFolder under `root`; returns the number of crops written."""
    import skimage.data

    rng = np.random.default_rng(seed)
    written = 0
    for photo, classes in PHOTO_CLASSES.items():
        image = Image.fromarray(getattr(skimage.data, photo)()).convert("RGB")
        width, height = image.size
        for k in range(per_photo):
            side = int(rng.uniform(0.35, 1.0) * min(width, height))
            x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            crop = image.crop((x0, y0, x0 + side, y0 + side)).resize((CROP_SIDE, CROP_SIDE), Image.BILINEAR)
            folder = root / classes[k % len(classes)]
            folder.mkdir(parents=True, exist_ok=True)
            crop.save(folder / f"{photo}_{k:02d}.png")
            written += 1
    return written


def make_imagenet_crop_cache(out_dir: Path | str, per_photo: int = CROPS_PER_PHOTO) -> Path:
    """The 1,000-class cache (with its clustering, without concepts) in `out_dir/cache`, made once: a folder whose
    build finished (its `complete` mark) is reused, one left half-built by a killed run is made again. Crops in
    `out_dir/crops`. One process builds at a time (a lock beside the folder)."""
    import fcntl
    import shutil

    out_dir = Path(out_dir)
    cache, done_mark = out_dir / "cache", out_dir / "complete"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f"{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done_mark.exists():
            return cache
        shutil.rmtree(out_dir, ignore_errors=True)
        write_crops(out_dir / "crops", per_photo)
        (out_dir / "imagenet_classes.txt").write_text("\n".join(imagenet_class_names()) + "\n", encoding="utf-8")
        crops, model = str(out_dir / "crops"), f"{IMAGENET_MODEL_FILE}:efficientnet_lite0"
        # The job without its offline analysis, then the clustering alone: the concepts of a 1,000-output model
        # take many times the job's time (the Concepts page then says how to make them; test_concepts covers them).
        steps = (["explain", "--data", crops, "--model", model, "--classes", str(out_dir / "imagenet_classes.txt"),
                  "--out", str(cache), "--device", "cpu", "--workers", "0", "--batch-size", "8", "--map-size", "28",
                  "--descriptor-size", "4", "--quiet", "--no-cluster"],
                 ["cluster", "--cache", str(cache), "--quiet"])
        for arguments in steps:
            code, _, err = run_command(*arguments)
            if code != 0:
                raise RuntimeError(f"`{arguments[0]}` failed ({code}): {err[-2000:]}")
        done_mark.write_text("built\n")
    return cache


def code_fingerprint() -> str:
    """A hash of the product's and this module's source: a kept cache is reused only by the code that made it."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([*(REPO_ROOT / "analysis").rglob("*.py"), Path(__file__), REPO_ROOT / "requirements.txt"]):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
