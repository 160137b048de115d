"""The tag widgets and the Find-more page in Streamlit's AppTest (the real app, dashboard/app.py with
st.navigation, on a copy of the small real cache): tag and untag through the Image page's form, remove a tag,
accept and reject candidates (each decision refits the probe), the label-error view follows Cleanlab's ranking,
and no page writes a tags database before the first tag. The real-browser flow is tests/test_browser_tags.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis.cache import load
from analysis.explore import cluster_offline
from analysis.review import DB_NAME, Review, label_issues
from tests import helpers



@pytest.fixture()
def cache_dir(small_cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(small_cache, tmp_path / "cache"))


def open_page(monkeypatch: pytest.MonkeyPatch, cache_dir: Path, page: str, query: dict[str, str]) -> AppTest:
    at = helpers.open_page(monkeypatch, cache_dir, page, query)
    assert not at.exception, [e.value for e in at.exception]
    return at


def button(at: AppTest, label: str | None = None, key_prefix: str | None = None):
    found = [b for b in at.button if (label is None or b.label == label)
             and (key_prefix is None or (b.key or "").startswith(key_prefix))]
    assert found, (label, key_prefix, [(b.label, b.key) for b in at.button])
    return found[0]


def test_pages_write_nothing_before_the_first_tag(monkeypatch, cache_dir):
    for page, query in [("overview", {}), ("image", {"id": "0"}), ("background", {"threshold": "0"}),
                        ("mistakes", {"true": "0", "pred": "1"}), ("mistakes", {"mk_view": "label_errors"}),
                        ("review", {})]:
        at = open_page(monkeypatch, cache_dir, page, query)
        assert not at.error, (page, [e.value for e in at.error])
    assert not (cache_dir / DB_NAME).exists()
    assert "Nothing is tagged yet" in at.info[0].value


def test_image_page_tags_untags_and_removes(monkeypatch, cache_dir):
    at = open_page(monkeypatch, cache_dir, "image", {"id": "3"})
    at.text_input(key="tag_who").input("Ada")
    at.selectbox(key="img_tag_choice").select("ambiguous")
    at.text_input(key="img_tag_note").input("blurry")
    button(at, "Tag").click()
    at.run()
    assert [s.value for s in at.success] == ["Tagged 1 image “ambiguous”."]
    review = Review(cache_dir)
    assert review.tags()[["id", "tag", "note", "who"]].values.tolist() == [[3, "ambiguous", "blurry", "Ada"]]
    # free text wins over the chosen tag; then an empty free-text tag is an error on the page, not a traceback
    at.text_input(key="img_tag_new").input("odd corner")
    button(at, "Tag").click()
    at.run()
    assert sorted(review.tags()["tag"]) == ["ambiguous", "odd corner"]
    at.text_input(key="img_tag_note").input("bad\x00note")   # refused by Review: one line on the page
    button(at, "Tag").click()
    at.run()
    assert not at.exception and [e.value for e in at.error] == ["a note holds control characters"]
    assert sorted(review.tags()["tag"]) == ["ambiguous", "odd corner"]
    at.text_input(key="img_tag_new").input("")
    at.text_input(key="img_tag_note").input("")
    at.selectbox(key="img_tag_choice").select("fine")
    button(at, "Untag").click()
    at.run()
    assert not at.exception and [s.value for s in at.success] == ["Removed “fine” from 0 images."]
    # the Remove button beside a tag
    button(at, "Remove", key_prefix="img_remove_ambiguous").click()
    at.run()
    assert review.tags()["tag"].tolist() == ["odd corner"]


def test_find_more_accept_and_reject_refit(monkeypatch, cache_dir):
    table = load(cache_dir).table
    cats = table.loc[table["label"] == 0, "id"].tolist()
    review = Review(cache_dir)
    review.tag(cats[:3], "shortcut")
    at = open_page(monkeypatch, cache_dir, "review", {"fm_top": "4"})
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Tagged"] == "3" and metrics["Rejected"] == "0"
    expected = review.rank_like(review.ids("shortcut"))["id"].head(4).tolist()
    shown = [int(b.key.removeprefix("fm_no_")) for b in at.button if (b.key or "").startswith("fm_no_")]
    assert shown == expected
    button(at, key_prefix=f"fm_no_{shown[0]}").click()
    at.run()
    assert review.rejected("shortcut").tolist() == [shown[0]]
    assert {m.label: m.value for m in at.metric}["Rejected"] == "1"
    refit = review.rank_like(review.ids("shortcut"), review.rejected("shortcut"))["id"].head(4).tolist()
    assert [int(b.key.removeprefix("fm_no_")) for b in at.button if (b.key or "").startswith("fm_no_")] == refit
    button(at, key_prefix=f"fm_yes_{refit[0]}").click()
    at.run()
    assert refit[0] in review.ids("shortcut").tolist()
    assert {m.label: m.value for m in at.metric}["Tagged"] == "4"
    button(at, "Accept all 4").click()
    at.run()
    assert len(review.ids("shortcut")) == 8
    counts = [d.value for d in at.dataframe if "rejected" in d.value.columns][0]
    assert counts[["tag", "images", "rejected"]].values.tolist() == [["shortcut", 8, 1]]


def test_label_error_view_follows_cleanlab(monkeypatch, cache_dir):
    at = open_page(monkeypatch, cache_dir, "mistakes", {"mk_view": "label_errors", "le_top": "5"})
    table = [d for d in at.dataframe if "label_quality" in d.value.columns][0].value
    expected = label_issues(load(cache_dir))
    assert table["id"].tolist() == expected["id"].tolist() and "tags" in table.columns
    assert any("in-sample" in c.value and "conservative" in c.value for c in at.caption)
    assert at.number_input(key="mk_le_top").value == 5
    # tag the gallery (the five most likely label errors) with the form's default tag, "label error"
    assert at.selectbox(key="mk_le_tagging_choice").value == "label error"
    button(at, "Tag").click()
    at.run()
    assert Review(cache_dir).ids("label error").tolist() == sorted(expected["id"].head(5).tolist())
    table = [d for d in at.dataframe if "label_quality" in d.value.columns][0].value
    assert table["tags"].head(5).tolist() == ["label error"] * 5 and set(table["tags"].iloc[5:]) == {""}


def test_clusters_page_tags_a_whole_cluster_and_filters_by_it(monkeypatch, cache_dir):
    """The Clusters gallery's form tags every member of the focused cluster (not only the gallery's page); the
    tiles then end in the tag, the filter keeps them, and a box selection is tagged the same way."""
    stored = cluster_offline.read_clustering(load(cache_dir), "all")
    focus = int(stored.summary["cluster"].iloc[0])
    members = sorted(int(i) for i in stored.members(focus))
    at = open_page(monkeypatch, cache_dir, "clusters", {})
    assert at.selectbox(key="c_focus").value == focus
    assert not (cache_dir / DB_NAME).exists()                     # looking wrote nothing
    at.selectbox(key="c_tagging_choice").select("shortcut")
    at.text_input(key="c_tagging_note").input("corner tag")
    button(at, "Tag").click()
    at.run()
    assert not at.exception
    assert [s.value for s in at.success] == [f"Tagged {len(members):,} image{'s' if len(members) != 1 else ''} "
                                             "“shortcut”."]
    review = Review(cache_dir)
    assert review.ids("shortcut").tolist() == members
    assert set(review.tags()["note"]) == {"corner tag"}
    captions = [c for image in at.image for c in image.captions]
    assert sum(c.endswith("· tag: shortcut") for c in captions) == min(len(members), 24), captions
    # the filter: "untagged" leaves nothing of this cluster, "tagged: shortcut" keeps all of it (URL-bound)
    at.selectbox(key="c_gallery_tag").select("untagged").run()
    assert at.query_params["c_gallery_tag"] == "untagged"
    assert "No image to show." in [i.value for i in at.info]
    assert not [f for f in at.get("form") if f.form_id == "c_tagging_form"]   # nothing left to tag
    at = open_page(monkeypatch, cache_dir, "clusters", {"c_gallery_tag": "tagged: shortcut"})
    assert at.selectbox(key="c_gallery_tag").value == "tagged: shortcut"
    assert any(c.value == f"{len(members):,} of {len(members):,} images: tagged: shortcut" for c in at.caption)
    # the box selection: every image of the scope inside it, tagged at once
    layout = stored.assignments
    x0, y0 = layout[["x", "y"]].min()
    x1, y1 = layout[["x", "y"]].max()
    at = open_page(monkeypatch, cache_dir, "clusters", {"c_sel": f"box:{x0 - 1},{x1 + 1},{y0 - 1},{y1 + 1}"})
    at.selectbox(key="c_tagging_choice").select("fine")
    button(at, "Tag").click()
    at.run()
    assert Review(cache_dir).ids("fine").tolist() == sorted(layout["id"].astype(int).tolist())


def test_clusters_csv_carries_the_tags(cache_dir):
    """The members' CSV (built when the download is clicked) has a tags column: "" before any tag."""
    import io

    import pandas as pd

    from analysis.explore.statistics import table_csv
    from dashboard.views.clusters import members_table

    cache = load(cache_dir)
    stored = cluster_offline.read_clustering(cache, "all")
    by_cluster = stored.assignments.set_index("id")["cluster"]
    ids = [int(i) for i in stored.members(int(stored.summary["cluster"].iloc[0]))]
    before = pd.read_csv(io.BytesIO(table_csv(members_table(cache, ids, by_cluster, None))), keep_default_na=False)
    assert before["id"].tolist() == ids and set(before["tags"]) == {""}
    review = Review(cache_dir)
    review.tag(ids[:1], "shortcut")
    review.tag(ids[:1], "ambiguous")
    after = pd.read_csv(io.BytesIO(table_csv(members_table(cache, ids, by_cluster, review))), keep_default_na=False)
    assert after["tags"].tolist() == ["ambiguous; shortcut"] + [""] * (len(ids) - 1)
    assert after["cluster"].tolist() == before["cluster"].tolist()


def test_per_class_gallery_tags_and_filters(monkeypatch, cache_dir):
    table = load(cache_dir).table
    wrong = sorted(table.loc[(table["label"] == 0) & ~table["correct"], "id"].astype(int).tolist())
    assert wrong
    at = open_page(monkeypatch, cache_dir, "per_class", {"class": "0", "show": "wrong"})
    assert at.selectbox(key="pc_tagging_choice").value == "shortcut"
    at.selectbox(key="pc_tagging_choice").select("label error")
    button(at, "Tag").click()
    at.run()
    assert not at.exception
    assert Review(cache_dir).ids("label error").tolist() == wrong
    at = open_page(monkeypatch, cache_dir, "per_class", {"class": "0", "pc_tag": "untagged"})
    assert at.selectbox(key="pc_tag").value == "untagged"
    rows = table[table["label"] == 0]
    assert any(c.value == f"{len(rows) - len(wrong):,} of {len(rows):,} images: untagged" for c in at.caption)
    captions = [c for image in at.image for c in image.captions if c.startswith("#")]
    assert captions and not any("tag" in c for c in captions)
