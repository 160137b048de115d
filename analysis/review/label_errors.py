"""Likely label errors: Cleanlab's label quality scores (Northcutt, Jiang, Chuang, "Confident learning",
JAIR 2021) on the class probabilities the job stores (or out-of-sample ones the user gives), with the wrong
predictions that a verified shortcut explains set apart (analysis.review.shortcut_victims)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.cache import Cache, full_probabilities
from analysis.review.shortcut_victims import shortcut_victims
from analysis.review.tags import DEFAULT_LABEL_QUALITY_METHOD, LABEL_QUALITY_METHODS


def label_probabilities(cache: Cache) -> tuple[np.ndarray, str]:
    """float32 [n, K] class probabilities of every row (table order), and where they come from: "stored"
    (the job's float16 probabilities), or "top-5" for a cache made before they were stored -- its top-5
    probabilities with the rest of each row's mass spread evenly over the other classes (exact for up to 5
    classes; for more, an image whose given label is outside its top 5 gets a share of the rest)."""
    stored = cache.probabilities()
    if stored is not None:
        return stored, "stored"
    table = cache.table
    num_classes = len(cache.manifest.get("class_names") or []) or int(table[["label", "pred"]].max().max()) + 1
    if len(table) == 0:
        return np.zeros((0, num_classes), np.float32), "top-5"
    top_classes = np.stack(table["top5_classes"].map(lambda v: np.asarray(v, np.int64)).to_numpy())
    top_probs = np.stack(table["top5_probs"].map(lambda v: np.asarray(v, np.float32)).to_numpy())
    return full_probabilities(top_probs, top_classes, num_classes), "top-5"


def label_issues(cache: Cache, method: str = DEFAULT_LABEL_QUALITY_METHOD, probabilities: np.ndarray | None = None,
                 set_apart: bool = True) -> pd.DataFrame:
    """Every image ranked by how likely its label is wrong: DataFrame with columns id, label_quality (in
    [0, 1]; lowest = most likely mislabelled), sorted by label_quality then id.

    Cleanlab's `get_label_quality_scores` on the class probabilities (`method`: "normalized_margin", the
    default, chosen by measurement on planted flips -- bench/bench_label_errors.py; "self_confidence", the
    probability of the given label; "confidence_weighted_entropy"). `probabilities`: float [n, K] in table
    order, out-of-sample ones (cross-validation; `read_probability_file` reads them from a CSV); without them
    the model's own, in-sample for images it was trained on: a model that has fit a wrong label gives it a high
    probability, so on training images this finds fewer errors than out-of-sample probabilities would (a
    conservative list). `set_apart`: leave out the shortcut victims (`shortcut_victims`: wrong predictions a
    verified shortcut finding explains). attrs: "probabilities" ("given", "stored" or "top-5", see
    `label_probabilities`), "victims" (how many were left out).
    """
    from cleanlab.rank import get_label_quality_scores

    if method not in LABEL_QUALITY_METHODS:
        raise ValueError(f"method must be one of {LABEL_QUALITY_METHODS}, not {method!r}")
    if probabilities is None:
        probabilities, source = label_probabilities(cache)
    else:
        probabilities, source = np.asarray(probabilities), "given"
        if probabilities.ndim != 2 or len(probabilities) != len(cache):
            raise ValueError(f"probabilities must be [{len(cache)} images, classes], got {probabilities.shape}")
    table = cache.columns(["id", "label"])
    labels = table["label"].to_numpy(np.int64)
    victims = shortcut_victims(cache)["id"].to_numpy(np.int64) if set_apart and len(labels) else np.zeros(0, np.int64)
    keep = ~np.isin(table["id"].to_numpy(np.int64), victims)
    if not keep.any():
        frame = pd.DataFrame({"id": np.zeros(0, np.int64), "label_quality": np.zeros(0, np.float64)})
        frame.attrs.update(probabilities=source, victims=int(len(victims)))
        return frame
    if labels.min() < 0 or labels.max() >= probabilities.shape[1]:
        raise ValueError(f"labels outside the model's {probabilities.shape[1]} classes")
    # float16 storage leaves row sums a few 1e-4 off 1; Cleanlab expects distributions.
    probabilities = np.clip(probabilities.astype(np.float64), 0.0, None)
    sums = probabilities.sum(axis=1, keepdims=True)
    probabilities = np.where(sums > 0, probabilities / np.where(sums > 0, sums, 1.0), 1.0 / probabilities.shape[1])
    # Scored on every image (normalized_margin and the entropy method look at the whole set), then filtered.
    scores = np.asarray(get_label_quality_scores(labels, probabilities, method=method), np.float64)[keep]
    ids = table["id"].to_numpy(np.int64)[keep]
    order = np.lexsort((ids, scores))
    frame = pd.DataFrame({"id": ids[order], "label_quality": scores[order]})
    frame.attrs.update(probabilities=source, victims=int(len(victims)))
    return frame.reset_index(drop=True)
