"""Engine breadth (issue 24, item 4): a channel shuffle (view / transpose / reshape / chunk / cat of channels)
moves relevance with the channels, and a model the engine cannot explain (a ViT's tokens at the CAM layer) is
refused in one line by `check-model` and `explain`. The sweep over every torchvision classification model is
tests/test_torchvision_sweep.py (slow)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from analysis.fgcam import FGCAM
from tests.helpers import make_image_folder, run_main

TESTS = Path(__file__).resolve().parent
TINY_VIT = f"{TESTS / 'tiny_models.py'}:tiny_vit"
SHUFFLE = [0, 2, 1, 3]  # ShuffleNet's shuffle of 4 channels in 2 groups: output channel k is input SHUFFLE[k]


class Shuffled(nn.Module):
    """conv -> ReLU -> ShuffleNetV2's channel shuffle (view, transpose, contiguous, view) -> chunk: one half
    passes on, the other through a 1x1 conv -> cat -> the CAM layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.branch = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())
        self.cam = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.mix(self.relu(self.stem(x))).chunk(2, dim=1)
        return self.head(self.cam(torch.cat((left, self.branch(right)), dim=1)))


class Unshuffled(Shuffled):
    """The same function with the shuffle folded into the stem's output channels: no view or transpose."""

    def __init__(self, shuffled: Shuffled) -> None:
        super().__init__()
        self.load_state_dict(shuffled.state_dict())
        with torch.no_grad():
            self.stem.weight.copy_(shuffled.stem.weight[SHUFFLE])
            self.stem.bias.copy_(shuffled.stem.bias[SHUFFLE])

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_channel_shuffle_moves_relevance_with_the_channels():
    torch.manual_seed(0)
    shuffled = Shuffled().eval()
    unshuffled = Unshuffled(shuffled).eval()
    images = torch.randn(3, 3, 12, 12)
    assert torch.allclose(shuffled(images), unshuffled(images), atol=1e-5)  # one function, two spellings
    explained = FGCAM(shuffled, cam_layer="cam")(images)  # crashed in the walk before (issue 24)
    reference = FGCAM(unshuffled, cam_layer="cam")(images)
    # the stem's relevance per channel decides the input map (z^B weighs each channel's kernel): a shuffle that
    # did not move relevance with the channels would give another map
    assert torch.allclose(explained.maps, reference.maps, rtol=1e-4, atol=1e-6 * float(reference.maps.abs().max()))
    components = FGCAM(shuffled, cam_layer="cam")(images, target_layer="cam").maps
    sums, expected = explained.maps.double().sum(dim=(1, 2)), components.double().sum(dim=(1, 2))
    assert torch.allclose(sums, expected, rtol=1e-4)  # conserved


def test_shufflenet_v2_conserves(capsys):
    code, out, err = run_main(capsys, "check-model", "--model", "torchvision:shufflenet_v2_x0_5", "--image-size",
                              "64", "--count", "1", "--batch-size", "1")
    assert code == 0, out + err
    assert "conservation on 1 random noise images (sum at input / components' sum): 100.0%" in out
    assert out.splitlines()[-1] == "verdict: explainable; relevance is conserved"


@pytest.mark.parametrize("spec, size", [(TINY_VIT, "20"), ("torchvision:vit_b_32", "224")])
def test_check_model_refuses_a_vision_transformer_in_one_line(capsys, spec, size):
    code, out, err = run_main(capsys, "check-model", "--model", spec, "--image-size", size, "--count", "1")
    assert code == 1 and "Traceback" not in out + err
    verdict = out.splitlines()[-1]
    assert verdict.startswith("verdict: FG-CAM cannot explain this model: the CAM layer 'encoder.ln' outputs [1, ")
    assert "not a spatial feature map [N, C, H, W]" in verdict


def test_explain_refuses_a_vision_transformer_in_one_line(capsys, tmp_path):
    make_image_folder(tmp_path / "images", per_class=2)
    code, out, err = run_main(capsys, "explain", "--data", str(tmp_path / "images"), "--model", TINY_VIT,
                              "--image-size", "20", "--out", str(tmp_path / "cache"), "--workers", "0", "--quiet")
    assert code == 2 and "Traceback" not in out + err
    assert err.count("\n") == 1 and err.startswith("error: ") and "not a spatial feature map" in err, err
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_the_engine_refuses_tokens_at_the_cam_layer():
    from analysis.fgcam import UnsupportedOperation

    model = torchvision.models.VisionTransformer(image_size=20, patch_size=5, num_layers=1, num_heads=2,
                                                 hidden_dim=8, mlp_dim=16, num_classes=3).eval()
    with pytest.raises(UnsupportedOperation, match=r"the CAM layer 'encoder.ln' outputs \[2, 17, 8\]"):
        FGCAM(model)(torch.randn(2, 3, 20, 20))
