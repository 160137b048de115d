"""Every torchvision classification model (issue 24, item 4): `check-model`'s library function either explains
it with relevance conserved within 1% or refuses it in one line, never a traceback. Random weights, one random
noise image through the model's own preprocessing, at the smallest input the model takes (64 px, but where its
forward fixes the size), without the timing rounds (``check_model(timing=False)``): the verdict is what is checked.

Slow: about 80 models, most in a second or two; the largest ones (ViT-H, RegNetY-128GF) are dominated by building
their random weights. A model whose weights and the engine's copies of them (packed W, W+, W-: about 5 times the
weights) would not fit in this machine's free memory is skipped, saying how much it needs.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from analysis.commands.check_model import check_model, format_report, load_images
from analysis.pipeline.models import load_model

MODELS = torchvision.models.list_models(module=torchvision.models)
FIXED_SIZE = {"inception_v3": 75,  # its stem needs 75 px at least
              "maxvit_t": 224,     # its partitions are sized for 224 px at construction
              **{name: 224 for name in MODELS if name.startswith("vit_")}}  # the position embedding's size
SMALL_SIZE = 64
# the transformers: their CAM layer holds tokens or their attention has no rule; every CNN is explained
REFUSED = {name for name in MODELS if name.startswith(("vit_", "swin_", "maxvit_"))}
ENGINE_COPIES = 5  # the weights, and the engine's packed products of W, W+ and W- (measured: RegNetY-32GF's
                   # 0.58 GB of weights peak at 2.95 GB during the check)


def _memory_needed(name: str) -> int:
    # the parameter count from the pretrained weights' metadata (nothing is downloaded or built)
    parameters = torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
    return ENGINE_COPIES * 4 * parameters + 2 ** 30


def _memory_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2 ** 62  # not Linux: no guard


def test_the_sweep_covers_every_classification_constructor():
    assert len(MODELS) >= 80 and {"shufflenet_v2_x0_5", "vit_b_16", "swin_t", "resnet50"} <= set(MODELS)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_every_torchvision_classifier_is_explained_or_refused_in_one_line(name):
    needed, available = _memory_needed(name), _memory_available()
    if needed > available:
        pytest.skip(f"{name} needs about {needed / 2 ** 30:.1f} GB, {available / 2 ** 30:.1f} GB are free")
    torch.manual_seed(0)
    loaded = load_model(f"torchvision:{name}", image_size=FIXED_SIZE.get(name, SMALL_SIZE))
    images, source, _ = load_images(None, loaded, 1)
    check = check_model(loaded, images, source, f"torchvision:{name}", batch_size=1, timing=False)
    verdict = format_report(check).splitlines()[-1]
    if name in REFUSED:
        assert not check.explainable and "\n" not in check.error, check.error
        assert verdict.startswith("verdict: FG-CAM cannot explain this model: "), verdict
    else:
        assert check.explainable, check.error
        assert len(check.conservation) == 1 and abs(check.conservation[0] - 1) <= 0.01, check.conservation
        assert verdict == "verdict: explainable; relevance is conserved"
