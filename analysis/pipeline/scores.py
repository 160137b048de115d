"""Per-image scores and descriptors of relevance maps (pure torch; batched, on any device).

All functions take maps [N, H, W] (signed relevance, already at the stored map size) and return one value
per map. A ratio whose denominator is 0 (no positive relevance at all) is NaN, never 0 or 1: "no evidence"
must not look like "all evidence on the object".
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TOP_FRACTION = 0.05     # "the 5% most relevant pixels"
FRAME_FRACTION = 0.10   # "the outer 10% frame": this fraction of the height (width) on each side


def _as_tensor(array: Tensor | np.ndarray) -> Tensor:
    return array if isinstance(array, Tensor) else torch.from_numpy(np.asarray(array))


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    nan = torch.full_like(numerator, float("nan"))
    return torch.where(denominator > 0, numerator / torch.where(denominator > 0, denominator, 1.0), nan)


def resize_maps(maps: Tensor | np.ndarray, size: int) -> Tensor:
    """[N, H, W] -> float32 [N, size, size] by area interpolation (mean over each target cell).

    Area (not bilinear) keeps a thin spike's mass in the downsampled map instead of skipping it.
    Upsampling (a map smaller than `size`) repeats values (area degenerates to nearest there).
    """
    maps = _as_tensor(maps).float()
    if maps.shape[-2:] == (size, size):
        return maps
    return F.interpolate(maps[:, None], size=(size, size), mode="area")[:, 0]


def top_pixel_count(num_pixels: int, fraction: float = TOP_FRACTION) -> int:
    """How many pixels are "the top `fraction`": ceil(fraction * num_pixels), at least 1."""
    return max(1, math.ceil(fraction * num_pixels - 1e-9))


def _top_indices(maps: Tensor, fraction: float) -> Tensor:
    flat = maps.reshape(maps.shape[0], -1)
    k = top_pixel_count(flat.shape[1], fraction)
    return flat.topk(k, dim=1).indices  # ties broken by torch; irrelevant for real-valued maps


def background_share(maps: Tensor | np.ndarray, foreground: Tensor | np.ndarray) -> Tensor:
    """Positive relevance outside the foreground / all positive relevance (1 - relevance mass accuracy)."""
    maps, foreground = _as_tensor(maps).float(), _as_tensor(foreground).bool()
    positive = maps.clamp(min=0)
    total = positive.sum(dim=(1, 2))
    outside = (positive * (~foreground)).sum(dim=(1, 2))
    return _ratio(outside, total)


def dilate(foreground: Tensor | np.ndarray, pixels: int = 1) -> Tensor:
    """Binary dilation by `pixels` with a square structuring element (8-neighbourhood)."""
    foreground = _as_tensor(foreground).bool()
    if pixels <= 0:
        return foreground
    grown = F.max_pool2d(foreground[:, None].float(), kernel_size=2 * pixels + 1, stride=1, padding=pixels)
    return grown[:, 0] > 0.5


def background_hotspot(maps: Tensor | np.ndarray, foreground: Tensor | np.ndarray,
                       fraction: float = TOP_FRACTION) -> Tensor:
    """Of the top `fraction` most relevant pixels, the share lying outside the foreground dilated by one pixel.

    NaN when the map has no positive relevance (its "top" pixels would be arbitrary).
    The one-pixel dilation keeps the object's own edge (where maps are often strongest) from counting.
    """
    maps, foreground = _as_tensor(maps).float(), _as_tensor(foreground).bool()
    top = _top_indices(maps, fraction)
    outside = (~dilate(foreground, 1)).reshape(maps.shape[0], -1).gather(1, top)
    share = outside.float().mean(dim=1)
    has_positive = maps.clamp(min=0).sum(dim=(1, 2)) > 0
    return torch.where(has_positive, share, torch.full_like(share, float("nan")))


def frame_mask(height: int, width: int, fraction: float = FRAME_FRACTION, device: torch.device | None = None) -> Tensor:
    """bool [H, W]: the outer frame, round(fraction * side) pixels wide (at least 1) on each side."""
    rows = max(1, round(fraction * height))
    cols = max(1, round(fraction * width))
    inner = torch.zeros(height, width, dtype=torch.bool, device=device)
    inner[rows:height - rows, cols:width - cols] = True
    return ~inner


def border_share(maps: Tensor | np.ndarray, fraction: float = FRAME_FRACTION) -> Tensor:
    """Positive relevance in the outer frame / all positive relevance (needs no annotation)."""
    maps = _as_tensor(maps).float()
    positive = maps.clamp(min=0)
    frame = frame_mask(maps.shape[1], maps.shape[2], fraction, maps.device)
    return _ratio((positive * frame).sum(dim=(1, 2)), positive.sum(dim=(1, 2)))


def concentration(maps: Tensor | np.ndarray, fraction: float = TOP_FRACTION) -> Tensor:
    """Share of all positive relevance held by the top `fraction` pixels (1: a few pixels carry it all)."""
    maps = _as_tensor(maps).float()
    positive = maps.clamp(min=0).reshape(maps.shape[0], -1)
    k = top_pixel_count(positive.shape[1], fraction)
    return _ratio(positive.topk(k, dim=1).values.sum(dim=1), positive.sum(dim=1))


def descriptors(maps: Tensor | np.ndarray, size: int, kind: str = "positive") -> Tensor:
    """float32 [N, size*size]: the positive part (kind="positive") or |map| ("absolute"), adaptive-average
    pooled to size x size and normalised to unit mass. A map with no mass gets the uniform descriptor
    (no evidence anywhere), so clustering never sees NaN.
    """
    maps = _as_tensor(maps).float()
    if kind == "positive":
        values = maps.clamp(min=0)
    elif kind == "absolute":
        values = maps.abs()
    else:
        raise ValueError(f"kind must be 'positive' or 'absolute', not {kind!r}")
    pooled = F.adaptive_avg_pool2d(values[:, None], size).reshape(maps.shape[0], -1)
    mass = pooled.sum(dim=1, keepdim=True)
    uniform = torch.full_like(pooled, 1.0 / pooled.shape[1])
    return torch.where(mass > 0, pooled / torch.where(mass > 0, mass, 1.0), uniform)


def all_scores(maps: Tensor, foreground: Tensor | None, has_foreground: Tensor | None) -> dict[str, Tensor]:
    """The four table scores for a batch; the foreground scores are NaN for rows without a foreground."""
    n = maps.shape[0]
    nan = torch.full((n,), float("nan"), device=maps.device)
    scores = {"border_share": border_share(maps), "concentration": concentration(maps)}
    if foreground is None:
        scores["background_share"] = nan
        scores["background_hotspot"] = nan.clone()
    else:
        known = has_foreground.to(maps.device) if has_foreground is not None else torch.ones(n, dtype=torch.bool)
        scores["background_share"] = torch.where(known, background_share(maps, foreground), nan)
        scores["background_hotspot"] = torch.where(known, background_hotspot(maps, foreground), nan)
    return scores
