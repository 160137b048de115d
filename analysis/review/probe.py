"""Find more like these: rank every image by how much its explanation resembles a few tagged examples.

A linear probe on the cached descriptors (the unit-mass downsampled maps, `Cache.descriptors`), as
Reveal-to-Revise ranks a dataset with a direction fitted on a few confirmed shortcut samples (Pahde et al.,
"Reveal to Revise", 2023, arXiv 2303.12641): class-balanced logistic regression (scikit-learn), positives =
the images tagged so far, negatives = the images a reviewer rejected plus a random sample of the other
images, refitted after every round of accept / reject.

Our choices (measured on the demo, see README "Find more like these"):

* **Unlabelled images as negatives, always.** With positives only, a probe needs something to contrast them
  with. A random sample of the untagged images is mostly negatives when the tagged kind is rare, and
  Elkan & Noto (KDD 2008) show that a classifier of tagged vs. unlabelled ranks images in the same order as
  one of positives vs. negatives (its output is the latter's times a constant). Rejected images are added
  but cannot replace the sample: the loop shows the reviewer the probe's own top candidates, so the
  rejections are hard negatives near the boundary, not a picture of the rest of the data.
* **Cross-fitting.** An untagged image of the sought kind that lands in the negative sample would be pushed
  down by the very fit that ranks it. The training set is split into folds; each sampled image is scored by
  the probe fitted without its fold (the images outside the sample by the probe fitted on everything). The
  same out-of-fold scores give the cross-validated average precision that says how well the probe separates
  what is tagged so far.
* **Strong L2 regularisation on unscaled descriptors.** With ten positives in a few hundred dimensions, a
  weakly regularised probe separates them by noise; strong regularisation pulls the weight vector towards the
  difference of the class means (the "pattern" direction that Pahde et al. 2024, "Navigating Neural Space",
  find more robust than a fitted filter). Per-feature standardisation hurts: it blows up cells that are
  almost always empty. Descriptors are multiplied by their number of cells (mean 1 per cell), and the
  objective is 0.5 |w|^2 + C (mean loss over positives + mean loss over negatives), with C = PROBE_C,
  independent of how many images there are.

Pure numpy / scikit-learn; `rank_by_probe` works on arrays, `analysis.review.Review.rank_like` feeds it the
cache's descriptors.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd

PROBE_C = 0.1                 # inverse L2 strength against the two class-mean losses (see the module doc)
UNLABELLED_SAMPLE = 2000      # untagged images drawn as negatives
MAX_FOLDS = 5


@dataclass(frozen=True)
class ProbeQuality:
    """How well the probe separates what is tagged so far (from out-of-fold scores).

    cv_roc_auc: the chance that a held-out tagged image scores above a held-out untagged one (sampled
      unlabelled images; the few untagged positives among them lower it only in proportion): the headline
      number; 0.5 is chance. NaN with fewer than two positives.
    cv_average_precision: positives against every negative (rejected + sampled unlabelled). Untagged
      positives among the sampled images count as misses, so it is a lower bound, and a low one when the
      tagged kind is common among the untagged.
    chance: cv_average_precision for a random ranking (the positives' share of the training set).
    cv_average_precision_rejected: positives against the rejected images only (the hard cases); NaN when
      nothing was rejected yet.
    """

    cv_roc_auc: float
    cv_average_precision: float
    chance: float
    cv_average_precision_rejected: float
    chance_rejected: float
    positives: int
    rejected: int
    unlabelled_negatives: int
    folds: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_ids(values: Iterable[int] | np.ndarray) -> np.ndarray:
    """Sorted unique int64 ids from any iterable of integers (a list, an array, a Series, a set ...);
    ValueError for values that are not whole numbers."""
    array = (np.asarray(values) if isinstance(values, (np.ndarray, pd.Series, list, tuple))
             else np.fromiter(values, dtype=np.int64))
    array = array.reshape(-1)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        try:
            as_float = array.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError("image ids must be integers") from None
        if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
            raise ValueError("image ids must be integers")
    return np.unique(array.astype(np.int64))


def probe_features(descriptors: np.ndarray) -> np.ndarray:
    """float64 [n, P]: unit-mass descriptors times P (a uniform map is 1 in every cell); non-finite -> 0."""
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be [n, P], got shape {x.shape}")
    return np.where(np.isfinite(x), x, 0.0) * x.shape[1]


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    # class_weight="balanced" gives each class a total weight of n/2, so C * 2 / n makes the objective
    # 0.5 |w|^2 + c * (mean positive loss + mean negative loss), whatever n is.
    probe = LogisticRegression(C=c * 2.0 / len(y), class_weight="balanced", max_iter=2000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a ranking needs the direction, not the optimum
        probe.fit(x, y)
    return probe


def _ranking_quality(y: np.ndarray, scores: np.ndarray, metric: str) -> float:
    from sklearn.metrics import average_precision_score, roc_auc_score

    if y.sum() == 0 or y.sum() == len(y):
        return float("nan")
    return float((average_precision_score if metric == "ap" else roc_auc_score)(y, scores))


def _tagged_rows(ids: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of `ids` holding the positive and the negative ids; ValueError for an id not in `ids`."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]

    def rows_of(wanted: np.ndarray) -> np.ndarray:
        where = np.searchsorted(sorted_ids, wanted)
        where = np.minimum(where, max(len(sorted_ids) - 1, 0))
        if len(sorted_ids) == 0 or np.any(sorted_ids[where] != wanted):
            missing = wanted if len(sorted_ids) == 0 else wanted[sorted_ids[where] != wanted]
            raise ValueError(f"image ids not in the cache: {missing[:10].tolist()}")
        return order[where]

    return rows_of(positives), rows_of(negatives)


def _out_of_fold_scores(x: np.ndarray, train_rows: np.ndarray, y: np.ndarray, folds: int, seed: int,
                        c: float) -> np.ndarray:
    """Each training row's score by the probe fitted on the other folds (NaN everywhere for fewer than 2 folds)."""
    from sklearn.model_selection import StratifiedKFold

    out_of_fold = np.full(len(train_rows), np.nan)
    if folds >= 2:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for fit_part, held_out in splitter.split(train_rows, y):
            probe = _fit(x[train_rows[fit_part]], y[fit_part], c)
            out_of_fold[held_out] = probe.decision_function(x[train_rows[held_out]])
    return out_of_fold


def _probe_quality(y: np.ndarray, kind: np.ndarray, out_of_fold: np.ndarray, folds: int) -> ProbeQuality:
    """The cross-validated quality; `kind` says of each training row 0 positive, 1 rejected, 2 unlabelled."""
    positives, rejected, unlabelled = (int(np.sum(kind == k)) for k in (0, 1, 2))
    if folds < 2:
        return ProbeQuality(float("nan"), float("nan"), float(y.mean()), float("nan"), float("nan"), positives,
                            rejected, unlabelled, 0)
    versus_rejected, versus_unlabelled = kind < 2, kind != 1
    return ProbeQuality(
        cv_roc_auc=_ranking_quality(y[versus_unlabelled], out_of_fold[versus_unlabelled], "auc"),
        cv_average_precision=_ranking_quality(y, out_of_fold, "ap"), chance=float(y.mean()),
        cv_average_precision_rejected=_ranking_quality(y[versus_rejected], out_of_fold[versus_rejected], "ap"),
        chance_rejected=(float(y[versus_rejected].mean()) if rejected else float("nan")),
        positives=positives, rejected=rejected, unlabelled_negatives=unlabelled, folds=folds)


def rank_by_probe(ids: np.ndarray, descriptors: np.ndarray, positive_ids: Iterable[int] | np.ndarray,
                  negative_ids: Iterable[int] | np.ndarray = (), seed: int = 0,
                  unlabelled_sample: int = UNLABELLED_SAMPLE, c: float = PROBE_C,
                  max_folds: int = MAX_FOLDS) -> tuple[pd.DataFrame, ProbeQuality]:
    """Rank every image of `ids` that is neither positive nor negative, most like the positives first.

    ids: int64 [n] image ids, rows of `descriptors` [n, P]. Returns (DataFrame with columns id, score --
    the probe's log-odds, comparable within one ranking only; ties broken by id -- and the ProbeQuality).
    Deterministic for a given seed. ValueError for no positives, ids not in `ids`, an id both positive and
    negative, or nothing to contrast the positives with.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    x = probe_features(descriptors)
    if len(x) != len(ids):
        raise ValueError(f"{len(ids)} ids for {len(x)} descriptor rows")
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
        raise ValueError(f"c must be a positive number, got {c!r}")
    positives, negatives = as_ids(positive_ids), as_ids(negative_ids)
    if len(positives) == 0:
        raise ValueError("tag at least one image to find more like it")
    both = np.intersect1d(positives, negatives)
    if len(both):
        raise ValueError(f"{len(both)} image(s) are both tagged and rejected (e.g. id {int(both[0])})")
    pos_rows, neg_rows = _tagged_rows(ids, positives, negatives)
    labelled = np.zeros(len(ids), bool)
    labelled[pos_rows] = labelled[neg_rows] = True
    unlabelled_rows = np.nonzero(~labelled)[0]
    rng = np.random.default_rng(seed)
    sample_rows = np.sort(rng.choice(unlabelled_rows, size=min(len(unlabelled_rows), int(unlabelled_sample)),
                                     replace=False)) if len(unlabelled_rows) else unlabelled_rows
    if len(neg_rows) + len(sample_rows) == 0:
        raise ValueError("every image is tagged: there is nothing to contrast the tagged images with")
    train_rows = np.concatenate([pos_rows, neg_rows, sample_rows])
    y = np.concatenate([np.ones(len(pos_rows)), np.zeros(len(neg_rows) + len(sample_rows))]).astype(int)
    kind = np.concatenate([np.zeros(len(pos_rows)), np.ones(len(neg_rows)), np.full(len(sample_rows), 2)])

    scores = np.full(len(ids), np.nan)
    folds = min(max_folds, len(pos_rows), len(neg_rows) + len(sample_rows))
    out_of_fold = _out_of_fold_scores(x, train_rows, y, folds, seed, c)
    full = _fit(x[train_rows], y, c)
    rest = unlabelled_rows if folds < 2 else np.setdiff1d(unlabelled_rows, sample_rows, assume_unique=True)
    if len(rest):
        scores[rest] = full.decision_function(x[rest])
    if folds >= 2:
        sampled = kind == 2
        scores[train_rows[sampled]] = out_of_fold[sampled]
    ranked = unlabelled_rows[np.lexsort((ids[unlabelled_rows], -scores[unlabelled_rows]))]
    frame = pd.DataFrame({"id": ids[ranked], "score": scores[ranked]})
    return frame.reset_index(drop=True), _probe_quality(y, kind, out_of_fold, folds)
