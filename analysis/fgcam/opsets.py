"""Sets of ops (module classes, functions, tensor methods) and what they are, not how relevance crosses
them: outputs that are >= 0 by construction, the ops that mix pixels, gates of a product, and the ops the
graph's search for the CAM layer walks through. The graph (``graph.py``) and the rules table (``ops.py``)
both read these; this module reads neither, so the two do not import each other."""
from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


class UnsupportedOperation(RuntimeError):
    """The engine met an operation it has no relevance rule for (never a silently wrong map)."""


def qualified_name(thing: Any) -> str:
    return f"{getattr(thing, '__module__', '')}.{getattr(thing, '__qualname__', '')}"


@dataclass(frozen=True)
class Ops:
    """A set of ops: module classes (subclasses included), functions, and tensor method names. A module class
    or function may also be named by its qualified name (`named`), so that a library is not imported to name
    its ops: importing torchvision costs a `python -m analysis` command 2 s, and a model that has torchvision's
    ops has imported it already."""
    modules: tuple[type, ...] = ()
    functions: frozenset = frozenset()
    methods: frozenset = frozenset()
    named: frozenset = frozenset()

    def __or__(self, other: "Ops") -> "Ops":
        return Ops(self.modules + other.modules, self.functions | other.functions, self.methods | other.methods,
                   self.named | other.named)

    def match(self, node: fx.Node, module: nn.Module | None) -> bool:
        if node.op == "call_module":
            return isinstance(module, self.modules) or any(qualified_name(kind) in self.named
                                                           for kind in type(module).__mro__)
        if node.op == "call_function":
            return node.target in self.functions or qualified_name(node.target) in self.named
        return node.op == "call_method" and node.target in self.methods


def ops(modules: Iterable[type] = (), functions: Iterable[Any] = (), methods: Iterable[str] = (),
        named: Iterable[str] = ()) -> Ops:
    return Ops(tuple(modules), frozenset(functions), frozenset(methods), frozenset(named))


# --------------------------------------------------------------------------------------------------- op sets
CONVOLUTIONS = ops([nn.Conv2d], [F.conv2d, torch.conv2d])
LINEAR = ops([nn.Linear], [F.linear])
MIXES_PIXELS = CONVOLUTIONS | LINEAR | ops([nn.Conv1d, nn.Conv3d])  # the ops after which a value is no longer the image
RECTIFIERS = ops(  # element-wise, with outputs >= 0 whatever the input
    [nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid],
    [F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid],
    ["relu", "relu_", "sigmoid", "sigmoid_"])
NONNEGATIVE = RECTIFIERS | ops([nn.Softmax], [torch.softmax, F.softmax], ["softmax"])
ELEMENTWISE = RECTIFIERS | ops(  # activations, normalisations, casts: one value in, one value out
    [nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardtanh,
     nn.Softplus, nn.Tanh, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
     nn.LayerNorm, nn.InstanceNorm2d, nn.AlphaDropout],
    [F.alpha_dropout, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardtanh, F.softplus,
     torch.tanh, F.tanh, F.batch_norm, F.group_norm, F.layer_norm, F.instance_norm, torch.clone, torch.clamp,
     torch.clip],
    ["tanh", "clone", "clamp", "clamp_", "clamp_min", "clamp_min_", "clip", "hardtanh_", "detach", "to", "float",
     "type_as"])
IDENTITIES = ops(  # no value changes at inference (and no sign changes in training)
    [nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity], [F.dropout, F.dropout2d],
    named=["torchvision.ops.stochastic_depth.StochasticDepth", "torchvision.ops.stochastic_depth.stochastic_depth"])
POOLS = ops(
    [nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
     nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d],
    [F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.max_pool1d, F.avg_pool1d,
     torch.max_pool2d, torch.avg_pool1d, torch.mean, torch.amax],
    ["mean", "amax"])
PADS = ops([nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d],
           [F.pad, torch.constant_pad_nd])
MOVES = PADS | ops(  # ops that only move, copy or select entries
    [nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle],
    [torch.flatten, torch.reshape, torch.cat, torch.concat, torch.concatenate, torch.stack, torch.permute,
     torch.transpose, torch.swapaxes, torch.swapdims, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
     torch.narrow, torch.movedim, torch.channel_shuffle, F.pixel_shuffle, operator.getitem],
    ["view", "reshape", "flatten", "permute", "transpose", "swapaxes", "swapdims", "contiguous", "squeeze",
     "unsqueeze", "chunk", "split", "narrow", "view_as", "reshape_as", "expand", "expand_as", "repeat", "movedim",
     "__getitem__"])
ADDS = ops(functions=[operator.add, operator.iadd, torch.add], methods=["add", "add_", "__add__", "__radd__"])
SUBS = ops(functions=[operator.sub, operator.isub, torch.sub], methods=["sub", "sub_"])
MULS = ops(functions=[operator.mul, operator.imul, torch.mul], methods=["mul", "mul_"])
DIVS = ops(functions=[operator.truediv, operator.itruediv, torch.div], methods=["div", "div_"])
GATES = ops([nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Tanh],
            [torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.softmax, F.softmax, torch.tanh, F.tanh],
            ["sigmoid", "softmax", "tanh", "hardsigmoid"])

# The graph's search for the default CAM layer (graph.default_cam_layer): ops that turn a spatial map into a
# vector (the head starts at the first), layers of a head above them, and layers that change no value.
REDUCING = ops([nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten],
               [F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d,
                torch.flatten, torch.reshape, torch.mean, torch.amax, torch.squeeze],
               ["view", "reshape", "flatten", "mean", "amax", "squeeze"])
HEAD = ops([nn.Linear, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.BatchNorm1d, nn.LayerNorm],
           [F.linear, F.relu, torch.relu])
TRANSPARENT = ops([nn.Dropout, nn.Identity], [F.dropout])


def argument(node: fx.Node, env: Mapping, index: int, name: str, default: Any) -> Any:
    """The value of a call's argument, given by position ``index`` or by keyword ``name``."""
    value = node.args[index] if len(node.args) > index else node.kwargs.get(name, default)
    return env[value] if isinstance(value, fx.Node) else value
