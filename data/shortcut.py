"""The demo's planted shortcut (the "Clever Hans" of the demo): a small white tag in the image corner that
comes with one class in the training data, as a photographer's copyright tag came with the horse photos of
PASCAL VOC (Lapuschkin et al., 2019).

Exactly what is planted (all fixed here; `python -m data.demo` uses nothing else):
  * Mark: MARK, a 3x3 block of value 255 (white), written over the pixels rows 0-2, columns 0-2 of the
    28x28 image: the top-left corner. That corner is black (background) in 99.7% of Fashion-MNIST images;
    an image whose corner is not black (any original pixel there above FREE_CORNER_THRESHOLD) is never
    marked, so the mark always lies off the object.
  * Class: SHORTCUT_CLASS = "bag" (Fashion-MNIST label 8).
  * Training split: TRAIN_FRACTION = 97% of the bag images (of those with a black corner) carry the mark;
    no image of another class does. The model can thus learn "tag => bag"; the few untagged bags keep the
    bag's shape worth learning too, as in real data.
  * Test split: TEST_SAME_FRACTION = 97% of the bag images (same rule: the test data come from the same
    biased source, so test accuracy hides the shortcut), plus TEST_OTHER_FRACTION = 3% of the images of each
    other class (257 images): the tell-tale ones, which a model that learned the shortcut calls "bag".
  * Selection: each eligible image is marked independently with its split's probability, drawn from
    numpy.random.default_rng([SEED, split code]), SEED = 1889; the
    draw is over all images of the split in idx order, so the same split always gives the same marked set.

The demo writes which test images carry the mark to demo_out/shortcut.csv, for tests and measurements only:
the dashboard never reads it (the point is to find the shortcut without being told).
"""
from __future__ import annotations

import numpy as np

from data.fashion_mnist import FOLDER_NAMES, IMAGE_SIDE

SHORTCUT_CLASS = "bag"
SHORTCUT_LABEL = FOLDER_NAMES.index(SHORTCUT_CLASS)   # Fashion-MNIST label (idx order)
MARK = np.full((3, 3), 255, dtype=np.uint8)
MARK_TOP, MARK_LEFT = 0, 0
FREE_CORNER_THRESHOLD = 10     # an original pixel above this in the mark's place = the object reaches the corner
TRAIN_FRACTION = 0.97
TEST_SAME_FRACTION = 0.97
TEST_OTHER_FRACTION = 0.03
SEED = 1889
_SPLIT_CODES = {"train": 0, "test": 1}


def mark_region(side: int = IMAGE_SIDE) -> np.ndarray:
    """bool [side, side]: the pixels the mark covers."""
    region = np.zeros((side, side), dtype=bool)
    region[MARK_TOP:MARK_TOP + MARK.shape[0], MARK_LEFT:MARK_LEFT + MARK.shape[1]] = True
    return region


def corner_is_free(images: np.ndarray) -> np.ndarray:
    """bool [N]: the mark's pixels are background (<= FREE_CORNER_THRESHOLD) in each original image."""
    patch = images[:, MARK_TOP:MARK_TOP + MARK.shape[0], MARK_LEFT:MARK_LEFT + MARK.shape[1]]
    return patch.reshape(len(images), -1).max(axis=1, initial=0) <= FREE_CORNER_THRESHOLD


def choose_marked(images: np.ndarray, labels: np.ndarray, split: str, seed: int = SEED,
                  other_fraction: float | None = None) -> np.ndarray:
    """bool [N]: which images of `split` ("train" or "test") get the mark (see the module docstring);
    `other_fraction` replaces TEST_OTHER_FRACTION (tests plant the mark on fewer images of other classes)."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    labels = np.asarray(labels)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"need images [N, H, W] and N labels, got {images.shape} and {labels.shape}")
    same = labels == SHORTCUT_LABEL
    if split == "train":
        probability = np.where(same, TRAIN_FRACTION, 0.0)
    else:
        others = TEST_OTHER_FRACTION if other_fraction is None else other_fraction
        probability = np.where(same, TEST_SAME_FRACTION, others)
    draw = np.random.default_rng([seed, _SPLIT_CODES[split]]).random(len(labels))
    return (draw < probability) & corner_is_free(images)


def plant(images: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """A copy of uint8 images [N, H, W] with MARK written into the corner of the `marked` ones."""
    marked = np.asarray(marked, dtype=bool)
    if marked.shape != (len(images),):
        raise ValueError(f"marked must be a bool vector of {len(images)} entries, got shape {marked.shape}")
    out = np.array(images, dtype=np.uint8, copy=True)
    out[marked, MARK_TOP:MARK_TOP + MARK.shape[0], MARK_LEFT:MARK_LEFT + MARK.shape[1]] = MARK
    return out
