"""Whatever a URL holds, a page shows a page: the links that used to put a traceback on the page, a fuzz of every
page's query parameters with bad values, and the last-resort guard. Streamlit's AppTest runs the real app
(dashboard/app.py, st.navigation) on a real cache made by the real job, large enough that the galleries and the
Mistakes cells have several pages (the old crashes needed a page number input to be shown)."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis.cache import load
from tests.helpers import TINY_MODEL_FILE, make_image_folder, make_mask_folder, train_tiny_cnn

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
BAD_VALUES = ["nan", "inf", "-inf", "-1", "0", "1e308", "99999999999999999999", "garbage", "", " 1 "]
SELECTION_VALUES = ["ids:nan", "ids:inf,2", "box:nan,0,0,1", "ids:1e999,-5", "box:1,2", "ids:", "box:a,b,c,d"]
# Each page's query parameters; the "gates" must be valid for the rest of the page to run at all.
PAGES = {
    "overview": ({}, []),
    "clusters": ({"c_k": "2"}, ["c_scope", "c_class", "c_desc", "c_emb", "c_algo", "c_k", "c_nn", "c_sel", "c_focus",
                                "c_gallery_page"]),
    "background": ({"threshold": "0"}, ["score", "threshold", "class", "view", "bg_page"]),
    "per_class": ({"class": "0"}, ["class", "show", "pc_page", "pc_grid_page"]),
    "mistakes": ({"true": "0", "pred": "1"}, ["true", "pred", "value", "mk_page"]),
    "image": ({}, ["id", "opacity", "cmap"]),
    "trust": ({}, ["st_by", "st_class", "st_q", "st_max", "st_run", "sn_variant", "sn_metric"]),
}


@pytest.fixture(scope="module")
def large_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 30 images of 20 x 20 with masks, the last 10 of each class showing the next class's colour (so
    the trained tiny CNN puts about 10 images in each off-diagonal cell), explained by the real job."""
    from analysis.__main__ import main

    root = tmp_path_factory.mktemp("large")
    make_image_folder(root / "images", per_class=30, size=20, mislabelled=10)
    make_mask_folder(root / "images", root / "masks", size=20)
    train_tiny_cnn(root / "images", root / "tiny_cnn.pth", steps=120)
    out = root / "cache"
    assert main(["explain", "--data", str(root / "images"), "--model", f"{TINY_MODEL_FILE}:tiny_cnn",
                 "--checkpoint", str(root / "tiny_cnn.pth"), "--out", str(out), "--masks", str(root / "masks"),
                 "--device", "cpu", "--workers", "0", "--batch-size", "32", "--map-size", "16",
                 "--descriptor-size", "4", "--quiet"]) == 0
    return out


def open_page(monkeypatch: pytest.MonkeyPatch, cache_dir: Path, page: str, query: dict[str, str]) -> AppTest:
    monkeypatch.setenv("FGCAM_CACHE", str(cache_dir))
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    at.switch_page(f"views/{page}.py")
    for name, value in query.items():
        at.query_params[name] = value
    at.run()
    return at


def texts(at: AppTest) -> str:
    kinds = ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error", "exception")
    return "\n".join(str(e.value) for kind in kinds for e in at.get(kind))


def assert_sane(at: AppTest, page: str, query: dict[str, str]) -> None:
    where = f"{page} {query}"
    assert not at.exception, (where, [e.value for e in at.exception])
    assert at.title, f"{where}: no page title"
    shown = texts(at)
    assert "Traceback" not in shown and "unexpected problem" not in shown, (where, shown[-1500:])


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
    ("clusters", {"c_k": "2", "c_focus": "0", "c_gallery_page": "-3"}, "c_gallery_page"),
    ("clusters", {"c_k": "2", "c_focus": "0", "c_gallery_page": "0"}, "c_gallery_page"),
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
    at = open_page(monkeypatch, large_cache, "clusters", {"c_sel": "ids:nan"})
    assert_sane(at, "clusters", {"c_sel": "ids:nan"})
    assert "selected in the chart" not in texts(at) and at.selectbox(key="c_focus")  # the cluster gallery instead
    wrong = load(large_cache).table.query("not correct")["id"].tolist()[:3]
    at = open_page(monkeypatch, large_cache, "clusters", {"c_sel": "ids:nan," + ",".join(map(str, wrong))})
    assert_sane(at, "clusters", {})
    assert "selected in the chart" not in texts(at)  # a selection with a nan in it is no selection


def test_st_run_in_a_link_starts_nothing(monkeypatch, large_cache):
    """The shortcut test loads the model and runs it on up to 5,000 images: only a click starts it."""
    query = {"st_run": "1", "st_by": "pred", "st_class": "1", "st_q": "10", "st_max": "5000"}
    at = open_page(monkeypatch, large_cache, "trust", query)
    assert_sane(at, "trust", query)
    assert "Accuracy before" not in {m.label for m in at.metric}
    assert "press **Run the test**" in texts(at)
    assert at.number_input[0].value == 5000 and at.slider[0].value == 10.0  # the link still fills in the form


# ------------------------------------------------------------------------------------------------ fuzz
@pytest.mark.parametrize("page", list(PAGES))
def test_every_query_parameter_with_bad_values_gives_a_sane_page(monkeypatch, large_cache, page):
    """Each bad value in every parameter of the page at once (with the gates valid, so the whole page runs), then
    in each gate alone."""
    gates, parameters = PAGES[page]
    for value in BAD_VALUES + (SELECTION_VALUES if page == "clusters" else []):
        queries = [{**gates, **{name: value for name in parameters if name not in gates}}]
        queries += [{**gates, name: value} for name in gates]
        for query in queries:
            assert_sane(open_page(monkeypatch, large_cache, page, query), page, query)


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
