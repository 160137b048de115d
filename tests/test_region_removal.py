"""The causal shortcut test on a model trained with a planted shortcut: class 1 differs from class 0 only by
a bright 3 x 3 mark in the top-left corner. Blurring the region its FG-CAM prototype points to must change
the predictions; an equally large random region must not. Then the command line on a real cache."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.cache import load
from analysis.fgcam import FGCAM
from analysis.pipeline.models import ModelSpecError
from analysis.pipeline.models import model_from_manifest
from analysis.trust.region_removal import (control_regions, foreground_test, per_class_foreground, prototype_map,
                                        region_pixel_count, shift_overlaps, shortcut_test, top_region)
from tests.helpers import fit, run_main
from tests.tiny_models import TinyCNN

SIDE = 16
MARK = (slice(0, 3), slice(0, 3))


def planted_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` noise images per class (values 0..0.5); class 1 carries the mark (value 1) in the corner."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2 * count, 3, SIDE, SIDE, generator=generator) * 0.5
    labels = torch.arange(2).repeat_interleave(count)
    images[count:, :, MARK[0], MARK[1]] = 1.0
    return images, labels


@pytest.fixture(scope="module")
def shortcut_model() -> TinyCNN:
    """TinyCNN trained for a few seconds on the planted data (nothing but the mark separates the classes).

    Margins measured with FGCAM_TEST_SEED 0 and 2 (1 and 2 threads): held-out accuracy 1.0; region on the mark
    9 of 13 pixels (>= 7 asserted); blurring it changes 1.0 of the marked images (>= 0.9), a random region 0.0
    (<= 0.1); probability after the prototype blur 0.002 / 0.157 (< 0.5), after the random one 0.999; object
    only / background only right on 8 of 8; pasting (test_region_insertion.py) flips 1.0 vs 0.0, probabilities
    1.0 / 0.999 vs 0.001 / 0.146."""
    torch.manual_seed(0)
    model = TinyCNN(num_classes=2, width=8)
    images, labels = planted_images(64, seed=0)
    return fit(model, images, labels, steps=150, lr=0.02, seed=1)


def test_blurring_the_prototype_region_removes_the_shortcut_and_a_random_region_does_not(
        shortcut_model: TinyCNN) -> None:
    images, labels = planted_images(24, seed=5)            # fresh images, not the training ones
    marked, marked_labels = images[24:], labels[24:]
    with torch.no_grad():
        assert (shortcut_model(images).argmax(1) == labels).float().mean() == 1.0
    maps = FGCAM(shortcut_model)(marked, target_layer="input").maps
    prototype = prototype_map(maps)
    q = 5.0
    region = top_region(prototype, q, SIDE, SIDE)
    assert int(region.sum()) == region_pixel_count(SIDE * SIDE, q) == 13  # ceil(0.05 * 256)
    mark = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    mark[MARK] = True
    assert int((region & mark).sum()) >= 7, "the prototype region must lie on the mark"

    result = shortcut_test(shortcut_model, marked, marked_labels, prototype, q=q, blur_sigma=5.0, seed=0)
    s = result.summary
    assert s["n"] == 24 and s["region_pixels"] == 13
    assert s["accuracy_before"] == 1.0 and s["changed_random"] <= 0.1 and s["accuracy_random"] >= 0.9
    assert s["changed_prototype"] >= 0.9 and s["accuracy_prototype"] <= 0.1
    assert s["probability_prototype"] < 0.5 < s["probability_random"]
    frame = result.per_image
    assert len(frame) == 24 and frame["control_overlap"].max() == 0  # the control never touches the region
    # The summary is the per-image table's means.
    assert s["changed_prototype"] == pytest.approx(frame["changed_prototype"].mean())
    assert s["accuracy_prototype"] == pytest.approx((frame["pred_prototype"] == frame["label"]).mean())
    np.testing.assert_array_equal(result.region, region.numpy())

    # Unmarked images have no mark to remove: the same region changes (almost) nothing there.
    clean = shortcut_test(shortcut_model, images[:24], labels[:24], prototype, q=q, blur_sigma=5.0)
    assert clean.summary["changed_prototype"] <= 0.1


def test_object_only_and_background_only(shortcut_model: TinyCNN) -> None:
    """With the mark as the 'object' of the marked images: the object alone keeps class 1, the background
    alone (mark blurred away) is class 0 -- Xiao et al.'s two variants, per image and per class."""
    images, labels = planted_images(8, seed=9)
    foreground = torch.zeros(16, SIDE, SIDE, dtype=torch.bool)
    foreground[8:, MARK[0], MARK[1]] = True                 # unmarked images: no foreground -> left out
    frame = foreground_test(shortcut_model, images, labels, foreground, blur_sigma=5.0)
    assert frame["row"].tolist() == list(range(8, 16))
    assert (frame["pred_full"] == 1).all() and (frame["pred_object_only"] == 1).all()
    assert (frame["pred_background_only"] == 0).all()
    table = per_class_foreground(frame, ["plain", "marked"])
    assert table.to_dict("records") == [{"class": "marked", "n": 8, "accuracy_full": 1.0, "accuracy_object_only": 1.0,
                                         "accuracy_background_only": 0.0, "kept_object_only": 1.0,
                                         "kept_background_only": 0.0}]


def test_regions_by_hand() -> None:
    # A 2 x 2 prototype with its maximum top-left, upsampled to 4 x 4: the top 25% (4 pixels) is that corner.
    region = top_region(np.array([[1.0, 0.2], [0.1, 0.0]]), 25.0, 4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(region, expected)
    controls = control_regions(region, 5, seed=3)
    assert controls.shape == (5, 4, 4)
    assert all(int(c.sum()) == 4 and int((c & region).sum()) == 0 for c in controls)
    # Each control is the region moved (same shape): a cyclic shift of it.
    for control in controls:
        assert any(torch.equal(torch.roll(region, (dy, dx), (0, 1)), control) for dy in range(4) for dx in range(4))
    # The prototype gives every map the same weight: unit positive mass first (the zero map is left out).
    maps = np.zeros((3, 2, 2), np.float32)
    maps[0, 0, 0] = 1000.0
    maps[1, 1, 1] = 1.0
    maps[2] = -1.0
    np.testing.assert_allclose(prototype_map(maps), [[0.5, 0.0], [0.0, 0.5]])


@pytest.mark.parametrize("height, width", [(4, 4), (7, 9), (1, 5), (28, 28)])
def test_shift_overlaps_count_what_each_roll_shares(height: int, width: int) -> None:
    """The FFT table the control placement reads, against torch.roll and a count, shift by shift."""
    region = torch.from_numpy(np.random.default_rng(height * width).random((height, width)) < 0.2)
    table = shift_overlaps(region)
    for dy in range(height):
        for dx in range(width):
            assert table[dy, dx] == int((torch.roll(region, (dy, dx), (0, 1)) & region).sum())


def test_wrong_options_fail_with_one_line(shortcut_model: TinyCNN) -> None:
    images, labels = planted_images(2, seed=0)
    for kwargs, message in [({"q": 0}, "q must be a percentage"), ({"q": 150}, "q must be a percentage"),
                            ({"forward_batch": 0}, "forward_batch must be a positive integer")]:
        with pytest.raises(ValueError, match=message):
            shortcut_test(shortcut_model, images, labels, np.ones((4, 4)), **kwargs)
    with pytest.raises(ValueError, match="no map of the selection has positive relevance"):
        prototype_map(-np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="foreground must be bool"):
        foreground_test(shortcut_model, images, labels, torch.zeros(4, 8, 8, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------
# On a real cache (the session's small cache: 3 colour classes x 8 images, masks, a trained tiny CNN)
# ----------------------------------------------------------------------------------------------------------

def test_command_line_on_a_cache(small_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cat.csv"
    code, stdout, stderr = run_main(capsys, "shortcut-test", "--cache", str(small_cache), "--class", "cat",
                                    "--q", "10", "--device", "cpu", "--out", str(out))
    assert code == 0, stderr
    assert "shortcut test: 8 images (class cat)" in stdout and "random region blurred" in stdout
    assert "object only (background blurred)" in stdout  # the cache has masks
    frame = pd.read_csv(out)
    cache = load(small_cache)
    cat_ids = cache.table.loc[cache.table["label_name"] == "cat", "id"].tolist()
    assert frame["id"].tolist() == cat_ids and frame["path"].str.startswith("cat/").all()
    assert {"pred_prototype", "pred_random", "pred_object_only", "pred_background_only"} <= set(frame.columns)
    assert frame["probability_before"].between(0, 1).all() and frame["probability_prototype"].between(0, 1).all()
    # "before" is the model now: it matches the cache's stored predictions (other batches: a near-tie of the two
    # best probabilities may fall either way, so those rows are left out; they must be few).
    stored = cache.table.set_index("id").loc[cat_ids]
    top = np.stack(stored["top5_probs"])
    decisive = top[:, 0] - top[:, 1] > 1e-4
    assert decisive.sum() >= len(cat_ids) - 1
    assert frame["pred_before"][decisive].tolist() == stored["pred"][decisive].tolist()
    per_class = pd.read_csv(tmp_path / "cat_per_class.csv")
    assert per_class["class"].tolist() == ["cat"] and per_class["n"].tolist() == [8]
    # The printed accuracy "before" is the share of correct cat predictions.
    accuracy = float((frame["pred_before"] == frame["label"]).mean())
    assert f"{'before':28}{accuracy:>10.3f}" in stdout

    ids = tmp_path / "ids.txt"
    ids.write_text("0\n3\n# a comment\n\n5\n")
    code, stdout, stderr = run_main(capsys, "shortcut-test", "--cache", str(small_cache), "--ids", str(ids),
                                    "--q", "5", "--device", "cpu", "--prototype-base", "layercam")
    assert code == 0, stderr
    assert "3 images (3 ids from" in stdout and "mean map from fresh FG-CAM (layercam) maps" in stdout


@pytest.mark.parametrize("arguments, message", [
    (["--class", "zebra"], "--class 'zebra': not a class of the cache (classes: cat, dog, fox)"),
    (["--pred", "cat", "--q", "0"], "argument --q: expected a percentage in (0, 100], got '0'"),
    (["--ids", "/nonexistent/ids.txt"], "--ids /nonexistent/ids.txt: no such file"),
    (["--class", "cat", "--device", "cuda:7"], "--device cuda:7"),
])
def test_command_line_errors_are_one_line(small_cache: Path, capsys: pytest.CaptureFixture, arguments: list[str],
                                          message: str) -> None:
    code, stdout, stderr = run_main(capsys, "shortcut-test", "--cache", str(small_cache), *arguments)
    assert code == 2 and message in stderr and stderr.count("\n") == 1 and stdout == ""


def test_ids_outside_the_cache_and_missing_cache(small_cache: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    ids = tmp_path / "ids.csv"
    ids.write_text("id,note\n1,a\n999,b\n")
    code, _, stderr = run_main(capsys, "shortcut-test", "--cache", str(small_cache), "--ids", str(ids))
    assert code == 2 and "1 id(s) are not in the cache (e.g. [999])" in stderr
    code, _, stderr = run_main(capsys, "shortcut-test", "--cache", str(tmp_path / "nope"), "--class", "cat")
    assert code == 2 and "cache directory not found" in stderr


def test_the_dashboard_is_told_why_the_model_cannot_be_loaded(small_cache: Path) -> None:
    manifest = json.loads((small_cache / "manifest.json").read_text())
    loaded = model_from_manifest(manifest)
    assert loaded.weights_sha256 == manifest["model"]["weights_sha256"]
    changed = {**manifest, "model": {**manifest["model"], "weights_sha256": "0" * 64}}
    with pytest.raises(ModelSpecError, match="now has other weights than the cache was made with"):
        model_from_manifest(changed)
    missing = {**manifest, "model": {**manifest["model"], "spec": "/nowhere/model.py:build"}}
    with pytest.raises(ModelSpecError, match=r"cannot load the cache's model here: .*no such file /nowhere/model.py"):
        model_from_manifest(missing)
    no_checkpoint = {**manifest, "model": {**manifest["model"], "checkpoint": "/nowhere/weights.pth"}}
    with pytest.raises(ModelSpecError, match="--checkpoint /nowhere/weights.pth: no such file"):
        model_from_manifest(no_checkpoint)


def test_run_inputs_decode_and_run_each_image_once_within_the_budget_and_agree_with_a_fresh_pass(
        small_cache: Path, tmp_path: Path) -> None:
    """A run's tests share images and compare every change with the image's own prediction: kept by path, the
    images are the very tensors a fresh decode gives and the outputs those of a fresh pass (to float tolerance:
    another batch); each image is decoded and goes through the model once while what is kept fits the budget,
    past it each time; a corrupt file is skipped with its reason, kept or not."""
    from analysis.trust.region_removal import RunInputs, load_inputs, model_probabilities

    cache = load(small_cache)
    loaded = model_from_manifest(cache.manifest)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    paths = [cache.image_path(i) for i in range(6)] + [broken]
    fresh, positions, errors = load_inputs(paths, loaded.transform, loaded.in_channels)
    assert positions == list(range(6)) and [e[0] for e in errors] == [6] and "Error" in errors[0][1]
    outputs = model_probabilities(loaded.model, fresh, forward_batch=64)
    one = fresh[0].element_size() * fresh[0].nelement() + outputs[0].element_size() * outputs[0].nelement()
    seen: list[int] = []
    hook = loaded.model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    try:
        # budget -> (images kept, forward passes of: the first 4 images, all, all again)
        for budget, kept, passes in ((0, 0, [4, 6, 6]), (4 * one, 4, [4, 2, 2]), (10 * one, 6, [4, 2])):
            inputs = RunInputs(budget=budget)
            seen.clear()
            first = inputs.load(paths[:4], loaded.transform, loaded.in_channels, loaded.model)
            for _ in range(2):            # the second call reads what the first kept
                found = inputs.load(paths, loaded.transform, loaded.in_channels, loaded.model)
                assert torch.equal(found.images, fresh) and found.positions == positions and found.errors == errors
                torch.testing.assert_close(found.outputs, outputs, rtol=0, atol=1e-6)
            torch.testing.assert_close(first.outputs, outputs[:4], rtol=0, atol=1e-6)
            assert seen == passes
            assert sum(isinstance(v, torch.Tensor) for v in inputs.decoded.values()) == len(inputs.outputs) == kept
            assert inputs.used == kept * one <= budget
    finally:
        hook.remove()
    assert inputs.load(paths, loaded.transform, loaded.in_channels).outputs is None   # no model, no outputs


def test_a_test_given_the_outputs_measures_what_it_measures_without_them(shortcut_model: TinyCNN) -> None:
    from analysis.trust.region_removal import model_probabilities

    images, labels = planted_images(6, seed=3)
    fresh = model_probabilities(shortcut_model, images, forward_batch=64)
    prototype = torch.zeros(SIDE, SIDE)     # the mark's place, by hand: what the test is given, not what it learnt
    prototype[MARK] = 1.0
    alone = shortcut_test(shortcut_model, images, labels, prototype, seed=0)
    given = shortcut_test(shortcut_model, images, labels, prototype, seed=0, before=fresh)
    pd.testing.assert_frame_equal(alone.per_image, given.per_image)
    with pytest.raises(ValueError, match="before must be"):
        shortcut_test(shortcut_model, images, labels, prototype, before=fresh[:3])
