"""Every dashboard page in a real browser: a real `streamlit run` server on the small real cache, headless
Debian Chromium through playwright. Each page is opened by its URL (a deep link, as a shared link would be),
left to finish running, checked for a Streamlit exception box, "Traceback"/"Error" text and the app shell's
navigation, and saved as a screenshot (see scripts/screenshots.py, which also makes the README's).
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import run_command

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.browser   # a real Chromium: `make test-quick` leaves these out


def screenshots_module():
    spec = importlib.util.spec_from_file_location("screenshots", REPO / "scripts" / "screenshots.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["screenshots"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_every_page_renders_in_a_browser(small_cache: Path, tmp_path: Path) -> None:
    pytest.importorskip("playwright.sync_api", reason="playwright is in requirements.txt")
    shots_module = screenshots_module()
    # The Trust page with a comparison: copy the cache (its images and model stay put) and make one.
    cache = Path(shutil.copytree(small_cache, tmp_path / "cache"))
    code, _, err = run_command("compare-methods", "--cache", str(cache), "--sample", "6", "--steps", "4", "--device",
                               "cpu", "--quiet")
    assert code == 0, err

    shots = shots_module.pages_for(cache)
    assert [s.name for s in shots] == ["findings", "overview", "clusters", "background", "per_class", "mistakes",
                                       "image", "trust", "mistakes_label_errors", "review"]
    missing = [s.page_file for s in shots if not (REPO / "dashboard" / "views" / s.page_file).exists()]
    assert not missing, f"pages not written: {missing}"
    out = tmp_path / "shots"
    log = tmp_path / "streamlit.log"
    with shots_module.running_app(cache, log) as base:
        found = shots_module.take_screenshots(base, out, shots, full_page=True, small=False)
    problems = {name: p for name, p in found.items() if p}
    assert not problems, f"{problems}\nserver log:\n{log.read_text()[-3000:]}"
    for shot in shots:
        assert (out / f"{shot.name}.png").stat().st_size > 10_000, f"{shot.name}: screenshot nearly empty"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_downloads_work_in_a_browser(small_cache: Path, tmp_path: Path) -> None:
    """The deferred downloads (data made only on click, which AppTest cannot press): the table as CSV, a chart
    as PNG rendered by vl-convert, the offline HTML report, and the report from the Findings page."""
    pytest.importorskip("playwright.sync_api", reason="playwright is in requirements.txt")
    import io

    import pandas as pd
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from analysis.cache import load

    shots_module = screenshots_module()
    cache = Path(shutil.copytree(small_cache, tmp_path / "cache"))  # the report saves its clustering there
    files: dict[str, Path] = {}
    with shots_module.running_app(cache, tmp_path / "streamlit.log") as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=shots_module.CHROMIUM_ARGS)
        context = browser.new_context(viewport=shots_module.VIEWPORT, accept_downloads=True)
        page = context.new_page()
        page.goto(base + "/overview")
        shots_module.wait_until_done(page, "Overview")
        for label in ("Download the table (CSV)", "Accuracy chart (PNG)", "Download HTML report"):
            with page.expect_download(timeout=180_000) as info:
                page.get_by_role("button", name=label).click()
            files[label] = tmp_path / info.value.suggested_filename
            info.value.save_as(files[label])
        page.goto(base)               # the Findings page (the first page: the app opens on it), and its report
        shots_module.wait_until_done(page, "Findings")
        with page.expect_download(timeout=180_000) as info:
            page.get_by_role("button", name="Download the report (HTML)").click()
        files["findings"] = tmp_path / info.value.suggested_filename
        info.value.save_as(files["findings"])
        browser.close()
    table = pd.read_csv(files["Download the table (CSV)"])
    expected = load(cache).table
    assert table["id"].tolist() == expected["id"].tolist()
    assert table["top5_classes"].iloc[0] == " ".join(map(str, expected["top5_classes"].iloc[0]))
    with Image.open(io.BytesIO(files["Accuracy chart (PNG)"].read_bytes())) as image:
        assert image.format == "PNG" and image.width > 200
    report = files["Download HTML report"].read_text()
    assert report.startswith("<!DOCTYPE html>") and "<svg" in report and "data:image/png;base64," in report
    assert "<script src" not in report and 'src="http' not in report
    from analysis.findings import current_findings

    from_page = files["findings"].read_text()
    assert files["findings"].name == "fgcam_findings.html" and from_page.startswith("<!DOCTYPE html>")
    import html

    assert all(html.escape(f.title) in from_page or f.title in from_page for f in current_findings(load(cache))[0])


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_photos_keep_their_aspect_ratio_in_a_browser(photo_cache: Path, tmp_path: Path) -> None:
    """The cache of real photos (600 x 400 coffee, Resize(256) + CenterCrop(224)): the Image page draws the
    photo 3:2 with the map on the centre crop, a gallery draws square letterboxed tiles; both pages are clean."""
    pytest.importorskip("playwright.sync_api", reason="playwright is in requirements.txt")
    shots_module = screenshots_module()
    shots = shots_module.photo_pages(photo_cache)
    assert [s.name for s in shots] == ["photo_image", "photo_image_cat", "photo_gallery"]
    sizes: dict[str, list[tuple[int, int]]] = {}

    def measure(page, shot) -> None:   # on the visit that took the screenshot
        images = page.locator('[data-testid="stImage"] img')
        images.last.scroll_into_view_if_needed()
        page.wait_for_function("() => [...document.querySelectorAll('[data-testid=\"stImage\"] img')]"
                               ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
        sizes[shot.name] = [tuple(images.nth(k).evaluate("i => [i.naturalWidth, i.naturalHeight]"))
                            for k in range(images.count())]

    with shots_module.running_app(photo_cache, tmp_path / "streamlit.log") as base:
        found = shots_module.take_screenshots(base, tmp_path / "shots", shots, small=False, after=measure)
    assert not any(found.values()), found
    for shot in shots:
        assert (tmp_path / "shots" / f"{shot.name}.png").stat().st_size > 10_000
    # Image page: original, overlay and map of the 600 x 400 coffee at 480 x 320, then square neighbour tiles.
    assert sizes["photo_image"][:3] == [(480, 320)] * 3, sizes["photo_image"]
    assert all(w == h for w, h in sizes["photo_image"][3:])
    # the cat (451 x 300, predicted wrong): original, then the prediction's and the true class's overlay and map
    assert sizes["photo_image_cat"][:5] == [(480, 319)] * 5, sizes["photo_image_cat"]
    # Gallery: one tile per photo, all the same square size whatever the photo's shape.
    assert len(sizes["photo_gallery"]) == 3 and set(sizes["photo_gallery"]) == {(160, 160)}, sizes["photo_gallery"]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_bad_links_show_pages_not_tracebacks_in_a_browser(small_cache: Path, tmp_path: Path) -> None:
    """Links whose query parameters once put a traceback (with server paths) on the page, opened in a real browser
    on a real server: each shows its page, no exception box, no "Traceback" or "Error" text, and the server
    keeps serving."""
    pytest.importorskip("playwright.sync_api", reason="playwright is in requirements.txt")
    shots_module = screenshots_module()
    links = {"mistakes_page": ("/mistakes?true=0&pred=0&mk_page=-3", "Mistakes"),
             "image_opacity": ("/image?id=0&opacity=inf", None),
             "background_threshold": ("/background?threshold=-inf&bg_page=0", "Background attention"),
             "clusters_selection": ("/clusters?c_sel=ids:nan&c_gallery_page=-3", None),
             "trust_run": ("/trust?st_run=1&st_q=nan&st_max=-1", "Trust")}
    shots = [shots_module.PageShot(name, path, "", title) for name, (path, title) in links.items()]
    log = tmp_path / "streamlit.log"
    cache = Path(shutil.copytree(small_cache, tmp_path / "cache"))  # the Clusters page saves its clustering there
    with shots_module.running_app(cache, log) as base:
        found = shots_module.take_screenshots(base, tmp_path / "shots", shots, small=False)
    problems = {name: p for name, p in found.items() if p}
    assert not problems, f"{problems}\nserver log:\n{log.read_text()[-3000:]}"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_a_box_dragged_on_the_clusters_chart_selects_every_image_inside(small_cache: Path, tmp_path: Path) -> None:
    """The Clusters page on the offline results, in a real browser: a box dragged on the embedding goes to the
    server (st.altair_chart's selection, which AppTest cannot drag), into the URL, and selects every image of the
    scope inside it -- counted independently from the stored layout -- which the CSV download lists. Then a
    link to another scope opens that scope."""
    pytest.importorskip("playwright.sync_api", reason="playwright is in requirements.txt")
    from urllib.parse import parse_qs, urlparse

    import pandas as pd
    from playwright.sync_api import sync_playwright

    from analysis.cache import load
    from analysis.explore import cluster_offline

    shots_module = screenshots_module()
    stored = cluster_offline.read_clustering(load(small_cache), "all")
    layout = pd.read_parquet(stored.path / "assignments.parquet", columns=["id", "x", "y"])
    with shots_module.running_app(small_cache, tmp_path / "streamlit.log") as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=shots_module.CHROMIUM_ARGS)
        context = browser.new_context(viewport=shots_module.VIEWPORT, accept_downloads=True)
        page = context.new_page()
        page.goto(base + "/clusters")
        shots_module.wait_until_done(page, "Clusters")
        chart = page.locator('[data-testid="stVegaLiteChart"]').first
        chart.scroll_into_view_if_needed()
        area = chart.bounding_box()
        # The left 60% of the plot, full height (the plot fills the chart but for the legend on its right).
        start = (area["x"] + 5, area["y"] + 5)
        end = (area["x"] + 0.6 * (area["width"] - 120), area["y"] + area["height"] - 5)
        page.mouse.move(*start)
        page.mouse.down()
        page.mouse.move(*end, steps=12)
        page.mouse.up()
        page.get_by_text("images in the box").first.wait_for(timeout=60_000)
        shots_module.wait_until_done(page, "Clusters")
        assert not shots_module.page_problems(page)
        selection = parse_qs(urlparse(page.url).query)["c_sel"][0]
        x0, x1, y0, y1 = (float(v) for v in selection.removeprefix("box:").split(","))
        inside = layout[layout["x"].between(x0, x1) & layout["y"].between(y0, y1)]
        assert 0 < len(inside) < len(layout), (selection, len(inside))
        assert f"{len(inside):,} images in the box" in page.locator("body").inner_text()
        with page.expect_download(timeout=120_000) as info:
            page.get_by_role("button", name="Download the box selection (CSV)").click()
        listed = pd.read_csv(info.value.path())
        assert sorted(listed["id"]) == sorted(inside["id"])

        page.goto(base + "/clusters?c_scope=mistakes")
        shots_module.wait_until_done(page, "Clusters")
        assert not shots_module.page_problems(page)
        mistakes = int((~load(small_cache).table["correct"]).sum())
        assert 0 < mistakes < len(layout)
        body = page.locator("body").inner_text()
        assert f"Images clustered\n\n{mistakes}\n" in body, body[:800]
        browser.close()
