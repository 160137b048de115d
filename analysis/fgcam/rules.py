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
    (None: nowhere)."""
    return _zero_where_undefined(torch.div(relevance, z, out=z))


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
        placed = conv.backward(x.shape, s, "positive").mul_(x)
    else:
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        s, zero = _divide_into(relevance, conv.forward(x_pos, "positive").add_(conv.forward(x_neg, "negative")))
        placed = conv.backward(x.shape, s, "positive").mul_(x_pos)
        placed.addcmul_(conv.backward(x.shape, s, "negative"), x_neg)
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
    placed = conv.backward(x_pos.shape, s, "negative").mul_(x_pos)
    if x_neg is not None:
        placed.addcmul_(conv.backward(x_pos.shape, s, "positive"), x_neg)
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
        placed = back_all.mul_(x - high).addcmul_(back_pos, high - low)
    else:
        placed = back_all.mul_(x - high * support).addcmul_(back_pos, (high - low) * support)
    unplaced = _unplaced(relevance, zero)
    if unplaced is not None:
        placed.add_(_flat(unplaced, conv, x, support))
    return placed


def linear_zplus(relevance: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """The z+ rule of a fully connected layer, with the convolution's fallbacks: the conv rule with 1x1 'pixels'."""
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    s, zero = _zero_where_undefined(relevance / (F.linear(x_pos, w_pos) + F.linear(x_neg, w_neg)))
    placed = x_pos * (s @ w_pos) + x_neg * (s @ w_neg)
    unplaced = _unplaced(relevance, zero)
    if unplaced is not None:  # the negative part, then evenly over the inputs
        s, zero = _zero_where_undefined(unplaced / (F.linear(x_pos, w_neg) + F.linear(x_neg, w_pos)))
        placed = placed + x_pos * (s @ w_neg) + x_neg * (s @ w_pos)
        rest = _unplaced(unplaced, zero)
        if rest is not None:
            placed = placed + rest.sum(dim=-1, keepdim=True) / x.shape[-1]
    return placed


def split_sum(relevance: Tensor, summands: Sequence[Tensor]) -> list[Tensor]:
    """A sum of tensors (a residual addition): R_i = a_i * R / sum_j a_j, so the parts add up to R; where the
    summands add up to 0, R is split evenly among them."""
    total = functools.reduce(operator.add, summands)
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
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [r for _, r in pairs], allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
