"""The walk that carries relevance from one node of the graph down to another, and its plan: which nodes it
visits and which values of the forward run it reads.

Which rule each op gets, and which values that rule reads, is the table in ``ops.py`` (``KINDS``): the plan
keeps what the table declares and the walk hands each rule exactly that, so the two cannot drift apart.
The mapping is by op, never by architecture: any CNN written with ordinary torch.nn modules and functional
calls works. An op with no rule raises ``UnsupportedOperation`` naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from .graph import ModelGraph, UnsupportedOperation, stand_in
from . import ops
from .ops import Kind, LowRule, ReadValues, Step, describe, is_nonnegative, kind_of, kind_table


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
    kinds: dict[fx.Node, Kind | None]
    reads: dict[fx.Node, frozenset[fx.Node]]         # per node: what its rule may read (its kind's reads, constants)
    nonnegative: frozenset[fx.Node]                  # nodes whose value is >= 0 by construction (ReLU outputs)


@dataclass
class NodeFlow:
    """The relevance one op of the walk received and passed on, per image (``RelevanceWalk``'s ``flow``)."""
    node: fx.Node
    kind: str | None
    received: Tensor                                 # [N] float64: the sum at the op's output
    passed: Tensor                                   # [N] float64: the sum it gave to inputs on the path


def walk_plan(graph: ModelGraph, low: fx.Node, high: fx.Node, low_rule: LowRule | None = None) -> WalkPlan:
    """The plan of a walk from ``high`` down to ``low``, with the rules of ``ops.kind_table(low_rule)``."""
    return graph.cached(("walk", low, high, low_rule), lambda: _make_plan(graph, low, high, low_rule))


def node_kinds(graph: ModelGraph, low_rule: LowRule | None = None) -> dict[fx.Node, Kind | None]:
    """Every node's row of the op table (None: no rule), once per graph and table."""
    table = kind_table(low_rule)
    return graph.cached(("kinds", low_rule), lambda: {node: kind_of(graph, node, table) for node in graph.nodes})


def _nonnegative_nodes(graph: ModelGraph, kinds: dict[fx.Node, Kind | None]) -> frozenset[fx.Node]:
    known: set[fx.Node] = set()
    for node in graph.nodes:  # in graph order: a node's inputs are decided before it
        if is_nonnegative(graph, node, kinds[node], known):
            known.add(node)
    return frozenset(known)


def _make_plan(graph: ModelGraph, low: fx.Node, high: fx.Node, low_rule: LowRule | None) -> WalkPlan:
    kinds = node_kinds(graph, low_rule)
    # which values are >= 0 is a property of the ops, not of the rules: the default table decides it
    nonnegative = graph.cached("nonnegative", lambda: _nonnegative_nodes(graph, node_kinds(graph)))
    path = graph.path(low, high)
    order = tuple(sorted(path, key=graph.order.__getitem__, reverse=True))
    reads: dict[fx.Node, frozenset[fx.Node]] = {}
    last_reader: dict[fx.Node, fx.Node] = {}  # every value the walk touches, and the last node that does
    for node in order:
        if node is low:
            continue  # the walk stops there: its rule never runs
        live_inputs = [n for n in node.all_input_nodes if n in graph.live]
        constants = {n for n in node.all_input_nodes if n not in graph.live}  # weights, constants: no memory
        declared = kinds[node].reads(node, live_inputs) if kinds[node] is not None else set()
        reads[node] = frozenset(constants | declared)
        for value in (node, *live_inputs):
            last_reader[value] = node  # the walk goes down the order, so the last assignment is the last reader
        x_node = node.args[0] if node.args else None
        if isinstance(x_node, fx.Node) and x_node.args and ops.PADS.match(x_node, graph.module(x_node)):
            # a rule that excludes a separate pad op's padding needs the shape of the pad's input (graph.padding),
            # also when the walk stops at the pad's output: keep a stand-in of it until then
            last_reader[x_node.args[0]] = node
    values = frozenset().union(*reads.values(), {high})  # the walk reads the start's value (RelevanceWalk.run)
    release: dict[fx.Node, list[fx.Node]] = {}
    for value, reader in last_reader.items():
        release.setdefault(reader, []).append(value)
    return WalkPlan(order, values, frozenset(last_reader.keys() - values),
                    {node: tuple(vals) for node, vals in release.items()}, kinds, reads, nonnegative)


class RelevanceWalk:
    """Carries relevance down a traced model, op by op, with the values of one forward run.

    The walk takes ``env`` over: it drops each value once no rule below needs it, and it writes into the
    relevance tensors it is given and makes (never into the values). ``flow``, when given, receives a
    ``NodeFlow`` per op (the per-layer relevance table of ``check-model``).
    """

    def __init__(self, graph: ModelGraph, env: dict[fx.Node, Any], flow: list[NodeFlow] | None = None,
                 low_rule: LowRule | None = None) -> None:
        self.graph, self.env, self.flow, self.low_rule = graph, env, flow, low_rule
        self.live = graph.live

    def run(self, start: fx.Node, relevance: Tensor, stop: fx.Node) -> Tensor:
        """Relevance at the output of ``stop``, given ``relevance`` at the output of ``start``.

        ``relevance`` may stack M relevance maps per image along its first dimension (copy-major: row m * N + n
        is copy m of image n, for the N images of the forward run in ``env``): the rules are linear in R given
        the forward values, so the M walks share those values and each convolution's denominator
        (``FGCAM.channel_maps``). The result then stacks M maps the same way."""
        path = self.graph.path(stop, start)
        if stop not in path:
            raise ValueError(f"'{self.graph.module_name(stop) or stop.name}' is not below "
                             f"'{self.graph.module_name(start) or start.name}' in the model: relevance cannot "
                             "flow there (choose a shallower target_layer)")
        self.plan = walk_plan(self.graph, stop, start, self.low_rule)
        pending: dict[fx.Node, Any] = {start: _on_activations(relevance, self.env[start])}
        for node in self.plan.order:
            if node is stop:
                return pending[node]
            if node in pending:
                received = pending.pop(node)
                parts = [(source, part) for source, part in self.to_inputs(node, received) if source in path]
                if self.flow is not None:
                    self._record(node, received, parts)
                for source, part in parts:
                    pending[source] = _accumulate(pending.get(source), part)
            for value in self.plan.release.get(node, ()):
                self.env.pop(value, None)
        raise ValueError("no relevance reached the target layer")

    def to_inputs(self, node: fx.Node, relevance: Any) -> list[tuple[fx.Node, Any]]:
        """Split the relevance at ``node``'s output among its inputs with the rule of its kind (ops.KINDS)."""
        env = self.env
        inputs = [n for n in node.all_input_nodes if n in self.live and isinstance(env[n], (Tensor, tuple, list))]
        if not inputs:
            return []
        kind = self.plan.kinds[node]
        if kind is None:
            raise UnsupportedOperation(f"FG-CAM has no relevance rule for {describe(self.graph, node)}")
        return kind.step(Step(self.graph, node, relevance, inputs, ReadValues(env, self.plan.reads[node], kind.name),
                              lambda n: stand_in(env[n]), self.plan.nonnegative, self._padding))

    def _padding(self, x_node: fx.Node, x: Tensor) -> tuple[Tensor, float] | None:
        return self.graph.padding(x_node, self.env, x)

    def _record(self, node: fx.Node, received: Any, parts: list[tuple[fx.Node, Any]]) -> None:
        kind = self.plan.kinds[node]
        sums = _image_sums(received)
        passed = sum((_image_sums(part) for _, part in parts), torch.zeros_like(sums))
        self.flow.append(NodeFlow(node, kind.name if kind else None, sums, passed))


def _on_activations(relevance: Tensor, activations: Any) -> Tensor:
    """The starting relevance without what sits on activations that are exactly 0.

    Components w_k A_k are 0 there anyway; denoised ones are not (each channel is centred): a neuron that
    is 0 contributed nothing below, so there is nothing to carry that relevance to. The reference drops it
    too, at its first rule (which cannot place it); everything after this point is conserved.
    """
    if isinstance(activations, Tensor) and activations.shape == relevance.shape:
        return relevance.masked_fill(activations == 0, 0.0)
    if isinstance(activations, Tensor) and activations.shape[1:] == relevance.shape[1:] and len(activations):
        copies = relevance.shape[0] // len(activations)  # relevance stacks copies per image
        grouped = relevance.view(copies, len(activations), *relevance.shape[1:])
        return grouped.masked_fill(activations == 0, 0.0).reshape(relevance.shape)
    return relevance


def _image_sums(relevance: Any) -> Tensor:
    """Relevance summed per image, in float64 ([N]); a dict holds one entry per output of a multi-output op."""
    if isinstance(relevance, dict):
        return sum(_image_sums(r) for r in relevance.values() if r is not None)
    return relevance.detach().flatten(1).sum(dim=1, dtype=torch.float64)


def _accumulate(total: Any, part: Any) -> Any:
    """Relevance from two consumers of one value, added into the first (a tensor of the walk's own). A
    multi-output op (chunk, split) holds a dict by output index: each consumer fills its own outputs (a
    channel shuffle's two halves go to two getitems)."""
    if total is None:
        return part
    if part is None:
        return total
    if isinstance(total, dict):
        return {k: _accumulate(total.get(k), part.get(k)) for k in total.keys() | part.keys()}
    return total.add_(part) if total.shape == part.shape else total + part
