"""Each relevance rule against values computed by hand on tiny layers."""
import torch
import torch.nn.functional as F

from analysis.fgcam import rules


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_safe_divide_zero_over_zero_is_zero():
    assert rules.safe_divide(t([1.0, 0.0, 6.0]), t([2.0, 0.0, 0.0])).tolist() == [0.5, 0.0, 0.0]


def test_conv_zplus_positive_input_by_hand():
    # one 2x2 input, 2x2 kernel, one output: z = 1*2 + 2*0 + 3*1 + 4*0 (negative weights ignored) = 5
    x = t([[[[1.0, 2.0], [3.0, 4.0]]]])
    w = t([[[[2.0, -1.0], [1.0, -3.0]]]])
    r = rules.conv_zplus(t([[[[10.0]]]]), x, rules.Conv(w))
    # R_in = x * w+ * R / z = [1*2, 0, 3*1, 0] * 10 / 5
    assert torch.allclose(r, t([[[[4.0, 0.0], [6.0, 0.0]]]]))


def test_conv_zplus_signed_input_uses_negative_parts():
    # x = [2, -1], w = [1, -2]: z = 2*1 (x+ w+) + (-1)(-2) (x- w-) = 4
    x = t([[[[2.0, -1.0]]]])
    w = t([[[[1.0, -2.0]]]])
    r = rules.conv_zplus(t([[[[8.0]]]]), x, rules.Conv(w))
    assert torch.allclose(r, t([[[[4.0, 4.0]]]]))  # 2/4*8 and 2/4*8


def test_conv_zbox_by_hand():
    # image [0.5, 1] so l = 0.5, h = 1; w = [2, 1] (no negative weight)
    # z = conv(x, W) - conv(l, W+) - conv(h, W-) = (1 + 1) - (1 + 0.5) - 0 = 0.5
    # R_in_i = (x_i w_i - l w+_i - h w-_i) * R / z = [(1 - 1) / 0.5, (1 - 0.5) / 0.5]
    x = t([[[[0.5, 1.0]]]])
    w = t([[[[2.0, 1.0]]]])
    r = rules.conv_zbox(t([[[[1.0]]]]), x, rules.Conv(w))
    assert torch.allclose(r, t([[[[0.0, 1.0]]]]))


def test_conv_zbox_zero_padding_applies_to_bounds():
    # 1 pixel image with padding 1 and a 3-wide kernel: the padded l and h contribute nothing
    x = t([[[[2.0]]]])   # l = h = 2
    w = t([[[[5.0, 1.0, 7.0]]]])
    r = rules.conv_zbox(t([[[[3.0]]]]), x, rules.Conv(w, padding=(0, 1)))
    # z = 2*1 - 2*1 - 0 = 0, not 5 or 7 of the padding: the flat rule gives all 3 to the one pixel
    assert torch.equal(r, t([[[[3.0]]]]))


def test_conv_zbox_separate_padding_is_not_in_the_bounds_and_gets_nothing():
    # the image [1, 2] after a separate zero pad of 1: x = [0, 1, 2, 0], support [0, 1, 1, 0]; w = [1, 1, 1].
    # Bounds over the image only: l = 1, h = 2 (not l = 0 from the padding).
    # z_1 = (0 + 1 + 2) - l * 2 = 1 and z_2 = (1 + 2 + 0) - l * 2 = 1; R_in_i = (x_i - l) * (s_1 + s_2) on the image
    x, support = t([[[[0.0, 1.0, 2.0, 0.0]]]]), t([[[[0.0, 1.0, 1.0, 0.0]]]])
    r = rules.conv_zbox(t([[[[2.0, 4.0]]]]), x, rules.Conv(t([[[[1.0, 1.0, 1.0]]]])), support=support)
    assert torch.allclose(r, t([[[[0.0, 0.0, 6.0, 0.0]]]]))


def test_conv_zplus_honours_stride_groups_dilation():
    torch.manual_seed(0)
    x = torch.rand(2, 4, 9, 9, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    z = F.conv2d(x, w.clamp(min=0), None, 2, 2, 2, 2)
    relevance = torch.rand_like(z)
    r = rules.conv_zplus(relevance, x, rules.Conv(w, stride=2, padding=2, dilation=2, groups=2))
    # the gradient trick computed by autograd on the same conv
    x_leaf = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.conv2d(x_leaf, w.clamp(min=0), None, 2, 2, 2, 2), x_leaf, relevance / z)
    assert torch.allclose(r, x * g)
    assert torch.allclose(r.sum(), relevance.sum())


def test_conv_flat_fallback_conserves_relevance_of_an_all_zero_window():
    # a depthwise window of zeros carries relevance (a bias-driven activation): spread evenly, not dropped
    w = t([[[[1.0, 1.0]]]])
    r = rules.conv_zplus(t([[[[4.0, 6.0]]]]), t([[[[0.0, 0.0, 0.0]]]]), rules.Conv(w, bias=t([0.5])))  # output = bias
    assert torch.allclose(r, t([[[[2.0, 5.0, 3.0]]]]))
    # the same without a bias (relevance on an output that is exactly 0: a BatchNorm shift made it non-zero
    # further up). x = [0, 0, 1]: the first window's 4 is spread over its two zeros (the reference drops it),
    # the second window's 6 goes to the 1
    r = rules.conv_zplus(t([[[[4.0, 6.0]]]]), t([[[[0.0, 0.0, 1.0]]]]), rules.Conv(w))
    assert torch.allclose(r, t([[[[2.0, 2.0, 6.0]]]]))


def test_conv_window_without_positive_weight_falls_back_to_its_negative_part():
    # a kernel with no positive weight over positive inputs: z+ = 0, z- = 1*(-1) + 2*(-3) = -7;
    # R_i = x_i w_i / z- * R = [-1, -6] / -7 * 5
    r = rules.conv_zplus(t([[[[5.0]]]]), t([[[[1.0, 2.0]]]]), rules.Conv(t([[[[-1.0, -3.0]]]])), x_nonnegative=True)
    assert torch.allclose(r, t([[[[5.0 / 7.0, 30.0 / 7.0]]]]))
    # the positive weight meets a zero: z+ = 0, z- = 2 * (-1): all R to the input under the negative weight
    r = rules.conv_zplus(t([[[[4.0]]]]), t([[[[0.0, 2.0]]]]), rules.Conv(t([[[[1.0, -1.0]]]])))
    assert torch.allclose(r, t([[[[0.0, 4.0]]]]))
    # signed input: z+ = x+ W+ + x- W- = 0; the negative part is x+ W- + x- W+ = 2*(-1) + (-1)*1 = -3
    r = rules.conv_zplus(t([[[[6.0]]]]), t([[[[-1.0, 2.0]]]]), rules.Conv(t([[[[1.0, -1.0]]]])))
    assert torch.allclose(r, t([[[[2.0, 4.0]]]]))


def test_flat_rule_gives_nothing_to_the_padding_of_a_separate_pad_op():
    # a 2-wide input of zeros after a separate zero pad of 1: x = [0, 0, 0, 0], support [0, 1, 1, 0]; a 3-wide
    # kernel has windows {0, 1, 2} and {1, 2, 3}, each with two real positions: 3 -> 1.5 + 1.5, 6 -> 3 + 3
    x, support = torch.zeros(1, 1, 1, 4, dtype=torch.float64), t([[[[0.0, 1.0, 1.0, 0.0]]]])
    conv = rules.Conv(t([[[[1.0, 2.0, 1.0]]]]))
    r = rules.conv_zplus(t([[[[3.0, 6.0]]]]), x, conv, x_nonnegative=True, support=support)
    assert torch.allclose(r, t([[[[0.0, 4.5, 4.5, 0.0]]]]))
    # without the support the padding takes 1 + 2 of the 9, which the pad op then drops
    r = rules.conv_zplus(t([[[[3.0, 6.0]]]]), x, conv, x_nonnegative=True)
    assert torch.allclose(r, t([[[[1.0, 3.0, 3.0, 2.0]]]]))


def test_max_pool_routes_to_the_winner_and_ignores_negatives():
    x = t([[[[1.0, 3.0], [-5.0, 2.0]]]])
    r = rules.pool(t([[[[7.0]]]]), x, lambda v: F.max_pool2d(v, 2))
    assert torch.allclose(r, t([[[[0.0, 7.0], [0.0, 0.0]]]]))


def test_avg_pool_shares_by_positive_part():
    x = t([[[[1.0, 3.0], [-5.0, 0.0]]]])
    r = rules.pool(t([[[[8.0]]]]), x, lambda v: F.avg_pool2d(v, 2))
    assert torch.allclose(r, t([[[[2.0, 6.0], [0.0, 0.0]]]]))


def test_pool_window_of_negatives_or_zeros_falls_back_to_an_even_share():
    x = t([[[[-1.0, -3.0], [-5.0, -2.0]]]])
    r = rules.pool(t([[[[8.0]]]]), x, lambda v: F.avg_pool2d(v, 2))
    assert torch.allclose(r, t([[[[2.0, 2.0], [2.0, 2.0]]]]))
    # a window of zeros (a ReLU's output, relevance passed down from a BatchNorm shift): the reference drops it
    r = rules.pool(t([[[[8.0]]]]), torch.zeros(1, 1, 2, 2, dtype=torch.float64), lambda v: F.avg_pool2d(v, 2),
                   x_nonnegative=True)
    assert torch.allclose(r, t([[[[2.0, 2.0], [2.0, 2.0]]]]))
    # after a separate zero pad ([0, 0] padded to [0, 0, 0, 0]): only the two real positions share
    r = rules.pool(t([[[[8.0]]]]), torch.zeros(1, 1, 1, 4, dtype=torch.float64),
                   lambda v: F.avg_pool2d(v, (1, 4)), support=t([[[[0.0, 1.0, 1.0, 0.0]]]]))
    assert torch.allclose(r, t([[[[0.0, 4.0, 4.0, 0.0]]]]))


def test_linear_zplus_by_hand():
    x = t([[1.0, -2.0]])
    w = t([[3.0, 1.0]])  # z = 1*3 + (-2)*0 = 3
    assert torch.allclose(rules.linear_zplus(t([[6.0]]), x, w), t([[6.0, 0.0]]))


def test_linear_fallbacks_negative_part_then_even():
    # z+ = 0 * 1 = 0; negative part 2 * (-1): all R to the second input
    assert torch.allclose(rules.linear_zplus(t([[6.0]]), t([[0.0, 2.0]]), t([[1.0, -1.0]])), t([[0.0, 6.0]]))
    # all inputs 0: evenly
    assert torch.allclose(rules.linear_zplus(t([[6.0, 2.0]]), t([[0.0, 0.0]]), t([[1.0, 1.0], [2.0, -1.0]])),
                          t([[4.0, 4.0]]))


def test_split_sum_is_proportional_and_conserves():
    a, b = t([1.0, 2.0, 0.0]), t([3.0, -1.0, 0.0])
    parts = rules.split_sum(t([8.0, 5.0, 9.0]), [a, b])
    # where the summands add up to 0 (the third entry), evenly: 9 -> 4.5 + 4.5 (the reference drops it)
    assert torch.allclose(parts[0], t([2.0, 10.0, 4.5]))
    assert torch.allclose(parts[1], t([6.0, -5.0, 4.5]))
    # a summand and its negative
    parts = rules.split_sum(t([6.0]), [t([2.0]), t([-2.0])])
    assert torch.allclose(parts[0], t([3.0])) and torch.allclose(parts[1], t([3.0]))


def test_move_splits_concatenation_by_slices():
    a, b = torch.ones(1, 2, 2, 2), torch.ones(1, 3, 2, 2)
    relevance = torch.arange(20.0).view(1, 5, 2, 2)
    ra, rb = rules.move([relevance], [a, b], lambda p, q: torch.cat([p, q], dim=1))
    assert torch.equal(ra, relevance[:, :2]) and torch.equal(rb, relevance[:, 2:])


def test_move_reverses_a_reshape():
    relevance = torch.arange(8.0).view(1, 8)
    (r,) = rules.move([relevance], [torch.zeros(1, 2, 2, 2)], lambda v: v.flatten(1))
    assert torch.equal(r, relevance.view(1, 2, 2, 2))
