"""The artefact insertion test (analysis/trust/region_insertion.py) on a model trained with a planted shortcut (the
one tests/test_region_removal.py trains: class 1 = noise + a bright 3 x 3 corner mark), then on a real cache
through the command line."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.cache import load
from analysis.fgcam import FGCAM
from analysis.trust.region_insertion import (INSERTION_DIR, insertion_test, insertion_test_on_cache, paste_regions,
                                     read_insertion_reports)
from analysis.review import Review
from analysis.trust.region_removal import prototype_map, top_region
from tests.helpers import run_main
from tests.test_region_removal import MARK, SIDE, planted_images, shortcut_model  # noqa: F401 (a fixture)


def test_paste_regions_copies_exactly_the_region() -> None:
    targets = torch.zeros(2, 3, 4, 4)
    sources = torch.arange(2 * 3 * 16, dtype=torch.float32).view(2, 3, 4, 4)
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[0, :2] = True
    pasted = paste_regions(targets, sources, region)
    assert torch.equal(pasted[:, :, 0, :2], sources[:, :, 0, :2])
    assert pasted.sum() == sources[:, :, 0, :2].sum() and targets.sum() == 0   # nothing else, input untouched
    per_image = torch.zeros(2, 4, 4, dtype=torch.bool)
    per_image[1, 3, 3] = True
    assert paste_regions(targets, sources, per_image).nonzero().tolist() == [[1, c, 3, 3] for c in range(3)]
    with pytest.raises(ValueError, match="do not fit"):
        paste_regions(targets, sources, torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="differ in shape"):
        paste_regions(targets, sources[:1], region)


def test_pasting_the_mark_flips_predictions_and_a_random_region_does_not(shortcut_model) -> None:  # noqa: F811
    images, labels = planted_images(24, seed=7)             # fresh images, not the training ones
    clean, marked = images[:24], images[24:]
    prototype = prototype_map(FGCAM(shortcut_model)(marked, target_layer="input").maps)
    result = insertion_test(shortcut_model, marked, clean, into=1, prototype=prototype, q=5.0, seed=0)
    s = result.summary
    assert s["n"] == 24 and s["sources"] == 24 and s["already_into"] == 0 and s["region_pixels"] == 13
    mark = np.zeros((SIDE, SIDE), bool)
    mark[MARK] = True
    assert (result.region & mark).sum() >= 7                 # the region lies on the mark
    # measured with FGCAM_TEST_SEED 0 and 2, 1 and 2 threads: flipped 1.0 and 0.0, probabilities 1.0 / 0.999 and
    # 0.001 / 0.146
    assert s["flipped_prototype"] >= 0.9 and s["flipped_random"] <= 0.1
    assert s["probability_prototype"] > 0.5 > s["probability_random"]
    frame = result.per_image
    # The summary is the per-image table's means; every source is used once (24 targets, 24 sources).
    assert s["flipped_prototype"] == pytest.approx(frame["flipped_prototype"].mean())
    assert s["probability_random"] == pytest.approx(frame["probability_random"].mean())
    assert sorted(frame["source"]) == list(range(24)) and frame["control_overlap"].max() == 0
    # A flip is exactly: predicted 1 after the paste, not before.
    region = top_region(prototype, 5.0, SIDE, SIDE)
    pasted = paste_regions(clean, marked[torch.tensor(frame["source"].tolist())], region)
    with torch.no_grad():
        np.testing.assert_array_equal(shortcut_model(pasted).argmax(1).numpy(), frame["pred_prototype"])

    # The sources' own object (noise) carries no evidence: pasting a clean image's region flips nothing.
    other = insertion_test(shortcut_model, images[:12], clean[12:], into=1, prototype=prototype, q=5.0)
    assert other.summary["flipped_prototype"] <= 0.1


def test_insertion_test_refuses_bad_input(shortcut_model) -> None:  # noqa: F811
    images, _ = planted_images(2, seed=0)
    prototype = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="differ in size"):
        insertion_test(shortcut_model, images[:, :, :8, :8], images, 1, prototype)
    with pytest.raises(ValueError, match="not an output"):
        insertion_test(shortcut_model, images, images, 5, prototype)
    with pytest.raises(ValueError, match="percentage"):
        insertion_test(shortcut_model, images, images, 1, prototype, q=0)


def test_on_a_cache_and_the_command_line(small_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(small_cache, copy)
    cache = load(copy)
    dogs = cache.table.loc[cache.table["pred_name"] == "dog", "id"].to_numpy()
    report = insertion_test_on_cache(cache, dogs, n_targets=5, q=10.0)
    assert report.into_name == "dog" and len(report.target_ids) == 5 and not report.skipped
    table = cache.table.set_index("id")
    assert (table.loc[report.target_ids, "label_name"] != "dog").all()
    assert (table.loc[report.target_ids, "pred_name"] != "dog").all()
    frame = report.result.per_image
    assert frame["target_id"].tolist() == report.target_ids.tolist() and set(frame["source_id"]) <= set(dogs)
    np.testing.assert_array_equal(frame["pred_before"], table.loc[report.target_ids, "pred"])

    Review(copy).tag(dogs[:4], "shortcut")
    code, out, err = run_main(capsys, "insertion-test", "--cache", str(copy), "--tag", "shortcut", "--targets", "6",
                              "--q", "10", "--device", "cpu")
    assert code == 0, err
    assert "flipped to dog" in out and "region pasted" in out and "random region pasted" in out
    saved = read_insertion_reports(copy)
    assert len(saved) == 1 and saved[0].description == "tagged shortcut" and saved[0].into_name == "dog"
    assert saved[0].summary["n"] == 6 and len(saved[0].per_image) == 6 and saved[0].region.shape == (20, 20)
    assert f"results: {copy / INSERTION_DIR / saved[0].name}" in out
    code, _, _ = run_main(capsys, "insertion-test", "--cache", str(copy), "--tag", "shortcut", "--targets", "6",
                          "--q", "10", "--device", "cpu")
    assert code == 0 and len(read_insertion_reports(copy)) == 1          # the same run replaces the last one

    for extra, message in [(["--tag", "fine"], "no image of the cache has this tag"),
                           (["--pred", "wolf"], "not a class of the cache"),
                           (["--pred", "dog", "--into", "wolf"], "--into 'wolf': not a class"),
                           (["--pred", "dog", "--q", "0"], "percentage")]:
        code, out, err = run_main(capsys, "insertion-test", "--cache", str(copy), *extra)
        assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
