"""The FG-CAM engine: the reference's numbers on VGG, conservation on every CNN family, batching, bases,
and leaving the model as it was found."""
import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from analysis.fgcam import FGCAM, UnsupportedOperation
from tests.reference_fgcam import reference_fgcam


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="module")
def vgg16_bn():
    torch.manual_seed(0)
    model = torchvision.models.vgg16_bn(num_classes=10).eval()
    with torch.no_grad():  # random BN statistics, so that batch norm is not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(-1.0, 1.5)  # some negative scales: BN must not be folded
    return model


def small_vgg(num_classes: int = 5) -> nn.Module:
    """torchvision's VGG class with few channels, so that Score-CAM's masked passes stay cheap."""
    features = torchvision.models.vgg.make_layers([8, "M", 16, "M", 24, 24, "M"], batch_norm=True)
    model = torchvision.models.vgg.VGG(features, num_classes=num_classes, init_weights=True)
    model.classifier = nn.Sequential(nn.Linear(24 * 49, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, num_classes))
    return model.eval()


@pytest.mark.parametrize("target_index", [-1, 10, 23])
def test_matches_reference_on_vgg16_bn_gradcam(vgg16_bn, target_index):
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    explainer = FGCAM(vgg16_bn, base="gradcam")
    assert explainer.cam_layer == "features.43"
    target = "input" if target_index == -1 else f"features.{target_index}"
    result = explainer(images, target_layer=target)
    for i in range(len(images)):
        expected, expected_class = reference_fgcam(vgg16_bn, images[i:i + 1], target_index, "gradcam")
        assert int(result.classes[i]) == expected_class
        assert result.maps[i].shape == expected.shape
        assert relative_error(result.maps[i], expected) < 1e-4


@pytest.mark.parametrize("base", ["gradcam", "scorecam"])
@pytest.mark.parametrize("denoise", [False, True])
def test_matches_reference_small_vgg(base, denoise):
    # 64 px: an 8 x 8 CAM layer with 24 channels, so denoising keeps rank floor(0.1 * 24) = 2
    torch.manual_seed(2)
    model = small_vgg()
    images = torch.randn(2, 3, 64, 64)
    classes = torch.tensor([3, 1])
    result = FGCAM(model, base=base, denoise=denoise)(images, classes=classes)
    for i in range(2):
        expected, _ = reference_fgcam(model, images[i:i + 1], -1, base, denoise, target_class=int(classes[i]))
        assert expected.abs().max() > 0
        assert relative_error(result.maps[i], expected) < 1e-4


def test_scorecam_constant_channel_gives_zero_mask_not_nan():
    from analysis.fgcam.bases import score_masks
    activations = torch.zeros(1, 3, 2, 2)
    activations[0, 1] = 4.0                      # constant, non-zero
    activations[0, 2] = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    masks = score_masks(activations, (4, 4))
    assert not masks.isnan().any()
    assert masks[0, 0].abs().sum() == 0 and masks[0, 1].abs().sum() == 0
    assert masks[0, 2].min() == 0 and masks[0, 2].max() == 1


class FunctionalNet(nn.Module):
    """A CNN that is not from torchvision: grayscale input, functional calls, a residual sum, a concatenation,
    a squeeze-excitation gate, depthwise and dilated convolutions, view."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.right = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.squeeze = nn.Conv2d(16, 4, 1)
        self.excite = nn.Conv2d(4, 16, 1)
        self.down = nn.Conv2d(16, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.left(x)), F.silu(self.right(x))], dim=1)
        y = y + torch.cat([x, x], dim=1)
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(y, 1)))))
        y = F.max_pool2d(y * gate, 2)
        y = F.relu(self.down(y))
        return self.fc(y.mean(dim=(2, 3)).view(y.size(0), -1))


FAMILIES = ["vgg11_bn", "resnet18", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "mobilenet_v2",
            "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "googlenet", "inception_v3"]


def build(name: str) -> nn.Module:
    if name == "functional":
        return FunctionalNet().eval()
    extra = dict(aux_logits=False, init_weights=True) if name in ("googlenet", "inception_v3") else {}
    return getattr(torchvision.models, name)(num_classes=7, **extra).eval()


@pytest.mark.parametrize("name", FAMILIES + ["functional"])
def test_conservation_every_family(name):
    torch.manual_seed(3)
    model = build(name).double()
    size = 80 if name == "inception_v3" else 40
    channels = 1 if name == "functional" else 3
    images = torch.randn(2, channels, size, size, dtype=torch.float64)
    explainer = FGCAM(model)
    pixels = explainer(images).maps
    components = explainer(images, target_layer=explainer.cam_layer).maps
    assert pixels.shape == (2, size, size)
    total, expected = pixels.sum(dim=(1, 2)), components.sum(dim=(1, 2))
    assert ((total - expected).abs() <= 1e-4 * expected.abs()).all(), (total, expected)


@pytest.mark.parametrize("name", ["resnet18", "functional"])
def test_conservation_float32(name):
    torch.manual_seed(4)
    model = build(name)
    images = torch.randn(2, 1 if name == "functional" else 3, 40, 40)
    explainer = FGCAM(model)
    total = explainer(images).maps.double().sum(dim=(1, 2))
    expected = explainer(images, target_layer=explainer.cam_layer).maps.double().sum(dim=(1, 2))
    assert ((total - expected).abs() <= 1e-4 * expected.abs()).all()


def test_default_cam_layers():
    expected = {"resnet18": "layer4.1", "densenet121": "features.norm5", "googlenet": "inception5b",
                "inception_v3": "Mixed_7c", "mobilenet_v2": "features.18.2", "efficientnet_b0": "features.8.2"}
    for name, layer in expected.items():
        assert FGCAM(build(name)).cam_layer == layer


@pytest.mark.parametrize("name", ["resnet18", "functional"])
@pytest.mark.parametrize("base", ["gradcam", "layercam"])
def test_batch_gives_the_same_maps_as_one_by_one(name, base):
    torch.manual_seed(5)
    model = build(name)
    images = torch.randn(4, 1 if name == "functional" else 3, 40, 40)
    explainer = FGCAM(model, base=base)
    batch = explainer(images).maps
    single = torch.cat([explainer(images[i:i + 1]).maps for i in range(4)])
    assert relative_error(batch, single) < 1e-5


def test_intermediate_target_layer_shape_and_target_equal_to_cam():
    model = build("resnet18")
    images = torch.randn(2, 3, 64, 64)
    explainer = FGCAM(model)
    assert explainer(images, target_layer="layer2").maps.shape == (2, 8, 8)
    assert explainer(images, target_layer="layer4.1").maps.shape == (2, 2, 2)


@pytest.mark.parametrize("base, cam_class", [("gradcam", "GradCAM"), ("gradcam++", "GradCAMPlusPlus"),
                                             ("xgradcam", "XGradCAM"), ("layercam", "LayerCAM")])
def test_components_match_pytorch_grad_cam(base, cam_class):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(6)
    model = build("resnet18")
    images = torch.randn(3, 3, 64, 64)
    ours = FGCAM(model, base=base)(images, target_layer="layer4.1")
    with getattr(pytorch_grad_cam, cam_class)(model=model, target_layers=[model.layer4[-1]]) as cam:
        targets = [ClassifierOutputTarget(int(c)) for c in ours.classes]
        cam(images, targets=targets)  # runs the forward and backward, keeps activations and gradients
        activations = cam.activations_and_grads.activations[0].cpu().numpy()
        gradients = cam.activations_and_grads.gradients[0].cpu().numpy()
        theirs = cam.get_cam_image(images, model.layer4[-1], targets, activations, gradients, False)
    model.zero_grad(set_to_none=True)
    if base == "gradcam++":
        # pytorch-grad-cam adds 1e-6 to alpha's denominator, which is not small against g^2 here: use the
        # paper's formula on their (independently hooked) activations and gradients instead
        g, a = gradients.astype("float64"), activations.astype("float64")
        denominator = 2 * g ** 2 + a.sum(axis=(2, 3), keepdims=True) * g ** 3
        alpha = np.where(denominator != 0, g ** 2 / np.where(denominator != 0, denominator, 1), 0)
        theirs = ((alpha * np.maximum(g, 0)).sum(axis=(2, 3), keepdims=True) * a).sum(axis=1)
    assert relative_error(ours.maps, torch.as_tensor(theirs)) < 1e-3


def _model_state(model: nn.Module):
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    modes = [m.training for m in model.modules()]
    return hooks, len(grads), modes


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if torch.is_tensor(obj))


def test_leaves_the_model_as_found_and_does_not_grow():
    model = build("resnet18")
    model.layer3.train()  # a mixed mode that must be kept
    before = _model_state(model)
    explainer = FGCAM(model)
    images = torch.randn(2, 3, 32, 32)
    explainer(images)
    baseline = _live_tensors()
    for _ in range(30):
        explainer(images)
    assert _live_tensors() <= baseline
    assert _model_state(model) == before
    with pytest.raises(ValueError):
        explainer(images, classes=torch.tensor([0, 99]))
    assert _model_state(model) == before
    assert _live_tensors() <= baseline


class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.cumsum(self.conv1(x), dim=3)  # mixes pixels in a way no rule covers
        return self.fc(F.adaptive_avg_pool2d(self.conv2(x), 1).flatten(1))


def test_unsupported_op_is_named_and_leaves_no_state():
    model = Unsupported().eval()
    explainer = FGCAM(model)
    assert explainer.cam_layer == "conv2"
    with pytest.raises(UnsupportedOperation, match="cumsum"):
        explainer(torch.randn(1, 3, 8, 8))
    assert _model_state(model)[0:2] == (0, 0)
    assert explainer(torch.randn(1, 3, 8, 8), target_layer="conv2").maps.shape == (1, 4, 4)


def test_bad_options_fail_clearly():
    model = build("functional")
    with pytest.raises(ValueError, match="unknown base"):
        FGCAM(model, base="gradcam3")
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        FGCAM(model, cam_layer="nope")
    explainer = FGCAM(model, cam_layer="squeeze")
    with pytest.raises(ValueError, match="not below"):
        explainer(torch.randn(1, 1, 16, 16), target_layer="down")
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        explainer(torch.randn(1, 16, 16))


@pytest.mark.parametrize("base", ["gradcam", "gradcam++", "xgradcam", "layercam", "scorecam"])
def test_every_base_runs_and_explains_the_requested_class(base):
    torch.manual_seed(7)
    model = small_vgg()
    images = torch.randn(2, 3, 32, 32)
    result = FGCAM(model, base=base)(images, classes=torch.tensor([4, 0]))
    assert result.classes.tolist() == [4, 0]
    assert result.maps.shape == (2, 32, 32) and torch.isfinite(result.maps).all()
    assert torch.allclose(result.logits, model(images), atol=1e-5)


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18", "functional"])
def test_lrp_from_the_logit_conserves_it(name):
    from analysis.fgcam import LRP
    torch.manual_seed(8)
    model = build(name).double()
    images = torch.randn(2, 1 if name == "functional" else 3, 40, 40, dtype=torch.float64)
    result = LRP(model)(images)
    logit = result.logits.gather(1, result.classes[:, None])[:, 0]
    assert torch.allclose(result.maps.sum(dim=(1, 2)), logit, rtol=1e-6)
