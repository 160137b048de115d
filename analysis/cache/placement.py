"""Laying a stored map over the original image: the cache records, per image, the crop box (x0, y0, x1, y1) in
original pixels that the model's input covered (how it is found: analysis.pipeline.geometry); a map of the
model frame is placed on that box, bilinear between its cell centres, NaN where the model never looked
(``Cache.map_in_image``)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Box = tuple[float, float, float, float]          # x0, y0, x1, y1 in original pixels


def check_box(box: Sequence[float]) -> Box:
    """The box as four floats; ValueError unless they are finite with x0 < x1 and y0 < y1."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or not (x1 > x0 and y1 > y0):
        raise ValueError(f"a crop box needs finite x0 < x1 and y0 < y1, got {box}")
    return x0, y0, x1, y1


def _interpolation(start: float, stop: float, cells: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(weights [length, cells], inside bool [length]): bilinear weights of the cells for each pixel centre of
    an axis of `length` pixels, the cells spanning [start, stop); values beyond the outer cell centres are the
    outer cells' (no extrapolation). `inside`: the pixel centre lies in [start, stop)."""
    centres = np.arange(length, dtype=np.float64) + 0.5
    position = np.clip((centres - start) / ((stop - start) / cells) - 0.5, 0.0, cells - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, cells - 1)
    fraction = position - low
    weights = np.zeros((length, cells), np.float64)
    rows = np.arange(length)
    np.add.at(weights, (rows, low), 1.0 - fraction)
    np.add.at(weights, (rows, high), fraction)
    return weights, (centres >= start) & (centres < stop)


def place_map(frame_map: np.ndarray, box: Sequence[float], width: int, height: int) -> np.ndarray:
    """float32 [height, width]: a model-frame map [m, n] laid over a width x height image whose crop box is
    `box` (in the same pixels), bilinear between cell centres; NaN at pixels whose centre the box misses."""
    x0, y0, x1, y1 = check_box(box)
    frame_map = np.asarray(frame_map, dtype=np.float64)
    if frame_map.ndim != 2 or 0 in frame_map.shape:
        raise ValueError(f"a map must be [m, n] with m, n >= 1, got shape {frame_map.shape}")
    weights_y, inside_y = _interpolation(y0, y1, frame_map.shape[0], int(height))
    weights_x, inside_x = _interpolation(x0, x1, frame_map.shape[1], int(width))
    out = np.full((int(height), int(width)), np.nan, np.float32)
    if inside_y.any() and inside_x.any():
        placed = weights_y[inside_y] @ np.nan_to_num(frame_map) @ weights_x[inside_x].T
        out[np.ix_(inside_y, inside_x)] = placed
    return out
