"""analysis/review/tag_views.py: what the pages show of the tags, on a copy of the small real cache."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.review import tag_views
from analysis.cache import load
from analysis.review import Review, label_issues


@pytest.fixture()
def review(small_cache: Path, tmp_path: Path) -> Review:
    copy = Path(shutil.copytree(small_cache, tmp_path / "cache"))
    return Review(copy, cache=load(copy))


def test_filters_keep_the_order_given(review):
    ids = review.cache.table["id"].tolist()[::-1]           # a gallery's own order (e.g. by score)
    review.tag(ids[:1] + ids[3:5], "shortcut", who="Ada")
    review.tag(ids[3:4], "fine")
    choices = tag_views.filter_choices(review)
    assert choices == [tag_views.ALL, tag_views.ANY_TAG, tag_views.UNTAGGED, "tagged: fine", "tagged: shortcut"]
    assert tag_views.filter_by_tag(review, ids, tag_views.ALL) == ids
    assert tag_views.filter_by_tag(review, ids, "tagged: shortcut") == [ids[0], ids[3], ids[4]]
    assert tag_views.filter_by_tag(review, ids, "tagged: fine") == [ids[3]]
    assert tag_views.filter_by_tag(review, ids, tag_views.ANY_TAG) == [ids[0], ids[3], ids[4]]
    untagged = tag_views.filter_by_tag(review, ids, tag_views.UNTAGGED)
    assert untagged == [i for k, i in enumerate(ids) if k not in (0, 3, 4)]
    assert tag_views.filter_by_tag(review, ids, "tagged: nobody") == []
    with pytest.raises(ValueError):
        tag_views.filter_by_tag(review, ids, "shortcut")


def test_tags_column_and_counts(review):
    ids = review.cache.table["id"].tolist()
    review.tag(ids[:2], "shortcut", who="Ada")
    review.tag(ids[1:2], "ambiguous", who="Bob")
    review.reject(ids[5:8], "shortcut")
    frame = tag_views.with_tags(pd.DataFrame({"id": ids[:4], "x": range(4)}), review)
    assert frame["tags"].tolist() == ["shortcut", "ambiguous; shortcut", "", ""] and frame["x"].tolist() == [0, 1, 2, 3]
    counts = tag_views.tag_counts(review)
    assert counts[["tag", "images", "rejected", "who"]].values.tolist() == [["shortcut", 2, 3, "Ada"],
                                                                             ["ambiguous", 1, 0, "Bob"]]
    assert tag_views.tag_counts(Review(review.root)).equals(counts)


def test_find_more_is_the_top_of_rank_like(review):
    table = review.cache.table
    with pytest.raises(ValueError, match="no image is tagged"):
        tag_views.find_more(review, "shortcut", 5)
    cats = table.loc[table["label"] == 0, "id"].to_numpy(np.int64)
    review.tag(cats[:4], "shortcut")
    review.reject(table.loc[table["label"] == 1, "id"].to_numpy(np.int64)[:2], "shortcut")
    top = tag_views.find_more(review, "shortcut", 5)
    full = review.rank_like(review.ids("shortcut"), review.rejected("shortcut"))
    assert top["id"].tolist() == full["id"].head(5).tolist() and top["rank"].tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(top["score"], full["score"].head(5))
    assert top.attrs["probe"]["positives"] == 4 and top.attrs["probe"]["rejected"] == 2
    assert top.attrs["ranked"] == len(table) - 6
    rows = table.set_index("id").loc[top["id"]]
    assert top["label_name"].tolist() == rows["label_name"].tolist()


def test_label_error_table_follows_label_issues(review):
    cache = review.cache
    frame = tag_views.label_error_table(cache)
    issues = label_issues(cache)
    assert frame["id"].tolist() == issues["id"].tolist() and frame["rank"].tolist() == list(range(1, len(cache) + 1))
    np.testing.assert_allclose(frame["label_quality"], issues["label_quality"])
    assert frame["label_quality"].is_monotonic_increasing
    rows = cache.table.set_index("id").loc[frame["id"]]
    assert frame["label_name"].tolist() == rows["label_name"].tolist()
    assert frame.attrs["probabilities"] in ("stored", "top-5")
