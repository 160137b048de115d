"""Relevance rules of FG-CAM's resolution increase, each mapping relevance R at an op's output to its inputs.

From the paper (Qiu, Jin, Zhang, AAAI 2024, arXiv 2303.09171) and its reference code:
``passthrough`` (activations, batch norm, dropout), ``pool`` (max / average pooling, z+ through the
pooling of x+), ``conv_zplus`` (LRP alpha1-beta0 on the positive and negative parts of x) and
``conv_zbox`` (the z^B rule for the convolution that reads the image). No epsilon; biases are ignored.

Ours, beyond the reference (which handles only VGG): ``split_sum`` (residual additions share R in
proportion to each summand's contribution, conserving the total), ``move`` (concatenation, slicing,
reshape, flatten, permute ... route R back exactly, through the op's vector-Jacobian product, so
concatenation splits by slices), multiplicative gates such as squeeze-excitation pass R to the gated
features with the gate held constant (``passthrough`` on the feature input), ``linear_zplus`` (z+ for
fully connected layers, used when relevance starts at the logit), convolutions with any stride,
padding, dilation and groups.

Ours too: where a rule's denominator is 0 the reference sets R/z to 0 and the relevance there is lost
(``_unplaced`` finds it). On VGG that never happens: every output that carries relevance has a positive
input under a positive weight. It does on trained networks: a ReLU output is sparse, a depthwise window
sees one channel (3 x 3 values, often all 0), a bias-free convolution followed by BatchNorm carries the
activation by the BatchNorm's shift alone (its output is exactly 0, the activation above it is not), and
trained depthwise kernels often have no positive weight (24% of EfficientNet-Lite0's last depthwise
layer). On the pretrained EfficientNet-Lite0 only 25-38% of the components' sum reached the pixels. The
method explains the activation the relevance sits on, so every rule here conserves R; where z = 0:

* convolution and fully connected layer, z+ = 0: the window's negative part, R_i = x_i w_i / sum_j x_j w_j
  over the terms x+ W- and x- W+ (all of one sign, so the shares are positive and add up to 1): the
  inputs that did drive the output, as z+ would see them after a negative BatchNorm scale
  (``_conv_fallback``);
* where that is 0 too (a window of zeros): LRP's flat rule, R in equal shares over the window (``_flat``);
* the image's convolution (z^B) at its bounds, a pooling window with no positive value: the flat rule;
* a sum whose summands add up to 0: R in equal shares to the summands (``split_sum``).

The flat rule gives nothing to padding, whether it is the layer's own or that of a separate pad op
(``ZeroPad2d``, ``F.pad``; ``support`` is 0 there), which passes on only what sits on its input: relevance
handed to padding is lost. For the same reason z^B takes its bounds over the image, not its padding, and
puts no l or h there. Relevance the walk starts with on an activation that is exactly 0 (denoised
components put some there) is dropped as the reference drops it (``propagate``); from then on, the input
map adds up to the components' sum on every network (``tests/test_fgcam_conservation.py``).

Another rule for the lowest convolutions (``ops.LowRule``, issue 16; off by default: z+ as the paper), for
maps that depend more on the model (Sixt et al., ICML 2020: chains of z+ rules converge to a map of the image
alone). Both as zennit defines them (its ``Gamma`` and ``Epsilon``; Montavon et al. 2019 recommend gamma in
the lower layers), with two differences of ours: biases are ignored, as everywhere here (zennit keeps them in
z unless told otherwise: on the bias-free convolutions of BatchNorm networks the two agree), and where z = 0
the gamma rule hands the relevance to z+ and its fallbacks (zennit drops it).

* ``conv_gamma`` (zennit's): the generalised gamma rule, weights W + gamma W+ (W + gamma W- for negative inputs)
  where the output is positive, the reverse where it is negative. It conserves (ours, with biases ignored):
  the shares of each output add up to 1, and its denominator z + gamma z+ is never 0 where z is not.
  gamma = 0 is LRP-0 (gradient x input), gamma -> infinity tends to z+.
* ``conv_epsilon`` (zennit's): R_in = x convT(R / (z + epsilon sign z), W). It does not conserve: each output
  passes on |z| / (|z| + epsilon) of its relevance and absorbs the rest (weak outputs most), so the input map
  sums to less than the components (``check-model`` shows where).

Several relevance maps per image (ours, for ``FGCAM.channel_maps``): every rule here is linear in R given the
forward values, so R may stack M copies per image along the batch (copy-major, ``_by_copy``) while the values
stay at N images: a convolution's denominator is computed once and divides all M copies; the rules that
differentiate through an op (pooling, data movement) run it on the copies (``_repeat_for_copies``, one
product per copy for a movement, whose arguments may name the batch size).

The rules never write into the relevance or the values they are given; they divide and multiply over
temporaries of their own, because on CPU a new activation-sized tensor costs more than the arithmetic on it.
The fallbacks run only where a denominator is 0; the common case pays one sum to learn that it is not.
The convolution products (and how they are made fast) are in ``conv.py``.
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .conv import Conv


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator with 0 wherever the denominator is 0 (the reference's 0/0 = 0)."""
    quotient = numerator / denominator
    return _zero_where_undefined(quotient)[0]


def _divide_into(relevance: Tensor, z: Tensor) -> tuple[Tensor, Tensor | None]:
    """R / z written over z, a temporary of the rule's own (no new tensor), with 0/0 = 0; and where z was 0
    (None: nowhere). With several relevance copies per image (``_by_copy``), z serves them all: a new tensor."""
    if relevance.shape == z.shape:
        return _zero_where_undefined(torch.div(relevance, z, out=z))
    return _zero_where_undefined(_flat_copies(_by_copy(relevance, z.shape[0]) / z, relevance.shape))


def _by_copy(relevance: Tensor, images: int) -> Tensor:
    """Relevance [M * N, ...] as [M, N, ...]: copy m of image n is row m * N + n (copy-major).

    The walk may carry M relevance maps per image over one forward run (``FGCAM.channel_maps``): the rules
    are linear in R given the forward values, so the values stay at N images and broadcast against the
    copies (a convolution's z is computed once for all of them). M = 1 is the common case.
    """
    return relevance.view(relevance.shape[0] // images, images, *relevance.shape[1:])


def _flat_copies(grouped: Tensor, shape: torch.Size) -> Tensor:
    """[M, N, ...] back to [M * N, ...] (a view where the layout allows one)."""
    return grouped.reshape(shape)


def _times(relevance_like: Tensor, x: Tensor) -> Tensor:
    """relevance_like *= x in place, with x [N, ...] broadcast over the copies of relevance_like [M * N, ...]."""
    if relevance_like.shape == x.shape:
        return relevance_like.mul_(x)
    _by_copy(relevance_like, x.shape[0]).mul_(x)
    return relevance_like


def _add_times(total: Tensor, relevance_like: Tensor, x: Tensor) -> Tensor:
    """total += relevance_like * x in place, with x [N, ...] broadcast over the copies."""
    if total.shape == x.shape:
        return total.addcmul_(relevance_like, x)
    n = x.shape[0]
    _by_copy(total, n).addcmul_(_by_copy(relevance_like, n), x)
    return total


def _repeat_for_copies(x: Tensor, relevance: Tensor) -> Tensor:
    """x [N, ...] repeated copy-major to R's [M * N, ...] rows, for rules that differentiate through the op
    (pooling): a copy of that one value, for that one step."""
    copies = relevance.shape[0] // x.shape[0]
    return x if copies == 1 else x.repeat(copies, *([1] * (x.dim() - 1)))


def _zero_where_undefined(quotient: Tensor) -> tuple[Tensor, Tensor | None]:
    """The quotient with its inf and nan (a zero denominator) set to 0, in place, and where they were.

    The common case, no zero denominator, costs one sum: an inf or nan anywhere makes the sum inf or nan.
    """
    if bool(quotient.sum().isfinite()):
        return quotient, None
    undefined = ~quotient.isfinite()
    return quotient.masked_fill_(undefined, 0.0), undefined


def passthrough(relevance: Tensor) -> Tensor:
    """Element-wise ops (activations, batch norm, dropout, a gate held constant): R is unchanged."""
    return relevance


def pool(relevance: Tensor, x: Tensor, pooling: Callable[[Tensor], Tensor], x_nonnegative: bool = False,
         support: Tensor | None = None) -> Tensor:
    """Max / average / adaptive pooling: x+ = max(x, 0); R_in = x+ * grad_x+[pool(x+)] applied to R/pool(x+).

    Where pool(x+) = 0 (a window of zeros or negatives), the flat rule: R goes where the pooling's gradient of
    a constant input sends it (evenly over an average pooling's window, to one position of a max pooling's),
    never to padding (``support``: 1 where x is a value, 0 where it is padding of a separate pad op).
    ``x_nonnegative``: x is known to be >= 0 (a ReLU's output), so x+ = x needs no copy.
    """
    x_pos = x.detach() if x_nonnegative else x.detach().clamp(min=0)
    x_pos = _repeat_for_copies(x_pos, relevance)
    placed, zero = _gradient_rule(relevance, x_pos, pooling)
    unplaced = _unplaced(relevance, zero)
    if unplaced is not None:
        ones = torch.ones_like(x_pos) if support is None else support.expand_as(x_pos)
        placed = placed + _gradient_rule(unplaced, ones, pooling)[0]
    return placed


def _gradient_rule(relevance: Tensor, x: Tensor, op: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor | None]:
    """x * grad_x[op(x)] applied to R / op(x), and where op(x) was 0 (None: nowhere)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = op(x)
    # a copy of z: the op's backward may read its own output (amax does)
    s, zero = _divide_into(relevance, z.detach().clone())
    (gradient,) = torch.autograd.grad(z, x, s)
    return x.detach() * gradient, zero


def _unplaced(relevance: Tensor, zero: Tensor | None) -> Tensor | None:
    """The relevance that sits where a rule's denominator is 0 (``zero``), which the rule would drop; None if
    there is none. The fallbacks of the rules place it instead (module docstring)."""
    if zero is None:
        return None
    unplaced = relevance * zero
    return unplaced if bool(unplaced.any()) else None


def conv_zplus(relevance: Tensor, x: Tensor, conv: Conv, x_nonnegative: bool = False,
               support: Tensor | None = None) -> Tensor:
    """z = conv(x+, W+) + conv(x-, W-); R_in = x+ * convT(R/z, W+) + x- * convT(R/z, W-).

    Where z = 0 and R is not, the window's negative part, then the flat rule (``_conv_fallback``).
    ``x_nonnegative``: x is known to be >= 0 (a ReLU's output), so it need not be checked. ``support``: 1 where
    x is a value, 0 where it is the padding of a separate pad op (None: no such padding).
    """
    if x_nonnegative or not bool((x < 0).any()):  # after a ReLU, the common case: the x- term vanishes, half the cost
        x_pos, x_neg = x, None
        s, zero = _divide_into(relevance, conv.forward(x, "positive"))
        placed = _times(conv.backward(x.shape, s, "positive"), x)
    else:
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        s, zero = _divide_into(relevance, conv.forward(x_pos, "positive").add_(conv.forward(x_neg, "negative")))
        placed = _times(conv.backward(x.shape, s, "positive"), x_pos)
        _add_times(placed, conv.backward(x.shape, s, "negative"), x_neg)
    unplaced = _unplaced(relevance, zero)
    if unplaced is not None:
        placed.add_(_conv_fallback(unplaced, x_pos, x_neg, conv, support))
    return placed


def _conv_fallback(relevance: Tensor, x_pos: Tensor, x_neg: Tensor | None, conv: Conv,
                   support: Tensor | None) -> Tensor:
    """Relevance at outputs where z+ is 0: in proportion to the window's negative part, x+ W- + x- W+ (a kernel
    with no positive weight, as trained depthwise kernels often are, over positive inputs); where that is 0 too
    (a window of zeros), the flat rule."""
    z = conv.forward(x_pos, "negative")
    if x_neg is not None:
        z.add_(conv.forward(x_neg, "positive"))
    s, zero = _divide_into(relevance, z)
    placed = _times(conv.backward(x_pos.shape, s, "negative"), x_pos)
    if x_neg is not None:
        _add_times(placed, conv.backward(x_pos.shape, s, "positive"), x_neg)
    rest = _unplaced(relevance, zero)
    if rest is not None:
        placed.add_(_flat(rest, conv, x_pos, support))
    return placed


def _flat(relevance: Tensor, conv: Conv, x: Tensor, support: Tensor | None) -> Tensor:
    """LRP's flat rule: each output's relevance in equal shares to the positions of its window that hold a
    value (the layer's own zero padding and a separate pad op's padding get none)."""
    ones = torch.ones_like(x[:1]) if support is None else support
    window_sizes = conv.forward(ones, "ones")
    spread = conv.backward(x.shape, safe_divide(relevance, window_sizes), "ones")
    return spread if support is None else spread.mul_(support)


def conv_zbox(relevance: Tensor, x: Tensor, conv: Conv, support: Tensor | None = None) -> Tensor:
    """z^B for the convolution reading the image, bounds l = min(x), h = max(x) per image.

    z = conv(x, W) - conv(l, W+) - conv(h, W-); s = R/z; R_in = x*convT(s, W) - l*convT(s, W+) - h*convT(s, W-).
    l and h are constant images, so conv(l, W+) = l * conv(1, W+) with the same zero padding; a separate pad
    op's padding (``support`` 0) is padding too: not in the bounds, no l or h there. Where z = 0 (a window at
    its bounds), the flat rule.
    """
    dims = tuple(range(1, x.dim()))
    if support is None:
        ones = torch.ones_like(x[:1])
        low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    else:
        ones, padding = support, support == 0
        low = x.masked_fill(padding, float("inf")).amin(dim=dims, keepdim=True)
        high = x.masked_fill(padding, float("-inf")).amax(dim=dims, keepdim=True)
    z = conv.forward(x, "whole")
    z.addcmul_(low, conv.forward(ones, "positive"), value=-1).addcmul_(high, conv.forward(ones, "negative"), value=-1)
    s, zero = _divide_into(relevance, z)
    back_all, back_pos = conv.backward(x.shape, s, "whole", "positive")
    # with convT(s, W-) = convT(s, W) - convT(s, W+): R_in = convT(s, W) (x - h) + convT(s, W+) (h - l)
    if support is None:
        placed = _add_times(_times(back_all, x - high), back_pos, (high - low).expand_as(x))
    else:
        placed = _add_times(_times(back_all, x - high * support), back_pos, (high - low) * support)
    unplaced = _unplaced(relevance, zero)
    if unplaced is not None:
        placed.add_(_flat(unplaced, conv, x, support))
    return placed


def conv_gamma(relevance: Tensor, x: Tensor, conv: Conv, gamma: float, x_nonnegative: bool = False,
               support: Tensor | None = None) -> Tensor:
    """LRP's generalised gamma rule (Montavon et al. 2019; Andeol et al. 2021; zennit's ``Gamma``), biases ignored.

    Each output j is split by the sign of its bias-free value z_j = conv(x, W)_j. Where z_j > 0, the weights
    W + gamma W+ for x+ and W + gamma W- for x- (the positive contributions favoured); where z_j < 0, W + gamma W-
    for x+ and W + gamma W+ for x-. By linearity the denominators are z + gamma z+ and z + gamma z-, with z+ the
    z+ rule's denominator (x+ W+ + x- W-) and z- its negative part (x+ W- + x- W+): never 0 where z is not, since
    z+ >= 0 >= z-. gamma = 0 is LRP-0 (the gradient times the input); gamma -> infinity tends to z+.

    R_in = x convT(s, W) + gamma (x+ [convT(s_up, W+) + convT(s_down, W-)] + x- [convT(s_up, W-) + convT(s_down, W+)])
    with s_up = R / (z + gamma z+) where z > 0, s_down = R / (z + gamma z-) where z < 0, s = s_up + s_down. Where
    z = 0 (zennit drops the relevance there), ours: the z+ rule and its fallbacks (``conv_zplus``).
    """
    if gamma < 0:
        raise ValueError(f"the gamma rule needs gamma >= 0, got {gamma}")
    x_neg = None if x_nonnegative or not bool((x < 0).any()) else x.clamp(max=0)
    x_pos = x if x_neg is None else x.clamp(min=0)
    z = conv.forward(x, "whole")
    up, down = z > 0, z < 0
    z_plus = conv.forward(x_pos, "positive")
    z_minus = conv.forward(x_pos, "negative")
    if x_neg is not None:
        z_plus.add_(conv.forward(x_neg, "negative"))
        z_minus.add_(conv.forward(x_neg, "positive"))
    s_up, _ = _divide_into(relevance, z_plus.mul_(gamma).add_(z).masked_fill_(~up, 0.0))
    s_down, _ = _divide_into(relevance, z_minus.mul_(gamma).add_(z).masked_fill_(~down, 0.0))
    placed = _times(conv.backward(x.shape, s_up + s_down, "whole"), x)
    if gamma:
        favoured = conv.backward(x.shape, s_up, "positive").add_(conv.backward(x.shape, s_down, "negative"))
        placed = _add_times(placed, favoured.mul_(gamma), x_pos)
        if x_neg is not None:
            opposed = conv.backward(x.shape, s_up, "negative").add_(conv.backward(x.shape, s_down, "positive"))
            placed = _add_times(placed, opposed.mul_(gamma), x_neg)
    flat_zero = z == 0
    if bool(flat_zero.any()):
        unplaced = _unplaced(relevance, _by_copy_mask(flat_zero, relevance))
        if unplaced is not None:
            placed.add_(conv_zplus(unplaced, x, conv, x_nonnegative=x_neg is None, support=support))
    return placed


def conv_epsilon(relevance: Tensor, x: Tensor, conv: Conv, epsilon: float) -> Tensor:
    """LRP's epsilon rule (Bach et al. 2015; zennit's ``Epsilon``), biases ignored: z = conv(x, W),
    R_in = x convT(R / (z + epsilon sign(z)), W) with sign(0) = +1 (zennit's stabiliser).

    Not conservative: each output keeps the share epsilon / (|z| + epsilon) of its relevance (absorbed: weak or
    contradictory outputs pass on less). zennit's default keeps the bias in z, which absorbs more; ours ignores
    it, as every rule here does, so only epsilon absorbs.
    """
    if not epsilon > 0:
        raise ValueError(f"the epsilon rule needs epsilon > 0, got {epsilon}")
    z = conv.forward(x, "whole")
    z.add_(torch.where(z < 0, -epsilon, epsilon))
    s, _ = _divide_into(relevance, z)
    return _times(conv.backward(x.shape, s, "whole"), x)


def _by_copy_mask(mask: Tensor, relevance: Tensor) -> Tensor:
    """A mask [N, ...] of the forward values for relevance [M * N, ...] (its copies share it)."""
    return mask if mask.shape == relevance.shape else _flat_copies(
        mask.expand(relevance.shape[0] // mask.shape[0], *mask.shape), relevance.shape)


def linear_zplus(relevance: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """The z+ rule of a fully connected layer, with the convolution's fallbacks: the conv rule with 1x1 'pixels'."""
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    s, zero = _divide_into(relevance, F.linear(x_pos, w_pos) + F.linear(x_neg, w_neg))
    placed = _add_times(_times(s @ w_pos, x_pos), s @ w_neg, x_neg)
    unplaced = _unplaced(relevance, zero)
    if unplaced is not None:  # the negative part, then evenly over the inputs
        s, zero = _divide_into(unplaced, F.linear(x_pos, w_neg) + F.linear(x_neg, w_pos))
        placed = _add_times(_add_times(placed, s @ w_neg, x_pos), s @ w_pos, x_neg)
        rest = _unplaced(unplaced, zero)
        if rest is not None:
            placed = placed + rest.sum(dim=-1, keepdim=True) / x.shape[-1]
    return placed


def split_sum(relevance: Tensor, summands: Sequence[Tensor]) -> list[Tensor]:
    """A sum of tensors (a residual addition): R_i = a_i * R / sum_j a_j, so the parts add up to R; where the
    summands add up to 0, R is split evenly among them."""
    total = functools.reduce(operator.add, summands)
    images = summands[0].shape[0]
    if relevance.shape[0] != images and relevance.dim() == total.dim():  # several copies of R per image
        grouped = _by_copy(relevance, images)
        s, zero = _zero_where_undefined(grouped / total)
        unplaced = _unplaced(grouped, zero)
        parts = [_flat_copies((a * s).sum_to_size(grouped.shape[0], *a.shape), (-1, *a.shape[1:]))
                 for a in summands]
        if unplaced is not None:
            share = unplaced / len(summands)
            parts = [part.add_(_flat_copies(share.sum_to_size(grouped.shape[0], *a.shape), part.shape))
                     for part, a in zip(parts, summands)]
        return parts
    if len(summands) > 1 and total.shape == relevance.shape:  # the sum is a new tensor: divide over it
        s, zero = _divide_into(relevance, total)
    else:  # one summand beside a constant, or a sum that broadcasts to R
        s, zero = _zero_where_undefined(relevance / total)
    unplaced = _unplaced(relevance, zero)
    *first, last = summands
    parts = [(a * s).sum_to_size(a.shape) for a in first] + [s.mul_(last).sum_to_size(last.shape)]
    if unplaced is not None:
        share = unplaced / len(summands)
        parts = [part.add_(share.sum_to_size(part.shape)) for part in parts]
    return parts


def move(relevance: Sequence[Tensor | None], inputs: Sequence[Tensor],
         op: Callable[..., Tensor | Sequence[Tensor]]) -> list[Tensor]:
    """Data movement (cat, slicing, reshape, permute, chunk, pad ...): R goes back where each value came from.

    These ops are linear and only move entries, so the vector-Jacobian product routes R exactly.
    ``relevance`` holds one entry per output (None where an output received none).
    """
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    with torch.enable_grad():
        out = op(*leaves)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    pairs = [(o, r) for o, r in zip(outs, relevance) if r is not None]
    copies = _copies_of(pairs)
    per_copy = []
    for m in range(copies):  # the op is replayed at N images (its arguments may name N): one product per copy
        grads = torch.autograd.grad([o for o, _ in pairs], leaves,
                                    [r if copies == 1 else r[m * len(o):(m + 1) * len(o)] for o, r in pairs],
                                    allow_unused=True, retain_graph=m < copies - 1)
        per_copy.append([torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)])
    return per_copy[0] if copies == 1 else [torch.cat(parts) for parts in zip(*per_copy)]


def _copies_of(pairs: list[tuple[Tensor, Tensor]]) -> int:
    """How many relevance copies per image the outputs of a data movement carry (1 but for channel maps)."""
    output, relevance = pairs[0]
    if relevance.shape == output.shape:
        return 1
    if relevance.shape[1:] != output.shape[1:] or relevance.shape[0] % max(output.shape[0], 1):
        raise ValueError(f"relevance of shape {tuple(relevance.shape)} does not stack copies of the output "
                         f"{tuple(output.shape)} along its first dimension (an op that moves the batch dimension)")
    return relevance.shape[0] // output.shape[0]
