"""The Overview, Clusters and Image pages and the no-cache page, run by Streamlit's AppTest on a real cache made
by the real job (tests/conftest.py: small_cache, 3 classes x 8 images, 3 mistakes)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from analysis.cache import load
from analysis.explore import cluster_offline

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


def _app(monkeypatch: pytest.MonkeyPatch, cache_dir: Path | str | None, page: str | None = None,
         query: dict[str, str] | None = None) -> AppTest:
    if cache_dir is None:
        monkeypatch.delenv("FGCAM_CACHE", raising=False)
    else:
        monkeypatch.setenv("FGCAM_CACHE", str(cache_dir))
    at = AppTest.from_file(APP, default_timeout=120)
    for name, value in (query or {}).items():
        at.query_params[name] = value
    if page is not None:
        at.switch_page(f"views/{page}.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


@pytest.fixture()
def private_cache(small_cache: Path, tmp_path: Path) -> Path:
    """A copy of the session cache, so that what a test writes in it (tags, clusterings) starts from nothing and
    does not leak into other tests. The dataset root in the manifest still points to the images."""
    copy = tmp_path / "cache"
    shutil.copytree(small_cache, copy)
    return copy


# ------------------------------------------------------------------------------------------------ no cache
def test_no_cache_given(monkeypatch):
    at = _app(monkeypatch, None)
    assert [t.value for t in at.title] == ["FG-CAM explanation dashboard"]
    assert "No cache was given" in at.warning[0].value


def test_missing_cache_directory(monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path / "nowhere")
    assert "does not exist" in at.warning[0].value


def test_corrupt_cache(monkeypatch, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{ this is not json")
    at = _app(monkeypatch, broken)
    assert "cannot be read as a cache" in at.warning[0].value
    assert [t.value for t in at.title] == ["FG-CAM explanation dashboard"]


# ------------------------------------------------------------------------------------------------ overview
def test_overview(monkeypatch, small_cache):
    cache = load(small_cache)
    at = _app(monkeypatch, small_cache, "overview")
    assert [t.value for t in at.title] == ["Overview"]
    metrics = _metrics(at)
    assert metrics["Images explained"] == f"{len(cache):,}"
    assert metrics["Misclassified"] == str(int((~cache.table["correct"]).sum()))
    assert metrics["Accuracy"] == f"{cache.table['correct'].mean():.1%}"
    charts = at.get("vega_lite_chart")
    # accuracy per class + one histogram per score present in this cache (4 without --faithfulness)
    assert len(charts) == 1 + 4
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels == ["Download HTML report", "Download the table (CSV)", "Accuracy chart (PNG)"]
    assert any(e.label == "Manifest" for e in at.expander)


# ------------------------------------------------------------------------------------------------ clusters
def test_clusters_default_view_reads_the_offline_results(monkeypatch, private_cache):
    at = _app(monkeypatch, private_cache, "clusters")
    assert [t.value for t in at.title] == ["Clusters"]
    metrics = _metrics(at)
    stored = cluster_offline.read_clustering(load(private_cache), "all")
    assert metrics["Images clustered"] == "24" and metrics["Eigengap suggests k"] == str(stored.suggested_k)
    assert int(metrics["Clusters"]) == stored.k == len(stored.summary) >= 2
    assert len(at.get("vega_lite_chart")) == 2          # density with marks + eigenvalues
    assert not (private_cache / "dashboard").exists()   # nothing clustered, nothing saved by the page
    assert len(at.image) > 0                            # prototypes and the gallery


def test_clusters_settings_change_the_view_and_the_url(monkeypatch, private_cache):
    at = _app(monkeypatch, private_cache, "clusters")
    choices = cluster_offline.read_clustering(load(private_cache), "all").choices
    spectral = choices[choices["algorithm"] == "spectral"].iloc[0]
    assert any(o.startswith(f"spectral, k = {spectral['k']}") for o in at.selectbox(key="c_clust").options)
    at.selectbox(key="c_clust").set_value(f"{spectral['run']}/{spectral['name']}").run()
    assert not at.exception
    assert at.query_params["c_clust"].endswith("/spectral_k" + _metrics(at)["Clusters"])
    assert sum(1 for b in at.markdown if "suspicion" in b.value and b.value.startswith("**#")) == \
        min(12, int(_metrics(at)["Clusters"]))
    at.selectbox(key="c_scope").set_value("true:cat").run()
    assert not at.exception
    assert _metrics(at)["Images clustered"] == "8"            # one class of the 3 x 8 images
    assert "c_clust" not in at.query_params                   # a new scope starts from its default clustering


def test_clusters_view_from_url(monkeypatch, private_cache):
    cache = load(private_cache)
    at = _app(monkeypatch, private_cache, "clusters", {"c_scope": "mistakes"})
    assert _metrics(at)["Images clustered"] == str(int((~cache.table["correct"]).sum()))
    assert at.selectbox(key="c_scope").value == "mistakes"
    # a box carried by a copied link shows every image of the scope inside it
    layout = cluster_offline.read_clustering(cache, "mistakes").assignments
    x0, y0 = layout[["x", "y"]].min()
    x1, y1 = layout[["x", "y"]].max()
    at = _app(monkeypatch, private_cache, "clusters", {"c_scope": "mistakes", "c_sel": f"box:{x0},{x1},{y0},{y1}"})
    assert any(b.value.startswith(f"**{len(layout)} images in the box**") for b in at.markdown)


# ------------------------------------------------------------------------------------------------ image
def test_image_page_by_url_and_widget(monkeypatch, small_cache):
    cache = load(small_cache)
    wrong = cache.table.loc[~cache.table["correct"]].iloc[0]
    at = _app(monkeypatch, small_cache, "image", {"id": str(int(wrong["id"]))})
    assert [t.value for t in at.title] == ["Image"]
    assert any(f"**#{int(wrong['id'])}**" in b.value for b in at.markdown)
    # wrong prediction: original + pred overlay + pred map + true overlay + true map, then the neighbours
    captions = [c for image in at.image for c in image.captions]
    assert any("true class" in c for c in captions)
    neighbours = [b for b in at.button if b.key and b.key.startswith("neighbour_")]
    assert len(neighbours) == 8
    assert "background share" in _metrics(at)

    # opening a neighbour shows it and puts its id in the URL
    first = int(neighbours[0].key.removeprefix("neighbour_"))
    neighbours[0].click().run()
    assert not at.exception
    assert at.query_params["id"] == str(first)
    assert any(f"**#{first}**" in b.value for b in at.markdown)

    right = int(cache.table.loc[cache.table["correct"], "id"].iloc[0])
    number = at.number_input[0]
    number.set_value(right).run()
    assert not at.exception
    assert at.query_params["id"] == str(right)
    assert any(f"**#{right}**" in b.value for b in at.markdown)


def test_image_page_unknown_id(monkeypatch, small_cache):
    at = _app(monkeypatch, small_cache, "image", {"id": "987654"})
    assert "no explained image with id 987654" in at.warning[0].value


def test_tiles_are_drawn_once_per_cache_state_and_view(monkeypatch, private_cache):
    """A page's rerun (a click, a second visit) takes its tiles from Streamlit's cache: the same pixels as
    drawing them, drawn again only for another view (opacity, ids, overlay style) or another state of the cache
    (a job that went on)."""
    import json

    from analysis.present import overlay
    from dashboard import common

    drawn = []
    draw = common.image_tiles
    monkeypatch.setattr(common, "image_tiles", lambda *args, **kwargs: drawn.append(args[1]) or draw(*args, **kwargs))
    cache = load(private_cache)
    ids = [int(i) for i in cache.table["id"][:5]]
    first = common.tiles_for(cache, ids, "overlay", opacity=0.5)
    again = common.tiles_for(cache, ids, "overlay", opacity=0.5)
    assert len(drawn) == 1
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(np.array_equal(a, b) for a, b in zip(first, draw(cache, ids, "overlay", opacity=0.5,
                                                                 size=common.TILE)))
    common.tiles_for(cache, ids, "overlay", opacity=0.8)
    common.tiles_for(cache, ids[:3], "overlay", opacity=0.5)
    common.tiles_for(cache, ids, "overlay", opacity=0.5, style=overlay.PHOTO_STYLE)
    common.tiles_for(cache, ids, "overlay", opacity=0.5, style=overlay.PHOTO_STYLE)
    assert len(drawn) == 4
    manifest = private_cache / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "updated": "later"}))
    common.tiles_for(load(private_cache), ids, "overlay", opacity=0.5)
    assert len(drawn) == 5
    maps = list(cache.maps(ids, "pred"))     # maps made on the page are drawn as given, every time
    common.tiles_for(cache, ids, "overlay", opacity=0.5, maps=maps)
    common.tiles_for(cache, ids, "overlay", opacity=0.5, maps=maps)
    assert len(drawn) == 7


# ------------------------------------------------------------------------------------------------ degenerate
PAGES_SCRIPT = r'''
import json, sys
from streamlit.testing.v1 import AppTest
from analysis import report
from analysis.cache import load

app, pages, out = sys.argv[1], sys.argv[2].split(","), {}
for page in pages:
    at = AppTest.from_file(app, default_timeout=300)
    at.run()
    at.switch_page(f"views/{page}.py")
    at.run()
    out[page] = {"exceptions": [e.value for e in at.exception], "titles": [t.value for t in at.title],
                 "info": [i.value for i in at.info], "metrics": {m.label: m.value for m in at.metric},
                 "charts": len(at.get("vega_lite_chart"))}
html = report.build_report(load(sys.argv[3]))
out["report"] = {"length": len(html), "note": "all 24 descriptors are" in html and "one cluster" in html}
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def flat_cache(small_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real cache whose maps are all empty: the README's own case, --denoise on a CAM layer with fewer than 10
    channels (the tiny CNN has 8: the denoising rank is 0), so every descriptor is the same uniform one."""
    from analysis.__main__ import main
    from tests.helpers import small_cache_arguments

    out = tmp_path_factory.mktemp("flat") / "cache"
    argv = small_cache_arguments(small_cache.parent)
    argv[argv.index("--out") + 1] = str(out)
    assert main([*argv, "--denoise"]) == 0
    return out


@pytest.mark.slow
def test_every_page_and_the_report_survive_a_cache_without_relevance(flat_cache: Path) -> None:
    """Every page and the HTML report on the flat cache, in a child process (scikit-learn's t-SNE crashed with
    SIGSEGV on such a cache, taking the whole Streamlit server down): no exception, and the Clusters page shows
    one cluster and says why."""
    import json
    import os
    import subprocess
    import sys

    cache = load(flat_cache)
    descriptors = cache.descriptors()
    assert np.allclose(descriptors, descriptors[0]) and np.allclose(cache.maps(cache.ids), 0)
    pages = ["overview", "clusters", "background", "per_class", "mistakes", "image", "trust"]
    done = subprocess.run([sys.executable, "-c", PAGES_SCRIPT, APP, ",".join(pages), str(flat_cache)],
                          cwd=Path(APP).parents[1], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "FGCAM_CACHE": str(flat_cache),
                               "PYTHONPATH": str(Path(APP).parents[1])})
    assert done.returncode == 0, f"exit {done.returncode} (a native crash is -11): {done.stderr[-3000:]}"
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for page in pages:
        assert results[page]["exceptions"] == [], (page, results[page]["exceptions"])
        assert results[page]["titles"], page
    clusters = results["clusters"]
    assert clusters["metrics"]["Clusters"] == "1" and clusters["metrics"]["Images clustered"] == "24"
    assert any("all 24 descriptors are" in i and "one cluster" in i for i in clusters["info"]), clusters
    assert clusters["charts"] == 0  # no embedding and no eigenvalues to draw
    assert results["report"]["note"] and results["report"]["length"] > 1000
