"""`python -m analysis check-model`: the report on real models (torchvision's, the demo's, a pretrained
EfficientNet-Lite0 from a `file.py:callable` spec), a model with an op without a rule, a target layer that
relevance partly bypasses (the per-layer table), and options that cannot be used (one line, exit 2)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import demo_model, fashion_mnist
from tests.helpers import run_main

TESTS = Path(__file__).resolve().parent


def check(capsys, *argv: str) -> tuple[int, dict]:
    code, out, err = run_main(capsys, "check-model", *argv, "--json")
    assert code in (0, 1), err
    return code, json.loads(out)


def ops_of(report: dict) -> dict[tuple[str, str | None], int]:
    return {(o["op"], o["kind"]): o["count"] for o in report["ops"]}


@pytest.mark.parametrize("name, cam_layer, finer", [
    ("resnet50", "layer4.2", ["layer3", "layer2", "layer1", "relu"]),
    ("efficientnet_b0", "features.8.2", ["features.5", "features.3", "features.2", "features.1"]),
])
def test_torchvision_models(capsys, name, cam_layer, finer):
    code, report = check(capsys, "--model", f"torchvision:{name}", "--image-size", "64", "--count", "2",
                         "--batch-size", "2", "--estimate-for", "1000")
    assert code == 0 and report["explainable"] and report["error"] is None
    assert report["cam_layer"] == cam_layer and report["cam_layer_is_default"]
    assert [c["layer"] for c in report["candidates"]] == finer
    ops = ops_of(report)
    assert ops[("Conv2d", "image conv")] == 1 and ops[("BatchNorm2d", "pass")] >= 49
    assert ("Sigmoid", "pass") not in ops  # efficientnet's squeeze-excitation gates receive no relevance
    assert report["unsupported"] == []
    assert "z+ (alpha1-beta0, paper)" in report["rules"]["conv"]
    assert len(report["conservation"]) == 2
    assert all(abs(k - 1) < 1e-3 for k in report["conservation"]) and report["conserved"]
    assert report["changes"] == []
    assert report["seconds_per_image"] > 0 and report["forward_seconds_per_image"] > 0
    assert report["peak_memory_bytes"] > 10 * 2 ** 20


def test_the_text_report_is_one_screen(capsys):
    code, out, _ = run_main(capsys, "check-model", "--model", "torchvision:resnet18", "--image-size", "64",
                            "--count", "2", "--batch-size", "2", "--estimate-for", "100000")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) <= 30
    assert lines[1] == "CAM layer: layer4.1 [512 x 2 x 2] (the default: the last spatial layer before the head)"
    assert "ops without a rule: none" in lines
    assert any(line.startswith("conservation on 2 random noise images") and line.endswith("100.0%, 100.0%")
               for line in lines)
    assert "layers that lose or gain more than 1% of the relevance: none" in lines
    assert any(line.startswith("time: ") and "100,000 images: about" in line for line in lines)
    assert lines[-1] == "verdict: explainable; relevance is conserved"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    import skimage.data
    folder = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "coffee", "astronaut"):
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")  # skipped and named, not a traceback
    return folder


def test_pretrained_efficientnet_lite0_from_a_file_spec(capsys, photos):
    code, report = check(capsys, "--model", f"{TESTS / 'pretrained_models.py'}:efficientnet_lite0",
                         "--images", str(photos), "--count", "4", "--batch-size", "2")
    assert code == 0
    assert report["cam_layer"] == "_swish" and report["input_shape"] == [3, 224, 224]
    assert any("called 2 times" in note for note in report["notes"])
    assert "3 images from" in report["images"] and "broken.jpg" in report["images"]
    assert report["estimate_for"] == 4  # the files found under --images
    ops = ops_of(report)
    assert ops[("ZeroPad2d", "move")] == 17 and ops[("conv2d", "conv")] == 48
    # before the conserving fallbacks: 25-38% and a dozen depthwise layers listed here
    assert all(abs(k - 1) < 0.01 for k in report["conservation"]) and report["changes"] == []


def test_demo_model_on_fashion_mnist_images(capsys, tmp_path, monkeypatch):
    if not fashion_mnist.has_files(fashion_mnist.DEBIAN_DIR):
        pytest.skip("Fashion-MNIST is not installed")
    weights = tmp_path / "model.pt"
    torch.manual_seed(0)
    demo_model.save_weights(demo_model.DemoCNN(), weights, {"note": "untrained, for check-model"})
    monkeypatch.setenv(demo_model.WEIGHTS_ENV, str(weights))
    split = fashion_mnist.read_split(fashion_mnist.DEBIAN_DIR, "test")
    for i in range(3):
        Image.fromarray(split.images[i]).save(tmp_path / f"item_{i}.png")
    code, report = check(capsys, "--model", "data/demo_model.py:load_demo_model", "--images", str(tmp_path),
                         "--batch-size", "3")
    assert code == 0
    assert report["cam_layer"] == "features.10" and report["input_shape"] == [1, 28, 28]
    assert ops_of(report)[("MaxPool2d", "pool")] == 2
    assert all(abs(k - 1) < 1e-3 for k in report["conservation"])


def test_an_op_without_a_rule_is_named_with_its_module(capsys):
    code, out, _ = run_main(capsys, "check-model", "--model", f"{TESTS / 'tiny_models.py'}:cnn_with_unsupported_op",
                            "--image-size", "20")
    assert code == 1
    assert "ops without a rule: op 'cumsum' (graph node 'cumsum', in features.2)" in out
    assert out.splitlines()[-1].startswith("verdict: FG-CAM cannot explain this model: ")
    code, report = check(capsys, "--model", f"{TESTS / 'tiny_models.py'}:cnn_with_unsupported_op",
                         "--image-size", "20")
    assert code == 1 and not report["explainable"] and report["conservation"] == []
    assert report["unsupported"] == ["op 'cumsum' (graph node 'cumsum', in features.2)"]
    assert (("cumsum", None), 1) in ops_of(report).items()


def test_a_target_layer_that_relevance_partly_bypasses_lists_the_layers_that_lose(capsys):
    # layer3.0.conv1 sits inside a residual block: what goes through the downsample branch never reaches it
    code, report = check(capsys, "--model", "torchvision:resnet18", "--image-size", "64", "--count", "2",
                         "--batch-size", "2", "--target-layer", "layer3.0.conv1")
    assert code == 0 and report["explainable"] and not report["conserved"]
    assert all(k < 0.99 for k in report["conservation"])
    # the residual sum of layer3.0 sends part of it down the other branch, off the way to the target
    assert [(c["layer"], c["kind"]) for c in report["changes"]] == [("op 'add' (graph node 'add_4', in layer3.0)",
                                                                     "add")]
    change = report["changes"][0]
    assert change["change"] < -0.01 and change["passed"] < change["received"]
    # every other op conserves: what reaches the target is what that sum passed on
    assert min(report["conservation"]) == pytest.approx(1 + change["change"], abs=1e-4)


def test_a_model_that_does_not_trace(capsys, tmp_path):
    spec = tmp_path / "branchy.py"
    spec.write_text("import torch\nfrom torch import nn\n\n"
                    "class Branchy(nn.Module):\n"
                    "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(3, 4, 3)\n"
                    "    def forward(self, x):\n        y = self.conv(x)\n"
                    "        return y.mean((2, 3)) if y.sum() > 0 else -y.mean((2, 3))\n\n"
                    "def build():\n    return Branchy()\n")
    code, out, _ = run_main(capsys, "check-model", "--model", f"{spec}:build", "--image-size", "16")
    assert code == 1
    assert "verdict: FG-CAM cannot explain this model: could not trace Branchy with torch.fx" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "torchvision:resnet18", "--cam-layer", "nope"], "error: --cam-layer: unknown layer 'nope'"),
    (["--model", "torchvision:resnet18", "--target-layer", "fc"], "error: --target-layer 'fc' is not below"),
    (["--model", "torchvision:resnet18", "--images", "/nonexistent"], "error: --images /nonexistent: no such "),
    (["--model", "torchvision:resnet_nope"], "error: --model torchvision:resnet_nope: torchvision has no model"),
    (["--model", "torchvision:resnet18", "--count", "0"], "argument --count: expected a positive integer"),
])
def test_options_that_cannot_be_used_fail_in_one_line(capsys, argv, message):
    code, out, err = run_main(capsys, "check-model", "--image-size", "32", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err


def test_an_images_folder_without_readable_images(capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    code, _, err = run_main(capsys, "check-model", "--model", "torchvision:resnet18", "--images", str(tmp_path))
    assert code == 2 and "none of the images could be read (a.png (ValueError))" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_main(capsys, "check-model", "--model", "torchvision:resnet18", "--images", str(empty))
    assert code == 2 and "no images with extensions" in err
