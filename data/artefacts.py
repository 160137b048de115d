"""The artefacts the Clever-Hans benchmark plants (issue 21): kinds the finder was never shown.

Each kind is a function `plant(images, rng) -> (planted, placed)` on uint8 Fashion-MNIST images [N, 28, 28]
(white object on black): `planted` is a copy with the artefact on every image where `placed` is True (an image
that cannot take it -- no free border, no object -- is left as it is and is not a carrier). Removing the
artefact is exact: the original image is kept, so the benchmark's ground truth ("the artefact drives this
prediction") is the model's prediction on the carrier against its prediction on the original.

The kinds break one assumption of the first finder (a 3x3 tag at one fixed corner) each:
  * fixed_place: a 4x4 checkerboard at the bottom-right corner (another place and pattern than the demo's);
  * random_place: the same checkerboard at a random place along the border, so clusters of maps split it by
    place;
  * on_object: the checkerboard centred on the object (a stamp over it), so "off the object" is false;
  * background: every background pixel set to grey, an artefact spread over most of the image;
  * stripes: a faint vertical sine grating over the whole image (a frequency pattern);
  * blur: a Gaussian blur of the whole image (sigma 0.7 px), an artefact the eye hardly sees at this size.
The real one (imagenet-w's watermark on photos with the pretrained EfficientNet-Lite0) lives with the
benchmark (bench/clever_hans.py), as it needs the test-only model.

`random_backgrounds` is not an artefact but a control: every image of every class gets a background of a
random grey, so that backgrounds vary as in photos yet say nothing of the class (a clean control on which a
test of the background can raise a false alarm, where plain Fashion-MNIST's black backgrounds cannot).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

FREE = 10                    # a pixel at or below this is background (as data/shortcut.py's corner rule)
PATCH = np.kron(np.array([[255, 0], [0, 255]], np.uint8), np.ones((2, 2), np.uint8))   # 4x4 checkerboard
BORDER = 2                   # random_place: the patch starts within this many pixels of an edge
GREY = 90                    # background: the grey the background becomes
STRIPE_AMPLITUDE, STRIPE_PERIOD = 28.0, 4.0
BLUR_SIGMA = 0.7

Plant = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ArtefactKind:
    name: str
    spread: str              # "region" (a patch), "spread" (over the image) or "invisible"
    plant: Plant
    description: str


def _patch_fits(image: np.ndarray, top: int, left: int) -> bool:
    side = PATCH.shape[0]
    return bool(image[top:top + side, left:left + side].max(initial=0) <= FREE)


def _paste(images: np.ndarray, where: list[tuple[int, int] | None]) -> tuple[np.ndarray, np.ndarray]:
    out, side = np.array(images, np.uint8, copy=True), PATCH.shape[0]
    for image, place in zip(out, where):
        if place is not None:
            image[place[0]:place[0] + side, place[1]:place[1] + side] = PATCH
    return out, np.array([place is not None for place in where], bool)


def fixed_place(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    top = left = images.shape[1] - PATCH.shape[0]
    return _paste(images, [(top, left) if _patch_fits(image, top, left) else None for image in images])


def random_place(images: np.ndarray, rng: np.random.Generator, tries: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """A free place along one of the four edges (the patch within BORDER pixels of it), drawn per image."""
    last = images.shape[1] - PATCH.shape[0]
    where = []
    for image in images:
        place = None
        for _ in range(tries):
            along, off, edge = int(rng.integers(0, last + 1)), int(rng.integers(0, BORDER + 1)), int(rng.integers(4))
            top, left = [(off, along), (last - off, along), (along, off), (along, last - off)][edge]
            if _patch_fits(image, top, left):
                place = (top, left)
                break
        where.append(place)
    return _paste(images, where)


def on_object(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The patch centred on the object's centre of mass (pixels above FREE); its black squares show on it."""
    last = images.shape[1] - PATCH.shape[0]
    where = []
    for image in images:
        rows, cols = np.nonzero(image > FREE)
        if len(rows) < PATCH.size:
            where.append(None)
            continue
        top, left = (int(np.clip(round(float(v.mean())) - PATCH.shape[0] // 2, 0, last)) for v in (rows, cols))
        where.append((top, left))
    return _paste(images, where)


def _with_backgrounds(images: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a copy with each image's background -- the pixels outside the hole-filled object, as the demo's masks --
    set to its grey in `levels` [N], the background masks)."""
    from data.demo import foreground_masks

    out = np.array(images, np.uint8, copy=True)
    back = ~foreground_masks(images, FREE)
    out[back] = np.broadcast_to(np.asarray(levels, np.uint8)[:, None, None], out.shape)[back]
    return out, back


def background(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background (pixels outside the hole-filled object, as the demo's masks) set to GREY."""
    out, back = _with_backgrounds(images, np.full(len(images), GREY))
    return out, back.reshape(len(images), -1).any(axis=1)


def random_backgrounds(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image's background (as `background`) set to its own grey, drawn uniformly from 0 to 2 * GREY."""
    return _with_backgrounds(images, rng.integers(0, 2 * GREY + 1, len(images)))[0]


def stripes(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A vertical sine grating added to every pixel (period STRIPE_PERIOD px, +-STRIPE_AMPLITUDE grey levels)."""
    wave = STRIPE_AMPLITUDE * (0.5 + 0.5 * np.sin(2 * np.pi * np.arange(images.shape[2]) / STRIPE_PERIOD))
    out = np.clip(images.astype(np.float32) + wave[None, None, :], 0, 255).round().astype(np.uint8)
    return out, np.ones(len(images), bool)


def blur(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from scipy.ndimage import gaussian_filter

    out = gaussian_filter(images.astype(np.float32), sigma=(0, BLUR_SIGMA, BLUR_SIGMA))
    return np.clip(out, 0, 255).round().astype(np.uint8), np.ones(len(images), bool)


KINDS: dict[str, ArtefactKind] = {kind.name: kind for kind in (
    ArtefactKind("fixed_place", "region", fixed_place, "4x4 checkerboard, bottom-right corner"),
    ArtefactKind("random_place", "region", random_place, "4x4 checkerboard, random place along the border"),
    ArtefactKind("on_object", "region", on_object, "4x4 checkerboard stamped on the object's centre"),
    ArtefactKind("background", "spread", background, f"background set to grey ({GREY})"),
    ArtefactKind("stripes", "spread", stripes, f"vertical sine grating, period {STRIPE_PERIOD:g} px"),
    ArtefactKind("blur", "invisible", blur, f"Gaussian blur, sigma {BLUR_SIGMA:g} px"),
)}


def plant_split(images: np.ndarray, labels: np.ndarray, kind: str, target: int, target_fraction: float,
                other_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(planted images, carriers): each image of class `target` is chosen with `target_fraction`, each other one
    with `other_fraction` (seeded), and the artefact `kind` planted on the chosen ones that can take it."""
    if kind not in KINDS:
        raise ValueError(f"unknown artefact kind {kind!r}: one of {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    chosen = rng.random(len(labels)) < np.where(np.asarray(labels) == target, target_fraction, other_fraction)
    planted = np.array(images, np.uint8, copy=True)
    if chosen.any():
        planted[chosen], placed = KINDS[kind].plant(images[chosen], rng)
        carriers = np.zeros(len(labels), bool)
        carriers[np.nonzero(chosen)[0][placed]] = True
        planted[chosen & ~carriers] = images[chosen & ~carriers]
        return planted, carriers
    return planted, chosen
