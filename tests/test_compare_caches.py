"""Two caches compared (issue 22, item 4): analysis/findings/compare.py, `report --compare`, the Compare page.

Cache A is the small real cache (tests/conftest.py: small_cache): 3 classes x 8 images, the last image of each
class painted in the next class's colour, a tiny CNN trained to tell the colours. Cache B explains the same image
files with the same network whose outputs for "cat" and "dog" are swapped (the rows of its last layer exchanged):
a real model, explained by the real job, whose predictions are known by hand: B calls "dog" what A calls "cat" and
the other way round, with the same confidence and the same map (the same computation up to the last row).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.findings import write_findings
from tests.helpers import TINY_MODEL_FILE, make_image_folder, run_main, write_synthetic_cache

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SWAP = {0: 1, 1: 0, 2: 2}      # cat <-> dog


def explain(images: Path, checkpoint: Path, out: Path, masks: Path | None = None) -> Path:
    from analysis.__main__ import main as job_main

    code = job_main(["explain", "--data", str(images), "--model", f"{TINY_MODEL_FILE}:tiny_cnn", "--checkpoint",
                     str(checkpoint), "--out", str(out), "--device", "cpu", "--workers", "0", "--batch-size", "8",
                     "--map-size", "16", "--descriptor-size", "4", "--quiet",
                     *(["--masks", str(masks)] if masks else [])])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def cache_a(small_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache A: a copy of the small cache (its images and model stay put), so that its tags are this module's."""
    return Path(shutil.copytree(small_cache, tmp_path_factory.mktemp("a") / "cache"))


@pytest.fixture(scope="module")
def swapped_cache(small_cache: Path, cache_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache B: the small cache's images explained by its model with the cat and dog outputs swapped; a tag
    "odd" on the three images painted in another class's colour in both caches."""
    import torch

    from analysis.cache import load
    from analysis.review import Review

    parent, out = small_cache.parent, tmp_path_factory.mktemp("swapped")
    state = torch.load(parent / "tiny_cnn.pth")
    for name in ("fc.weight", "fc.bias"):
        state[name] = state[name][[SWAP[i] for i in range(3)]].clone()
    torch.save(state, out / "swapped.pth")
    b = explain(parent / "images", out / "swapped.pth", out / "cache", parent / "masks")
    for root in (cache_a, b):
        cache = load(root)
        odd = cache.table.loc[cache.table["path"].str.endswith("img_007.png"), "id"].to_numpy()
        Review(root, cache).tag(odd, "odd")
        write_findings(load(root))    # `python -m analysis findings`: stored findings are read when fresh
    return b


def test_the_swapped_model_predicts_what_the_hand_says(cache_a: Path, swapped_cache: Path) -> None:
    """The premise of the numbers below: A predicts the colour, B the colour with cat and dog swapped."""
    from analysis.cache import load

    a, b = load(cache_a).table.set_index("path"), load(swapped_cache).table.set_index("path")
    colour = {"cat": 0, "dog": 1, "fox": 2}
    for path, row in a.iterrows():
        painted = (colour[path.split("/")[0]] + 1) % 3 if path.endswith("img_007.png") else colour[path.split("/")[0]]
        assert row["pred"] == painted, path
        assert b.at[path, "pred"] == SWAP[painted], path
        assert b.at[path, "confidence"] == pytest.approx(row["confidence"], abs=1e-5)


def test_the_comparison_numbers_are_the_hand_computed_ones(cache_a: Path, swapped_cache: Path) -> None:
    from analysis.cache import load
    from analysis.findings.compare import compare_caches

    comparison = compare_caches(load(cache_a), load(swapped_cache))
    # Per class, by hand: cat's 7 cat-coloured images become "dog" (wrong), its dog-coloured one "cat" (right):
    # 7/8 -> 1/8. Dog's 7 become "cat", its fox-coloured one stays "fox": 7/8 -> 0/8. Fox's 7 stay "fox", its
    # cat-coloured one becomes "dog": 7/8 -> 7/8.
    classes = comparison.classes.set_index("class")
    assert classes["images"].tolist() == [8, 8, 8]
    assert classes["accuracy_a"].tolist() == pytest.approx([7 / 8, 7 / 8, 7 / 8])
    assert classes["accuracy_b"].tolist() == pytest.approx([1 / 8, 0, 7 / 8])
    assert classes["accuracy_change"].tolist() == pytest.approx([-6 / 8, -7 / 8, 0])
    # The same computation up to the last layer's row: the same confidence and the same maps' scores.
    for column in ("confidence_change", "border_share_change", "concentration_change"):
        assert np.abs(classes[column].to_numpy()).max() < 1e-5, column
    assert comparison.accuracy_a == pytest.approx(21 / 24) and comparison.accuracy_b == pytest.approx(8 / 24)
    # Changed: every image A calls cat or dog (16): 1 now right (cat's dog-coloured), 14 now wrong, 1 still wrong
    # (fox's cat-coloured, now "dog").
    assert len(comparison.changed) == 16 and comparison.only_a == comparison.only_b == 0
    assert comparison.changed["outcome"].value_counts().to_dict() == {"now wrong": 14, "now right": 1,
                                                                     "still wrong": 1}
    assert comparison.summary()[1] == "16 predictions changed: 1 now right, 14 now wrong."


def test_a_findings_fate_is_counted_on_its_images(cache_a: Path, swapped_cache: Path) -> None:
    """The tag "odd" (the 3 images in another class's colour, all wrong in A): B keeps the prediction of one
    (dog's fox-coloured), brings one back to its own label (cat's dog-coloured, now "cat"), and the same tag in
    B is the finding run again; a finding only B has is new."""
    from analysis.cache import load
    from analysis.findings.compare import GONE, compare_caches

    a, b = load(cache_a), load(swapped_cache)
    comparison = compare_caches(a, b)
    fate = next(f for f in comparison.fates if f.finding.kind == "tag")
    assert (fate.images, fate.same_prediction, fate.wrong_in_a, fate.back_to_label) == (3, 1, 3, 1)
    assert fate.predicted_b == {"cat": 1, "dog": 1, "fox": 1}
    assert fate.verdict_b == "your tag" and fate.matches[0].title == 'Tagged "odd"'
    assert "B keeps the prediction of A for 1 of its 3 images" in fate.text()
    assert "Of the 3 images A got wrong, 1 (33%) are back to their own label in B." in fate.text()
    assert [b.table.set_index("id").at[j, "path"] for _, j in fate.examples] == \
        [a.table.set_index("id").at[i, "path"] for i, _ in fate.examples]      # pairs of one image
    # B's swapped outputs are findings new in B: the two confusions and the permutation, by hand.
    assert {'"cat" taken for "dog"', '"dog" taken for "cat"', "The labels and the model's outputs look permuted"} \
        <= {f.title for f in comparison.new_in_b}
    assert not [f for f in comparison.new_in_b if f.kind == "tag"]
    # A finding of B over other images is new in B; without B's tag, A's is gone.
    from analysis.review import Review

    review = Review(b.root, b)
    review.tag(b.table["id"].to_numpy()[:10], "first ten")
    write_findings(b)
    again = compare_caches(a, b)
    assert [f.title for f in again.new_in_b if f.kind == "tag"] == ['Tagged "first ten"']
    review.untag(b.table["id"].to_numpy()[:10], "first ten")
    review.untag(b.table["id"].to_numpy(), "odd")
    write_findings(b)
    gone = compare_caches(a, b)
    assert next(f for f in gone.fates if f.finding.kind == "tag").verdict_b == GONE
    review.tag(b.table.loc[b.table["path"].str.endswith("img_007.png"), "id"].to_numpy(), "odd")
    write_findings(b)


@pytest.fixture(scope="module")
def other_classes_cache(small_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of images with the classes cat, dog, wolf: another dataset."""
    out = tmp_path_factory.mktemp("wolf")
    make_image_folder(out / "images", classes=("cat", "dog", "wolf"), per_class=8, size=20, mislabelled=1)
    return explain(out / "images", small_cache.parent / "tiny_cnn.pth", out / "cache")


def test_caches_of_other_datasets_are_refused_in_one_line(cache_a: Path, other_classes_cache: Path,
                                                           tmp_path: Path) -> None:
    from analysis.cache import load
    from analysis.findings.compare import CachesNotComparable, compare_caches

    with pytest.raises(CachesNotComparable, match="other classes") as raised:
        compare_caches(load(cache_a), load(other_classes_cache))
    assert "\n" not in str(raised.value) and "wolf" in str(raised.value)
    # The same class names, other images: the synthetic cache's paths (cat/img_0000000.png) are not these.
    write_synthetic_cache(tmp_path / "synthetic", 24, 8)
    with pytest.raises(CachesNotComparable, match="share 0 of 24 image paths") as raised:
        compare_caches(load(cache_a), load(tmp_path / "synthetic"))
    assert "\n" not in str(raised.value)


def test_report_compare_adds_the_section(cache_a: Path, swapped_cache: Path, other_classes_cache: Path,
                                         tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.html"
    code, printed, error = run_main(capsys, "report", "--cache", str(cache_a), "--compare", str(swapped_cache),
                                    "--out", str(out))
    assert code == 0, error
    text = out.read_text()
    section = text[text.index('<section id="compare">'):]
    assert section.index("</section>") < section.index("</body>")     # inside the body, at its end
    assert "accuracy 87.5% in A, 33.3% in B." in section
    assert "16 predictions changed: 1 now right, 14 now wrong." in section
    tag_block = next(b for b in section.split('<div class="cluster">') if 'Tagged &quot;odd&quot;' in b[:200])
    assert tag_block.count("<img") == 6                                 # the tag's 3 images, in A and in B
    assert "[your tag → your tag]" in tag_block
    # Another dataset: one line, exit 2, no file.
    refused = tmp_path / "refused.html"
    code, printed, error = run_main(capsys, "report", "--cache", str(cache_a), "--compare",
                                    str(other_classes_cache), "--out", str(refused))
    assert code == 2 and error.count("\n") == 1 and error.startswith("error: ") and "other classes" in error
    assert not refused.exists()
    code, printed, error = run_main(capsys, "report", "--cache", str(cache_a), "--compare", str(tmp_path / "none"),
                                    "--out", str(refused))
    assert code == 2 and error.startswith("error: --compare: ") and error.count("\n") == 1 and not refused.exists()


def test_the_compare_page_shows_the_comparison_and_refuses_others(cache_a: Path, swapped_cache: Path,
                                                                  other_classes_cache: Path, monkeypatch) -> None:
    from tests.helpers import open_page, page_texts

    monkeypatch.setenv("FGCAM_COMPARE", str(swapped_cache))
    at = open_page(monkeypatch, cache_a, "compare")
    assert not at.exception
    text = page_texts(at)
    assert "16 predictions changed: 1 now right, 14 now wrong." in text
    assert "B keeps the prediction of A for 1 of its 3 images" in text
    assert len(at.dataframe) == 3          # per class, its scores, the changed predictions
    assert len(at.dataframe[2].value) == 16
    monkeypatch.setenv("FGCAM_COMPARE", str(other_classes_cache))
    at = open_page(monkeypatch, cache_a, "compare")
    assert not at.exception and len(at.error) == 1 and "other classes" in at.error[0].value
    assert str(other_classes_cache.parent) not in at.error[0].value       # no server path on a page


def test_the_sidebar_offers_compare_only_with_a_second_cache(cache_a: Path, swapped_cache: Path,
                                                             monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    from tests.helpers import APP

    monkeypatch.setenv("FGCAM_CACHE", str(cache_a))
    monkeypatch.delenv("FGCAM_COMPARE", raising=False)
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    with pytest.raises(Exception):
        at.switch_page("views/compare.py")        # not a page of the app without --compare
    monkeypatch.setenv("FGCAM_COMPARE", str(swapped_cache))
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    at.switch_page("views/compare.py")
    at.run()
    assert not at.exception and at.title[0].value == "Compare"


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}")
def test_the_compare_page_in_chromium(cache_a: Path, swapped_cache: Path, tmp_path: Path) -> None:
    """`streamlit run dashboard/app.py -- --cache A --compare B`, the Compare page opened by its URL in headless
    Chromium: no exception, the sidebar's Fix section lists it, A's and B's tiles are drawn."""
    pytest.importorskip("playwright.sync_api")
    from tests.test_browser import screenshots_module

    shots = screenshots_module()
    page_shot = shots.PageShot("compare", "/compare", "compare.py", "Compare")
    with shots.running_app(cache_a, tmp_path / "streamlit.log", app_options=["--compare", str(swapped_cache)]) \
            as base:
        found = shots.take_screenshots(base, tmp_path, [page_shot], full_page=True, small=False)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=shots.CHROMIUM_ARGS)
            page = browser.new_page(viewport=shots.VIEWPORT)
            page.goto(base + "/compare")
            shots.wait_until_done(page, "Compare")
            body = page.locator("body").inner_text()
            navigation = page.locator('[data-testid="stSidebarNav"]').inner_text()
            images = page.locator('[data-testid="stImage"] img').count()
            browser.close()
    assert found == {"compare": []}, (tmp_path / "streamlit.log").read_text()[-2000:]
    assert "Compare" in navigation and "16 predictions changed" in body
    from analysis.cache import load
    from analysis.findings.compare import compare_caches
    from dashboard.views.compare import TILES

    fates = compare_caches(load(cache_a), load(swapped_cache)).fates
    assert images == 2 * sum(min(TILES, len(f.examples)) for f in fates) >= 6   # A's and B's tiles side by side
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_images_in_one_cache_only_are_counted_apart(small_cache: Path, cache_a: Path, swapped_cache: Path,
                                                    tmp_path: Path) -> None:
    """B explains 18 of A's 24 image files (img_006 and img_007 of each class left out): 6 only in A, and the tag
    on the img_007 images has none of its images in B."""
    from analysis.cache import load
    from analysis.findings.compare import compare_caches

    images = tmp_path / "images"
    for source in sorted((small_cache.parent / "images").rglob("*.png")):
        if source.stem not in ("img_006", "img_007"):
            (images / source.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(source, images / source.parent.name / source.name)
    b = explain(images, small_cache.parent / "tiny_cnn.pth", tmp_path / "cache")
    comparison = compare_caches(load(cache_a), load(b))
    assert (len(comparison.images), comparison.only_a, comparison.only_b) == (18, 6, 0)
    assert not comparison.images["path"].str.contains("img_00[67]").any()
    fate = next(f for f in comparison.fates if f.finding.kind == "tag")
    assert fate.images == 0 and fate.text() == "None of its images is in B." and fate.verdict_b == "gone"
    # The same model on the same files: nothing changed.
    assert len(comparison.changed) == 0 and comparison.accuracy_b == 1.0    # the 18 are the well-painted ones
