"""Which rule each op of the graph gets, and the walk that carries relevance from one node down to another.

The mapping is by op, never by architecture: any CNN written with ordinary torch.nn modules and
functional calls works. An op with no rule raises ``UnsupportedOperation`` naming it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision.ops
from torch import Tensor, nn

from . import rules
from .graph import ModelGraph, UnsupportedOperation, argument

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                 nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid,
                 nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
                 nn.InstanceNorm2d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
                 torchvision.ops.StochasticDepth)
_PASS_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu,
                   F.silu, F.mish, F.hardswish, F.hardtanh, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh,
                   F.tanh, F.hardsigmoid, F.batch_norm, F.group_norm, F.layer_norm, F.instance_norm, F.dropout,
                   F.dropout2d, F.alpha_dropout, torch.clone, torch.clamp, torch.clip,
                   torchvision.ops.stochastic_depth}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clone", "clamp", "clamp_", "clamp_min",
                 "clamp_min_", "clip", "hardtanh_", "detach", "to", "float", "type_as"}
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.max_pool1d,
                   F.avg_pool1d, torch.max_pool2d, torch.avg_pool1d, torch.mean, torch.amax}
_POOL_METHODS = {"mean", "amax"}
_MOVE_MODULES = (nn.Flatten, nn.Unflatten, nn.ZeroPad2d, nn.ConstantPad2d, nn.ChannelShuffle, nn.PixelShuffle,
                 nn.PixelUnshuffle)
_MOVE_FUNCTIONS = {torch.flatten, torch.reshape, torch.cat, torch.concat, torch.concatenate, torch.stack,
                   torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
                   torch.narrow, torch.movedim, torch.channel_shuffle, F.pixel_shuffle, F.pad, operator.getitem}
_MOVE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                 "chunk", "split", "narrow", "view_as", "reshape_as", "expand", "expand_as", "repeat",
                 "movedim", "__getitem__"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Tanh)
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.softmax, F.softmax, torch.tanh, F.tanh,
                   "sigmoid", "softmax", "tanh", "hardsigmoid"}


_NONNEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_NONNEGATIVE_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, torch.sigmoid, F.sigmoid,
                          F.hardsigmoid, torch.softmax, F.softmax}
_NONNEGATIVE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "softmax"}
# Ops whose output is >= 0 when all their inputs are: pooling and data movement (except padding with a
# value of the caller's), dropout, identity.
_SIGN_KEEPING_KINDS = {"pool", "move"}
_SIGN_KEEPING_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)


def _kind(graph: ModelGraph, node: fx.Node) -> str | None:
    """Which rule ``node``'s op gets: conv, linear, pass, pool, move, add, sub, mul, div; None for no rule."""
    module = graph.module(node)
    target = node.target
    is_fn, is_method = node.op == "call_function", node.op == "call_method"
    if isinstance(module, nn.Conv2d) or (is_fn and target in (F.conv2d, torch.conv2d)):
        return "conv"
    if isinstance(module, nn.Linear) or (is_fn and target is F.linear):
        return "linear"
    if isinstance(module, _PASS_MODULES) or (is_fn and target in _PASS_FUNCTIONS) or \
            (is_method and target in _PASS_METHODS):
        return "pass"
    if isinstance(module, _POOL_MODULES) or (is_fn and target in _POOL_FUNCTIONS) or \
            (is_method and target in _POOL_METHODS):
        return "pool"
    if isinstance(module, _MOVE_MODULES) or (is_fn and target in _MOVE_FUNCTIONS) or \
            (is_method and target in _MOVE_METHODS):
        return "move"
    op = target if (is_fn or is_method) else None
    for kind, ops in (("add", _ADD), ("sub", _SUB), ("mul", _MUL), ("div", _DIV)):
        if op in ops:
            return kind
    return None


def _is_nonnegative(graph: ModelGraph, node: fx.Node, kind: str | None, known: set[fx.Node]) -> bool:
    """Whether ``node``'s value is >= 0 by construction, given the nodes ``known`` to be."""
    module = graph.module(node)
    if isinstance(module, _NONNEGATIVE_MODULES) or \
            (node.op == "call_function" and node.target in _NONNEGATIVE_FUNCTIONS) or \
            (node.op == "call_method" and node.target in _NONNEGATIVE_METHODS):
        return True
    keeps_sign = (kind in _SIGN_KEEPING_KINDS or isinstance(module, _SIGN_KEEPING_MODULES)) and \
        not isinstance(module, nn.ConstantPad2d) and node.target is not F.pad
    return keeps_sign and bool(node.all_input_nodes) and all(n in known for n in node.all_input_nodes)


@dataclass(frozen=True)
class WalkPlan:
    """What a walk from ``high`` down to ``low`` visits and reads, worked out once per graph from its ops.

    The forward run keeps real values only where a rule reads them (``values``) and meta stand-ins where the
    walk checks only type and size (``shapes``); the walk drops each value after its last reader
    (``release``). Keeping less is also what lets the model's in-place ops overwrite values (graph.py).
    """
    order: tuple[fx.Node, ...]                       # the path, from high to low
    values: frozenset[fx.Node]
    shapes: frozenset[fx.Node]
    release: dict[fx.Node, tuple[fx.Node, ...]]
    kinds: dict[fx.Node, str | None]
    nonnegative: frozenset[fx.Node]                  # nodes whose value is >= 0 by construction (ReLU outputs)


def walk_plan(graph: ModelGraph, low: fx.Node, high: fx.Node) -> WalkPlan:
    return graph.cached(("walk", low, high), lambda: _make_plan(graph, low, high))


def _nonnegative_nodes(graph: ModelGraph, kinds: dict[fx.Node, str | None]) -> frozenset[fx.Node]:
    known: set[fx.Node] = set()
    for node in graph.nodes:  # in graph order: a node's inputs are decided before it
        if _is_nonnegative(graph, node, kinds[node], known):
            known.add(node)
    return frozenset(known)


def _make_plan(graph: ModelGraph, low: fx.Node, high: fx.Node) -> WalkPlan:
    kinds = graph.cached("kinds", lambda: {node: _kind(graph, node) for node in graph.nodes})
    nonnegative = graph.cached("nonnegative", lambda: _nonnegative_nodes(graph, kinds))
    path = graph.path(low, high)
    order = tuple(sorted(path, key=graph.order.__getitem__, reverse=True))
    values: set[fx.Node] = set()
    last_reader: dict[fx.Node, fx.Node] = {}  # every value the walk touches, and the last node that does
    for node in order:
        if node is low:
            continue  # the walk stops there: its rule never runs
        live_inputs = [n for n in node.all_input_nodes if n in graph.live]
        values |= {n for n in node.all_input_nodes if n not in graph.live}  # weights, constants: no memory
        values |= _reads(node, kinds[node], live_inputs)
        for value in (node, *live_inputs):
            last_reader[value] = node  # the walk goes down the order, so the last assignment is the last reader
    release: dict[fx.Node, list[fx.Node]] = {}
    for value, reader in last_reader.items():
        release.setdefault(reader, []).append(value)
    return WalkPlan(order, frozenset(values), frozenset(last_reader.keys() - values),
                    {node: tuple(vals) for node, vals in release.items()}, kinds, nonnegative)


def _reads(node: fx.Node, kind: str | None, live_inputs: list[fx.Node]) -> set[fx.Node]:
    """The nodes whose values ``node``'s rule reads (the rest of its inputs it only checks for type and size)."""
    if kind in ("conv", "linear"):
        return {node.args[0]}
    if kind in ("pool", "move"):
        return {*live_inputs, node}          # the op is re-run on its inputs
    if kind in ("add", "sub"):
        return {a for a in node.args[:2] if isinstance(a, fx.Node) and a in live_inputs}
    return set()                             # pass, mul and div read no value; no rule: the walk raises


def _describe(graph: ModelGraph, node: fx.Node) -> str:
    if node.op == "call_module":
        module = graph.module(node)
        return f"module '{node.target}' ({type(module).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    where = graph.module_name(node)
    return f"op '{target}' (graph node '{node.name}'{f', in {where}' if where else ''})"


class RelevanceWalk:
    """Carries relevance down a traced model, op by op, with the values of one forward run.

    The walk takes ``env`` over: it drops each value once no rule below needs it, and it writes into the
    relevance tensors it is given and makes (never into the values).
    """

    def __init__(self, graph: ModelGraph, env: dict[fx.Node, Any]) -> None:
        self.graph, self.env = graph, env
        self.live = graph.live

    def run(self, start: fx.Node, relevance: Tensor, stop: fx.Node) -> Tensor:
        """Relevance at the output of ``stop``, given ``relevance`` at the output of ``start``."""
        path = self.graph.path(stop, start)
        if stop not in path:
            raise ValueError(f"'{self.graph.module_name(stop) or stop.name}' is not below "
                             f"'{self.graph.module_name(start) or start.name}' in the model: relevance cannot "
                             "flow there (choose a shallower target_layer)")
        self.plan = walk_plan(self.graph, stop, start)
        pending: dict[fx.Node, Any] = {start: relevance}
        for node in self.plan.order:
            if node is stop:
                return pending[node]
            if node in pending:
                for source, part in self.to_inputs(node, pending.pop(node)):
                    if source in path:
                        pending[source] = _accumulate(pending.get(source), part)
            for value in self.plan.release.get(node, ()):
                self.env.pop(value, None)
        raise ValueError("no relevance reached the target layer")

    def live_operands(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.args[:2] if isinstance(a, fx.Node) and a in self.live
                and isinstance(self.env[a], Tensor)]

    def to_inputs(self, node: fx.Node, relevance: Any) -> list[tuple[fx.Node, Any]]:
        """Split the relevance at ``node``'s output among its inputs with the rule of its op."""
        graph, env = self.graph, self.env
        inputs = [n for n in node.all_input_nodes if n in self.live and isinstance(env[n], (Tensor, tuple, list))]
        if not inputs:
            return []
        kind = self.plan.kinds[node]
        if kind == "conv":
            return [(inputs[0], self._conv(node, relevance))]
        if kind == "linear":
            module = graph.module(node)
            weight = module.weight if module is not None else argument(node, env, 1, "weight", None)
            return [(inputs[0], rules.linear_zplus(relevance, env[node.args[0]], weight))]
        if kind == "pass":
            if len(inputs) != 1:
                raise UnsupportedOperation(f"{_describe(graph, node)} combines several inputs")
            return [(inputs[0], rules.passthrough(relevance))]
        if kind == "pool":
            x_node = node.args[0]
            pooled = rules.pool(relevance, env[x_node], lambda t: graph.call(node, {**env, x_node: t}), env[node],
                                x_nonnegative=x_node in self.plan.nonnegative)
            return [(x_node, pooled)]
        if kind == "move":
            return self._move(node, relevance, inputs)
        if kind in ("add", "sub"):
            operands = self.live_operands(node)
            negated = [False, kind == "sub"]
            summands = [-env[a] if negate else env[a] for a, negate in zip(node.args[:2], negated)
                        if isinstance(a, fx.Node) and a in operands]
            return list(zip(operands, rules.split_sum(relevance, summands)))
        if kind == "mul":
            return [(self._gated_operand(node), rules.passthrough(relevance))]
        if kind == "div" and self.live_operands(node) == [node.args[0]]:
            return [(node.args[0], rules.passthrough(relevance))]
        raise UnsupportedOperation(f"FG-CAM has no relevance rule for {_describe(graph, node)}")

    def _conv(self, node: fx.Node, relevance: Tensor) -> Tensor:
        conv = self.graph.conv(node, self.env)
        x_node = node.args[0]
        if x_node in self.graph.reads_image:
            return rules.conv_zbox(relevance, self.env[x_node], conv)
        return rules.conv_zplus(relevance, self.env[x_node], conv, x_nonnegative=x_node in self.plan.nonnegative)

    def _move(self, node: fx.Node, relevance: Any, inputs: list[fx.Node]) -> list[tuple[fx.Node, Any]]:
        graph, env = self.graph, self.env
        if node.target is operator.getitem and isinstance(env[node.args[0]], (tuple, list)):
            return [(node.args[0], {node.args[1]: relevance})]  # one element of a chunk / split
        tensor_inputs = [n for n in inputs if isinstance(env[n], Tensor)]
        out = env[node]
        n_out = len(out) if isinstance(out, (tuple, list)) else 1
        per_output = [relevance.get(i) for i in range(n_out)] if isinstance(relevance, dict) else [relevance]
        parts = rules.move(per_output, [env[n] for n in tensor_inputs],
                           lambda *xs: graph.call(node, {**env, **dict(zip(tensor_inputs, xs))}))
        return list(zip(tensor_inputs, parts))

    def _gated_operand(self, node: fx.Node) -> fx.Node:
        """For a product, the operand that carries the features; the other is a gate held constant."""
        operands = self.live_operands(node)
        if len(operands) == 1:
            return operands[0]
        a, b = operands
        if self.env[a].numel() != self.env[b].numel():  # squeeze-excitation: [N,C,1,1] * [N,C,H,W]
            return a if self.env[a].numel() > self.env[b].numel() else b
        gates = [n for n in operands if self._is_gate(n)]
        if len(gates) == 1:
            return b if gates[0] is a else a
        raise UnsupportedOperation(f"FG-CAM cannot tell features from gate in the product "
                                   f"{_describe(self.graph, node)}")

    def _is_gate(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.graph.module(node), _GATE_MODULES)
        return node.op in ("call_function", "call_method") and node.target in _GATE_FUNCTIONS


def _accumulate(total: Any, part: Any) -> Any:
    """Relevance from two consumers of one value, added into the first (a tensor of the walk's own)."""
    if total is None:
        return part
    if isinstance(total, dict):
        return {k: _accumulate(total.get(k), part.get(k)) for k in total.keys() | part.keys()}
    return total.add_(part) if total.shape == part.shape else total + part
