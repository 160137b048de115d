"""The Background, Per-class, Mistakes and Trust pages under Streamlit's AppTest, on a real cache made by the
real job (tests/conftest.py: small_cache, 3 classes x 8 images with masks, 3 misclassified images).

Each page is opened through the app shell (dashboard/app.py, st.navigation) as a person would reach it; views
are set through the URL (query params) or the widgets, and the tests check what the page then shows.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from analysis.cache import load
from analysis.explore.statistics import confusion_matrix, top_confusions
from tests.helpers import run_command

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "dashboard" / "app.py")


def open_page(monkeypatch: pytest.MonkeyPatch, cache_dir: Path, page: str, **query: object) -> AppTest:
    monkeypatch.setenv("FGCAM_CACHE", str(cache_dir))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()  # the shell registers its pages first; then switch as the sidebar would
    at.switch_page(f"views/{page}.py")
    for name, value in query.items():
        at.query_params[name] = str(value)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error")
             for e in at.get(kind)]
    return "\n".join(str(p) for p in parts)


# ------------------------------------------------------------------------------------------------ background
def test_background_ranks_by_hotspot_and_threshold_flags(monkeypatch: pytest.MonkeyPatch, small_cache: Path) -> None:
    table = load(small_cache).table
    at = open_page(monkeypatch, small_cache, "background")
    assert at.title[0].value == "Background attention"
    shown = texts(at)
    assert "Ranked by **`background_hotspot`**" in shown and "knows the object" in shown
    assert at.get("vega_lite_chart"), "score distribution charts missing"

    at.slider(key="bg_threshold_background_hotspot").set_value(0.0).run()
    assert not at.exception
    assert metric(at, "Flagged images") == str(int(table["background_hotspot"].notna().sum()))
    assert at.query_params["threshold"] == "0.00"
    assert len(at.get("image")) == min(24, len(table))  # gallery: one page of tiles
    assert at.get("download_button"), "CSV download of the flagged images missing"

    at.slider(key="bg_threshold_background_hotspot").set_value(1.0).run()
    expected = int((table["background_hotspot"] >= 1.0).sum())
    assert metric(at, "Flagged images") == str(expected)
    assert len(at.get("image")) == expected


def test_background_score_and_class_from_the_url(monkeypatch: pytest.MonkeyPatch, small_cache: Path) -> None:
    table = load(small_cache).table
    at = open_page(monkeypatch, small_cache, "background", score="border_share", threshold="0.2", **{"class": 1})
    assert "Ranked by **`border_share`**" in texts(at) and "instead of the default" in texts(at)
    expected = int(((table["border_share"] >= 0.2) & (table["label"] == 1)).sum())
    assert metric(at, "Flagged images") == str(expected)
    # The annotation-free consensus score is computed from the descriptors and ranks too.
    at.selectbox(key="bg_score").set_value("consensus_dissimilarity").run()
    assert not at.exception
    assert at.query_params["score"] == "consensus_dissimilarity"
    assert "Ranked by **`consensus_dissimilarity`**" in texts(at)


# ------------------------------------------------------------------------------------------------ per-class
def test_per_class_grid_and_opening_a_class(monkeypatch: pytest.MonkeyPatch, small_cache: Path) -> None:
    at = open_page(monkeypatch, small_cache, "per_class")
    assert at.title[0].value == "Per-class maps"
    assert [b.label for b in at.button if b.label.startswith("Open ")] == ["Open cat", "Open dog", "Open fox"]
    assert len(at.get("image")) == 9  # 3 classes x (mean image, correct mean map, wrong mean map)
    assert at.get("download_button")[0].proto.label == "Download this grid (PNG)"

    at.button(key="open_1").click().run()
    assert not at.exception
    assert at.query_params["class"] == "1"
    assert "Class dog" in texts(at)
    assert len(at.get("image")) == 3 + 8  # the three big tiles and the class's 8 images

    at.radio(key="pc_show").set_value("wrong").run()
    assert len(at.get("image")) == 3 + 1 and at.query_params["show"] == "wrong"

    at.button(key="pc_back").click().run()
    assert "class" not in at.query_params and len(at.get("image")) == 9


# ------------------------------------------------------------------------------------------------ mistakes
def test_mistakes_cell_from_url_and_from_top_confusions(monkeypatch: pytest.MonkeyPatch, small_cache: Path) -> None:
    cache = load(small_cache)
    table = cache.table
    names = cache.manifest["class_names"]
    matrix = confusion_matrix(table["label"], table["pred"], len(names))
    top = top_confusions(matrix, names)

    at = open_page(monkeypatch, small_cache, "mistakes")
    assert "No cell selected yet." in texts(at) and at.get("vega_lite_chart")
    assert "**3** of **24** images are misclassified" in texts(at)

    first = top.iloc[0]
    at.query_params["true"], at.query_params["pred"] = str(first["true"]), str(first["pred"])
    at.run()
    assert not at.exception
    assert f"True {first['true_name']}, predicted {first['pred_name']}: {first['count']} image" in texts(at)
    assert len(at.get("image")) == 3 * int(first["count"])  # image, pred map, true map per image
    assert at.get("download_button")

    last = top.iloc[-1]
    at.button(key=f"mk_top_{last['true']}_{last['pred']}").click().run()
    assert not at.exception
    assert (at.query_params["true"], at.query_params["pred"]) == (str(last["true"]), str(last["pred"]))
    assert f"True {last['true_name']}, predicted {last['pred_name']}" in texts(at)

    at.query_params["true"], at.query_params["pred"] = "0", "0"  # a diagonal cell: correct predictions
    at.run()
    assert f"predicted {names[0]}: {int(matrix[0, 0])} images" in texts(at) and "diagonal cell" in texts(at)


# ------------------------------------------------------------------------------------------------ trust
@pytest.fixture()
def cache_copy(small_cache: Path, tmp_path: Path) -> Path:
    """A copy of the cache directory (its dataset and model stay where they are), to write trust/ into."""
    return Path(shutil.copytree(small_cache, tmp_path / "cache"))


def test_trust_without_comparison_says_which_command(monkeypatch: pytest.MonkeyPatch, cache_copy: Path) -> None:
    at = open_page(monkeypatch, cache_copy, "trust")
    assert "No method comparison for this cache yet" in texts(at)
    assert at.code[0].value == f"python -m analysis compare-methods --cache {cache_copy}"
    assert not at.dataframe


@pytest.mark.slow
def test_trust_with_comparison_and_shortcut_test(monkeypatch: pytest.MonkeyPatch, cache_copy: Path) -> None:
    code, _, err = run_command("compare-methods", "--cache", str(cache_copy), "--sample", "6", "--steps", "4",
                               "--device", "cpu", "--quiet")
    assert code == 0, err
    at = open_page(monkeypatch, cache_copy, "trust")
    table = at.dataframe[0].value
    assert len(table) == 12 and {"deletion AUC ↓", "insertion AUC ↑"} <= set(table.columns)
    assert {"FG-CAM (Grad-CAM)", "random map", "edge map (Sobel)"} <= set(table["method"])
    # deletion + insertion at two layers, and beside them the sanity checks (randomisation curve, class check)
    assert len(at.get("vega_lite_chart")) == 8
    assert sum("FG-CAM's map changes" in m.value for m in at.markdown) == 2
    assert "No method comparison" not in texts(at)

    # The shortcut test, from a link: images predicted as class 2, top 10% region. The link fills in the form; the
    # test (a model load, up to 5,000 images) runs only on a click, even when the link says st_run=1.
    at.query_params.update({"st_run": "1", "st_by": "pred", "st_class": "2", "st_q": "10"})
    at.run()
    assert not at.exception
    assert "Accuracy before" not in {m.label for m in at.metric} and "press **Run the test**" in texts(at)
    select_by = next(r for r in at.radio if r.label == "Select images by")
    assert at.slider[0].value == 10.0 and select_by.value == "pred" and at.selectbox[0].value == 2
    assert "st_run" not in at.query_params
    next(b for b in at.button if b.label == "Run the test").click().run()
    assert not at.exception
    n_pred = int((load(cache_copy).table["pred"] == 2).sum())
    assert f"{n_pred} images with predicted class fox, region: top 10%" in texts(at)
    labels = {m.label for m in at.metric}
    assert {"Accuracy before", "… region blurred", "… random region blurred", "Predictions changed, region",
            "Predictions changed, random"} <= labels
    assert len(at.get("image")) == 1  # the region on the mean image


def test_trust_shortcut_test_without_the_model_warns(monkeypatch: pytest.MonkeyPatch, cache_copy: Path) -> None:
    manifest_path = cache_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["checkpoint"] = str(cache_copy / "gone.pth")
    manifest_path.write_text(json.dumps(manifest))
    at = open_page(monkeypatch, cache_copy, "trust", st_run=1)
    assert not any("cannot be loaded here" in w.value for w in at.warning)  # opening the page loads no model
    next(b for b in at.button if b.label == "Run the test").click().run()
    warnings = [w.value for w in at.warning]
    assert any("cannot be loaded here" in w for w in warnings), warnings


@pytest.mark.slow
def test_trust_does_not_show_another_caches_comparison(monkeypatch: pytest.MonkeyPatch, cache_copy: Path,
                                                       small_cache: Path, tmp_path: Path) -> None:
    """A comparison left beside a cache it was not made for (a directory synced over an old one, or an --overwrite
    by an older version, which kept trust/) is named stale and not shown; so is one older than the cache."""
    from tests.helpers import small_cache_arguments

    code, _, err = run_command("compare-methods", "--cache", str(cache_copy), "--sample", "4", "--steps", "2",
                               "--device", "cpu", "--quiet")
    assert code == 0, err
    meta = json.loads((cache_copy / "trust" / "comparison.json").read_text())
    assert meta["cache_identity"] == load(cache_copy).identity
    other = tmp_path / "other"
    argv = small_cache_arguments(small_cache.parent)
    argv[argv.index("--out") + 1] = str(other)
    code, _, err = run_command(*argv)
    assert code == 0, err
    shutil.copytree(cache_copy / "trust", other / "trust")
    at = open_page(monkeypatch, other, "trust")
    assert "does not belong to this cache: it was made" in texts(at) and "for another cache" in texts(at)
    assert not at.dataframe and at.code[0].value == f"python -m analysis compare-methods --cache {other}"
    # The comparison's own cache still shows it.
    at = open_page(monkeypatch, cache_copy, "trust")
    assert at.dataframe and "does not belong" not in texts(at)
    # A comparison from before identities were recorded: stale when it is older than the cache.
    meta.pop("cache_identity")
    meta["created"] = "2001-01-01T00:00:00+0000"
    (other / "trust" / "comparison.json").write_text(json.dumps(meta))
    at = open_page(monkeypatch, other, "trust")
    assert "it was made 2001-01-01T00:00:00+0000, before this cache" in texts(at) and not at.dataframe
