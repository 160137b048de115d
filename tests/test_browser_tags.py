"""Tags in a real browser (issue 14): a real `streamlit run` server on a copy of the small real cache, headless
Debian Chromium through playwright. Tag an image on the Image page (signed with a name), reload: the tag and the
name are still there; filter a gallery by the tag, tag from that gallery, and the tiles show both tags; the
gallery's CSV and the Find-more page's export carry them, the export equal to `python -m analysis export`."""
from __future__ import annotations

import shutil
import urllib.parse
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import run_command
from tests.test_browser import CHROMIUM, screenshots_module

pytestmark = pytest.mark.browser
TAG = "odd corner"


def _wait(shots, page, title: str) -> None:
    shots.wait_until_done(page, title)
    problems = shots.page_problems(page)
    assert not problems, problems


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_tag_reload_filter_and_export_in_a_browser(small_cache: Path, tmp_path: Path) -> None:
    pytest.importorskip("playwright.sync_api", reason="playwright is in requirements.txt")
    from playwright.sync_api import expect, sync_playwright

    from analysis.cache import load
    from analysis.review import Review

    shots = screenshots_module()
    cache = Path(shutil.copytree(small_cache, tmp_path / "cache"))
    image_id = int(load(cache).table["id"].iloc[3])
    log = tmp_path / "streamlit.log"
    files: dict[str, Path] = {}
    with shots.running_app(cache, log) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=shots.CHROMIUM_ARGS)
        context = browser.new_context(viewport=shots.VIEWPORT, accept_downloads=True)
        page = context.new_page()
        try:
            # Tag one image on the Image page, signed with a name.
            page.goto(f"{base}/image?id={image_id}")
            _wait(shots, page, "Image")
            name = page.get_by_label("Your name (signs your tags)", exact=True)
            name.fill("Ada Lovelace")
            name.press("Enter")
            page.wait_for_timeout(500)
            _wait(shots, page, "Image")
            page.get_by_label("or a new tag").fill(TAG)
            page.get_by_label("Note (optional)").fill("a mark in the corner")
            page.get_by_role("button", name="Tag", exact=True).click()
            expect(page.get_by_text("Tagged 1 image “odd corner”.")).to_be_visible(timeout=60_000)
            stored = Review(cache).tags()
            assert stored[["id", "tag", "note", "who"]].values.tolist() == \
                [[image_id, TAG, "a mark in the corner", "Ada Lovelace"]]

            # Reload: a new session; the tag is read back from the database, the name from the cookie.
            page.reload()
            _wait(shots, page, "Image")
            expect(page.get_by_text(TAG, exact=False).first).to_be_visible()
            assert "a mark in the corner" in page.locator("body").inner_text()
            expect(page.get_by_label("Your name (signs your tags)", exact=True)).to_have_value("Ada Lovelace")

            # A gallery filtered by the tag (every image flagged at threshold 0), then tagged from there.
            page.goto(f"{base}/background?threshold=0.00")
            _wait(shots, page, "Background attention")
            page.locator('[data-testid="stSelectbox"]').filter(has_text="Show (by tag)").click()
            page.keyboard.type(f"tagged: {TAG}")
            page.keyboard.press("Enter")
            expect(page.get_by_text(f"images: tagged: {TAG}")).to_be_visible(timeout=60_000)
            _wait(shots, page, "Background attention")
            assert f"bg_tag=tagged: {TAG}" in urllib.parse.unquote_plus(page.url)  # a copied link keeps the filter
            form = page.locator('[data-testid="stForm"]')
            form.get_by_label("or a new tag").fill("shortcut")
            form.get_by_role("button", name="Tag", exact=True).click()
            expect(page.get_by_text("Tagged 1 image “shortcut”.")).to_be_visible(timeout=60_000)
            _wait(shots, page, "Background attention")
            captions = page.locator('[data-testid="stImageCaption"], [data-testid="stCaptionContainer"]')
            assert any(f"tags: {TAG}; shortcut" in captions.nth(k).inner_text() for k in range(captions.count())), \
                [captions.nth(k).inner_text() for k in range(captions.count())]
            with page.expect_download(timeout=120_000) as info:
                page.get_by_role("button", name="Download the flagged images (CSV)").click()
            files["gallery"] = tmp_path / "gallery.csv"
            info.value.save_as(files["gallery"])

            # The export on the Find-more page.
            page.goto(f"{base}/review")
            _wait(shots, page, "Find more like these")
            with page.expect_download(timeout=120_000) as info:
                page.get_by_role("button", name=f"Download “{TAG}” (CSV)").click()
            files["export"] = tmp_path / "export.csv"
            info.value.save_as(files["export"])
        finally:
            browser.close()
    assert "Traceback" not in log.read_text()

    gallery = pd.read_csv(files["gallery"], keep_default_na=False)
    assert "tags" in gallery.columns
    tagged_rows = gallery[gallery["tags"] != ""]
    assert tagged_rows["id"].tolist() == [image_id] and tagged_rows["tags"].tolist() == [f"{TAG}; shortcut"]
    assert len(gallery) > 1  # the CSV lists every flagged image, not only those the filter shows

    exported = files["export"].read_text()
    code, out, err = run_command("export", "--cache", str(cache), "--tag", TAG)
    assert code == 0, err
    assert exported == out
    frame = pd.read_csv(files["export"])
    assert frame[["id", "tags", "note", "who"]].values.tolist() == \
        [[image_id, f"{TAG}; shortcut", "a mark in the corner", "Ada Lovelace"]]
