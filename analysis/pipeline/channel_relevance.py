"""Per-image channel relevance in the cache (issue 15): how much of the CAM's evidence each CAM-layer channel holds.

FG-CAM starts from the components I_k = w_k A_k of the CAM layer (Qiu, Jin, Zhang, AAAI 2024); the spatial sum
of I_k is channel k's share of the class's evidence (``FGCAMResult.channel_relevance``, computed by the engine
in every call, before denoising). The job stores it for every image: for the predicted class, and for the true
class (on a mistake the engine's second call, on a correct image the same values as the predicted class). These
are the "concepts" of Concept Relevance Propagation (Achtibat et al., Nat. Mach. Intell. 2023) for CAM
components; ``analysis.explore.concepts`` builds the per-class statistics and reference images from them, and
``concept_descriptors`` makes them a clustering descriptor (ours): images whose evidence comes from the same
channels, in the same proportions, are near each other, wherever in the image those channels look.

Storage: two of the cache's per-row arrays (``cache.ROW_ARRAYS``), float16 [n, K] each (K: the CAM layer's
channels; 2 x 2 K bytes per image, e.g. 5 KiB for EfficientNet-Lite0's 1280 channels). Values beyond float16's
range (|x| > 65504) are clipped to it, so a row never holds inf. Caches made before the arrays existed read None.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

PRED, TRUE = "channel_relevance", "channel_relevance_true"   # names in cache.ROW_ARRAYS (which names the files)
WHICH = {"pred": PRED, "true": TRUE}
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def channel_relevance_arrays(pred: Tensor, true_of_wrong: Tensor | None, wrong: Tensor) -> dict[str, np.ndarray]:
    """The job's row arrays for one batch: ``pred`` [n, K] (the predicted class's channel relevance),
    ``true_of_wrong`` [n_wrong, K] (the true class's, for the rows where ``wrong`` [n] is True, in order; None
    when there is no mistake) -> {PRED: float16 [n, K], TRUE: float16 [n, K]}."""
    pred = pred.detach().float()
    true = pred.clone()
    if true_of_wrong is not None and bool(wrong.any()):
        true[wrong.to(true.device)] = true_of_wrong.detach().float().to(true.device)
    return {name: values.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).cpu().numpy().astype(np.float16)
            for name, values in ((PRED, pred), (TRUE, true))}


def read_channel_relevance(cache: Any, ids: Sequence[int] | np.ndarray | None = None,
                           which: str = "pred") -> np.ndarray | None:
    """float32 [len(ids), K] channel relevance of `ids` (None: every row, in table order) for the predicted
    (``which="pred"``) or the true class (``"true"``); None for a cache made before it was stored."""
    if which not in WHICH:
        raise ValueError(f"which must be 'pred' or 'true', not {which!r}")
    stored = cache.row_array(WHICH[which], ids)
    return None if stored is None else stored.astype(np.float32)


def relevance_share(relevance: np.ndarray) -> np.ndarray:
    """Each channel's share of a row's positive evidence: max(r, 0) / sum max(r, 0) (rows without positive
    evidence: zeros). Float32 [n, K]."""
    positive = np.clip(np.asarray(relevance, np.float32), 0, None)
    total = positive.sum(axis=1, keepdims=True)
    return np.divide(positive, total, out=np.zeros_like(positive), where=total > 0)


def concept_descriptors(relevance: np.ndarray) -> np.ndarray:
    """float32 [n, K] clustering descriptors from channel relevance [n, K]: each row's positive evidence per
    channel at unit mass (``relevance_share``), the uniform row for an image without positive evidence, as the
    spatial descriptors (``analysis.pipeline.scores.descriptors``) do, so that clustering never sees a zero row."""
    shares = relevance_share(relevance)
    if shares.shape[1]:
        shares[shares.sum(axis=1) == 0] = 1.0 / shares.shape[1]
    return shares


def read_concept_descriptors(cache: Any, ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """``concept_descriptors`` of the stored channel relevance for the predicted class (``cache.descriptors(ids,
    "concepts")``); CacheError for a cache made before it was stored."""
    from analysis.cache.layout import CacheError

    relevance = read_channel_relevance(cache, ids, "pred")
    if relevance is None:
        raise CacheError("this cache has no channel relevance (made before it was stored): re-run "
                         "`python -m analysis explain` with --overwrite to use the concepts descriptor")
    return concept_descriptors(relevance)
