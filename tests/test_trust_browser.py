"""The Trust page in a real browser (a real `streamlit run` server, headless Debian Chromium through playwright) on
copies of the small real cache: without any trust results, with a comparison made without the sanity checks, and
with the sanity checks and a saved insertion test; links with bad values never show a traceback."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import run_command
from tests.test_browser import CHROMIUM, screenshots_module

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}")]


def analysis_command(*argv: str) -> None:
    code, out, err = run_command(*argv)
    assert code == 0, out[-2000:] + err[-2000:]


def page_text(shots, page, base: str, path: str) -> str:
    """Open `path`, wait until it finished, fail on any problem (exception box, "Traceback", "Error"); its text."""
    page.goto(base + path, wait_until="domcontentloaded", timeout=60_000)
    shots.wait_until_done(page, "Trust")
    problems = shots.page_problems(page)
    assert not problems, (path, problems)
    return page.locator("body").inner_text()


def test_trust_page_without_and_with_sanity_checks_in_a_browser(small_cache: Path, tmp_path: Path) -> None:
    pytest.importorskip("playwright.sync_api", reason="playwright is in requirements.txt")
    from playwright.sync_api import sync_playwright

    shots = screenshots_module()
    bare = Path(shutil.copytree(small_cache, tmp_path / "bare"))
    full = Path(shutil.copytree(small_cache, tmp_path / "full"))
    analysis_command("compare-methods", "--cache", str(full), "--sample", "6", "--steps", "2", "--device", "cpu",
                     "--quiet")
    analysis_command("insertion-test", "--cache", str(full), "--pred", "fox", "--q", "10", "--device", "cpu")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=shots.CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 3000}).new_page()
        with shots.running_app(bare, tmp_path / "bare.log") as base:
            # No trust results at all: one line each, naming the command to run.
            text = page_text(shots, page, base, "/trust")
            assert "No sanity checks for this cache" in text
            assert f"python -m analysis compare-methods --cache {bare}" in text
            assert "No insertion test for this cache yet" in text   # the one missing-result record (cache.derived)
            assert f"python -m analysis insertion-test --cache {bare} --tag shortcut" in text
            # A comparison made without the sanity checks (the page reads trust/ on every run: a reload shows it).
            analysis_command("compare-methods", "--cache", str(bare), "--sample", "4", "--steps", "2",
                             "--device", "cpu", "--quiet", "--randomise", "none", "--no-class-check")
            text = page_text(shots, page, base, "/trust")
            assert "Deletion at input" in text
            assert "The comparison stored here was made without them" in text   # the one missing-result record
            assert "Model randomised from the top" not in text
        with shots.running_app(full, tmp_path / "full.log") as base:
            text = page_text(shots, page, base, "/trust")
            assert "Does the map depend on the model, and on the class?" in text
            assert text.count("FG-CAM's map changes") == 2   # one sentence per layer (input, features.2)
            assert "Model randomised from the top" in text and "Another class explained" in text
            assert "Predictions flipped to the class" in text and "predicted as fox → fox" in text
            assert "Pasting the region flips" in text
            assert page.locator('[data-testid="stVegaLiteChart"]').count() >= 4 + 4 + 1
            page.screenshot(path=str(tmp_path / "trust.png"))
            # The other variant and metric through the URL, and links with bad values: a page, never a traceback.
            page_text(shots, page, base, "/trust?sn_variant=positive_pooled&sn_metric=ssim")
            assert page.get_by_role("radio", name="SSIM").is_checked()
            assert page.get_by_role("radio", name="positive part pooled to 4x4 (what clustering reads)").is_checked()
            for query in ("sn_variant=garbage&sn_metric=nan", "sn_variant=&sn_metric=inf",
                          "sn_variant=signed&sn_metric=spearman&st_q=nan&st_max=-1&st_by=x"):
                text = page_text(shots, page, base, f"/trust?{query}")
                assert "Model randomised from the top" in text, query
                assert page.get_by_role("radio", name="rank correlation (Spearman)").is_checked(), query
        browser.close()
    assert (tmp_path / "trust.png").stat().st_size > 10_000
