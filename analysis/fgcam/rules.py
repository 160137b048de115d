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
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator with 0 wherever the denominator is 0 (the reference's 0/0 = 0).

    A zero denominator gives inf or nan, which are replaced by 0: two passes over the tensor instead of
    three (the quotient of two finite float32 numbers cannot overflow to inf in practice).
    """
    return (numerator / denominator).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _has_zero(t: Tensor) -> bool:
    return int(torch.count_nonzero(t)) < t.numel()


def passthrough(relevance: Tensor) -> Tensor:
    """Element-wise ops (activations, batch norm, dropout, a gate held constant): R is unchanged."""
    return relevance


def pool(relevance: Tensor, x: Tensor, pooling: Callable[[Tensor], Tensor], output: Tensor) -> Tensor:
    """Max / average / adaptive pooling: x+ = max(x, 0); R_in = x+ * grad_x+[pool(x+)] applied to R/pool(x+).

    ``output`` is the op's value in the forward pass (for the flat rule of ``_unplaced``).
    """
    x_pos = x.detach().clamp(min=0)
    placed, z = _gradient_rule(relevance, x_pos, pooling)
    unplaced = _unplaced(relevance, z, output)
    if unplaced is not None:  # a window with no positive input that still carries relevance
        placed = placed + _gradient_rule(unplaced, torch.ones_like(x_pos), pooling)[0]
    return placed


def _gradient_rule(relevance: Tensor, x: Tensor, op: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """x * grad_x[op(x)] applied to R / op(x), and op(x)."""
    x = x.requires_grad_(True)
    with torch.enable_grad():
        z = op(x)
    (gradient,) = torch.autograd.grad(z, x, safe_divide(relevance, z.detach()))
    return x.detach() * gradient, z.detach()


def _unplaced(relevance: Tensor, z: Tensor, output: Tensor) -> Tensor | None:
    """Relevance on a non-zero activation that a rule cannot place (its denominator is 0), or None.

    Ours, beyond the reference: it happens where an activation is carried by the bias alone (a depthwise
    window of zeros) or where a pooling window holds only negatives; the reference drops it (it never
    happens on VGG, where pooling follows a ReLU). We spread it evenly over the window (LRP's flat rule),
    so that relevance is conserved. Relevance on an activation that is exactly zero (denoised components
    can put some there) is dropped, as in the reference.
    """
    if not _has_zero(z):  # the common case, checked first because it costs one reduction
        return None
    unplaced = relevance * ((z == 0) & (output != 0))
    return unplaced if bool(unplaced.any()) else None


class ConvGeometry:
    """Stride, padding, dilation and groups of a 2-d convolution, with its forward and transposed product."""

    def __init__(self, stride, padding, dilation, groups: int, kernel_size: Sequence[int]) -> None:
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
        self.stride, self.dilation, self.groups = pair(stride), pair(dilation), groups
        if padding == "valid":
            padding = 0
        elif padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, kernel_size)]
            if any(t % 2 for t in total):
                raise ValueError("padding='same' with an even receptive field is asymmetric")
            padding = tuple(t // 2 for t in total)
        self.padding = pair(padding)
        self.kernel_size = tuple(kernel_size)

    # Both products run in channels-last layout: oneDNN's convolutions are about a third faster in it on
    # CPU (bench/bench_engine.py), and the results are the same numbers.
    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(_channels_last(x), _channels_last(weight), None, self.stride, self.padding,
                        self.dilation, self.groups)

    def backward(self, shape: torch.Size, weight: Tensor, s: Tensor) -> Tensor:
        """The transposed convolution convT(s, W), sized to the input ``shape``."""
        output_padding = tuple(
            size - ((out - 1) * stride - 2 * pad + dil * (k - 1) + 1)
            for size, out, stride, pad, dil, k in zip(shape[2:], s.shape[2:], self.stride, self.padding,
                                                       self.dilation, self.kernel_size))
        return F.conv_transpose2d(_channels_last(s), _channels_last(weight), None, self.stride, self.padding,
                                  output_padding, self.groups, self.dilation)


def _channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def conv_zplus(relevance: Tensor, x: Tensor, weight: Tensor, geometry: ConvGeometry, output: Tensor) -> Tensor:
    """z = conv(x+, W+) + conv(x-, W-); R_in = x+ * convT(R/z, W+) + x- * convT(R/z, W-).

    ``output`` is the convolution's value in the forward pass, bias included (for ``_unplaced``).
    """
    w_pos = weight.clamp(min=0)
    if not bool((x < 0).any()):  # after a ReLU, the common case: the x- term vanishes, half the cost
        z = geometry.forward(x, w_pos)
        placed = x * geometry.backward(x.shape, w_pos, safe_divide(relevance, z))
    else:
        x_pos, x_neg, w_neg = x.clamp(min=0), x.clamp(max=0), weight.clamp(max=0)
        z = geometry.forward(x_pos, w_pos) + geometry.forward(x_neg, w_neg)
        s = safe_divide(relevance, z)
        placed = x_pos * geometry.backward(x.shape, w_pos, s) + x_neg * geometry.backward(x.shape, w_neg, s)
    unplaced = _unplaced(relevance, z, output)
    if unplaced is not None:
        ones, flat = torch.ones_like(x[:1]), torch.ones_like(weight)
        placed = placed + geometry.backward(x.shape, flat, safe_divide(unplaced, geometry.forward(ones, flat)))
    return placed


def conv_zbox(relevance: Tensor, x: Tensor, weight: Tensor, geometry: ConvGeometry) -> Tensor:
    """z^B for the convolution reading the image, bounds l = min(x), h = max(x) per image.

    z = conv(x, W) - conv(l, W+) - conv(h, W-); s = R/z; R_in = x*convT(s, W) - l*convT(s, W+) - h*convT(s, W-).
    l and h are constant images, so conv(l, W+) = l * conv(1, W+) with the same zero padding.
    """
    dims = tuple(range(1, x.dim()))
    low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    ones = torch.ones_like(x[:1])
    z = geometry.forward(x, weight) - low * geometry.forward(ones, w_pos) - high * geometry.forward(ones, w_neg)
    s = safe_divide(relevance, z)
    back_all, back_pos = geometry.backward(x.shape, weight, s), geometry.backward(x.shape, w_pos, s)
    return x * back_all - low * back_pos - high * (back_all - back_pos)  # convT(s, W-) = convT(s, W) - convT(s, W+)


def linear_zplus(relevance: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """The z+ rule of a fully connected layer: the conv rule with 1x1 'pixels'."""
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    s = safe_divide(relevance, F.linear(x_pos, w_pos) + F.linear(x_neg, w_neg))
    return x_pos * (s @ w_pos) + x_neg * (s @ w_neg)


def split_sum(relevance: Tensor, summands: Sequence[Tensor]) -> list[Tensor]:
    """A sum of tensors (a residual addition): R_i = a_i * R / sum_j a_j, so the parts add up to R."""
    s = safe_divide(relevance, functools.reduce(operator.add, summands))
    return [(a * s).sum_to_size(a.shape) for a in summands]


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
