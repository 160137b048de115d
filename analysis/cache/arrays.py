"""Per-row arrays as stored: maps divided by their max |value| (float16 has no room for input-level
relevance), class probabilities (all of them, or the top 20 with many classes) and packed foreground bits."""
from __future__ import annotations

import numpy as np

from analysis.cache.layout import FULL_PROBABILITIES_MAX, PROBABILITY_TOP_K


def normalise_maps(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split float32 maps [n, M, M] into float16 maps with max |value| 1 and a float32 scale per map.

    A map of zeros keeps scale 0 (multiplying back gives zeros); non-finite values are left as they are.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape[0] == 0:
        return maps.astype(np.float16), np.zeros(0, np.float32)
    flat = maps.reshape(maps.shape[0], -1)
    scale = np.where(np.isfinite(flat), np.abs(flat), 0.0).max(axis=1).astype(np.float32)
    divisor = np.where(scale > 0, scale, 1.0).astype(np.float32)
    stored = (maps / divisor[:, None, None]).astype(np.float16)
    return stored, scale


def probability_arrays(probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """The row arrays that store softmax outputs [n, K]: all K as float16 for up to FULL_PROBABILITIES_MAX
    classes, else the top PROBABILITY_TOP_K as float16 with their classes (int32), descending."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must be [n, classes], got shape {probabilities.shape}")
    if probabilities.shape[1] <= FULL_PROBABILITIES_MAX:
        return {"probabilities": probabilities.astype(np.float16)}
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :PROBABILITY_TOP_K]
    return {"probabilities": np.take_along_axis(probabilities, top, axis=1).astype(np.float16),
            "probability_classes": top.astype(np.int32)}


def full_probabilities(stored: np.ndarray, classes: np.ndarray | None, num_classes: int) -> np.ndarray:
    """float32 [n, num_classes] from `probability_arrays`' output: the stored top-k in their columns, the
    rest of each row's mass (1 - their sum, at least 0) spread evenly over the other classes."""
    stored = np.asarray(stored, dtype=np.float32)
    if classes is None:
        return stored
    out = np.zeros((len(stored), num_classes), np.float32)
    others = num_classes - stored.shape[1]
    if others > 0:
        out += (np.clip(1.0 - stored.sum(axis=1), 0.0, None) / others)[:, None]
    np.put_along_axis(out, np.asarray(classes, dtype=np.int64), stored, axis=1)
    return out


def pack_foreground(masks: np.ndarray) -> np.ndarray:
    """bool [n, M, M] -> uint8 [n, ceil(M*M/8)] (np.packbits along the flattened map)."""
    masks = np.asarray(masks, dtype=bool)
    return np.packbits(masks.reshape(masks.shape[0], int(np.prod(masks.shape[1:]))), axis=1)  # 0 rows too


def unpack_foreground(packed: np.ndarray, map_size: int) -> np.ndarray:
    bits = np.unpackbits(np.asarray(packed), axis=1, count=map_size * map_size)
    return bits.reshape(packed.shape[0], map_size, map_size).astype(bool)
