"""Whatever a URL holds, a page shows a page: the links that used to put a traceback on the page, a fuzz of every
page's query parameters with bad values, and the last-resort guard. Streamlit's AppTest runs the real app
(dashboard/app.py, st.navigation) on a real cache made by the real job, large enough that the galleries and the
Mistakes cells have several pages (the old crashes needed a page number input to be shown)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from analysis.cache import load
from analysis.explore import cluster_offline
from tests.helpers import (TINY_MODEL_FILE, make_image_folder, make_mask_folder, open_page, page_texts,
                           train_tiny_cnn)

BAD_VALUES = ["nan", "inf", "-inf", "-1", "0", "1e308", "99999999999999999999", "garbage", "", " 1 "]
SELECTION_VALUES = ["ids:nan", "ids:inf,2", "box:nan,0,0,1", "ids:1e999,-5", "box:1,2", "ids:", "box:a,b,c,d",
                    "box:1e999,-1e999,0,1", "box:0,1,0,1,2", "pred:nope"]
EVERYWHERE = "box:-1e9,1e9,-1e9,1e9"   # a box around every point of any layout
# Each page's query parameters; the "gates" must be valid for the rest of the page to run at all.
PAGES = {
    "findings": ({}, []),
    "overview": ({}, []),
    "clusters": ({}, ["c_scope", "c_clust", "c_sel", "c_focus", "c_gallery_page", "c_gallery_tag"]),
    "background": ({"threshold": "0"}, ["score", "threshold", "class", "view", "bg_page", "bg_tag"]),
    "per_class": ({"class": "0"}, ["class", "show", "pc_page", "pc_grid_page", "pc_tag"]),
    "mistakes": ({"true": "0", "pred": "1"}, ["true", "pred", "value", "mk_page", "mk_tag", "mk_view"]),
    "image": ({}, ["id", "opacity", "cmap"]),
    "trust": ({}, ["st_by", "st_class", "st_q", "st_max", "st_run", "sn_variant", "sn_metric"]),
    "review": ({}, ["fm_tag", "fm_top", "fm_page"]),
    "concepts": ({}, ["class", "concept"]),
}
# Pages whose parameters matter only with tags in the database (test_bad_values_with_tags_in_use).
TAGGED_PAGES = {
    "review": ({}, ["fm_tag", "fm_top", "fm_page"]),
    "mistakes": ({"mk_view": "label_errors"}, ["le_top", "mk_le_tag", "mk_le_page", "mk_view"]),
    "background": ({"threshold": "0"}, ["bg_tag", "bg_page"]),
    "clusters": ({}, ["c_gallery_tag", "c_gallery_page", "c_sel", "c_focus"]),
    "per_class": ({"class": "0"}, ["pc_tag", "pc_page", "show"]),
    "image": ({}, ["id"]),
    "overview": ({}, []),
}


@pytest.fixture(scope="module")
def large_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 30 images of 20 x 20 with masks, the last 10 of each class showing the next class's colour (so
    the trained tiny CNN puts about 10 images in each off-diagonal cell), explained by the real job."""
    from analysis.__main__ import main

    root = tmp_path_factory.mktemp("large")
    make_image_folder(root / "images", per_class=30, size=20, mislabelled=10)
    make_mask_folder(root / "images", root / "masks", size=20)
    # lr 0.005: at 0.02 (120 steps) a class went unpredicted with FGCAM_TEST_SEED 0, 2 and 3 (an empty mistakes
    # cell 0 -> 1 with seed 2). Measured with seeds 0 to 3, 1 and 2 threads: 10 images in each off-diagonal cell.
    train_tiny_cnn(root / "images", root / "tiny_cnn.pth", steps=200, lr=0.005)
    out = root / "cache"
    assert main(["explain", "--data", str(root / "images"), "--model", f"{TINY_MODEL_FILE}:tiny_cnn",
                 "--checkpoint", str(root / "tiny_cnn.pth"), "--out", str(out), "--masks", str(root / "masks"),
                 "--device", "cpu", "--workers", "0", "--batch-size", "32", "--map-size", "16",
                 "--descriptor-size", "4", "--quiet"]) == 0
    return out


texts = page_texts


def assert_sane(at: AppTest, page: str, query: dict[str, str]) -> None:
    where = f"{page} {query}"
    assert not at.exception, (where, [e.value for e in at.exception])
    assert at.title, f"{where}: no page title"
    shown = texts(at)
    assert "Traceback" not in shown and "unexpected problem" not in shown, (where, shown[-1500:])


def distinct(queries: list[dict[str, str]]) -> list[dict[str, str]]:
    """The queries without repeats, in order: a page without parameters (Findings, Overview) gets one query, {},
    whatever the value -- running the same page on the same URL ten times more tests nothing more."""
    return list({tuple(sorted(query.items())): query for query in queries}.values())


def number_input(at: AppTest, key: str):
    found = [n for n in at.number_input if n.key == key]
    assert found, f"no number input {key!r}: the page has a single page, the test would prove nothing"
    return found[0]


# ------------------------------------------------------------------------------------------------ the listed URLs
@pytest.mark.parametrize("page, query, key", [
    ("mistakes", {"true": "0", "pred": "1", "mk_page": "-3"}, "mk_page"),
    ("mistakes", {"true": "0", "pred": "1", "mk_page": "0"}, "mk_page"),
    ("background", {"threshold": "0", "bg_page": "-3"}, "bg_page"),
    ("background", {"threshold": "0", "bg_page": "0"}, "bg_page"),
    ("per_class", {"class": "0", "pc_page": "-3"}, "pc_page"),
    ("per_class", {"class": "0", "pc_page": "0"}, "pc_page"),
    ("clusters", {"c_sel": EVERYWHERE, "c_gallery_page": "-3"}, "c_gallery_page"),
    ("clusters", {"c_sel": EVERYWHERE, "c_gallery_page": "0"}, "c_gallery_page"),
])
def test_page_numbers_below_one_open_the_first_page(monkeypatch, large_cache, page, query, key):
    at = open_page(monkeypatch, large_cache, page, query)
    assert_sane(at, page, query)
    assert number_input(at, key).value == 1


def test_a_page_number_past_the_last_opens_the_last(monkeypatch, large_cache):
    at = open_page(monkeypatch, large_cache, "mistakes", {"true": "0", "pred": "1", "mk_page": "99999"})
    assert_sane(at, "mistakes", {})
    pages = number_input(at, "mk_page")
    assert pages.value == pages.max >= 2


def test_opacity_inf_threshold_minus_inf_and_a_nan_selection(monkeypatch, large_cache):
    at = open_page(monkeypatch, large_cache, "image", {"opacity": "inf"})
    assert_sane(at, "image", {"opacity": "inf"})
    assert at.slider(key="img_opacity").value == 0.6  # the default: inf is no opacity
    at = open_page(monkeypatch, large_cache, "background", {"threshold": "-inf"})
    assert_sane(at, "background", {"threshold": "-inf"})
    default = open_page(monkeypatch, large_cache, "background", {})
    assert at.slider(key="bg_threshold_background_hotspot").value == \
        default.slider(key="bg_threshold_background_hotspot").value
    for selection in ("box:nan,0,0,1", "box:0,1,0,inf", "ids:nan"):
        at = open_page(monkeypatch, large_cache, "clusters", {"c_sel": selection})
        assert_sane(at, "clusters", {"c_sel": selection})
        assert "in the box" not in texts(at) and at.selectbox(key="c_focus")  # the cluster gallery instead


def test_st_run_in_a_link_starts_nothing(monkeypatch, large_cache):
    """The shortcut test loads the model and runs it on up to 5,000 images: only a click starts it."""
    query = {"st_run": "1", "st_by": "pred", "st_class": "1", "st_q": "10", "st_max": "5000"}
    at = open_page(monkeypatch, large_cache, "trust", query)
    assert_sane(at, "trust", query)
    assert "Accuracy before" not in {m.label for m in at.metric}
    assert "press **Run the test**" in texts(at)
    assert at.number_input[0].value == 5000 and at.slider[0].value == 10.0  # the link still fills in the form


# ------------------------------------------------------------------------------------------------ fuzz
@pytest.mark.slow
@pytest.mark.parametrize("page", list(PAGES))
def test_every_query_parameter_with_bad_values_gives_a_sane_page(monkeypatch, large_cache, page):
    """Each bad value in every parameter of the page at once (with the gates valid, so the whole page runs), then
    in each gate alone."""
    gates, parameters = PAGES[page]
    queries = []
    for value in BAD_VALUES + (SELECTION_VALUES if page == "clusters" else []):
        queries += [{**gates, **{name: value for name in parameters if name not in gates}}]
        queries += [{**gates, name: value} for name in gates]
    for query in distinct(queries):
        assert_sane(open_page(monkeypatch, large_cache, page, query), page, query)


@pytest.mark.slow
def test_bad_values_with_tags_in_use(monkeypatch, large_cache, tmp_path):
    """The tag filters, the Find-more page and the label-error gallery with tags in the database: every bad value
    gives a page; a link naming a tag that exists opens its filter, one naming no tag shows every image."""
    import shutil

    from analysis.review import Review

    cache = Path(shutil.copytree(large_cache, tmp_path / "cache"))
    ids = load(cache).table["id"].tolist()
    Review(cache).tag(ids[:4], "shortcut")
    Review(cache).reject(ids[4:6], "shortcut")
    for page, (gates, parameters) in TAGGED_PAGES.items():
        queries = [{**gates, **{name: value for name in parameters if name not in gates}}
                   for value in BAD_VALUES + ["tagged: nope", "tagged: ", "untagged"]]
        for query in distinct(queries):
            assert_sane(open_page(monkeypatch, cache, page, query), page, query)
    at = open_page(monkeypatch, cache, "background", {"threshold": "0", "bg_tag": "tagged: shortcut"})
    assert at.selectbox(key="bg_tag").value == "tagged: shortcut"
    assert "images: tagged: shortcut" in texts(at)
    at = open_page(monkeypatch, cache, "background", {"threshold": "0", "bg_tag": "tagged: nope"})
    assert at.selectbox(key="bg_tag").value == "all images"
    at = open_page(monkeypatch, cache, "review", {"fm_tag": "shortcut", "fm_top": "3"})
    assert {m.label: m.value for m in at.metric}["Tagged"] == "4"
    assert len([b for b in at.button if b.key and b.key.startswith("fm_yes_")]) == 3


# ------------------------------------------------------------------------------------------------ last resort
def _page_that_fails() -> None:
    from dashboard import common

    def broken() -> None:
        import streamlit as st

        st.title("A page")
        open("/srv/secret/layout/of/the/server.txt")  # FileNotFoundError naming a server path

    common.run_guarded(broken)


def test_an_unexpected_error_shows_a_message_without_trace_or_path():
    at = AppTest.from_function(_page_that_fails, default_timeout=60)
    at.run()
    assert not at.exception
    assert [t.value for t in at.title] == ["A page"]
    message = at.error[0].value
    assert message.startswith("This page hit an unexpected problem (FileNotFoundError:")
    assert "/srv" not in message and "secret" not in message and "<path>" in message


# ------------------------------------------------------------------------------------------------ offline results
def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def stored_tables(cache_dir: Path, scope: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The stored assignments (id, x, y, cluster) and summary of a scope's default clustering, read from the
    files themselves (not through the reading API the page uses)."""
    stored = cluster_offline.read_clustering(load(cache_dir), scope)
    frame = pd.read_parquet(stored.path / "assignments.parquet", columns=["id", "x", "y", stored.name])
    summary = pd.read_parquet(stored.path / "summary.parquet")
    summary = summary[summary["clustering"] == stored.name].sort_values("rank")
    return frame.rename(columns={stored.name: "cluster"}), summary


def test_clusters_page_shows_every_image_of_each_scope(monkeypatch, large_cache):
    """The page reads the offline results of every scope: all images, then a predicted class chosen in the menu;
    the cards follow the stored ranking and the gallery opens on the most suspicious cluster."""
    cache = load(large_cache)
    table, names = cache.table, list(cache.manifest["class_names"])
    scopes = cluster_offline.fresh_scopes(cache)
    predicted = table["pred"].value_counts().index     # a class nothing is predicted as has no scope
    assert scopes[:2] == ["all", "mistakes"] and {f"pred:{names[p]}" for p in predicted} <= set(scopes)
    at = open_page(monkeypatch, large_cache, "clusters", {})
    assert_sane(at, "clusters", {})
    assert len(at.selectbox(key="c_scope").options) == len(scopes)
    assert metric(at, "Images clustered") == f"{len(table):,}"
    for scope, rows in (("all", table), (f"pred:{names[predicted[0]]}", table[table["pred"] == predicted[0]])):
        if scope != "all":
            at.selectbox(key="c_scope").set_value(scope).run()
            assert_sane(at, "clusters", {"c_scope": scope})
            assert at.query_params["c_scope"] == scope
        assert metric(at, "Images clustered") == f"{len(rows):,}"
        frame, summary = stored_tables(large_cache, scope)
        assert sorted(frame["id"]) == sorted(rows["id"])
        cards = [m.value.split("**")[1] for m in at.markdown if m.value.startswith("**#")]
        assert cards == [f"#{r} C{c}" for r, c in zip(summary["rank"], summary["cluster"])][:len(cards)]
        assert at.selectbox(key="c_focus").value == summary["cluster"].iloc[0]


def test_a_box_in_the_link_selects_every_image_inside(monkeypatch, large_cache):
    frame, _ = stored_tables(large_cache, "all")
    x0, x1 = np.quantile(frame["x"], [0.1, 0.8])
    y0, y1 = float(frame["y"].min()) - 1, float(frame["y"].max()) + 1
    inside = frame[(frame["x"] >= x0) & (frame["x"] <= x1)]
    assert 24 < len(inside) < len(frame)   # more than a gallery page, fewer than all
    query = {"c_sel": f"box:{x1},{x0},{y0},{y1}"}   # corners in any order
    at = open_page(monkeypatch, large_cache, "clusters", query)
    assert_sane(at, "clusters", query)
    assert f"**{len(inside):,} images in the box**" in texts(at)
    assert number_input(at, "c_gallery_page").label == f"Page (of {-(-len(inside) // 24)}, {len(inside):,} images)"


def test_missing_or_stale_offline_results_name_the_command(monkeypatch, large_cache, tmp_path):
    """Without results, or with results of an older state of the cache, both pages say so in one line and name
    the command, whatever the link holds."""
    import json
    import shutil

    missing = Path(shutil.copytree(large_cache, tmp_path / "missing"))
    shutil.rmtree(missing / "analysis")
    stale = Path(shutil.copytree(large_cache, tmp_path / "stale"))
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["created"] = "2000-01-01T00:00:00"          # another generation of the cache: its results are stale
    (stale / "manifest.json").write_text(json.dumps(manifest))
    query = {"c_scope": "pred:nope", "c_clust": "x/y", "c_sel": "box:0,1,0,1", "class": "0", "c_gallery_page": "9"}
    for cache_dir, word in ((missing, "yet"), (stale, "stale")):
        for page in ("clusters", "per_class"):
            at = open_page(monkeypatch, cache_dir, page, query)
            assert_sane(at, page, query)
            assert len(at.info) == 1, [i.value for i in at.info]
            message = at.info[0].value
            assert f"python -m analysis cluster --cache {cache_dir}" in message, message
            assert (word in message) if page == "clusters" or word == "stale" else "not been computed" in message


def test_per_class_page_draws_the_stored_class_maps(monkeypatch, large_cache):
    cache = load(large_cache)
    table, names = cache.table, list(cache.manifest["class_names"])
    at = open_page(monkeypatch, large_cache, "per_class", {})
    assert_sane(at, "per_class", {})
    shown = texts(at)
    for label, name in enumerate(names):
        rows = table[table["label"] == label]
        assert f"**{name}** · {len(rows):,} images, {rows['correct'].mean():.0%} correct" in shown


def test_a_box_is_reclustered_live_on_a_click_only(monkeypatch, large_cache):
    """Issue 13: live re-clustering stays for a selection of a few thousand images. Nothing runs before the
    click; after it, every image of the box is clustered on its own and the summary adds up to the box."""
    from analysis.explore.cluster_data import LIVE_MAX, recluster_selection

    frame, _ = stored_tables(large_cache, "all")
    x0, x1 = np.quantile(frame["x"], [0.1, 0.8])
    y0, y1 = float(frame["y"].min()) - 1, float(frame["y"].max()) + 1
    inside = frame[(frame["x"] >= x0) & (frame["x"] <= x1)]["id"].to_numpy()
    query = {"c_sel": f"box:{x0},{x1},{y0},{y1}"}
    at = open_page(monkeypatch, large_cache, "clusters", query)
    assert_sane(at, "clusters", query)
    assert not [d for d in at.dataframe if "suspicion" in d.value.columns and len(d.value) and
                d.value["size"].sum() == len(inside)]          # not computed before the click
    at.button(key="c_live_go").click().run()
    assert_sane(at, "clusters", query)
    live = [d.value for d in at.dataframe if list(d.value.columns[:3]) == ["rank", "cluster", "size"]
            and d.value["size"].sum() == len(inside)]
    assert live, "the re-clustered selection's summary is missing"
    result, summary, prototypes = recluster_selection(load(large_cache), inside)
    assert sorted(result.ids) == sorted(inside) and summary["size"].sum() == len(inside)
    assert len(prototypes) == len(summary) and list(live[0]["size"]) == list(summary["size"])
    with pytest.raises(ValueError, match="not 3"):
        recluster_selection(load(large_cache), inside[:3])
    assert LIVE_MAX >= 1000
