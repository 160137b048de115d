"""The machinery under the rules: packed convolution products, the engine's own forward pass (packed
convolutions, batch norm in place), in-place ops of the model, and the per-layer caches when weights change.

The rules' numbers are checked in test_fgcam_rules.py and test_fgcam_engine.py; here, that the fast paths
give the numbers of the plain torch ops and of the model itself."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from analysis.fgcam import FGCAM
from analysis.fgcam.conv import Conv

GEOMETRIES = [  # in, out, kernel, stride, padding, dilation, groups, height, width
    (3, 8, 7, 2, 3, 1, 1, 23, 20),   # an image convolution, odd sizes (output padding on the way back)
    (8, 8, 3, 1, 1, 1, 8, 9, 9),     # depthwise
    (8, 12, 3, 2, 2, 2, 2, 11, 10),  # grouped, dilated, strided
    (16, 4, 1, 1, 0, 1, 1, 5, 5),    # 1 x 1
    (4, 6, 3, 1, "same", 2, 1, 7, 8),
]


def _parts(weight):
    return {"whole": weight, "positive": weight.clamp(min=0), "negative": weight.clamp(max=0),
            "ones": torch.ones_like(weight)}


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_conv_products_match_torch_packed_and_plain(geometry):
    c_in, c_out, k, stride, padding, dilation, groups, h, w = geometry
    torch.manual_seed(0)
    weight, bias = torch.randn(c_out, c_in // groups, k, k), torch.randn(c_out)
    x = torch.randn(3, c_in, h, w)
    packed = Conv(weight, bias, stride, padding, dilation, groups)
    plain = Conv(weight.double(), bias.double(), stride, padding, dilation, groups)
    assert packed.packs, "this machine's torch has oneDNN: the packed path must be the one tested"
    assert not plain.packs
    for name, part in _parts(weight).items():
        expected = F.conv2d(x.double(), part.double(), None, stride, padding, dilation, groups)
        assert torch.allclose(packed.forward(x, name).double(), expected, atol=1e-4)
        assert torch.allclose(plain.forward(x.double(), name), expected)
        s = torch.randn_like(expected)
        # the transposed product is the vector-Jacobian product of the forward one
        leaf = x.double().requires_grad_(True)
        (back,) = torch.autograd.grad(F.conv2d(leaf, part.double(), None, stride, padding, dilation, groups), leaf, s)
        assert torch.allclose(packed.backward(x.shape, s.float(), name).double(), back, atol=1e-4)
        assert torch.allclose(plain.backward(x.shape, s, name), back)
    expected = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    assert torch.allclose(packed.output(x), expected, atol=1e-5)
    # two parts in one transposed convolution (side by side, or one by one for grouped layers)
    s = torch.randn_like(expected)
    whole, positive = packed.backward(x.shape, s, "whole", "positive")
    assert torch.allclose(whole, packed.backward(x.shape, s, "whole"), atol=1e-5)
    assert torch.allclose(positive, packed.backward(x.shape, s, "positive"), atol=1e-5)


def test_packed_weights_serve_every_batch_and_image_size():
    torch.manual_seed(1)
    weight = torch.randn(6, 3, 3, 3)
    conv = Conv(weight, None, 2, 1)
    for shape in [(1, 3, 9, 9), (5, 3, 16, 12), (2, 3, 9, 9)]:
        x = torch.randn(shape)
        assert torch.allclose(conv.forward(x, "positive"), F.conv2d(x, weight.clamp(min=0), None, 2, 1), atol=1e-5)


def _random_batch_norm(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.0, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def test_engine_forward_gives_the_models_logits():
    # packed convolutions and batch norm in place, on a residual network with in-place ReLUs and additions
    model = _random_batch_norm(torchvision.models.resnet18(num_classes=5).eval(), 2)
    images = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        expected = model(images)
    explainer = FGCAM(model)
    assert torch.allclose(explainer(images).logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.allclose(explainer.logits(images), expected, rtol=1e-4, atol=1e-4)


def test_batch_norm_in_training_mode_uses_the_batch_statistics():
    model = _random_batch_norm(torchvision.models.resnet18(num_classes=5), 3).train()
    twin = copy.deepcopy(model)
    images = torch.randn(4, 3, 40, 40)
    logits = FGCAM(model)(images).logits
    with torch.no_grad():
        expected = twin(images)  # updates its running statistics exactly as the engine's run did the model's
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.allclose(model.bn1.running_mean, twin.bn1.running_mean)


def test_a_hook_on_a_layer_is_honoured():
    model = _random_batch_norm(torchvision.models.resnet18(num_classes=5).eval(), 4)
    images = torch.randn(2, 3, 40, 40)
    explainer = FGCAM(model)
    before = explainer(images).logits
    handle = model.layer1[0].conv1.register_forward_hook(lambda module, args, output: output * 3.0)
    try:
        with torch.no_grad():
            expected = model(images)
        logits = explainer(images).logits
    finally:
        handle.remove()
    assert not torch.allclose(expected, before, atol=1e-3)
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_changed_weights_and_statistics_are_seen():
    # the engine keeps packed weights and batch-norm factors per layer: an update in place, a new parameter
    # and new running statistics must all give the maps of a fresh explainer
    model = _random_batch_norm(torchvision.models.resnet18(num_classes=5).eval(), 5)
    images = torch.randn(2, 3, 40, 40)
    explainer = FGCAM(model)
    first = explainer(images).maps

    def check(change):
        with torch.no_grad():
            change()
        ours = explainer(images)
        fresh = FGCAM(model)(images)
        assert torch.allclose(ours.maps, fresh.maps, rtol=1e-4, atol=1e-6)
        assert torch.allclose(ours.logits, fresh.logits)
        return ours.maps

    after_step = check(lambda: model.conv1.weight.mul_(-0.5))          # an optimizer step writes in place
    assert not torch.allclose(after_step, first, atol=1e-4)
    check(lambda: setattr(model.layer1[0].conv2, "weight", nn.Parameter(torch.randn_like(model.layer1[0].conv2.weight))))
    check(lambda: model.layer2[0].bn1.running_var.mul_(4.0))
    check(lambda: model.layer2[0].bn2.bias.add_(1.0))


class InPlaceNet(nn.Module):
    """The same network written with in-place ops (on its input, on a sum's operand, after a batch norm, on
    a view) or without: FG-CAM must give both the same maps and leave the caller's images alone."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(12, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = x.mul_(2.0) if self.in_place else x * 2.0
        y = F.relu(self.bn1(self.conv1(x)), inplace=self.in_place)
        z = self.bn2(self.conv2(y))
        z = z.add_(y) if self.in_place else z + y
        z = F.relu(z, inplace=self.in_place)
        z = torch.cat([z, y], dim=1)
        z = z.view(z.shape).sub_(0.1) if self.in_place else z.view(z.shape) - 0.1
        z = F.relu(self.conv3(z), inplace=self.in_place)
        return self.fc(F.adaptive_avg_pool2d(z, 1).flatten(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_ops_give_the_same_maps_and_leave_the_images_alone(dtype):
    torch.manual_seed(6)
    plain = _random_batch_norm(InPlaceNet(in_place=False).eval(), 7).to(dtype)
    in_place = InPlaceNet(in_place=True).eval().to(dtype)
    in_place.load_state_dict(plain.state_dict())
    # channels-last, the engine's own layout: the engine works on the caller's tensor itself, not on a copy
    images = torch.randn(2, 3, 12, 12, dtype=dtype).contiguous(memory_format=torch.channels_last)
    kept = images.clone()
    with torch.no_grad():
        expected_logits = plain(images)
    for target in ["input", "conv2", "bn2"]:
        ours = FGCAM(in_place, cam_layer="conv3")(images, target_layer=target)
        theirs = FGCAM(plain, cam_layer="conv3")(images, target_layer=target)
        assert torch.equal(images, kept)
        assert torch.allclose(ours.logits, expected_logits, rtol=1e-5, atol=1e-5)
        assert torch.allclose(ours.maps, theirs.maps, rtol=1e-5, atol=1e-6 * float(theirs.maps.abs().max()))


def test_a_rule_reading_a_value_its_row_does_not_declare_fails_loudly(monkeypatch):
    # the plan keeps only what ops.KINDS declares, and the walk hands each rule only that: a row that
    # declares too little is an error naming the rule, never a rule silently reading a value that was dropped
    import dataclasses

    from analysis.fgcam import ops
    model = _random_batch_norm(torchvision.models.resnet18(num_classes=5).eval(), 8)
    images = torch.randn(1, 3, 32, 32)
    FGCAM(model)(images)  # as declared, it runs
    rows = tuple(dataclasses.replace(kind, reads=ops.reads_nothing) if kind.name == "conv" else kind
                 for kind in ops.KINDS)
    monkeypatch.setattr(ops, "KINDS", rows)
    with pytest.raises(AssertionError, match="the 'conv' rule read .* does not declare"):
        FGCAM(model)(images)


def test_every_kind_states_its_rule_and_the_first_match_wins():
    from analysis.fgcam import ops
    assert len({kind.name for kind in ops.KINDS}) == len(ops.KINDS)
    assert all(kind.rule and kind.reads and kind.step for kind in ops.KINDS)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    graph = FGCAM(model).graph
    kinds = {graph.module_name(node): ops.kind_of(graph, node).name for node in graph.nodes
             if node.op == "call_module"}
    assert kinds == {"0": "image conv", "1": "pass", "2": "conv", "3": "pool", "4": "move", "5": "linear"}
