"""The stored channel relevance read back (written by the job: analysis.pipeline.channel_relevance): each
CAM-layer channel's share of the evidence per image, and the "concepts" clustering descriptor made from it
(``Cache.channel_relevance``, ``Cache.descriptors(ids, "concepts")``)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from analysis.cache.layout import CacheError

PRED, TRUE = "channel_relevance", "channel_relevance_true"   # names in ROW_ARRAYS (which names the files)
WHICH = {"pred": PRED, "true": TRUE}


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
    relevance = read_channel_relevance(cache, ids, "pred")
    if relevance is None:
        raise CacheError("this cache has no channel relevance (made before it was stored): re-run "
                         "`python -m analysis explain` with --overwrite to use the concepts descriptor")
    return concept_descriptors(relevance)
