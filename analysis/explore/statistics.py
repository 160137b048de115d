"""Pure functions behind the dashboard's views: per-class mean maps, confusion matrix, consensus
dissimilarity, nearest neighbours in explanation space and score rankings.

Everything here works on numpy arrays and pandas DataFrames (the cache's table and descriptors), never
imports streamlit, and is small enough to check by hand in tests/test_explore.py.

Descriptors are the cache's unit-mass downsampled maps ([n, D*D], each row sums to 1, or is all zeros for an
image whose map has no positive relevance): averaging them gives a mean map in which every image counts once,
whatever the magnitude of its relevance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# Scores of the table that rank images by attention off the object. The first two need a foreground
# (mask or box); the last two are annotation-free.
FOREGROUND_SCORES = ("background_hotspot", "background_share")
ANNOTATION_FREE_SCORES = ("border_share", "consensus_dissimilarity")

SCORE_DESCRIPTIONS = {
    "background_hotspot": "share of the strongest positive relevance that falls outside the object",
    "background_share": "share of all positive relevance that falls outside the object",
    "border_share": "share of positive relevance in the image border strip",
    "consensus_dissimilarity": "1 - cosine similarity between the image's map and the mean map of the "
                               "correctly classified images of its predicted class",
    "concentration": "how concentrated the positive relevance is",
    "confidence": "softmax probability of the predicted class",
}


def unit_mass(maps: np.ndarray, kind: str = "positive") -> np.ndarray:
    """[n, h, w] signed maps -> [n, h, w] float32 maps with non-negative values summing to 1 per map.

    kind='positive' keeps the positive part, kind='absolute' the magnitude. A map with no mass stays all zeros
    (so it does not pull a mean towards a uniform map).
    """
    maps = np.asarray(maps, dtype=np.float32)
    if kind == "positive":
        part = np.clip(maps, 0.0, None)
    elif kind == "absolute":
        part = np.abs(maps)
    else:
        raise ValueError(f"kind must be 'positive' or 'absolute', not {kind!r}")
    part = np.where(np.isfinite(part), part, 0.0)
    mass = part.reshape(part.shape[0], -1).sum(axis=1)
    divisor = np.where(mass > 0, mass, 1.0).astype(np.float32)
    return (part / divisor[:, None, None]).astype(np.float32)


def group_means(vectors: np.ndarray, groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean row of `vectors` for each group 0..n_groups-1 -> (means [n_groups, P] with NaN rows for empty
    groups, counts [n_groups])."""
    vectors = np.asarray(vectors, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    if vectors.shape[0] != groups.shape[0]:
        raise ValueError(f"{vectors.shape[0]} vectors for {groups.shape[0]} group labels")
    if groups.size and (groups.min() < 0 or groups.max() >= n_groups):
        raise ValueError(f"group labels must lie in [0, {n_groups})")
    sums = np.zeros((n_groups, vectors.shape[1]), np.float64)
    np.add.at(sums, groups, vectors)
    counts = np.bincount(groups, minlength=n_groups).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    means[counts == 0] = np.nan
    return means.astype(np.float32), counts


@dataclass
class ClassMeanMaps:
    """Per-class mean descriptor maps (rows: class index = model output; NaN rows for empty groups)."""

    correct: np.ndarray        # [C, D, D] mean over images of the class predicted correctly
    wrong: np.ndarray          # [C, D, D] mean over images of the class predicted wrongly (map of the prediction)
    n_correct: np.ndarray      # [C]
    n_wrong: np.ndarray        # [C]
    wrong_true: np.ndarray | None = None   # [C, D, D] the wrong ones' maps of their true class, when known


def class_mean_maps(descriptors: np.ndarray, labels: np.ndarray, correct: np.ndarray,
                    n_classes: int) -> ClassMeanMaps:
    """Mean unit-mass map of each true class, separately for correct and for wrong predictions."""
    descriptors = np.asarray(descriptors, dtype=np.float32)
    side = int(round(np.sqrt(descriptors.shape[1]))) if descriptors.ndim == 2 else 0
    if side * side != descriptors.shape[1]:
        raise ValueError(f"descriptors of length {descriptors.shape[1]} are not square maps")
    labels = np.asarray(labels, dtype=np.int64)
    correct = np.asarray(correct, dtype=bool)
    mean_ok, n_ok = group_means(descriptors[correct], labels[correct], n_classes)
    mean_bad, n_bad = group_means(descriptors[~correct], labels[~correct], n_classes)
    return ClassMeanMaps(mean_ok.reshape(n_classes, side, side), mean_bad.reshape(n_classes, side, side),
                         n_ok, n_bad)


def class_consensus(descriptors: np.ndarray, preds: np.ndarray, correct: np.ndarray,
                    n_classes: int) -> np.ndarray:
    """The consensus map of each class: mean descriptor of the images predicted as that class correctly.

    A class with no correct prediction falls back to the mean over all images predicted as it (NaN rows when
    the class was never predicted). Maps explain the predicted class, so images are grouped by prediction.
    """
    preds = np.asarray(preds, dtype=np.int64)
    correct = np.asarray(correct, dtype=bool)
    consensus, counts = group_means(descriptors[correct], preds[correct], n_classes)
    fallback, _ = group_means(descriptors, preds, n_classes)
    consensus[counts == 0] = fallback[counts == 0]
    return consensus


def cosine_dissimilarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise 1 - cosine similarity of [n, P] arrays; NaN where a row has zero norm or is NaN."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        similarity = (a * b).sum(axis=1) / norms
    similarity[~(norms > 0)] = np.nan
    return (1.0 - similarity).astype(np.float32)


def consensus_dissimilarity(descriptors: np.ndarray, preds: np.ndarray, correct: np.ndarray,
                            n_classes: int) -> np.ndarray:
    """How unlike the consensus of its predicted class each image's map is (0 same direction, 1 orthogonal)."""
    consensus = class_consensus(descriptors, preds, correct, n_classes)
    return cosine_dissimilarity(descriptors, consensus[np.asarray(preds, dtype=np.int64)])


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """[C, C] int64 counts, rows = true class, columns = predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    matrix = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(matrix, (labels, preds), 1)
    return matrix


def confusion_frame(matrix: np.ndarray, class_names: list[str], classes: list[int] | None = None) -> pd.DataFrame:
    """Long form of a confusion matrix for charts: one row per (true, pred) cell with a count or share.

    row_share is the count divided by the number of images of the true class (the whole row, shown or not), so a
    50-image class and a 5,000-image class are comparable. ``classes`` (class indices) keeps only their rows and
    columns, with their own indices: a 1,000-output model's matrix is drawn for the classes a person can read.
    """
    index = np.arange(matrix.shape[0]) if classes is None else np.asarray(classes, dtype=np.int64)
    true_idx, pred_idx = np.meshgrid(index, index, indexing="ij")
    row_totals = matrix.sum(axis=1)
    counts = matrix[true_idx, pred_idx]
    share = counts / np.maximum(row_totals[true_idx], 1)
    names = np.asarray(class_names, dtype=object)
    return pd.DataFrame({
        "true": true_idx.ravel(),
        "pred": pred_idx.ravel(),
        "true_name": names[true_idx.ravel()],
        "pred_name": names[pred_idx.ravel()],
        "count": counts.ravel(),
        "row_share": share.ravel().astype(np.float64),
    })


def top_confusions(matrix: np.ndarray, class_names: list[str], k: int = 10,
                   involving: int | None = None) -> pd.DataFrame:
    """The k largest off-diagonal cells (ties broken by true then predicted class), with their row share; only
    those whose true or predicted class is ``involving`` when given. Reads the non-zero cells only."""
    true, pred = np.nonzero(matrix)
    keep = true != pred
    if involving is not None:
        keep &= (true == involving) | (pred == involving)
    true, pred = true[keep], pred[keep]
    count = matrix[true, pred].astype(np.int64)
    order = np.lexsort((pred, true, -count))[:k]
    true, pred, count = true[order].astype(np.int64), pred[order].astype(np.int64), count[order]
    names = np.asarray(class_names, dtype=object)
    return pd.DataFrame({"true": true, "pred": pred, "true_name": names[true], "pred_name": names[pred],
                         "count": count,
                         "row_share": (count / np.maximum(matrix.sum(axis=1)[true], 1)).astype(np.float64)})


def occurring_classes(matrix: np.ndarray) -> np.ndarray:
    """Indices of the classes that occur in a confusion matrix, as true or as predicted class (ascending)."""
    return np.flatnonzero((matrix.sum(axis=1) + matrix.sum(axis=0)) > 0)


def matrix_classes(matrix: np.ndarray, limit: int, keep: tuple[int, ...] = ()) -> list[int]:
    """The classes (ascending) a readable confusion matrix shows: every class that occurs (as true or predicted
    class) when at most ``limit`` do, else the ``limit`` with the most mistakes (as true plus as predicted class;
    ties: more images, then lower index), and always the occurring classes of ``keep``."""
    rows, columns = matrix.sum(axis=1), matrix.sum(axis=0)
    occurring = occurring_classes(matrix)
    if len(occurring) <= limit:
        return occurring.tolist()
    diagonal = np.diagonal(matrix)
    mistakes = (rows - diagonal) + (columns - diagonal)
    ranked = occurring[np.lexsort((occurring, -(rows + columns)[occurring], -mistakes[occurring]))]
    chosen = set(ranked[:limit].tolist()) | {int(c) for c in keep if c in set(occurring.tolist())}
    return sorted(chosen)


def per_class_accuracy(table: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    """One row per class that has images: class, class_name, images, correct, accuracy (by true label)."""
    grouped = table.groupby("label", sort=True)["correct"].agg(["size", "sum"])
    out = pd.DataFrame({
        "class": grouped.index.to_numpy(np.int64),
        "images": grouped["size"].to_numpy(np.int64),
        "correct": grouped["sum"].to_numpy(np.int64),
    })
    out["accuracy"] = out["correct"] / out["images"]
    names = np.asarray(class_names, dtype=object)
    out.insert(1, "class_name", [names[c] if 0 <= c < len(names) else str(c) for c in out["class"]])
    return out


def nearest_neighbours(descriptors: np.ndarray, query_row: int, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The k rows most similar to `query_row` (cosine distance, itself excluded) -> (rows, distances).

    Rows with a zero descriptor (no positive relevance) have undefined direction and are never returned.
    """
    x = np.asarray(descriptors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    query = x[query_row]
    if not norms[query_row] > 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        similarity = (x @ query) / (norms * norms[query_row])
    distance = (1.0 - similarity).astype(np.float32)
    distance[~(norms > 0)] = np.inf
    distance[query_row] = np.inf
    k = int(min(k, np.isfinite(distance).sum()))
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    candidates = np.argpartition(distance, k - 1)[:k]
    order = np.lexsort((candidates, distance[candidates]))  # by distance, then by row for ties
    rows = candidates[order].astype(np.int64)
    return rows, distance[rows]


def has_foreground(table: pd.DataFrame) -> bool:
    """True when at least one image has a known foreground (mask or box) and so a background score."""
    if "has_foreground" in table.columns and bool(table["has_foreground"].any()):
        return True
    return bool(table["background_share"].notna().any()) if "background_share" in table.columns else False


def available_attention_scores(table: pd.DataFrame) -> list[str]:
    """Scores that can rank images by attention off the object, preferred one first.

    With a foreground: background_hotspot (default), background_share, then the annotation-free ones;
    without: border_share, consensus_dissimilarity.
    """
    if has_foreground(table):
        return list(FOREGROUND_SCORES) + list(ANNOTATION_FREE_SCORES)
    return list(ANNOTATION_FREE_SCORES)


def rank_by_score(table: pd.DataFrame, score: str, threshold: float | None = None,
                  classes: list[int] | None = None) -> pd.DataFrame:
    """Rows sorted by `score` descending (NaN scores dropped), optionally only those >= threshold and of the
    given true classes. Ties keep id order so a ranking is reproducible."""
    frame = table
    if classes:
        frame = frame[frame["label"].isin(classes)]
    frame = frame[frame[score].notna()]
    if threshold is not None:
        frame = frame[frame[score] >= threshold]
    return frame.sort_values([score, "id"], ascending=[False, True], kind="stable")


def sample_rows(n: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a uniform random sample of at most max_rows of n rows (all rows if n <= max)."""
    if n <= max_rows:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_rows, replace=False)).astype(np.int64)


def default_flag_threshold(values: np.ndarray) -> float:
    """The threshold the Background page flags images above at first: the 90th percentile of the finite
    scores, rounded up to 0.01 (so about a tenth of the images is flagged), at most 1; 0.5 when none is finite."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.5
    return float(min(1.0, np.ceil(np.quantile(finite, 0.9) * 100) / 100))


def table_csv(frame: pd.DataFrame) -> bytes:
    """CSV bytes of table rows for a download. List columns (top5_classes, top5_probs) are written as
    space-separated values: pandas would print each numpy array's repr, which is both unreadable for a
    spreadsheet and ~100x slower (18 s instead of well under 1 s for 100,000 rows)."""
    out = frame.copy(deep=False)
    for column in out.columns:
        values = out[column]
        if values.dtype == object and len(values) and isinstance(values.iloc[0], (list, tuple, np.ndarray)):
            if np.asarray(values.iloc[0]).dtype.kind == "f":
                out[column] = [" ".join(f"{x:.6g}" for x in np.asarray(v).tolist()) for v in values]
            else:
                out[column] = [" ".join(map(str, np.asarray(v).tolist())) for v in values]
    return out.to_csv(index=False).encode("utf-8")
