"""Channels (issue 15): the map of a set of CAM components, one map per component, and each component's
relevance at the CAM layer.

Every rule is linear in the relevance given the forward values, so the maps of disjoint sets of channels add
up to the full map (on every family, in float64 to 1e-10); ``channel_maps`` (the M walks stacked along the
batch over one forward run) gives the maps of one-channel-at-a-time calls; ``channel_relevance`` is the
spatial sum of each component, checked against components computed here from the model's parts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.fgcam import FGCAM, LowRule, denoise
from tests.test_fgcam_engine import FAMILIES, build


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference over b's largest value (a channel that is 0 everywhere gives maps of 0: 0)."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def inputs(name: str, n: int = 2, dtype=torch.float64) -> torch.Tensor:
    size = 80 if name == "inception_v3" else 40
    return torch.randn(n, 1 if name == "functional" else 3, size, size, dtype=dtype)


def partition(n: int, k: int, parts: int, seed: int) -> list[torch.Tensor]:
    """Boolean masks [N, K] of `parts` disjoint random sets of channels that cover all K (another per image)."""
    group = torch.randint(0, parts, (n, k), generator=torch.Generator().manual_seed(seed))
    return [group == p for p in range(parts)]


@pytest.mark.parametrize("name", FAMILIES + ["functional"])
def test_channel_maps_add_up_to_the_full_map_on_every_family(name):
    torch.manual_seed(10)
    model = build(name).double()
    images = inputs(name)
    explainer = FGCAM(model)
    full = explainer(images)
    k = full.channel_relevance.shape[1]
    parts = [explainer(images, channels=mask).maps for mask in partition(len(images), k, 3, seed=1)]
    assert all(part.abs().max() > 0 for part in parts)
    assert relative(sum(parts), full.maps) < 1e-10
    # the same with indices [M] for every image: a set and its complement
    chosen = torch.randperm(k)[:k // 3]
    rest = torch.ones(k, dtype=torch.bool)
    rest[chosen] = False
    pair = explainer(images, channels=chosen).maps + explainer(images, channels=torch.nonzero(rest)[:, 0]).maps
    assert relative(pair, full.maps) < 1e-10


def test_every_single_channel_map_adds_up_to_the_full_map():
    torch.manual_seed(11)
    model = build("functional").double()  # 12 channels at the CAM layer: all of them, one map each
    images = inputs("functional", 3)
    explainer = FGCAM(model)
    full = explainer(images)
    k = full.channel_relevance.shape[1]
    every = explainer.channel_maps(images, torch.arange(k).expand(3, k))
    assert every.maps.shape == (3, k, 40, 40)
    assert relative(every.maps.sum(dim=1), full.maps) < 1e-10
    # each channel's map carries exactly that channel's relevance down (conservation, channel by channel)
    assert torch.allclose(every.maps.sum(dim=(2, 3)), full.channel_relevance, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet_b0", "googlenet", "inception_v3",
                                  "functional"])
def test_channel_maps_equal_one_channel_at_a_time(name):
    torch.manual_seed(12)
    model = build(name).double()
    images = inputs(name, 3)
    explainer = FGCAM(model)
    k = explainer(images[:1], target_layer=explainer.cam_layer).channel_relevance.shape[1]
    chosen = torch.stack([torch.randperm(k)[:4] for _ in range(3)])  # other channels per image
    chosen[:, 0] = explainer(images).channel_relevance.argmax(dim=1)  # one that surely carries relevance
    stacked = explainer.channel_maps(images, chosen)
    assert stacked.maps.shape == (3, 4, *images.shape[-2:]) and torch.equal(stacked.channels, chosen)
    for m in range(4):
        one = explainer(images, channels=F.one_hot(chosen[:, m], k).bool()).maps
        assert relative(stacked.maps[:, m], one) < 1e-10, m


def test_channel_maps_in_float32_and_at_an_intermediate_layer():
    torch.manual_seed(13)
    model = build("resnet18")
    images = inputs("resnet18", 2, torch.float32)
    explainer = FGCAM(model)
    stacked = explainer.channel_maps(images, 3, target_layer="layer2")
    assert stacked.maps.shape == (2, 3, 5, 5)
    for m in range(3):
        one = explainer(images, target_layer="layer2", channels=F.one_hot(stacked.channels[:, m], 512).bool()).maps
        assert relative(stacked.maps[:, m], one) < 1e-5


def test_top_channels_are_those_of_highest_relevance_in_order():
    torch.manual_seed(14)
    explainer = FGCAM(build("resnet18"))
    images = inputs("resnet18", 3, torch.float32)
    result = explainer.channel_maps(images, 5)
    assert torch.equal(result.channels, result.channel_relevance.topk(5, dim=1).indices)
    picked = result.channel_relevance.gather(1, result.channels)
    assert (picked[:, :-1] >= picked[:, 1:]).all()


class Sequential(nn.Module):
    """Conv-BN-ReLU features and a linear head, so that the CAM layer's activations and the head's gradient
    can be computed here from the parts."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("base", ["gradcam", "gradcam++", "xgradcam", "layercam", "scorecam"])
def test_channel_relevance_is_the_spatial_sum_of_each_component(base):
    torch.manual_seed(15)
    model = Sequential().eval().double()
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    result = FGCAM(model, base=base)(images)
    # the components at the CAM layer, summed over channels, are the CAM map: consistent with the result
    cam = FGCAM(model, base=base)(images, target_layer="features.4").maps
    assert torch.allclose(result.channel_relevance.sum(dim=1), cam.sum(dim=(1, 2)), rtol=1e-10)
    if base != "gradcam":
        return
    # Grad-CAM's components from the parts: w_k = mean of d logit_c / d A_k, I_k = w_k A_k
    with torch.no_grad():
        activations = model.features(images)
    leaf = activations.clone().requires_grad_(True)
    (gradients,) = torch.autograd.grad(model.head(leaf).gather(1, result.classes[:, None]).sum(), leaf)
    expected = (gradients.mean(dim=(2, 3)) * activations.sum(dim=(2, 3)))
    assert torch.allclose(result.channel_relevance, expected, rtol=1e-10, atol=1e-14)


def test_denoise_selects_rows_of_the_denoised_components():
    # 24 channels at the CAM layer, so that denoising keeps rank floor(0.1 * 24) = 2
    torch.manual_seed(16)
    model = nn.Sequential(nn.Conv2d(3, 24, 3), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 4)).eval().double()
    images = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    explainer = FGCAM(model, cam_layer="3", denoise=True)
    plain = FGCAM(model, cam_layer="3")
    full = explainer(images)
    # linearity holds after denoising too: the selection is made on the denoised matrix
    parts = [explainer(images, channels=mask).maps for mask in partition(2, 24, 4, seed=2)]
    assert relative(sum(parts), full.maps) < 1e-10
    # at the CAM layer, channel k's map is row k of the denoised components (not of the plain ones)
    components = plain(images, target_layer="3").maps  # the sum only; rebuild the components from the parts
    with torch.no_grad():
        activations = model[:4](images)
    leaf = activations.clone().requires_grad_(True)
    (gradients,) = torch.autograd.grad(model[4:](leaf).gather(1, full.classes[:, None]).sum(), leaf)
    rows = gradients.mean(dim=(2, 3), keepdim=True) * activations
    assert torch.allclose(rows.sum(dim=1), components, rtol=1e-10)
    chosen = torch.tensor([[3, 7], [0, 11]])
    at_cam = explainer.channel_maps(images, chosen, target_layer="3").maps
    expected = denoise(rows)[torch.arange(2)[:, None], chosen]
    assert torch.allclose(at_cam, expected, rtol=1e-10, atol=1e-14)
    # channel_relevance is taken before denoising (denoised rows are centred: their sums are 0)
    assert torch.allclose(full.channel_relevance, rows.sum(dim=(2, 3)), rtol=1e-10)
    assert denoise(rows).sum(dim=(2, 3)).abs().max() < 1e-10


@pytest.mark.parametrize("low_rule", [LowRule("gamma", "layer2", gamma=0.25), LowRule("epsilon", "layer1", epsilon=0.5)])
def test_linearity_holds_with_the_low_layer_rules(low_rule):
    torch.manual_seed(17)
    model = build("resnet18").double()
    images = inputs("resnet18")
    explainer = FGCAM(model, low_rule=low_rule)
    full = explainer(images)
    parts = [explainer(images, channels=mask).maps for mask in partition(2, 512, 3, seed=3)]
    assert relative(sum(parts), full.maps) < 1e-10
    stacked = explainer.channel_maps(images, 3)
    for m in range(3):
        one = explainer(images, channels=F.one_hot(stacked.channels[:, m], 512).bool()).maps
        assert relative(stacked.maps[:, m], one) < 1e-10


def test_bad_channels_fail_clearly():
    explainer = FGCAM(build("functional"))
    images = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"in \[0, 12\)"):
        explainer(images, channels=torch.tensor([3, 12]))
    with pytest.raises(ValueError, match=r"\[N, K\] = \[2, 12\]"):
        explainer(images, channels=torch.ones(3, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="long tensor"):
        explainer(images, channels=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="must be a tensor"):
        explainer(images, channels=[1, 2])
    with pytest.raises(ValueError, match="between 1 and the CAM layer's 12 channels"):
        explainer.channel_maps(images, 13)
    with pytest.raises(ValueError, match="between 1"):
        explainer.channel_maps(images, 0)
    with pytest.raises(ValueError, match=r"\[N, M\] = \[2, M >= 1\]"):
        explainer.channel_maps(images, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"in \[0, 12\)"):
        explainer.channel_maps(images, torch.tensor([[1], [-1]]))
    # an empty selection is no error: nothing is carried down
    assert explainer(images, channels=torch.tensor([], dtype=torch.long)).maps.abs().max() == 0
