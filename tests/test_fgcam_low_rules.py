"""Another rule for the lowest convolutions (issue 16): the gamma and epsilon rules, by hand, against zennit's
definitions, in the op table (which convolutions get them), and on whole networks (gamma conserves, epsilon
absorbs; the default is unchanged).

zennit (Anders et al., github.com/chr5tphr/zennit) is not installed: ``zennit_gamma`` and ``zennit_epsilon``
below re-derive its rules from their published definitions (the generalised Gamma rule: per output sign, the
modified weights W + gamma W+ / W + gamma W- on the positive and negative inputs, biases modified alike,
the sign taken from the unmodified output with its bias; the stabiliser adds 1e-6 sign(z), sign(0) = +1;
Epsilon: z + epsilon sign(z)), written here with autograd's gradient trick and no code of the engine."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.fgcam import FGCAM, LRP, LowRule, rules
from analysis.fgcam.conv import Conv
from analysis.fgcam.ops import kind_table
from analysis.fgcam.propagate import node_kinds
from tests.test_fgcam_engine import build


def t(values):
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ by hand
def test_gamma_by_hand():
    # x = [2, 1], w = [1, -1]: z = 1 > 0, weights W + gamma W+ = [1.5, -1] for gamma 0.5; z_gamma = 3 - 1 = 2
    r = rules.conv_gamma(t([[[[4.0]]]]), t([[[[2.0, 1.0]]]]), Conv(t([[[[1.0, -1.0]]]])), gamma=0.5)
    assert torch.allclose(r, t([[[[6.0, -2.0]]]]))  # 2 * 1.5 / 2 * 4 and 1 * (-1) / 2 * 4: sums to 4
    # x = [1, 2], same w: z = -1 < 0, weights W + gamma W- = [1, -2] for gamma 1; z_gamma = 1 - 4 = -3
    r = rules.conv_gamma(t([[[[6.0]]]]), t([[[[1.0, 2.0]]]]), Conv(t([[[[1.0, -1.0]]]])), gamma=1.0)
    assert torch.allclose(r, t([[[[-2.0, 8.0]]]]))
    # signed input x = [2, -1], w = [1, 1]: z = 1 > 0; x+ = [2, 0] under W + W+ = [2, 2], x- = [0, -1] under
    # W + W- = [1, 1]: z_gamma = 4 - 1 = 3
    r = rules.conv_gamma(t([[[[3.0]]]]), t([[[[2.0, -1.0]]]]), Conv(t([[[[1.0, 1.0]]]])), gamma=1.0)
    assert torch.allclose(r, t([[[[4.0, -1.0]]]]))
    # gamma 0 is LRP-0: x_i w_i / z
    r = rules.conv_gamma(t([[[[4.0]]]]), t([[[[2.0, 1.0]]]]), Conv(t([[[[1.0, -1.0]]]])), gamma=0.0)
    assert torch.allclose(r, t([[[[8.0, -4.0]]]]))


def test_gamma_where_z_is_zero_falls_back_to_z_plus():
    # x = [1, 1], w = [1, -1]: z = 0 (zennit drops the 5); ours: z+ = 1 puts all of it on the first input
    r = rules.conv_gamma(t([[[[5.0]]]]), t([[[[1.0, 1.0]]]]), Conv(t([[[[1.0, -1.0]]]])), gamma=0.25)
    assert torch.allclose(r, t([[[[5.0, 0.0]]]]))
    # a window of zeros (relevance carried by a bias): the flat rule, as z+ does
    r = rules.conv_gamma(t([[[[6.0]]]]), t([[[[0.0, 0.0]]]]), Conv(t([[[[1.0, -1.0]]]]), bias=t([1.0])), gamma=0.25)
    assert torch.allclose(r, t([[[[3.0, 3.0]]]]))


def test_epsilon_by_hand():
    # x = [1, 2], w = [1, 1]: z = 3, epsilon 1: R / 4 = 2 per unit of z: [2, 4], 2 of the 8 absorbed
    r = rules.conv_epsilon(t([[[[8.0]]]]), t([[[[1.0, 2.0]]]]), Conv(t([[[[1.0, 1.0]]]])), epsilon=1.0)
    assert torch.allclose(r, t([[[[2.0, 4.0]]]]))
    # z = -3 < 0: the denominator is z - epsilon = -4
    r = rules.conv_epsilon(t([[[[8.0]]]]), t([[[[1.0, 2.0]]]]), Conv(t([[[[-1.0, -1.0]]]])), epsilon=1.0)
    assert torch.allclose(r, t([[[[2.0, 4.0]]]]))
    # z = 0: sign(0) = +1, R / epsilon spread as x_i w_i, which add up to 0: all absorbed
    r = rules.conv_epsilon(t([[[[1.0]]]]), t([[[[1.0, 1.0]]]]), Conv(t([[[[1.0, -1.0]]]])), epsilon=0.5)
    assert torch.allclose(r, t([[[[2.0, -2.0]]]]))


def test_rules_refuse_values_outside_their_range():
    conv = Conv(t([[[[1.0]]]]))
    with pytest.raises(ValueError, match="gamma >= 0"):
        rules.conv_gamma(t([[[[1.0]]]]), t([[[[1.0]]]]), conv, gamma=-0.1)
    with pytest.raises(ValueError, match="epsilon > 0"):
        rules.conv_epsilon(t([[[[1.0]]]]), t([[[[1.0]]]]), conv, epsilon=0.0)


# ------------------------------------------------------------------------------------- against zennit's
def _stabilise(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    return z + epsilon * (z.sign() + (z == 0).to(z))


def _conv_vjp(x: torch.Tensor, weight: torch.Tensor, bias, geometry: dict, grad: torch.Tensor) -> torch.Tensor:
    """x * d/dx [conv(x, weight, bias) . grad] (the gradient trick)."""
    leaf = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.conv2d(leaf, weight, bias, **geometry), leaf, grad)
    return x * g


def zennit_gamma(relevance, x, weight, bias, gamma, geometry):
    """zennit's generalised Gamma rule, from its definition (see the module docstring)."""
    def mod(w, part):  # W + gamma W+ or W + gamma W-
        return None if w is None else w + gamma * (w.clamp(min=0) if part == "+" else w.clamp(max=0))

    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    z = F.conv2d(x, weight, bias, **geometry)
    up = F.conv2d(x_pos, mod(weight, "+"), mod(bias, "+"), **geometry) + F.conv2d(x_neg, mod(weight, "-"), None, **geometry)
    down = F.conv2d(x_pos, mod(weight, "-"), mod(bias, "-"), **geometry) + F.conv2d(x_neg, mod(weight, "+"), None, **geometry)
    s_up = (z > 0).to(x) * relevance / _stabilise(up, 1e-6)
    s_down = (z < 0).to(x) * relevance / _stabilise(down, 1e-6)
    return (_conv_vjp(x_pos, mod(weight, "+"), None, geometry, s_up) + _conv_vjp(x_neg, mod(weight, "-"), None, geometry, s_up)
            + _conv_vjp(x_pos, mod(weight, "-"), None, geometry, s_down)
            + _conv_vjp(x_neg, mod(weight, "+"), None, geometry, s_down))


def zennit_epsilon(relevance, x, weight, bias, epsilon, geometry):
    z = F.conv2d(x, weight, bias, **geometry)
    return _conv_vjp(x, weight, None, geometry, relevance / _stabilise(z, epsilon))


GEOMETRIES = [dict(stride=1, padding=1, dilation=1, groups=1), dict(stride=2, padding=2, dilation=2, groups=2),
              dict(stride=1, padding=1, dilation=1, groups=4)]  # plain, strided dilated grouped, depthwise


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 0.25, 1.0])
def test_gamma_matches_zennits_definition_on_a_bias_free_layer(geometry, signed, gamma):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    x = x if signed else x.clamp(min=0)
    weight = torch.randn(4, 4 // geometry["groups"], 3, 3, dtype=torch.float64)
    z = F.conv2d(x, weight, None, **geometry)
    # where z = 0 the two differ on purpose (zennit drops, ours falls back); near 0 zennit's stabiliser (1e-6)
    # matters to LRP-0 (gamma 0): relevance only on outputs with |z| > 0.1, where it changes R / z by < 1e-5
    relevance = torch.randn_like(z) * (z.abs() > 0.1)
    ours = rules.conv_gamma(relevance, x, Conv(weight, None, **geometry), gamma, x_nonnegative=not signed)
    theirs = zennit_gamma(relevance, x, weight, None, gamma, geometry)
    assert float((ours - theirs).abs().max()) < 1e-5 * float(theirs.abs().max())
    # and it conserves: every output's relevance reaches the inputs (biases ignored)
    assert torch.allclose(ours.sum(dim=(1, 2, 3)), relevance.sum(dim=(1, 2, 3)), rtol=1e-10)


def test_with_a_bias_ours_is_zennits_rule_on_the_layer_without_it():
    torch.manual_seed(1)
    x = torch.rand(1, 3, 6, 6, dtype=torch.float64)
    weight, bias = torch.randn(5, 3, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    relevance = torch.randn(1, 5, 4, 4, dtype=torch.float64)
    ours = rules.conv_gamma(relevance, x, Conv(weight, bias), 0.25)
    theirs = zennit_gamma(relevance, x, weight, None, 0.25, {})
    assert float((ours - theirs).abs().max()) < 1e-5 * float(theirs.abs().max())
    assert not torch.allclose(ours, zennit_gamma(relevance, x, weight, bias, 0.25, {}), rtol=1e-2)
    ours = rules.conv_epsilon(relevance, x, Conv(weight, bias), 0.25)
    assert torch.allclose(ours, zennit_epsilon(relevance, x, weight, None, 0.25, {}), rtol=1e-10)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("epsilon", [1e-6, 0.25, 1.0])
def test_epsilon_matches_zennits_definition_on_a_bias_free_layer(geometry, epsilon):
    torch.manual_seed(2)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    weight = torch.randn(4, 4 // geometry["groups"], 3, 3, dtype=torch.float64)
    relevance = torch.randn_like(F.conv2d(x, weight, None, **geometry))
    ours = rules.conv_epsilon(relevance, x, Conv(weight, None, **geometry), epsilon)
    assert torch.allclose(ours, zennit_epsilon(relevance, x, weight, None, epsilon, geometry), rtol=1e-10)


# ------------------------------------------------------------------------------------------- the op table
def test_the_low_rule_covers_the_convolutions_up_to_its_layer_but_not_the_images():
    model = build("functional")  # stem (reads the image), left, right, squeeze, excite, down
    explainer = FGCAM(model, cam_layer="down", low_rule=LowRule("gamma", "left"))
    kinds = node_kinds(explainer.graph, explainer.low_rule)
    by_module = {explainer.graph.module_name(node): kind.name for node, kind in kinds.items()
                 if node.op == "call_module" and isinstance(explainer.graph.module(node), nn.Conv2d)}
    assert by_module == {"stem": "image conv", "left": "low conv (gamma)", "right": "conv", "squeeze": "conv",
                         "excite": "conv", "down": "conv"}
    # the table is KINDS with one row after the image's convolution; equal rules share one table
    table = kind_table(LowRule("epsilon", "down", epsilon=0.5))
    assert [kind.name for kind in table][:3] == ["image conv", "low conv (epsilon)", "conv"]
    assert table is kind_table(LowRule("epsilon", "down", epsilon=0.5))
    assert "epsilon = 0.5" in table[1].rule and "zennit" in table[1].rule
    assert node_kinds(explainer.graph)[next(n for n in kinds if n.target == "left")].name == "conv"


def test_a_low_rule_below_which_only_the_image_conv_sits_changes_nothing():
    torch.manual_seed(3)
    model = build("vgg11_bn")
    images = torch.randn(2, 3, 32, 32)
    default = FGCAM(model)(images).maps
    assert torch.equal(FGCAM(model, low_rule=LowRule("gamma", "features.2"))(images).maps, default)
    other = FGCAM(model, low_rule=LowRule("gamma", "features.6"))(images).maps
    assert float((other - default).abs().max()) > 1e-3 * float(default.abs().max())


# --------------------------------------------------------------------------------------- whole networks
@pytest.mark.parametrize("name, through", [("resnet18", "layer2"), ("mobilenet_v2", "features.6"),
                                           ("densenet121", "features.denseblock2"), ("functional", "down")])
def test_gamma_conserves_and_epsilon_absorbs_on_whole_networks(name, through):
    torch.manual_seed(4)
    model = build(name).double()
    images = torch.randn(2, 1 if name == "functional" else 3, 40, 40, dtype=torch.float64)
    plain = FGCAM(model)
    components = plain(images, target_layer=plain.cam_layer).maps.sum(dim=(1, 2))
    gamma = FGCAM(model, low_rule=LowRule("gamma", through, gamma=0.25))
    flow: list = []
    maps = gamma(images, flow=flow).maps
    assert torch.allclose(maps.sum(dim=(1, 2)), components, rtol=1e-9)
    assert any(step.kind == "low conv (gamma)" for step in flow)
    default = plain(images).maps
    assert float((maps - default).abs().max()) > 1e-3 * float(default.abs().max())  # another map
    epsilon = FGCAM(model, low_rule=LowRule("epsilon", through, epsilon=0.25))
    flow = []
    kept = epsilon(images, flow=flow).maps.sum(dim=(1, 2)) / components
    assert ((kept < 1) & (kept > 0)).all(), kept
    for step in flow:  # only the epsilon convolutions lose relevance (by |passed| <= |received|, not exactly)
        if step.kind != "low conv (epsilon)":
            assert torch.allclose(step.passed, step.received, rtol=1e-8, atol=1e-12 * float(components.abs().max()))


def test_lrp_with_a_low_rule_conserves_the_logit_under_gamma():
    torch.manual_seed(5)
    model = build("resnet18").double()
    images = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    result = LRP(model, low_rule=LowRule("gamma", "layer1", gamma=1.0))(images)
    logit = result.logits.gather(1, result.classes[:, None])[:, 0]
    assert torch.allclose(result.maps.sum(dim=(1, 2)), logit, rtol=1e-6)


def test_bad_low_rules_fail_clearly():
    with pytest.raises(ValueError, match="unknown low-layer rule 'alpha'; choose one of gamma, epsilon"):
        LowRule("alpha", "layer1")
    with pytest.raises(ValueError, match="gamma >= 0"):
        LowRule("gamma", "layer1", gamma=-1.0)
    with pytest.raises(ValueError, match="epsilon > 0"):
        LowRule("epsilon", "layer1", epsilon=0.0)
    with pytest.raises(ValueError, match="epsilon > 0"):
        LowRule("epsilon", "layer1", epsilon=float("nan"))
    model = build("resnet18")
    with pytest.raises(ValueError, match="unknown layer 'layer9'"):
        FGCAM(model, low_rule=LowRule("gamma", "layer9"))
    with pytest.raises(TypeError, match="LowRule"):
        FGCAM(model, low_rule="gamma")
