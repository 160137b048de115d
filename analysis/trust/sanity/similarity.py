"""How alike two sets of maps are, row by row: Spearman rank correlation and SSIM (Adebayo et al. 2018's
measures), on the variants of a map the checks compare."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from analysis.pipeline.scores import descriptors
from analysis.trust.sanity.blocks import SSIM_WINDOW

SSIM_K1, SSIM_K2 = 0.01, 0.03


def map_variants(maps: Tensor, pooled_size: int) -> dict[str, np.ndarray]:
    """{variant: float64 [N, h, w]} of maps [N, h, w] (see the module docstring)."""
    maps = maps.detach().float().cpu()
    pooled = descriptors(maps, pooled_size, "positive").view(len(maps), pooled_size, pooled_size)
    return {"abs": maps.abs().double().numpy(), "signed": maps.double().numpy(),
            "positive_pooled": pooled.double().numpy()}


def rank_rows(values: np.ndarray) -> np.ndarray:
    """float64 [N, P]: each row's average ranks (ties share their mean rank), as spearmanr ranks."""
    from scipy.stats import rankdata

    return rankdata(values.reshape(len(values), -1), axis=1).astype(np.float64)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=1) / denominator, np.nan)


def spearman_rows(a: np.ndarray, b: np.ndarray, ranks_a: np.ndarray | None = None) -> np.ndarray:
    """float64 [N]: Spearman rank correlation of a[i] and b[i] ([N, ...] each); NaN where a map is constant.
    `ranks_a` (``rank_rows(a)``) saves ranking a again."""
    return _pearson_rows(rank_rows(a) if ranks_a is None else ranks_a, rank_rows(b))


def ssim_window(height: int, width: int) -> int | None:
    """The SSIM window for a map: 7, or the largest odd size that fits; None under 3 pixels a side."""
    side = min(SSIM_WINDOW, height, width)
    side -= 1 - side % 2
    return side if side >= 3 else None


def _unit_range(maps: Tensor) -> tuple[Tensor, Tensor]:
    flat = maps.flatten(1)
    low, high = flat.amin(1), flat.amax(1)
    span = high - low
    scaled = (maps - low[:, None, None]) / torch.where(span > 0, span, 1)[:, None, None]
    return scaled, span > 0


def ssim_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 [N]: SSIM of a[i] and b[i] ([N, h, w] each), each min-max scaled to [0, 1] (data range 1), with
    scikit-image's defaults; NaN where a map is constant or smaller than 3 x 3."""
    a_t, b_t = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    window = ssim_window(*a_t.shape[-2:])
    if window is None or len(a_t) == 0:
        return np.full(len(a_t), np.nan)
    (x, x_ok), (y, y_ok) = _unit_range(a_t), _unit_range(b_t)
    x, y = x[:, None], y[:, None]

    def mean(t: Tensor) -> Tensor:   # the window's mean at every position where it fits inside the map
        return F.avg_pool2d(t, window, stride=1)

    n = window * window
    covariance = n / (n - 1)   # sample covariance, as scikit-image's default
    ux, uy = mean(x), mean(y)
    vx = covariance * (mean(x * x) - ux * ux)
    vy = covariance * (mean(y * y) - uy * uy)
    vxy = covariance * (mean(x * y) - ux * uy)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    out = s.mean(dim=(1, 2, 3)).numpy()
    return np.where((x_ok & y_ok).numpy(), out, np.nan)
