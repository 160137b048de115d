"""compare-methods end to end on a tiny generated ImageFolder and a tiny trained CNN whose answer depends on a
clear region (a small white mark), plus the pieces of the table by hand."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from analysis.explore.statistics import sample_rows as sample_positions
from analysis.trust.compare import (METHODS, ComparisonError, Explainers, compare_methods, default_intermediate_layer,
                                    method_maps, read_comparison, summarise, trust_page_data)
from analysis.trust.faithfulness import deletion_insertion_curves
from data.demo_model import DemoCNN
from PIL import Image

from tests.helpers import TINY_MODEL_FILE, run_main, train_tiny_cnn
from tests.tiny_models import TinyCNN

TINY = f"{TINY_MODEL_FILE}:tiny_cnn"


def make_mark_folder(root: Path, per_class: int = 8, size: int = 20) -> None:
    """root/marked/*.png and root/plain/*.png: grey noise (0..127); a 'marked' image has a white 3 x 3 mark at
    a random place. The class is decided by a small region that a blur erases -- unlike a colour, whose
    amount a blur keeps (blurring is mass-preserving, and a pooled CNN reads colour amounts)."""
    rng = np.random.default_rng(11)
    for name in ("marked", "plain"):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 128, size=(size, size, 3), dtype=np.uint8)
            if name == "marked":
                y, x = (int(v) for v in rng.integers(0, size - 3, size=2))
                pixels[y:y + 3, x:x + 3] = 255
            Image.fromarray(pixels, "RGB").save(root / name / f"img_{k:03d}.png")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(ImageFolder of 2 classes x 8 images of 20 x 20, state dict of the tiny CNN trained on it)."""
    root = tmp_path_factory.mktemp("compare")
    make_mark_folder(root / "images")
    return root / "images", train_tiny_cnn(root / "images", root / "tiny_cnn.pth", steps=100)


def test_compare_methods_end_to_end(dataset: tuple[Path, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    images, checkpoint = dataset
    out = tmp_path / "trust"
    code, stdout, stderr = run_main(capsys, "compare-methods", "--data", str(images), "--model", TINY,
                                    "--checkpoint", str(checkpoint), "--sample", "12", "--steps", "8",
                                    "--sanity-sample", "5", "--device", "cpu", "--quiet", "--out", str(out))
    assert code == 0, stderr
    faithfulness, sanity_text = stdout.split("randomisation cascade")
    # The printed table: 2 layers x 6 methods, every number finite.
    rows = [line for line in faithfulness.splitlines() if line.startswith(("input", "features"))]
    assert len(rows) == 12
    assert "deletion AUC (lower is better)" in stdout and "insertion AUC (higher is better)" in stdout
    numbers = [float(x) for line in rows for x in line.replace("±", " ").replace("[", " ").replace("]", " ").split()
               if x.replace(".", "").isdigit()]
    assert len(numbers) >= 72 and all(math.isfinite(x) for x in numbers)

    comparison = read_comparison(out)
    table = comparison.table.set_index(["layer", "method"])
    layer = comparison.meta["layers"][1]
    assert comparison.meta["layers"] == ["input", "features.2"] and comparison.meta["n_images"] == 12
    for at in ("input", layer):
        # The model reads the mark: removing FG-CAM's most relevant pixels first hurts more than removing
        # pixels at random, and inserting them first helps more.
        assert table.loc[(at, "fgcam"), "deletion_auc_mean"] < table.loc[(at, "random"), "deletion_auc_mean"]
        assert table.loc[(at, "fgcam"), "insertion_auc_mean"] > table.loc[(at, "random"), "insertion_auc_mean"]
        # Where there is a mark to find, by far: (a plain image stays 'plain' whatever is blurred, AUC ~ 1.)
        # Measured (FGCAM_TEST_SEED 0 / 2, one thread), random minus FG-CAM: all images' deletion AUC 0.13 / 0.12
        # (input), 0.16 / 0.15 (features.2), insertion 0.25 / 0.27 and 0.24 / 0.25; the marked images' deletion
        # 0.31 / 0.28 and 0.37 / 0.36, insertion 0.60 / 0.64 and 0.57 / 0.59 (0.2 asserted).
        marked = comparison.per_image[comparison.per_image["path"].str.startswith("marked/")
                                      & (comparison.per_image["layer"] == at)].groupby("method").mean(numeric_only=True)
        assert marked.loc["fgcam", "deletion_auc"] < marked.loc["random", "deletion_auc"] - 0.2
        assert marked.loc["fgcam", "insertion_auc"] > marked.loc["random", "insertion_auc"] + 0.2
    assert np.isfinite(comparison.table[[c for c in comparison.table if c.endswith(("_mean", "_std", "_ci95"))]]
                       .to_numpy()).all()
    # The table is the per-image AUCs' summary; the mean curves are the per-image curves' means.
    per_image = comparison.per_image
    assert len(per_image) == 12 * 12 and per_image["path"].str.endswith(".png").all()
    assert set(per_image["id"]) == set(sample_positions(16, 12, 0))
    for (at, method), group in per_image.groupby(["layer", "method"]):
        assert table.loc[(at, method), "n"] == 12
        assert table.loc[(at, method), "deletion_auc_mean"] == pytest.approx(group["deletion_auc"].mean(), rel=1e-6)
    curves = comparison.curves
    assert len(curves) == 12 * 2 * 9  # (layer, method) x (deletion, insertion) x (steps + 1)
    start = curves[(curves["curve"] == "deletion") & (curves["fraction"] == 0)]["probability"]
    assert np.allclose(start, start.iloc[0])  # every method starts from the same unperturbed images
    table_again, curves_again, meta = trust_page_data(out)
    pd.testing.assert_frame_equal(table_again, comparison.table)
    assert meta["steps"] == 8 and meta["options"]["sample"] == 12

    # The sanity checks: printed (four tables and the sentence), stored beside the faithfulness results.
    assert sanity_text.count("rank correlation with the original map") == 3
    assert "SSIM with the original map" in sanity_text
    assert "head + 1 block: head, features.2" in sanity_text and "explaining another class gives" in sanity_text
    sanity_meta = comparison.meta["sanity"]
    assert [s["label"] for s in sanity_meta["steps"]] == ["head", "head + 1 block", "all (head + 2 blocks)"]
    assert sanity_meta["n_images"] == 5 and sanity_meta["pooled_size"] == 16 and sanity_meta["sentence"] in stdout
    checks = comparison.sanity_per_image
    assert len(checks) == 5 * (3 + 1) * 2 * 6 * 3   # images x (steps + class) x layers x methods x variants
    assert checks["id"].nunique() == 5 and set(checks["id"]) <= set(per_image["id"])
    assert (checks["path"] == per_image.set_index("id").loc[checks["id"], "path"].groupby(level=0).first()
            .loc[checks["id"]].to_numpy()).all()
    assert set(comparison.sanity["method"]) == set(METHODS)
    assert set(comparison.sanity["check"]) == {"randomise", "class"}
    # The maps that ignore the model do not change.
    assert np.allclose(checks[checks["method"].isin(["edge", "random"])]["spearman"], 1.0)


def test_curves_and_areas_equal_a_direct_computation(dataset: tuple[Path, Path]) -> None:
    """compare_methods is deletion_insertion_curves of each method's map: recompute FG-CAM's and the CAM's
    by hand, across a batch boundary."""
    images_root, checkpoint = dataset
    from torchvision.datasets import ImageFolder

    from tests.tiny_models import tiny_cnn

    model, transform = tiny_cnn()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    model.eval()
    folder = ImageFolder(str(images_root), transform=transform)
    images = torch.stack([folder[i][0] for i in (0, 7, 12)])
    comparison = compare_methods(model, images, layers=("input", "features.0"), methods=("fgcam", "cam", "random"),
                                 steps=5, batch_size=2, seed=3)
    explainers = Explainers.build(model)
    # By hand on the same batches (images 0-1, then 2): a curve's pixel order ranks the map, and a near-tie
    # can flip when another batching changes the map's last bits; identical batches give identical maps.
    batches = (slice(0, 2), slice(2, 3))
    results = [explainers.fgcam(images[rows], target_layer="input") for rows in batches]
    classes = torch.cat([r.classes for r in results])
    direct = [deletion_insertion_curves(model, images[rows], r.maps, r.classes, steps=5)
              for rows, r in zip(batches, results)]
    got = comparison.per_image.query("layer == 'input' and method == 'fgcam'")
    np.testing.assert_allclose(got["deletion_auc"], np.concatenate([d.deletion_auc for d in direct]), rtol=1e-5)
    np.testing.assert_allclose(got["insertion_auc"], np.concatenate([d.insertion_auc for d in direct]), rtol=1e-5)
    # the CAM layer: the components summed
    cam = torch.cat([explainers.fgcam(images[rows], target_layer="features.3").maps for rows in batches])
    cam_maps = method_maps(explainers, "cam", images, "input", classes, (20, 20), [0, 1, 2])
    upsampled = torch.nn.functional.interpolate(cam[:, None], size=(20, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(cam_maps, upsampled[:, 0])
    direct_cam = [deletion_insertion_curves(model, images[rows], cam[rows], classes[rows], steps=5)
                  for rows in batches]
    got_cam = comparison.per_image.query("layer == 'input' and method == 'cam'")
    np.testing.assert_allclose(got_cam["deletion_auc"], np.concatenate([d.deletion_auc for d in direct_cam]),
                               rtol=1e-5)
    mean_curve = comparison.curves.query("layer == 'input' and method == 'fgcam' and curve == 'insertion'")
    np.testing.assert_allclose(mean_curve["probability"],
                               np.concatenate([d.insertion for d in direct]).mean(axis=0), rtol=1e-5)
    # Seeded per image: the random maps (and so their AUCs) repeat with other batches and layers. The random
    # maps have no ties, so only the model's probabilities differ, in their last bits (hence rtol 1e-5).
    again = compare_methods(model, images, layers=("input",), methods=("random",), steps=5, batch_size=3, seed=3)
    # (Other batches: the perturbed forward passes differ in the last bits, hence a tolerance.)
    np.testing.assert_allclose(again.per_image["deletion_auc"],
                               comparison.per_image.query("layer == 'input' and method == 'random'")["deletion_auc"],
                               rtol=1e-5)


def test_summary_by_hand() -> None:
    per_image = pd.DataFrame({"layer": ["input"] * 3 + ["x"] * 2, "method": ["fgcam"] * 3 + ["random"] * 2,
                              "deletion_auc": [0.1, 0.2, 0.3, 0.5, 0.5], "insertion_auc": [0.9, 0.8, 0.7, 0.4, 0.6],
                              "constant_map": [False, False, True, False, False]})
    table = summarise(per_image, {"fgcam": "FG-CAM"})
    first = table.iloc[0]
    assert (first["layer"], first["method"], first["label"], first["n"]) == ("input", "fgcam", "FG-CAM", 3)
    assert first["deletion_auc_mean"] == pytest.approx(0.2)
    assert first["deletion_auc_std"] == pytest.approx(0.1)
    assert first["deletion_auc_ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)  # t(0.975, 2)
    assert first["constant_maps"] == pytest.approx(1 / 3)
    second = table.iloc[1]
    assert second["deletion_auc_std"] == 0 and second["insertion_auc_ci95"] == pytest.approx(
        12.706205 * math.sqrt(0.02) / math.sqrt(2), rel=1e-6)  # t(0.975, 1), std of (0.4, 0.6)


def test_default_intermediate_layer_is_a_middle_stage() -> None:
    from analysis.fgcam import FGCAM

    # DemoCNN 28 -> 14 -> 7: the middle resolution is 14 x 14, whose last module is the second block's ReLU.
    assert default_intermediate_layer(FGCAM(DemoCNN().eval()), torch.zeros(1, 1, 28, 28)) == "features.6"
    # ResNet-18 on 64 x 64: stages at 32, 16, 8, 4 below layer4 -> 8 x 8 -> the stage output "layer2".
    resnet = torchvision.models.resnet18(num_classes=4).eval()
    assert default_intermediate_layer(FGCAM(resnet), torch.zeros(1, 3, 64, 64)) == "layer2"
    # No pooling at all: everything has the input's size; the last module below the CAM layer.
    assert default_intermediate_layer(FGCAM(TinyCNN().eval()), torch.zeros(1, 3, 20, 20)) == "features.2"


def test_default_intermediate_layer_is_never_a_pad_module() -> None:
    """EfficientNet pads with modules of its own (`static_padding`, ZeroPad2d): their odd sizes (57 x 57) once made
    a pad the default, and the explanation at a pad's output failed with a KeyError."""
    from analysis.fgcam import FGCAM
    from tests.pretrained_models import efficientnet_lite0

    model, _ = efficientnet_lite0()
    explainer = FGCAM(model)
    image = torch.zeros(1, 3, 224, 224)
    layer = default_intermediate_layer(explainer, image)
    assert layer == "_blocks.4"   # the middle of 112, 56, 28, 14 (the stage outputs below the 7 x 7 CAM layer)
    assert explainer(image, target_layer=layer).maps.shape == (1, 28, 28)


def test_a_cache_gets_its_trust_folder(small_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)  # the session cache stays untouched
    code, stdout, stderr = run_main(capsys, "compare-methods", "--cache", str(cache), "--sample", "6", "--steps", "4",
                                    "--randomise", "all", "--no-class-check", "--device", "cpu", "--quiet")
    assert code == 0, stderr
    comparison = read_comparison(cache / "trust")
    assert comparison.meta["model"].endswith("tiny_models.py:tiny_cnn") and comparison.meta["n_images"] == 6
    assert set(comparison.per_image["method"]) == set(METHODS)
    # The pooled variant at the cache's own descriptor size; one step, no class check.
    sanity_meta = comparison.meta["sanity"]
    assert sanity_meta["pooled_size"] == 4 and [s["label"] for s in sanity_meta["steps"]] == ["all (head + 2 blocks)"]
    assert set(comparison.sanity["check"]) == {"randomise"} and sanity_meta["n_images"] == 6
    assert comparison.per_image["path"].isin(pd.read_parquet(next(cache.rglob("table.parquet")))["path"]).all()


@pytest.mark.parametrize("arguments, message", [
    (["--data", "{images}"], "--data needs --model"),
    (["--data", "{images}", "--model", TINY, "--layer", "fc"], "--layer fc: not between the input and the CAM layer"),
    (["--data", "{images}", "--model", TINY, "--layer", "nope"], "unknown layer 'nope'"),
    (["--data", "{images}", "--model", TINY, "--steps", "0"], "argument --steps: expected a positive integer"),
    (["--data", "{images}", "--model", TINY, "--base", "gradcam--"], "argument --base: invalid choice"),
    (["--data", "/nonexistent", "--model", TINY], "--data /nonexistent: no such file or directory"),
    (["--cache", "{images}", "--model", TINY], "--model goes with --data"),
    (["--data", "{images}", "--cache", "{images}"], "not allowed with argument"),
    (["--data", "{images}", "--model", TINY, "--randomise", "9"],
     "--randomise 9: the model has 2 blocks below the head"),
    (["--data", "{images}", "--model", TINY, "--randomise", "1,top"],
     "argument --randomise: expected 'none', 'default'"),
    (["--data", "{images}", "--model", TINY, "--sanity-sample", "0"], "argument --sanity-sample: expected a positive"),
])
def test_wrong_options_fail_with_one_line(dataset: tuple[Path, Path], capsys: pytest.CaptureFixture,
                                          arguments: list[str], message: str) -> None:
    images, _ = dataset
    argv = [a.replace("{images}", str(images)) for a in arguments]
    code, stdout, stderr = run_main(capsys, "compare-methods", *argv, "--device", "cpu", "--quiet")
    assert code == 2 and message in stderr and stderr.count("\n") == 1 and stdout == ""


def test_no_sanity_checks_when_both_are_off(dataset: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    images, checkpoint = dataset
    code, stdout, stderr = run_main(capsys, "compare-methods", "--data", str(images), "--model", TINY, "--checkpoint",
                                    str(checkpoint), "--sample", "2", "--steps", "2", "--randomise", "none",
                                    "--no-class-check", "--device", "cpu", "--quiet", "--out", str(tmp_path))
    assert code == 0, stderr
    assert "randomisation cascade" not in stdout and "Spearman" not in stdout
    comparison = read_comparison(tmp_path)
    assert comparison.sanity is None and "sanity" not in comparison.meta


def test_reading_a_missing_comparison_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ComparisonError, match=r"no method comparison in .* \(run `python -m analysis compare-methods"):
        read_comparison(tmp_path)
    (tmp_path / "comparison.json").write_text('{"format_version": 1}')
    with pytest.raises(ComparisonError, match="unreadable method comparison"):
        read_comparison(tmp_path)


def test_a_corrupt_image_is_skipped_and_named(dataset: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    images, checkpoint = dataset
    folder = Path(shutil.copytree(images, tmp_path / "images"))
    (folder / "plain" / "img_005.png").write_bytes(b"not a png")   # the 14th of 16 files
    code, stdout, stderr = run_main(capsys, "compare-methods", "--data", str(folder), "--model", TINY, "--checkpoint",
                                    str(checkpoint), "--sample", "16", "--steps", "2", "--randomise", "head",
                                    "--sanity-sample", "5", "--device", "cpu", "--quiet",
                                    "--out", str(tmp_path / "trust"))
    assert code == 0, stderr
    assert "skipped 1 unreadable image(s), e.g. plain/img_005.png" in stderr
    comparison = read_comparison(tmp_path / "trust")
    assert comparison.meta["skipped"][0]["path"] == "plain/img_005.png" and comparison.meta["n_images"] == 15
    assert "plain/img_005.png" not in set(comparison.per_image["path"]) and comparison.per_image["id"].nunique() == 15
    checked = comparison.sanity_per_image
    assert "plain/img_005.png" not in set(checked["path"]) and checked["id"].nunique() == 5
    assert set(checked["path"]) <= set(comparison.per_image["path"])
