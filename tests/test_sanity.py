"""Sanity checks (analysis/trust/sanity/): the blocks of real architectures, randomisation that never touches the
caller's model, the similarity metrics against scipy and scikit-image, the checks against a direct
computation on the same maps, and a model-ignoring edge map against the CAM on a small trained model whose
layers are re-initialised from the top."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision
from scipy import ndimage, stats
from skimage.metrics import structural_similarity
from torch import nn

from analysis.trust import sanity
from analysis.trust.compare import (ComparisonError, MethodComparison, edge_maps, read_comparison, sanity_page_data,
                              trust_page_data, write_comparison)
from analysis.fgcam import FGCAM
from data.demo_model import DemoCNN
from tests.helpers import fit
from tests.test_fgcam_engine import FunctionalNet


# ----------------------------------------------------------------------------------------------------------
# A small trained model: which of two classes is decided by a small white mark in grey noise
# ----------------------------------------------------------------------------------------------------------

def mark_images(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey noise (0..127) scaled to [-1, 0]; odd images carry a 3 x 3 white mark (+1) at a random place."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 128, size=(n, 3, size, size)).astype(np.float32)
    labels = np.arange(n) % 2
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, size - 3, size=2)
        pixels[i, :, y:y + 3, x:x + 3] = 255
    return torch.from_numpy(pixels / 127.5 - 1), torch.from_numpy(labels)


class MarkCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@pytest.fixture(scope="module")
def mark_model() -> tuple[MarkCNN, torch.Tensor]:
    """(a MarkCNN trained to tell marked from plain images, 24 held-out images)."""
    torch.manual_seed(0)
    model = MarkCNN()
    images, labels = mark_images(256, seed=0)
    fit(model, images, labels, steps=150, lr=0.01, seed=0)
    test_images, test_labels = mark_images(24, seed=5)
    with torch.no_grad():
        # it learnt the mark. Measured (FGCAM_TEST_SEED 0 and 2, 1 and 2 threads): accuracy 1.0, the true
        # class's logit ahead by at least 2.04 (seed 0) and 2.07 (seed 2) on every held-out image.
        assert (model(test_images).argmax(1) == test_labels).float().mean() == 1.0
    return model, test_images


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------

def blocks_of(model: nn.Module) -> list[sanity.Block]:
    explainer = FGCAM(model)
    return sanity.randomisation_blocks(explainer.graph, explainer.cam_layer)


def owners(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules()
            if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))}


def test_blocks_of_real_architectures() -> None:
    demo = blocks_of(DemoCNN().eval())
    assert [b.name for b in demo] == ["head", "features.8 + features.9", "features.4 + features.5",
                                      "features.0 + features.1"]
    assert demo[0].modules == ("classifier",)

    resnet = torchvision.models.resnet18(num_classes=4).eval()
    blocks = blocks_of(resnet)
    assert [b.name for b in blocks[:3]] == ["head", "layer4.1", "layer4.0"] and blocks[-1].name == "conv1 + bn1"
    assert len(blocks) == 10 and "layer4.0.downsample.0" in blocks[2].modules
    # Every module that owns a parameter or buffer is re-initialised in exactly one block.
    listed = [m for b in blocks for m in b.modules]
    assert sorted(listed) == sorted(owners(resnet))

    vgg = blocks_of(torchvision.models.vgg11_bn(num_classes=4).eval())
    assert vgg[0].modules == ("classifier.0", "classifier.3", "classifier.6") and len(vgg) == 9
    assert all(len(b.modules) == 2 for b in vgg[1:])   # each convolution with its batch norm

    functional = blocks_of(FunctionalNet().eval())   # no containers: each top-level module is a block
    assert [b.name for b in functional] == ["head", "down", "excite", "squeeze", "right", "left", "stem"]


def test_blocks_of_the_pretrained_efficientnet_lite0() -> None:
    from tests.pretrained_models import efficientnet_lite0

    model, _ = efficientnet_lite0()
    blocks = blocks_of(model)
    assert [b.name for b in blocks[:4]] == ["head", "_conv_head + _bn1", "_blocks.15", "_blocks.14"]
    assert blocks[0].modules == ("_fc",) and blocks[-1].name == "_conv_stem + _bn0" and len(blocks) == 19
    assert sanity.default_depths(blocks) == [0, 1, 2, 4, 8, 16, 18]


class OwnWeight(nn.Module):
    """Holds its weight itself and convolves functionally: no reset_parameters, found through get_attr."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.conv2d(x, self.weight, padding=1))


class OwnWeightNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = OwnWeight()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.body(x), 1).flatten(1))


def test_a_module_without_reset_parameters_gets_its_weights_permuted() -> None:
    torch.manual_seed(0)
    model = OwnWeightNet().eval()
    blocks = blocks_of(model)
    assert [(b.name, b.modules) for b in blocks] == [("head", ("fc",)), ("body", ("body",))]
    values, how = sanity.randomised_tensors(model, blocks[1], seed=3)
    assert how == {"body": "permuted"}
    new, old = values["body"]["weight"], model.body.weight.detach()
    assert torch.equal(new.flatten().sort().values, old.flatten().sort().values) and not torch.equal(new, old)


# ----------------------------------------------------------------------------------------------------------
# Randomisation
# ----------------------------------------------------------------------------------------------------------

def snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "ids": {k: id(v) for k, v in model.named_parameters()},
            "training": {k: m.training for k, m in model.named_modules()},
            "requires_grad": {k: v.requires_grad for k, v in model.named_parameters()}}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["ids"] == before["ids"] and after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key


def test_randomisation_never_touches_the_callers_model(mark_model: tuple[MarkCNN, torch.Tensor]) -> None:
    model, images = mark_model
    before = snapshot(model)
    checks = sanity.sanity_checks(model, images[:3], methods=("fgcam", "cam"), batch_size=2)
    assert_unchanged(model, before)
    # ... while the maps it explained did change: the randomised copy was really randomised.
    cam = checks.per_image.query("check == 'randomise' and method == 'cam' and variant == 'signed'")
    assert (cam["spearman"] < 0.999).any()
    twin, chosen = sanity.randomised_copy(model, 1, seed=0)
    assert_unchanged(model, before)
    assert [b.name for b in chosen] == ["head", "features.5"]


def test_randomised_copy_changes_exactly_the_blocks_of_its_depth(mark_model: tuple[MarkCNN, torch.Tensor]) -> None:
    model, _ = mark_model
    twin, chosen = sanity.randomised_copy(model, 1, seed=7)
    changed = {name for name, module in model.named_modules() if name in owners(model)
               and not all(torch.equal(p, dict(twin.named_parameters())[f"{name}.{k}"])
                           for k, p in module.named_parameters(recurse=False))}
    assert changed == {"fc", "features.5"} == {m for b in chosen for m in b.modules}
    # What reset_parameters gives: nn.Linear's bound 1/sqrt(fan_in) for its bias.
    assert twin.fc.bias.abs().max() <= 1 / math.sqrt(32)
    again, _ = sanity.randomised_copy(model, 1, seed=7)
    other, _ = sanity.randomised_copy(model, 1, seed=8)
    assert torch.equal(again.features[5].weight, twin.features[5].weight)   # seeded
    assert not torch.equal(other.features[5].weight, twin.features[5].weight)


def test_depths_from_options() -> None:
    blocks = [sanity.Block("head", ("fc",))] + [sanity.Block(f"b{i}", (f"b{i}",)) for i in range(18)]
    assert sanity.default_depths(blocks) == [0, 1, 2, 4, 8, 16, 18]
    assert sanity.default_depths(blocks[:4]) == [0, 1, 2, 3]
    assert sanity.default_depths(blocks[1:4]) == [1, 2, 3]   # no head
    assert sanity.parse_depths("none") is None
    assert sanity.resolve_depths(sanity.parse_depths("all,head,4,1,4"), blocks) == [0, 1, 4, 18]
    assert sanity.resolve_depths(sanity.parse_depths("default"), blocks) == [0, 1, 2, 4, 8, 16, 18]
    with pytest.raises(ValueError, match="expected 'none', 'default' or comma-separated depths"):
        sanity.parse_depths("1,two")
    with pytest.raises(ValueError, match="--randomise 19: the model has 18 blocks below the head"):
        sanity.resolve_depths([19], blocks)
    with pytest.raises(ValueError, match="no parameters above the CAM layer"):
        sanity.resolve_depths(["head"], blocks[1:])
    assert [sanity.step_label(d, blocks) for d in (0, 1, 4, 18)] == [
        "head", "head + 1 block", "head + 4 blocks", "all (head + 18 blocks)"]


def test_other_classes_are_other_seeded_and_cover_the_rest() -> None:
    classes = torch.tensor([3] * 400)
    other = sanity.other_classes(classes, 5, range(400), seed=1)
    assert (other != 3).all() and set(other.tolist()) == {0, 1, 2, 4}
    assert torch.equal(other, sanity.other_classes(classes, 5, range(400), seed=1))
    assert not torch.equal(other, sanity.other_classes(classes, 5, range(400), seed=2))
    with pytest.raises(ValueError, match="at least two outputs"):
        sanity.other_classes(torch.tensor([0]), 1, [0], 0)


# ----------------------------------------------------------------------------------------------------------
# Metrics against scipy and scikit-image
# ----------------------------------------------------------------------------------------------------------

def test_spearman_equals_scipy_with_ties_and_nan_for_a_constant_map() -> None:
    rng = np.random.default_rng(0)
    a = np.round(rng.random((6, 9, 11)), 1)          # many ties
    b = np.round(a + rng.random((6, 9, 11)), 1)
    b[2] = 0.0                                        # constant: undefined
    got = sanity.spearman_rows(a, b)
    for i in range(6):
        expected = stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic if i != 2 else np.nan
        np.testing.assert_allclose(got[i], expected, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(sanity.spearman_rows(a, b, sanity.rank_rows(a)), got)


@pytest.mark.parametrize("side, window", [(28, 7), (14, 7), (7, 7), (6, 5), (4, 3)])
def test_ssim_equals_scikit_image(side: int, window: int) -> None:
    rng = np.random.default_rng(side)
    a = rng.standard_normal((4, side, side + 3))
    b = a + rng.standard_normal((4, side, side + 3))
    b[1] = np.abs(b[1])
    assert sanity.ssim_window(side, side + 3) == window
    got = sanity.ssim_rows(a, b)
    for i in range(4):
        x = (a[i] - a[i].min()) / (a[i].max() - a[i].min())
        y = (b[i] - b[i].min()) / (b[i].max() - b[i].min())
        np.testing.assert_allclose(got[i], structural_similarity(x, y, data_range=1.0, win_size=window), rtol=1e-9)


def test_ssim_of_real_maps_and_undefined_cases(mark_model: tuple[MarkCNN, torch.Tensor]) -> None:
    model, images = mark_model
    marked = images[1::2][:4]
    result = FGCAM(model)(marked)
    other = FGCAM(model)(marked, classes=1 - result.classes)
    a, b = result.maps.abs().double().numpy(), other.maps.abs().double().numpy()
    assert (np.ptp(a.reshape(4, -1), axis=1) > 0).all() and (np.ptp(b.reshape(4, -1), axis=1) > 0).all()
    got = sanity.ssim_rows(a, b)
    assert np.isfinite(got).all()
    for i in range(4):
        x, y = ((m - m.min()) / (m.max() - m.min()) for m in (a[i], b[i]))
        np.testing.assert_allclose(got[i], structural_similarity(x, y, data_range=1.0), rtol=1e-9)
    assert np.isnan(sanity.ssim_rows(np.zeros((1, 8, 8)), a[:1, :8, :8])).all()   # a constant map
    assert np.isnan(sanity.ssim_rows(a[:1, :2, :2], a[:1, :2, :2])).all()          # too small for a window
    assert sanity.ssim_rows(a, a) == pytest.approx(np.ones(4))


def test_edge_map_is_the_sobel_magnitude() -> None:
    images = torch.rand(3, 3, 16, 20, dtype=torch.float64)
    got = edge_maps(images, (16, 20)).double()
    for i in range(3):
        gray = images[i].mean(0).numpy()
        expected = np.hypot(ndimage.sobel(gray, axis=0, mode="nearest"), ndimage.sobel(gray, axis=1, mode="nearest"))
        np.testing.assert_allclose(got[i].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert edge_maps(images, (8, 10)).shape == (3, 8, 10)   # a layer's resolution


# ----------------------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------------------

def test_an_edge_map_scores_1_and_the_cam_near_0_when_the_model_is_randomised_from_the_top(
        mark_model: tuple[MarkCNN, torch.Tensor]) -> None:
    """Adebayo et al.'s point on a small trained model: a map that ignores the model (edges, noise) does not
    change at all; the CAM, which reads the top layers' weights, decorrelates as they are re-initialised."""
    model, images = mark_model
    checks = sanity.sanity_checks(model, images, methods=("cam", "edge", "random"), batch_size=8)
    assert [s["label"] for s in checks.meta["steps"]] == ["head", "head + 1 block", "head + 2 blocks",
                                                         "all (head + 3 blocks)"]
    per_image = checks.per_image
    reference = per_image[per_image["method"].isin(["edge", "random"])]
    assert len(reference) == 2 * 24 * 5 * 3   # methods x images x (4 steps + class) x variants
    np.testing.assert_allclose(reference[["spearman", "ssim"]].to_numpy(), 1.0, atol=1e-12)
    table = checks.table.set_index(["check", "step", "method", "variant"])
    cam = [table.loc[("randomise", step, "cam", "abs"), "spearman_mean"] for step in (1, 2, 3, 4)]
    assert abs(cam[-1]) < 0.25, cam                     # everything random: near 0
    assert cam[-1] < cam[0] - 0.5, cam                  # and far below where it started
    assert table.loc[("randomise", 4, "cam", "abs"), "ssim_mean"] < 0.25


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_numbers_equal_a_direct_computation_on_the_same_maps(mark_model: tuple[MarkCNN, torch.Tensor]) -> None:
    """Every per-image number is scipy's Spearman and scikit-image's SSIM of maps made here by hand: the
    original model's and a randomised copy's, in the same batches (so that no float tie can differ)."""
    model, all_images = mark_model
    images = all_images[1::2][:5]   # marked: every original map has relevance
    batches = [slice(0, 2), slice(2, 4), slice(4, 5)]
    checks = sanity.sanity_checks(model, images, layers=("input", "features.2"), methods=("fgcam", "cam", "lrp"),
                                  depths=[0, 3], batch_size=2, pooled_size=4, seed=3)
    per_image = checks.per_image.set_index(["check", "step", "layer", "method", "variant", "image"]).sort_index()
    from analysis.fgcam import LRP

    def maps_of(net: nn.Module, layer: str, method: str, classes: torch.Tensor) -> torch.Tensor:
        explain = (FGCAM(net) if method in ("fgcam", "cam") else LRP(net))
        target = FGCAM(net).cam_layer if method == "cam" else layer
        return torch.cat([explain(images[s], target_layer=target, classes=classes[s]).maps for s in batches])

    classes = torch.cat([model(images[s]).argmax(1) for s in batches])
    other = torch.tensor(per_image.xs(("class", 0, "input", "fgcam", "abs"))["other_class"].to_numpy())
    assert (other != classes).all()
    randomised = {step: sanity.randomised_copy(model, depth, seed=3)[0] for step, depth in ((1, 0), (2, 3))}
    cases = [("class", 0, model, other)] + [("randomise", step, net, classes) for step, net in randomised.items()]
    checked = defined = 0
    for layer in ("input", "features.2"):
        for method in ("fgcam", "cam", "lrp"):
            original = maps_of(model, layer, method, classes)
            for check, step, net, explained in cases:
                changed = maps_of(net, layer, method, explained)
                for i in range(5):
                    a, b = original[i].double().numpy(), changed[i].double().numpy()
                    pooled = [F.adaptive_avg_pool2d(torch.from_numpy(m).clamp(min=0)[None], 4)[0].numpy()
                              for m in (a, b)]
                    for variant, (x, y) in (("abs", (np.abs(a), np.abs(b))), ("signed", (a, b)),
                                            ("positive_pooled", pooled)):
                        row = per_image.loc[(check, step, layer, method, variant, i)]
                        spearman = stats.spearmanr(x.ravel(), y.ravel()).statistic
                        assert row["spearman"] == pytest.approx(spearman, abs=1e-6, nan_ok=True)
                        defined += np.isfinite(spearman)
                        if variant != "positive_pooled":
                            ssim = structural_similarity((x - x.min()) / np.ptp(x), (y - y.min()) / np.ptp(y),
                                                         data_range=1.0, win_size=sanity.ssim_window(*x.shape))
                            assert row["ssim"] == pytest.approx(ssim, abs=1e-6, nan_ok=True)
                        checked += 1
    assert checked == 2 * 3 * 3 * 5 * 3 and defined > 0.8 * checked
    # The summary is the per-image numbers' mean and Student-t interval.
    table = checks.table.set_index(["check", "step", "layer", "method", "variant"])
    values = checks.per_image.query("check == 'randomise' and step == 2 and layer == 'input' and method == 'lrp' "
                                    "and variant == 'abs'")["spearman"].to_numpy()
    row = table.loc[("randomise", 2, "input", "lrp", "abs")]
    assert row["spearman_mean"] == pytest.approx(values.mean())
    assert row["spearman_ci95"] == pytest.approx(stats.t.ppf(0.975, 4) * values.std(ddof=1) / math.sqrt(5))
    assert row["step_label"] == "all (head + 3 blocks)" and row["depth"] == 3
    assert checks.meta["steps"][1]["modules"] == ["fc", "features.5", "features.3", "features.0"]
    assert checks.meta["reinitialised_with"] == {m: "reset_parameters" for m in ("fc", "features.5", "features.3",
                                                                                 "features.0")}


def test_sentence_and_curves_from_a_table_by_hand() -> None:
    rows = []
    for check, step, label, fgcam, cam in (("randomise", 1, "head", 0.88, 0.04),
                                           ("randomise", 2, "all (head + 2 blocks)", 0.62, -0.08),
                                           ("class", 0, "another class", 0.60, 0.32)):
        for method, value in (("fgcam", fgcam), ("cam", cam)):
            rows.append({"check": check, "step": step, "depth": -1 if check == "class" else step - 1,
                         "step_label": label, "layer": "input", "method": method, "label": method, "variant": "abs",
                         "spearman_mean": value, "spearman_ci95": 0.1})
    table = pd.DataFrame(rows)
    assert sanity.sanity_sentence(table, {"base": "gradcam"}) == (
        "With the model's top layers replaced by random ones, FG-CAM's map at the pixels still has a rank correlation "
        "of 0.62 to 0.88 with the original (the plain Grad-CAM: -0.08 to 0.04; 1 would mean it ignores the model), "
        "so much of its detail shows the image rather than what the model learnt; explaining another class gives "
        "0.60 (the plain Grad-CAM: 0.32).")
    curves = sanity.sanity_curves(table)
    fg = curves[curves["method"] == "fgcam"]
    assert fg["step"].tolist() == [0, 1, 2] and fg["mean"].tolist() == [1.0, 0.88, 0.62]
    assert fg["step_label"].tolist() == ["original", "head", "all (head + 2 blocks)"]
    assert fg["low"].tolist() == pytest.approx([1.0, 0.78, 0.52])


# ----------------------------------------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------------------------------------

def small_comparison(with_sanity: bool) -> MethodComparison:
    table = pd.DataFrame({"layer": ["input"], "method": ["fgcam"], "label": ["FG-CAM"], "n": [2],
                          "deletion_auc_mean": [0.2], "insertion_auc_mean": [0.8]})
    curves = pd.DataFrame({"layer": ["input"] * 2, "method": ["fgcam"] * 2, "label": ["FG-CAM"] * 2,
                           "curve": ["deletion"] * 2, "fraction": [0.0, 1.0], "probability": [0.9, 0.1]})
    per_image = pd.DataFrame({"image": [0, 1], "layer": ["input"] * 2, "method": ["fgcam"] * 2,
                              "deletion_auc": [0.1, 0.3], "insertion_auc": [0.7, 0.9]})
    comparison = MethodComparison(table, curves, per_image, meta={"layers": ["input"], "n_images": 2})
    if with_sanity:
        per = pd.DataFrame({"image": [0, 1, 0, 1], "class": [1, 1, 1, 1], "other_class": [-1, -1, 0, 0],
                            "check": ["randomise"] * 2 + ["class"] * 2, "step": [1, 1, 0, 0], "layer": "input",
                            "method": "fgcam", "variant": "abs", "spearman": [0.5, 0.7, 0.2, 0.4],
                            "ssim": [0.4, 0.6, 0.1, 0.3]})
        steps = [{"step": 1, "depth": 0, "label": "head", "blocks": ["head"], "modules": ["fc"]}]
        comparison.sanity = sanity.summarise_sanity(per, steps)
        comparison.sanity_per_image = per
        comparison.meta["sanity"] = {"steps": steps, "sentence": "A sentence."}
    return comparison


def test_sanity_results_round_trip_and_feed_the_page(tmp_path) -> None:
    write_comparison(small_comparison(True), tmp_path)
    read = read_comparison(tmp_path)
    assert read.meta["format_version"] == 2 and read.meta["sanity"]["sentence"] == "A sentence."
    pd.testing.assert_frame_equal(read.sanity, small_comparison(True).sanity)
    curves, classes, meta = sanity_page_data(tmp_path)
    assert curves["step"].tolist() == [0, 1] and curves["mean"].tolist() == pytest.approx([1.0, 0.6])
    assert classes["spearman_mean"].tolist() == pytest.approx([0.3]) and meta["steps"][0]["label"] == "head"
    # Made again without the checks: the old sanity files go, and the page says there are none.
    write_comparison(small_comparison(False), tmp_path)
    assert not (tmp_path / "sanity.parquet").exists() and read_comparison(tmp_path).sanity is None
    assert sanity_page_data(tmp_path) is None


def test_a_version_1_comparison_still_reads(tmp_path) -> None:
    """What compare-methods wrote before the sanity checks: comparison.json version 1 and three tables."""
    old = small_comparison(False)
    for name, frame in (("table.parquet", old.table), ("curves.parquet", old.curves),
                        ("per_image.parquet", old.per_image)):
        frame.to_parquet(tmp_path / name, index=False)
    (tmp_path / "comparison.json").write_text('{"format_version": 1, "layers": ["input"], "n_images": 2}')
    read = read_comparison(tmp_path)
    assert read.sanity is None and read.sanity_per_image is None and sanity_page_data(tmp_path) is None
    table, curves, meta = trust_page_data(tmp_path)
    pd.testing.assert_frame_equal(table, old.table)
    (tmp_path / "comparison.json").write_text('{"format_version": 3}')
    with pytest.raises(ComparisonError, match="format version 3, expected one of 1, 2"):
        read_comparison(tmp_path)
