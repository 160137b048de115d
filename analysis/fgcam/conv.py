"""Convolution products for the engine: conv(x, W) and its transpose convT(s, W), for a layer's weight and
the weight's signed parts W+ and W-.

Machinery, not method: the rules (``rules.py``) say which products they need; this module makes them fast.

* Everything runs in channels-last layout: oneDNN's convolutions are fastest in it on CPU, and the engine's
  activations are in it already (``explainer._on_model``).
* On CPU in float32 (oneDNN), each weight is packed once into oneDNN's own blocked layout. ``F.conv2d``
  repeats that reorder on every call, and at batch 1 in a network's deep layers it costs more than the
  convolution itself (ResNet-50's 3x3 convolutions at 7 x 7: 0.44 ms packed, 0.82 ms from a channels-last
  weight, 3.9 ms from the model's own; ``bench/bench_engine.py`` shows the whole effect). The packed
  products give the same numbers. Elsewhere (GPU, float64) the plain torch ops run.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


@functools.cache
def _onednn_available() -> bool:
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:  # private ops (the ones torch.compile uses on CPU): check that this build has them
        return all(callable(getattr(torch.ops.mkldnn, name)) for name in (
            "_reorder_convolution_weight", "_convolution_pointwise",
            "_reorder_convolution_transpose_weight", "_convolution_transpose_pointwise"))
    except (AttributeError, RuntimeError):
        return False


class Conv:
    """A 2-d convolution layer's weight, its signed parts and its geometry, with the forward and transposed
    products. The engine keeps one per layer for as long as the weight is unchanged (``graph.ModelGraph.conv``).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                 groups: int = 1) -> None:
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.stride, self.dilation, self.groups = _pair(stride), _pair(dilation), groups
        self.kernel_size = tuple(weight.shape[2:])
        if padding == "valid":
            padding = 0
        elif padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            if any(t % 2 for t in total):
                raise ValueError("padding='same' with an even receptive field is asymmetric")
            padding = tuple(t // 2 for t in total)
        self.padding = _pair(padding)
        self.packs = (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 4
                      and _onednn_available())
        self._parts: dict[str, Tensor] = {}
        self._packed: dict[tuple, Tensor] = {}

    def part(self, name: str) -> Tensor:
        """The weight ("whole"), W+ ("positive"), W- ("negative"), or all ones ("ones", the flat rule), in
        channels-last layout; kept where the products use it as it is (packing keeps its own copy)."""
        if name in self._parts:
            return self._parts[name]
        weight = channels_last(self.weight)
        value = {"whole": lambda: weight, "positive": lambda: weight.clamp(min=0),
                 "negative": lambda: weight.clamp(max=0), "ones": lambda: torch.ones_like(weight)}[name]()
        if not self.packs:
            self._parts[name] = value
        return value

    def output(self, x: Tensor) -> Tensor:
        """The layer's output: conv(x, W) + bias."""
        return self.forward(x, "whole", self.bias)

    def forward(self, x: Tensor, part: str, bias: Tensor | None = None) -> Tensor:
        """conv(x, part) (+ bias) with this layer's geometry."""
        x = channels_last(x)
        if self.packs_for(x):
            packed = self._pack(("forward", part), lambda: torch.ops.mkldnn._reorder_convolution_weight(
                self.part(part), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(x.shape)))
            return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, list(self.padding), list(self.stride),
                                                           list(self.dilation), self.groups, "none", [], "")
        return F.conv2d(x, self.part(part), bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, shape: torch.Size, s: Tensor, *parts: str) -> Tensor | tuple[Tensor, ...]:
        """The transposed convolution convT(s, part), sized to the layer's input ``shape``; for several parts,
        one transposed convolution with their weights side by side (a convolution with few output channels,
        the image's, costs the same for twice as many), split."""
        output_padding = tuple(
            size - ((out - 1) * stride - 2 * pad + dil * (k - 1) + 1)
            for size, out, stride, pad, dil, k in zip(shape[2:], s.shape[2:], self.stride, self.padding,
                                                       self.dilation, self.kernel_size))
        if len(parts) > 1 and self.groups != 1:  # side by side would mix the groups
            return tuple(self.backward(shape, s, part) for part in parts)
        s = channels_last(s)
        if self.packs_for(s):
            packed = self._pack(("backward", parts, output_padding),
                                lambda: torch.ops.mkldnn._reorder_convolution_transpose_weight(
                                    self._side_by_side(parts), list(self.padding), list(output_padding),
                                    list(self.stride), list(self.dilation), self.groups, list(s.shape)))
            out = torch.ops.mkldnn._convolution_transpose_pointwise(
                s, packed, None, list(self.padding), list(output_padding), list(self.stride), list(self.dilation),
                self.groups, "none", [], "")
        else:
            out = F.conv_transpose2d(s, self._side_by_side(parts), None, self.stride, self.padding, output_padding,
                                     self.groups, self.dilation)
        return out if len(parts) == 1 else out.split(shape[1], dim=1)

    def _side_by_side(self, parts: tuple[str, ...]) -> Tensor:
        # conv_transpose2d's weight is [in, out / groups, kh, kw]: more parts, more output channels
        return self.part(parts[0]) if len(parts) == 1 else channels_last(torch.cat([self.part(p) for p in parts], 1))

    def packs_for(self, x: Tensor) -> bool:
        """Whether the products on ``x`` run with packed weights (they have no autograd: not for x that needs
        a gradient)."""
        return self.packs and x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad

    def _pack(self, key: tuple, make) -> Tensor:
        # a packed weight serves every batch size and image size (packing only picks oneDNN's layout)
        if key not in self._packed:
            self._packed[key] = make()
        return self._packed[key]
