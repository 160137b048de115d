"""Per-class aggregates of a cache (mean maps by true and predicted class), streamed once and stored in
CACHE/analysis/class_maps.parquet."""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import sparse

from analysis.explore import statistics as explore
from analysis.explore.clustering import SPATIAL_DESCRIPTOR_KINDS
from analysis.explore.cluster_offline.settings import (CLASS_MAPS_FILE, FORMAT_VERSION, TMP_PREFIX, cache_fingerprint,
                                                       class_names_of)
from analysis.explore.cluster_offline.store import _now, results_root


@dataclass
class ClassAggregates:
    """Per-class means over the whole cache, so that no page reads every map.

    maps: mean unit-mass positive map (at the cache's map size) of each true class, of the correct and of the
    wrong predictions (their predicted-class map), and the wrong ones' true-class map (`wrong_true`).
    consensus: descriptor kind -> [C, D*D] consensus of each predicted class (analysis.explore.statistics.class_consensus:
    the mean descriptor of the correct predictions of the class, or of all its predictions when none is
    correct), the suspicion's reference.
    """

    maps: explore.ClassMeanMaps
    consensus: dict[str, np.ndarray]


def _group_sums(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    indicator = sparse.csr_matrix((np.ones(len(groups), np.float64), (groups, np.arange(len(groups)))),
                                  shape=(n_groups, len(groups)))
    flat = values.reshape(values.shape[0], int(np.prod(values.shape[1:], dtype=np.int64)))
    return np.asarray(indicator @ flat.astype(np.float64))


def compute_class_aggregates(cache: Any, chunk_rows: int = 4096,
                             progress: Callable[[int, int], None] | None = None) -> ClassAggregates:
    """Stream the cache in chunks of `chunk_rows` images (maps and descriptors read per chunk, never all at
    once) and return the per-class aggregates."""
    table = cache.columns(["label", "pred", "correct"])
    n_classes = len(class_names_of(cache))
    ids = cache.ids
    size = cache.map_size or cache.maps(ids[:1]).shape[-1] if len(ids) else 1
    pixels = size * size
    sums = {name: np.zeros((n_classes, pixels)) for name in ("correct", "wrong", "wrong_true")}
    counts = {"correct": np.zeros(n_classes, np.int64), "wrong": np.zeros(n_classes, np.int64)}
    consensus_sums: dict[str, dict[str, np.ndarray]] = {}
    prediction_counts = {"correct": np.zeros(n_classes, np.int64), "all": np.zeros(n_classes, np.int64)}
    labels_all = table["label"].to_numpy(np.int64)
    preds_all = table["pred"].to_numpy(np.int64)
    correct_all = table["correct"].to_numpy(bool)
    for start in range(0, len(ids), chunk_rows):
        stop = min(start + chunk_rows, len(ids))
        chunk, labels, preds, correct = ids[start:stop], labels_all[start:stop], preds_all[start:stop], \
            correct_all[start:stop]
        unit = explore.unit_mass(cache.maps(chunk, "pred"), "positive")
        sums["correct"] += _group_sums(unit[correct], labels[correct], n_classes)
        sums["wrong"] += _group_sums(unit[~correct], labels[~correct], n_classes)
        counts["correct"] += np.bincount(labels[correct], minlength=n_classes)
        counts["wrong"] += np.bincount(labels[~correct], minlength=n_classes)
        if (~correct).any():
            sums["wrong_true"] += _group_sums(explore.unit_mass(cache.maps(chunk[~correct], "true"), "positive"),
                                              labels[~correct], n_classes)
        for kind in SPATIAL_DESCRIPTOR_KINDS:     # the summaries' (a clustering on concepts uses "positive")
            descriptors = cache.descriptors(chunk, kind)
            entry = consensus_sums.setdefault(kind, {"correct": 0.0, "all": 0.0})
            entry["correct"] = entry["correct"] + _group_sums(descriptors[correct], preds[correct], n_classes)
            entry["all"] = entry["all"] + _group_sums(descriptors, preds, n_classes)
        prediction_counts["correct"] += np.bincount(preds[correct], minlength=n_classes)
        prediction_counts["all"] += np.bincount(preds, minlength=n_classes)
        if progress:
            progress(stop, len(ids))

    def mean(total: np.ndarray, count: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            out = total / count[:, None]
        out[count == 0] = np.nan
        return out.astype(np.float32)

    maps = explore.ClassMeanMaps(
        correct=mean(sums["correct"], counts["correct"]).reshape(n_classes, size, size),
        wrong=mean(sums["wrong"], counts["wrong"]).reshape(n_classes, size, size),
        n_correct=counts["correct"], n_wrong=counts["wrong"],
        wrong_true=mean(sums["wrong_true"], counts["wrong"]).reshape(n_classes, size, size))
    consensus = {}
    for kind, entry in consensus_sums.items():
        own = mean(np.asarray(entry["correct"]), prediction_counts["correct"])
        fallback = mean(np.asarray(entry["all"]), prediction_counts["all"])
        own[prediction_counts["correct"] == 0] = fallback[prediction_counts["correct"] == 0]
        consensus[kind] = own
    return ClassAggregates(maps=maps, consensus=consensus)


def write_class_aggregates(cache_root: Path | str, aggregates: ClassAggregates, fingerprint: str) -> Path:
    """CACHE/analysis/class_maps.parquet: one row per (group, class) with its count and flattened mean."""
    from analysis.cache.files import _save_parquet

    maps = aggregates.maps
    records = {"group": [], "class": [], "n": [], "values": []}

    def add(group: str, means: np.ndarray, counts: np.ndarray) -> None:
        for c in range(len(means)):
            records["group"].append(group)
            records["class"].append(c)
            records["n"].append(int(counts[c]))
            records["values"].append(np.asarray(means[c], np.float32).ravel())

    add("correct", maps.correct, maps.n_correct)
    add("wrong", maps.wrong, maps.n_wrong)
    add("wrong_true", maps.wrong_true, maps.n_wrong)
    for kind, values in aggregates.consensus.items():
        add(f"consensus:{kind}", values, np.isfinite(values).all(axis=1).astype(np.int64))
    table = pa.table({"group": pa.array(records["group"], pa.string()), "class": pa.array(records["class"], pa.int32()),
                      "n": pa.array(records["n"], pa.int64()),
                      "values": pa.array(records["values"], pa.list_(pa.float32()))})
    table = table.replace_schema_metadata({b"fgcam_class_maps": json.dumps(
        {"format_version": FORMAT_VERSION, "cache_fingerprint": fingerprint, "map_size": int(maps.correct.shape[-1]),
         "created": _now()}).encode()})
    root = results_root(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / CLASS_MAPS_FILE
    tmp = root / f"{TMP_PREFIX}{CLASS_MAPS_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        _save_parquet(tmp, table)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def read_class_aggregates(cache: Any) -> ClassAggregates | None:
    """The stored per-class aggregates of the cache as it is now; None when absent, unreadable or stale."""
    path = results_root(cache.root) / CLASS_MAPS_FILE
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"fgcam_class_maps"])
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
        return None
    if meta.get("cache_fingerprint") != cache_fingerprint(cache):
        return None
    frame = table.to_pandas()
    size = int(meta["map_size"])

    def block(group: str, side: int | None) -> tuple[np.ndarray, np.ndarray]:
        part = frame[frame["group"] == group].sort_values("class")
        values = np.stack([np.asarray(v, np.float32) for v in part["values"]]) if len(part) else np.zeros((0, 0))
        if side is not None:
            values = values.reshape(len(part), side, side)
        return values, part["n"].to_numpy(np.int64)

    correct, n_correct = block("correct", size)
    wrong, n_wrong = block("wrong", size)
    wrong_true, _ = block("wrong_true", size)
    consensus = {group.split(":", 1)[1]: block(group, None)[0]
                 for group in frame["group"].unique() if group.startswith("consensus:")}
    return ClassAggregates(explore.ClassMeanMaps(correct, wrong, n_correct, n_wrong, wrong_true), consensus)
