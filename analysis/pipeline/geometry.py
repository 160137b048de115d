"""Where the model's input lies in the original image, and moving maps and masks between the two frames.

A classifier's preprocessing resizes and crops: with torchvision's standard Resize(256) + CenterCrop(224), a
600 x 400 photo becomes the 224 x 224 centre of a 384 x 256 resize, so the model sees the region x 125..475,
y 25..375 of the original. Every map the job computes lives in that *model frame*; drawn over the whole photo,
or scored against a mask given in original pixels, it lands on the wrong pixels.

The relation is recorded per image as the original size and the *crop box*: the rectangle (x0, y0, x1, y1),
in original pixel coordinates (continuous: pixel i spans [i, i + 1)), that the model's input covers. A resize
only scales, so the model frame is the crop box stretched to the input size (an aspect change where the box's
aspect ratio and the input's differ). A centre crop larger than the image pads with zeros: the box then reaches
outside the image, where no original pixel (and no object) lies.

How the box is found (our method; torchvision documents the transforms, not this inverse):
* **derived** when every step of the transform is known: torchvision Resize and CenterCrop (v1 and v2,
  Resize of the short side, to (h, w), with max_size or size None), the weights' ImageClassification presets,
  and value-only steps (ToTensor, Normalize, ...). The arithmetic mirrors torchvision's own (output sizes
  truncated to integers, crop offsets rounded half to even, padding split floor / ceil).
* **measured** for any other transform: probe images (black, white, a horizontal and a vertical 8-bit ramp)
  go through the whole transform. Calibrated per channel by the black and white probes, a ramp's value at an
  output pixel says which original coordinate landed there; a straight-line fit per axis gives the box. The
  fit is accepted only when the transform is deterministic and the fit explains every interior output pixel
  to within two ramp steps; a random, flipping, rotating or warping transform fails, and its geometry is
  *unknown*: the cache says so instead of guessing.

Moving between frames (separable along the axes, so exact for an axis-aligned box):
* `analysis.cache.placement.place_map`: a map [m, n] of the model frame -> [H, W] over the original image,
  bilinear between the map's cell centres, NaN where the model never looked (the cache's `map_in_image`);
* `frame_coverage`: a mask in original pixels -> [m, n], the share of each map cell that the object covers
  (exact area overlap); a cell belongs to the foreground when at least half of it does (`foreground_in_frame`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from analysis.cache.placement import Box, check_box

GEOMETRY_METHODS = ("derived", "measured", "unknown")


# ----------------------------------------------------------------------------------------------------------
# Moving maps and masks between the model frame and the original image
# ----------------------------------------------------------------------------------------------------------

def _overlaps(start: float, stop: float, cells: int, length: int) -> np.ndarray:
    """[cells, length]: how much of pixel i = [i, i + 1) lies in cell j = [start + j s, start + (j + 1) s)."""
    edges = start + (stop - start) * np.arange(cells + 1, dtype=np.float64) / cells
    pixels = np.arange(length, dtype=np.float64)
    return np.clip(np.minimum(edges[1:, None], pixels[None, :] + 1) - np.maximum(edges[:-1, None], pixels[None, :]),
                   0.0, None)


def frame_coverage(mask: np.ndarray, box: Sequence[float], rows: int, columns: int | None = None) -> np.ndarray:
    """float32 [rows, columns]: the share of each model-frame cell that the True pixels of `mask` (bool [H, W],
    original pixels) cover. Parts of a cell outside the image (padding) count as not covered."""
    x0, y0, x1, y1 = check_box(box)
    columns = rows if columns is None else columns
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    along_y = _overlaps(y0, y1, rows, height)          # [rows, H]
    along_x = _overlaps(x0, x1, columns, width)        # [columns, W]
    used_y, used_x = along_y.any(axis=0), along_x.any(axis=0)  # only the pixels inside the box are read
    inside = mask[np.ix_(used_y, used_x)].astype(np.float32)     # float32: a 12-megapixel mask stays 48 MB
    covered = along_y[:, used_y].astype(np.float32) @ inside @ along_x[:, used_x].T.astype(np.float32)
    cell_area = (y1 - y0) / rows * (x1 - x0) / columns
    return (covered / cell_area).astype(np.float32)


def foreground_in_frame(mask: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
    """bool [size, size]: the model-frame cells at least half covered by the object of `mask` (original pixels)."""
    return frame_coverage(mask, box, size) >= 0.5 - 1e-6


def scale_box(box: Sequence[float], factor_x: float, factor_y: float) -> Box:
    """The box in the pixels of the image resized by (factor_x, factor_y) (e.g. a display copy)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0 * factor_x, y0 * factor_y, x1 * factor_x, y1 * factor_y


def covers_image(box: Sequence[float], width: int, height: int, tolerance: float = 1e-3) -> bool:
    """True when the box is the whole image (a plain resize: nothing to dim, nothing cut off)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return abs(x0) <= tolerance and abs(y0) <= tolerance and abs(x1 - width) <= tolerance \
        and abs(y1 - height) <= tolerance


# ----------------------------------------------------------------------------------------------------------
# The crop box of a transform: derived from known steps
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResizeStep:
    size: tuple[int, ...] | None      # (short side,) or (height, width); None: the long side is max_size
    max_size: int | None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize: torchvision's `_compute_resized_output_size`, step for step."""
        if self.size is not None and len(self.size) == 2:
            return int(self.size[0]), int(self.size[1])
        short, long = (width, height) if width <= height else (height, width)
        if self.size is None:
            if self.max_size is None:
                raise ValueError("Resize(None) needs max_size")
            new_short, new_long = int(self.max_size * short / long), self.max_size
        else:
            requested = int(self.size[0])
            new_short, new_long = requested, int(requested * long / short)
            if self.max_size is not None and new_long > self.max_size:
                new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        return new_height, new_width

    def describe(self) -> str:
        if self.size is None:
            return f"Resize(long side {self.max_size})"
        if len(self.size) == 2:
            return f"Resize({self.size[0]}x{self.size[1]})"
        return f"Resize(short side {self.size[0]}" + (f", max {self.max_size})" if self.max_size else ")")


@dataclass(frozen=True)
class CenterCropStep:
    height: int
    width: int

    def offsets(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the crop in the frame before it; negative where torchvision pads (crop > image)."""
        def along(image: int, crop: int) -> int:
            if crop > image:
                return -((crop - image) // 2)        # padded by (crop - image) // 2 before, the rest after
            return int(round((image - crop) / 2.0))  # Python's round, as torchvision: half to even
        return along(height, self.height), along(width, self.width)

    def describe(self) -> str:
        return f"CenterCrop({self.height}x{self.width})" if self.height != self.width else \
            f"CenterCrop({self.height})"


def _size_tuple(size: Any) -> tuple[int, ...] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        return (int(size),)
    return tuple(int(s) for s in size)


def known_steps(transform: Any) -> list[ResizeStep | CenterCropStep] | None:
    """The geometric steps of a transform made only of steps we know, in order; None otherwise.

    Known: Compose, Resize, CenterCrop (v1 and v2), torchvision weights' ImageClassification presets, and the
    value-only steps (ToTensor, PILToTensor, ConvertImageDtype, Normalize, Grayscale, ToImage, ToDtype,
    ToPureTensor, RGB, Identity).
    """
    from torch import nn
    from torchvision import transforms as T
    from torchvision.transforms import v2
    from torchvision.transforms._presets import ImageClassification

    value_only = (T.ToTensor, T.PILToTensor, T.ConvertImageDtype, T.Normalize, T.Grayscale,
                  v2.ToImage, v2.ToDtype, v2.Normalize, v2.Grayscale, v2.ToPureTensor, v2.RGB, v2.Identity,
                  nn.Identity)
    steps: list[ResizeStep | CenterCropStep] = []

    def crop(size: Any) -> CenterCropStep:
        size = _size_tuple(size)
        return CenterCropStep(size[0], size[-1])

    def walk(step: Any) -> bool:
        if isinstance(step, (T.Compose, v2.Compose)):
            return all(walk(s) for s in step.transforms)
        if isinstance(step, ImageClassification):
            steps.append(ResizeStep(_size_tuple(step.resize_size), None))
            steps.append(crop(step.crop_size))
            return True
        if isinstance(step, (T.Resize, v2.Resize)):
            steps.append(ResizeStep(_size_tuple(step.size), getattr(step, "max_size", None)))
            return True
        if isinstance(step, (T.CenterCrop, v2.CenterCrop)):
            steps.append(crop(step.size))
            return True
        return isinstance(step, value_only)

    return steps if walk(transform) else None


class TransformGeometry:
    """Finds the crop box of an original image of a given size under one transform."""

    method = "unknown"

    def locate(self, width: int, height: int) -> tuple[Box, tuple[int, int]] | None:
        """(crop box in original pixels, model input size (width, height)), or None when it cannot be known."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.method


class DerivedGeometry(TransformGeometry):
    """The box computed from the known steps (exact)."""

    method = "derived"

    def __init__(self, steps: Sequence[ResizeStep | CenterCropStep]):
        self.steps = list(steps)

    def locate(self, width: int, height: int) -> tuple[Box, tuple[int, int]]:
        x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
        frame_height, frame_width = int(height), int(width)
        for step in self.steps:
            if isinstance(step, ResizeStep):
                frame_height, frame_width = step.output_size(frame_height, frame_width)
            else:
                top, left = step.offsets(frame_height, frame_width)
                per_x, per_y = (x1 - x0) / frame_width, (y1 - y0) / frame_height
                x0, x1 = x0 + left * per_x, x0 + (left + step.width) * per_x
                y0, y1 = y0 + top * per_y, y0 + (top + step.height) * per_y
                frame_height, frame_width = step.height, step.width
        return (x0, y0, x1, y1), (frame_width, frame_height)

    def describe(self) -> str:
        return " + ".join(step.describe() for step in self.steps) or "no resize or crop"


class MeasuredGeometry(TransformGeometry):
    """The box measured by sending probe images through the transform (memoised per image size)."""

    method = "measured"
    MEMO = 256

    def __init__(self, transform: Callable[[Any], Any], channels: int):
        self.transform = transform
        self.channels = channels
        self._memo: OrderedDict[tuple[int, int], tuple[Box, tuple[int, int]] | None] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers start with an empty memo
        return {"transform": self.transform, "channels": self.channels}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["transform"], state["channels"])

    def locate(self, width: int, height: int) -> tuple[Box, tuple[int, int]] | None:
        key = (int(width), int(height))
        if key not in self._memo:
            try:
                self._memo[key] = measure_box(self.transform, key[0], key[1], self.channels)
            except Exception:  # a transform that fails on a probe image: geometry unknown, never a crash
                self._memo[key] = None
            while len(self._memo) > self.MEMO:
                self._memo.popitem(last=False)
        return self._memo[key]

    def describe(self) -> str:
        return f"measured with probe images ({type(self.transform).__name__})"


class NoGeometry(TransformGeometry):
    """A transform whose geometry cannot be known (random, flipping, warping): every box is unknown."""

    method = "unknown"

    def __init__(self, reason: str):
        self.reason = reason

    def locate(self, width: int, height: int) -> None:
        return None

    def describe(self) -> str:
        return self.reason


def geometry_of(transform: Any, channels: int = 3) -> TransformGeometry:
    """Derived geometry for a transform made of known steps, measured geometry for any other."""
    steps = known_steps(transform)
    return DerivedGeometry(steps) if steps is not None else MeasuredGeometry(transform, channels)


# ----------------------------------------------------------------------------------------------------------
# The crop box of a transform: measured with probe images
# ----------------------------------------------------------------------------------------------------------

RAMP_LEVELS = 255.0


def _probe_output(transform: Callable[[Any], Any], values: np.ndarray, channels: int) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(values, "L")
    if channels == 3:
        image = image.convert("RGB")
    out = transform(image)
    array = out.detach().cpu().numpy() if hasattr(out, "detach") else np.asarray(out)
    if array.ndim != 3:
        raise ValueError(f"the transform returned shape {array.shape}, expected [C, H, W]")
    return array.astype(np.float64)


def _fit_axis(decoded: np.ndarray, valid: np.ndarray, extent: int, axis: int) -> tuple[float, float] | None:
    """Fit coordinate = a (u + 0.5) + b along one output axis (axis 1: columns, u = column index), from the
    decoded original coordinates of the valid output pixels [h, w]. None when the fit does not hold."""
    if axis == 0:
        decoded, valid = decoded.T, valid.T
    count = valid.sum(axis=0)
    usable = count > 0
    profile = np.where(usable, (decoded * valid).sum(axis=0) / np.maximum(count, 1), np.nan)
    # Leave out the two outermost usable columns on each side, and those next to padding: there resampling
    # filters are cut off by the image's border and pull the ramp's value inwards.
    interior = usable.copy()
    for shift in (1, 2):
        interior[shift:] &= usable[:-shift]
        interior[:-shift] &= usable[shift:]
    columns = np.nonzero(interior)[0]
    if len(columns) < 3:
        return None
    u = columns + 0.5
    slope, intercept = np.polyfit(u, profile[columns], 1)
    if not slope > 0:  # flipped or constant: not a crop of the original
        return None
    tolerance = 2.0 * extent / RAMP_LEVELS + 0.5  # two ramp steps of quantisation, half a pixel of resampling
    predicted = slope * u + intercept
    if np.max(np.abs(profile[columns] - predicted)) > tolerance:
        return None
    pixels = decoded[:, columns][valid[:, columns]]
    expected = np.broadcast_to(predicted, decoded[:, columns].shape)[valid[:, columns]]
    if np.quantile(np.abs(pixels - expected), 0.99) > tolerance:  # every row agrees: no rotation or warp
        return None
    return float(slope), float(intercept)


def measure_box(transform: Callable[[Any], Any], width: int, height: int,
                channels: int = 3) -> tuple[Box, tuple[int, int]] | None:
    """(crop box, input size (w, h)) of `transform` on a width x height image (mode RGB for channels 3, else
    L), measured with probe images; None when the transform is random or not an axis-aligned resize/crop.

    Probes: black, white, a horizontal ramp (column i has value (i + 0.5) / width * 255) and a vertical one.
    The value steps of the transform (ToTensor, Normalize, ...) are taken to be affine per channel, and are
    calibrated out with the black and white probes; output pixels whose black and white values agree come from
    padding, not from the image, and are left out.
    """
    width, height = int(width), int(height)
    if width < 1 or height < 1:
        return None
    ramp_x = np.rint((np.arange(width) + 0.5) / width * RAMP_LEVELS).astype(np.uint8)
    ramp_y = np.rint((np.arange(height) + 0.5) / height * RAMP_LEVELS).astype(np.uint8)
    black = _probe_output(transform, np.zeros((height, width), np.uint8), channels)
    white = _probe_output(transform, np.full((height, width), 255, np.uint8), channels)
    along_x = _probe_output(transform, np.broadcast_to(ramp_x[None, :], (height, width)).copy(), channels)
    along_y = _probe_output(transform, np.broadcast_to(ramp_y[:, None], (height, width)).copy(), channels)
    again = _probe_output(transform, np.broadcast_to(ramp_x[None, :], (height, width)).copy(), channels)
    if not (black.shape == white.shape == along_x.shape == along_y.shape == again.shape):
        return None
    if not np.allclose(along_x, again, rtol=0, atol=1e-6):  # random: each call sees another region
        return None
    span = white - black                                   # [C, h, w]
    weight = (span ** 2).sum(axis=0)
    if not weight.max() > 0:
        return None
    valid = weight > 0.25 * np.median(weight[weight > 0])  # output pixels that show the image, not padding

    def decode(probe: np.ndarray) -> np.ndarray:
        """The probe's value at each output pixel as a share of white (0..1): least squares over the channels."""
        return ((probe - black) * span).sum(axis=0) / np.where(weight > 0, weight, 1.0)

    fit_x = _fit_axis(decode(along_x) * width, valid, width, axis=1)
    fit_y = _fit_axis(decode(along_y) * height, valid, height, axis=0)
    if fit_x is None or fit_y is None:
        return None
    out_height, out_width = black.shape[1:]
    (ax, bx), (ay, by) = fit_x, fit_y
    return (bx, by, ax * out_width + bx, ay * out_height + by), (int(out_width), int(out_height))
