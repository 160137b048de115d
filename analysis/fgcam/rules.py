"""Relevance rules of FG-CAM's resolution increase, each mapping relevance R at an op's output to its inputs.

From the paper (Qiu, Jin, Zhang, AAAI 2024, arXiv 2303.09171) and its reference code:
``passthrough`` (activations, batch norm, dropout), ``pool`` (max / average pooling, z+ through the
pooling of x+), ``conv_zplus`` (LRP alpha1-beta0 on the positive and negative parts of x) and
``conv_zbox`` (the z^B rule for the convolution that reads the image). 0/0 is 0, no epsilon; biases are
ignored.

Ours, beyond the reference (which handles only VGG): ``split_sum`` (residual additions share R in
proportion to each summand's contribution, conserving the total), ``move`` (concatenation, slicing,
reshape, flatten, permute ... route R back exactly, through the op's vector-Jacobian product, so
concatenation splits by slices), multiplicative gates such as squeeze-excitation pass R to the gated
features with the gate held constant (``passthrough`` on the feature input), ``linear_zplus`` (z+ for
fully connected layers, used when relevance starts at the logit), convolutions with any stride,
padding, dilation and groups, and the flat rule for relevance that z+ cannot place (``_unplaced``).

The rules never write into the relevance or the values they are given; they divide and multiply over
temporaries of their own, because on CPU a new activation-sized tensor costs more than the arithmetic on it.
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


def pool(relevance: Tensor, x: Tensor, pooling: Callable[[Tensor], Tensor], output: Tensor,
         x_nonnegative: bool = False) -> Tensor:
    """Max / average / adaptive pooling: x+ = max(x, 0); R_in = x+ * grad_x+[pool(x+)] applied to R/pool(x+).

    ``output`` is the op's value in the forward pass (for the flat rule of ``_unplaced``);
    ``x_nonnegative``: x is known to be >= 0 (a ReLU's output), so x+ = x needs no copy.
    """
    x_pos = x.detach() if x_nonnegative else x.detach().clamp(min=0)
    placed, zero = _gradient_rule(relevance, x_pos, pooling)
    unplaced = _unplaced(relevance, zero, output)
    if unplaced is not None:  # a window with no positive input that still carries relevance
        placed = placed + _gradient_rule(unplaced, torch.ones_like(x_pos), pooling)[0]
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


def _unplaced(relevance: Tensor, zero: Tensor | None, output: Tensor) -> Tensor | None:
    """Relevance on a non-zero activation that a rule cannot place (its denominator ``zero`` is 0), or None.

    Ours, beyond the reference: it happens where an activation is carried by the bias alone (a depthwise
    window of zeros) or where a pooling window holds only negatives; the reference drops it (it never
    happens on VGG, where pooling follows a ReLU). We spread it evenly over the window (LRP's flat rule),
    so that relevance is conserved. Relevance on an activation that is exactly zero (denoised components
    can put some there) is dropped, as in the reference.
    """
    if zero is None:
        return None
    unplaced = relevance * (zero & (output != 0))
    return unplaced if bool(unplaced.any()) else None


def conv_zplus(relevance: Tensor, x: Tensor, conv: Conv, x_nonnegative: bool = False) -> Tensor:
    """z = conv(x+, W+) + conv(x-, W-); R_in = x+ * convT(R/z, W+) + x- * convT(R/z, W-).

    ``x_nonnegative``: x is known to be >= 0 (a ReLU's output), so it need not be checked. Where some z is 0,
    the flat rule (``_unplaced``) needs the layer's output: it is recomputed then, rather than kept for all.
    """
    if x_nonnegative or not bool((x < 0).any()):  # after a ReLU, the common case: the x- term vanishes, half the cost
        s, zero = _divide_into(relevance, conv.forward(x, "positive"))
        placed = conv.backward(x.shape, s, "positive").mul_(x)
    else:
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        s, zero = _divide_into(relevance, conv.forward(x_pos, "positive").add_(conv.forward(x_neg, "negative")))
        placed = conv.backward(x.shape, s, "positive").mul_(x_pos)
        placed.addcmul_(conv.backward(x.shape, s, "negative"), x_neg)
    unplaced = None if zero is None else _unplaced(relevance, zero, conv.output(x))
    if unplaced is not None:  # the flat rule: an even share of each window
        window_sizes = conv.forward(torch.ones_like(x[:1]), "ones")
        placed = placed + conv.backward(x.shape, safe_divide(unplaced, window_sizes), "ones")
    return placed


def conv_zbox(relevance: Tensor, x: Tensor, conv: Conv) -> Tensor:
    """z^B for the convolution reading the image, bounds l = min(x), h = max(x) per image.

    z = conv(x, W) - conv(l, W+) - conv(h, W-); s = R/z; R_in = x*convT(s, W) - l*convT(s, W+) - h*convT(s, W-).
    l and h are constant images, so conv(l, W+) = l * conv(1, W+) with the same zero padding.
    """
    dims = tuple(range(1, x.dim()))
    low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    ones = torch.ones_like(x[:1])
    z = conv.forward(x, "whole")
    z.addcmul_(low, conv.forward(ones, "positive"), value=-1).addcmul_(high, conv.forward(ones, "negative"), value=-1)
    s, _ = _divide_into(relevance, z)
    back_all, back_pos = conv.backward(x.shape, s, "whole", "positive")
    # with convT(s, W-) = convT(s, W) - convT(s, W+): R_in = convT(s, W) (x - h) + convT(s, W+) (h - l)
    return back_all.mul_(x - high).addcmul_(back_pos, high - low)


def linear_zplus(relevance: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """The z+ rule of a fully connected layer: the conv rule with 1x1 'pixels'."""
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    s = safe_divide(relevance, F.linear(x_pos, w_pos) + F.linear(x_neg, w_neg))
    return x_pos * (s @ w_pos) + x_neg * (s @ w_neg)


def split_sum(relevance: Tensor, summands: Sequence[Tensor]) -> list[Tensor]:
    """A sum of tensors (a residual addition): R_i = a_i * R / sum_j a_j, so the parts add up to R."""
    total = functools.reduce(operator.add, summands)
    if len(summands) > 1 and total.shape == relevance.shape:  # the sum is a new tensor: divide over it
        s, _ = _divide_into(relevance, total)
    else:  # one summand beside a constant, or a sum that broadcasts to R
        s = safe_divide(relevance, total)
    *first, last = summands
    return [(a * s).sum_to_size(a.shape) for a in first] + [s.mul_(last).sum_to_size(last.shape)]


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
