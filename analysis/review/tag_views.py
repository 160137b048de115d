"""What the pages show of the tags (issue 14): a gallery filtered by tag, a table with a tags column, the tag
list with counts, one round of "find more like these", the likely label errors as a table.

Thin helpers over `analysis.review` (the tags database, the probe, Cleanlab's label quality) so that the
dashboard's views only load, call and draw; no Streamlit here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from analysis.cache import Cache
from analysis.review import DEFAULT_LABEL_QUALITY_METHOD, Review, clean_tag, label_issues, shortcut_victims

ALL = "all images"          # the tag filter's choices besides the tags themselves
UNTAGGED = "untagged"
ANY_TAG = "any tag"
FILTER_PREFIX = "tagged: "  # a filter choice for one tag reads "tagged: shortcut"


def filter_choices(review: Review) -> list[str]:
    """The choices of a gallery's tag filter: all images, any tag, untagged, then one per tag in use."""
    used = sorted(set(review.tags()["tag"]), key=str.casefold)
    return [ALL, ANY_TAG, UNTAGGED] + [FILTER_PREFIX + tag for tag in used]


def filter_by_tag(review: Review, ids: Sequence[int] | np.ndarray, choice: str) -> list[int]:
    """The ids (in the order given) that the filter `choice` (one of `filter_choices`) keeps; ValueError for an
    unknown choice."""
    ids = [int(i) for i in ids]
    if choice == ALL:
        return ids
    if choice in (ANY_TAG, UNTAGGED):
        tagged = set(review.tags()["id"].tolist())
        return [i for i in ids if (i in tagged) == (choice == ANY_TAG)]
    if not choice.startswith(FILTER_PREFIX):
        raise ValueError(f"unknown tag filter {choice!r}")
    tagged = set(review.ids(clean_tag(choice[len(FILTER_PREFIX):])).tolist())
    return [i for i in ids if i in tagged]


def with_tags(frame: pd.DataFrame, review: Review, id_column: str = "id") -> pd.DataFrame:
    """`frame` with a `tags` column (each row's tags, "; "-joined, "" when untagged), e.g. for a CSV export."""
    column = review.tag_column(frame[id_column].to_numpy(np.int64))
    return frame.assign(tags=column.to_numpy())


def tag_counts(review: Review) -> pd.DataFrame:
    """One row per tag in use: tag, images (tagged), rejected (images rejected for it), last (time of the
    latest tagging), who (the names that tagged it, "; "-joined); most images first."""
    tags = review.tags()
    names = sorted(set(tags["tag"]), key=str.casefold)
    rows = []
    for name in names:
        of = tags[tags["tag"] == name]
        rows.append({"tag": name, "images": len(of), "rejected": len(review.rejected(name)),
                     "last": of["time"].max(),
                     "who": "; ".join(sorted({w for w in of["who"] if isinstance(w, str) and w}))})
    frame = pd.DataFrame(rows, columns=["tag", "images", "rejected", "last", "who"])
    return frame.sort_values(["images", "tag"], ascending=[False, True], kind="stable").reset_index(drop=True)


def find_more(review: Review, tag: str, top: int, seed: int = 0) -> pd.DataFrame:
    """One round of "find more like these" for `tag`: the `top` images that are neither tagged nor rejected,
    most like the tagged ones first (columns id, score, rank from 1, label_name, pred_name, correct);
    `attrs["probe"]` says how well the probe separates what is tagged so far (see `Review.rank_like`).
    ValueError when nothing is tagged `tag`."""
    tag = clean_tag(tag)
    positives = review.ids(tag)
    if len(positives) == 0:
        raise ValueError(f"no image is tagged {tag!r} yet: tag a few, then find more like them")
    ranking = review.rank_like(positives, review.rejected(tag), seed=seed)
    shown = ranking.head(max(0, int(top))).reset_index(drop=True)
    table = review.cache.table.set_index("id")
    rows = table.loc[shown["id"].to_numpy(np.int64)]
    result = shown.assign(rank=np.arange(1, len(shown) + 1), label_name=rows["label_name"].to_numpy(),
                          pred_name=rows["pred_name"].to_numpy(), correct=rows["correct"].to_numpy())
    result.attrs["probe"] = ranking.attrs.get("probe", {})
    result.attrs["ranked"] = len(ranking)
    return result


def label_error_table(cache: Cache, method: str = DEFAULT_LABEL_QUALITY_METHOD,
                      probabilities: np.ndarray | None = None) -> pd.DataFrame:
    """Every image but the shortcut victims, most likely mislabelled first (Cleanlab,
    `analysis.review.label_issues`): columns rank (from 1), id, label_quality, label_name, pred_name,
    confidence, correct, path. attrs: "probabilities" (where they came from), "victims" (how many were left
    out: `shortcut_victim_table`)."""
    issues = label_issues(cache, method=method, probabilities=probabilities)
    rows = cache.table.set_index("id").loc[issues["id"].to_numpy(np.int64)]
    frame = pd.DataFrame({
        "rank": np.arange(1, len(issues) + 1), "id": issues["id"].to_numpy(np.int64),
        "label_quality": issues["label_quality"].to_numpy(np.float64),
        "label_name": rows["label_name"].to_numpy(), "pred_name": rows["pred_name"].to_numpy(),
        "confidence": rows["confidence"].to_numpy(np.float64), "correct": rows["correct"].to_numpy(bool),
        "path": rows["path"].to_numpy()})
    frame.attrs.update(probabilities=issues.attrs.get("probabilities"), victims=issues.attrs.get("victims", 0))
    return frame


def shortcut_victim_table(cache: Cache) -> pd.DataFrame:
    """The wrong predictions a verified shortcut explains (`analysis.review.shortcut_victims`), left out of the
    label-error ranking: columns id, label_name, pred_name, confidence, region_share, finding, path; the
    strongest evidence in the region first."""
    victims = shortcut_victims(cache).sort_values(["region_share", "id"], ascending=[False, True], kind="stable")
    rows = cache.table.set_index("id").loc[victims["id"].to_numpy(np.int64)]
    return pd.DataFrame({
        "id": victims["id"].to_numpy(np.int64), "label_name": rows["label_name"].to_numpy(),
        "pred_name": rows["pred_name"].to_numpy(), "confidence": rows["confidence"].to_numpy(np.float64),
        "region_share": victims["region_share"].to_numpy(np.float64), "finding": victims["finding"].to_numpy(),
        "path": rows["path"].to_numpy()})

