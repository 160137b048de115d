"""Label noise to measure the label-error ranking against (`analysis.review.label_issues`): Fashion-MNIST test
images written as an ImageFolder, with `count` images of one class saved in another class's folder, as a
careless annotator would file them. The images are the plain originals unless `marked` asks for the demo's
shortcut mark on some (data/label_audit.py: flips and a shortcut together); by default test images 1000-2999, which the small demo's test split (the first 1,000) does not use."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data.fashion_mnist import DEBIAN_DIR, FOLDER_NAMES, read_split

DEFAULT_INDICES = range(1000, 3000)


def write_moved_split(root: Path, source_class: str, target_class: str, count: int = 100,
                      indices: range | np.ndarray = DEFAULT_INDICES, seed: int = 0,
                      fashion_mnist_dir: Path = DEBIAN_DIR, marked: np.ndarray | None = None) -> list[str]:
    """Write root/<class>/<index:05d>.png for the test images `indices`, `count` of those of `source_class`
    (a seeded sample, never a `marked` one) into `target_class`'s folder. `marked` (bool, one per index): the
    images that get the demo's shortcut mark (data/shortcut.py). Returns the moved images' paths relative to
    root."""
    from PIL import Image

    from data.shortcut import plant

    for name in (source_class, target_class):
        if name not in FOLDER_NAMES:
            raise ValueError(f"{name!r} is not a Fashion-MNIST class folder ({', '.join(FOLDER_NAMES)})")
    test = read_split(Path(fashion_mnist_dir), "test")
    indices = np.asarray(indices, dtype=np.int64)
    labels = test.labels[indices]
    marked = np.zeros(len(indices), bool) if marked is None else np.asarray(marked, bool)
    if marked.shape != indices.shape:
        raise ValueError(f"marked must hold one flag per index ({len(indices)}), got shape {marked.shape}")
    images = plant(test.images[indices], marked)
    candidates = indices[(labels == FOLDER_NAMES.index(source_class)) & ~marked]
    if len(candidates) < count:
        raise ValueError(f"only {len(candidates)} {source_class} images among the chosen indices, {count} asked")
    moved = set(np.random.default_rng(seed).choice(candidates, size=count, replace=False).tolist())
    for name in FOLDER_NAMES:
        (Path(root) / name).mkdir(parents=True, exist_ok=True)
    paths = []
    for index, label, image in zip(indices.tolist(), labels.tolist(), images):
        folder = target_class if index in moved else FOLDER_NAMES[label]
        Image.fromarray(image, "L").save(Path(root) / folder / f"{index:05d}.png")
        if index in moved:
            paths.append(f"{folder}/{index:05d}.png")
    return sorted(paths)
