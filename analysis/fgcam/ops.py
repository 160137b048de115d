"""The engine's one table of ops: which kind each op of a traced model is, the relevance rule the kind
gets, and the values the rule reads.

``KINDS`` is the table (read it like zennit's composites: one line per kind of op). Each ``Kind`` says
which ops it covers (module classes, functions, tensor methods), its rule in words (the README's rules
table, ``check-model``), which values the rule reads, and the rule's step. The walk plan
(``propagate._make_plan``) keeps exactly the values that ``reads`` names; the walk hands each step
exactly those values (``Step.values``; reading any other raises), so the two cannot drift apart.

The op sets the kinds are made of (``opsets``) are properties of ops, not rules: outputs that are >= 0 by
construction (a ReLU's: z+ then needs no sign check), gates of a product, and the ops the graph's search for
the CAM layer walks through. The mapping is by op, never by architecture; an op on the relevance path with no
kind raises ``UnsupportedOperation`` naming it.

Extending: a new rule for an op is a ``Kind`` placed before the row that covers the op now (the first match
wins); a rule that depends on where a node sits adds an ``applies`` test, as the image-reading convolution
does. ``LowRule`` (gamma or epsilon for the convolutions up to a module, zennit's composites by depth) is
such a row: ``kind_table(low_rule)`` is ``KINDS`` with it placed after the image's convolution, and the
explainer's walk plans use that table. The rules see the relevance of every channel at once, so propagating
a subset of the components changes nothing here.
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import Tensor

from . import rules
from .graph import ModelGraph, pad_value
from .opsets import (ADDS, CONVOLUTIONS, DIVS, ELEMENTWISE, GATES, IDENTITIES, LINEAR, MOVES, MULS, NONNEGATIVE,
                     PADS, POOLS, SUBS, Ops, UnsupportedOperation, argument)


# ------------------------------------------------------------------------------------------- the walk's steps
class ReadValues(Mapping):
    """The values one step may read: those its kind declares (``Kind.reads``) and the node's constants."""

    def __init__(self, env: dict[fx.Node, Any], allowed: frozenset[fx.Node], kind: str) -> None:
        self._env, self._allowed, self._kind = env, allowed, kind

    def __getitem__(self, node: fx.Node) -> Any:
        if node not in self._allowed:
            raise AssertionError(f"the '{self._kind}' rule read {node.name}, which its row of ops.KINDS does not "
                                 "declare: the walk plan did not keep it")
        return self._env[node]

    def __iter__(self):
        return iter(self._allowed)

    def __len__(self) -> int:
        return len(self._allowed)


@dataclass
class Step:
    """One op of the walk: the relevance at its output, and what its rule may look at."""
    graph: ModelGraph
    node: fx.Node
    relevance: Any
    inputs: list[fx.Node]                     # live inputs holding a tensor (or a tuple of them)
    values: ReadValues                        # the values the rule reads (declared in KINDS)
    meta: Callable[[fx.Node], Any]            # any input's type and shape, no data
    nonnegative: frozenset[fx.Node]           # nodes whose value is >= 0 by construction
    padding: Callable[[fx.Node, Tensor], tuple[Tensor, float] | None]  # graph.padding of a pad op's output

    def x(self) -> tuple[fx.Node, Tensor]:
        x_node = self.node.args[0]
        return x_node, self.values[x_node]

    def padded_x(self) -> tuple[fx.Node, Tensor, Tensor | None]:
        """The op's first argument, and where it is the padding of a separate pad op (``support``, 0 there; None:
        not a pad's output). Padding with a constant other than 0 is made 0 for the rule: like a bias, a
        constant is no input and gets no relevance."""
        x_node, x = self.x()
        found = self.padding(x_node, x)
        if found is None:
            return x_node, x, None
        support, value = found
        return x_node, (x if value == 0 else x * support), support


Result = list[tuple[fx.Node, Any]]


def _conv(step: Step) -> Result:
    x_node, x, support = step.padded_x()
    conv = step.graph.conv(step.node, step.values)
    return [(x_node, rules.conv_zplus(step.relevance, x, conv, x_nonnegative=x_node in step.nonnegative,
                                      support=support))]


def _image_conv(step: Step) -> Result:
    x_node, x, support = step.padded_x()
    return [(x_node, rules.conv_zbox(step.relevance, x, step.graph.conv(step.node, step.values), support=support))]


def _low_conv(rule: "LowRule") -> Callable[[Step], Result]:
    """The step of a convolution in the low layers under ``rule`` (gamma or epsilon, ``rules``)."""
    def step_(step: Step) -> Result:
        x_node, x, support = step.padded_x()
        conv = step.graph.conv(step.node, step.values)
        if rule.rule == "gamma":
            return [(x_node, rules.conv_gamma(step.relevance, x, conv, rule.gamma,
                                              x_nonnegative=x_node in step.nonnegative, support=support))]
        return [(x_node, rules.conv_epsilon(step.relevance, x, conv, rule.epsilon))]
    return step_


def _linear(step: Step) -> Result:
    x_node, x = step.x()
    module = step.graph.module(step.node)
    weight = module.weight if module is not None else argument(step.node, step.values, 1, "weight", None)
    return [(x_node, rules.linear_zplus(step.relevance, x, weight))]


def _pass(step: Step) -> Result:
    if len(step.inputs) != 1:
        raise UnsupportedOperation(f"{describe(step.graph, step.node)} combines several inputs")
    return [(step.inputs[0], rules.passthrough(step.relevance))]


def _pool(step: Step) -> Result:
    x_node, x, support = step.padded_x()
    node, graph, values = step.node, step.graph, step.values
    pooled = rules.pool(step.relevance, x, lambda t: graph.call(node, {**values, x_node: t}),
                        x_nonnegative=x_node in step.nonnegative, support=support)
    return [(x_node, pooled)]


def _move(step: Step) -> Result:
    node, graph, values, relevance = step.node, step.graph, step.values, step.relevance
    if node.target is operator.getitem and isinstance(step.meta(node.args[0]), (tuple, list)):
        return [(node.args[0], {node.args[1]: relevance})]  # one element of a chunk / split
    tensor_inputs = [n for n in step.inputs if isinstance(step.meta(n), Tensor)]
    out = step.meta(node)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    per_output = [relevance.get(i) for i in range(n_out)] if isinstance(relevance, dict) else [relevance]
    parts = rules.move(per_output, [values[n] for n in tensor_inputs],
                       lambda *xs: graph.call(node, {**values, **dict(zip(tensor_inputs, xs))}))
    return list(zip(tensor_inputs, parts))


def _operands(step: Step) -> list[fx.Node]:
    return [a for a in step.node.args[:2] if isinstance(a, fx.Node) and a in step.inputs
            and isinstance(step.meta(a), Tensor)]


def _sum(step: Step, negate_second: bool) -> Result:
    operands = _operands(step)
    summands = [-step.values[a] if negate_second and a is step.node.args[1] else step.values[a] for a in operands]
    return list(zip(operands, rules.split_sum(step.relevance, summands)))


def _mul(step: Step) -> Result:
    """A product: the operand that carries the features gets R; the other is a gate held constant."""
    operands = _operands(step)
    if len(operands) == 1:
        return [(operands[0], rules.passthrough(step.relevance))]
    a, b = operands
    size_a, size_b = step.meta(a).numel(), step.meta(b).numel()
    if size_a != size_b:  # squeeze-excitation: [N,C,1,1] * [N,C,H,W]
        return [(a if size_a > size_b else b, rules.passthrough(step.relevance))]
    gates = [n for n in operands if GATES.match(n, step.graph.module(n))]
    if len(gates) == 1:
        return [(b if gates[0] is a else a, rules.passthrough(step.relevance))]
    raise UnsupportedOperation(f"FG-CAM cannot tell features from gate in the product "
                               f"{describe(step.graph, step.node)}")


def _div(step: Step) -> Result:
    if _operands(step) == [step.node.args[0]]:
        return [(step.node.args[0], rules.passthrough(step.relevance))]
    raise UnsupportedOperation(f"FG-CAM has no relevance rule for {describe(step.graph, step.node)} "
                               "(a division by a value that depends on the image)")


# ------------------------------------------------------------------------------------ the values rules read
def reads_nothing(node: fx.Node, live_inputs: list[fx.Node]) -> set[fx.Node]:
    return set()


def reads_x(node: fx.Node, live_inputs: list[fx.Node]) -> set[fx.Node]:
    """The op's first argument (the layer input of a convolution or linear layer)."""
    return {node.args[0]}


def reads_inputs(node: fx.Node, live_inputs: list[fx.Node]) -> set[fx.Node]:
    """Every input that depends on the image: the op is run again on them."""
    return set(live_inputs)


def reads_operands(node: fx.Node, live_inputs: list[fx.Node]) -> set[fx.Node]:
    """The two operands of a sum or difference that depend on the image."""
    return {a for a in node.args[:2] if isinstance(a, fx.Node) and a in live_inputs}


@dataclass(frozen=True)
class Kind:
    name: str
    ops: Ops
    rule: str                                                   # in words, with its source
    reads: Callable[[fx.Node, list[fx.Node]], set[fx.Node]]     # the nodes whose values the rule reads
    step: Callable[[Step], Result]
    keeps_sign: bool = False                                    # output >= 0 when every input is
    applies: Callable[[ModelGraph, fx.Node], bool] | None = None  # a condition beyond the op (None: always)


KINDS: tuple[Kind, ...] = (
    Kind("image conv", CONVOLUTIONS, "z^B, bounds l = min, h = max of each image (paper); where z = 0, the "
         "flat rule over the window's pixels (ours)", reads_x, _image_conv,
         applies=lambda graph, node: node.args[0] in graph.reads_image),
    Kind("conv", CONVOLUTIONS, "z+ (alpha1-beta0, paper); where z+ = 0, the window's negative part; where "
         "that is 0 too, the flat rule over the window, padding excluded (ours)", reads_x, _conv),
    Kind("linear", LINEAR, "z+ (ours: LRP from the logit), with the conv's fallbacks", reads_x, _linear),
    Kind("pass", ELEMENTWISE, "R passes unchanged (paper)", reads_nothing, _pass),
    Kind("identity", IDENTITIES, "R passes unchanged (paper)", reads_nothing, _pass, keeps_sign=True),
    Kind("pool", POOLS, "z+ through the pooling of x+ (paper); where pool(x+) = 0, the flat rule (ours)",
         reads_inputs, _pool, keeps_sign=True),
    Kind("move", MOVES, "routed back exactly: the op's vector-Jacobian product (ours)", reads_inputs, _move,
         keeps_sign=True),
    Kind("add", ADDS, "split in proportion to the summands; where they sum to 0, evenly (ours)", reads_operands,
         lambda step: _sum(step, negate_second=False)),
    Kind("sub", SUBS, "as add, with the second operand negated (ours)", reads_operands,
         lambda step: _sum(step, negate_second=True)),
    Kind("mul", MULS, "a gate held constant: R goes to the features (ours)", reads_nothing, _mul),
    Kind("div", DIVS, "division by a constant: R passes unchanged (ours)", reads_nothing, _div),
)


LOW_RULES = ("gamma", "epsilon")


@dataclass(frozen=True)
class LowRule:
    """Another rule for the convolutions of the lowest layers, as zennit's composites give one (ours: by depth
    in the graph, not by layer type): every convolution whose output is at or below the output of module
    ``through`` gets ``rule`` instead of z+; the convolution that reads the image keeps z^B.

    ``LowRule("gamma", "_blocks.2")`` (gamma 0.25, zennit's default), ``LowRule("epsilon", "features.6",
    epsilon=0.25)``. The rules and how they conserve: ``rules.conv_gamma``, ``rules.conv_epsilon``.
    """
    rule: str
    through: str
    gamma: float = 0.25
    epsilon: float = 0.25

    def __post_init__(self) -> None:
        if self.rule not in LOW_RULES:
            raise ValueError(f"unknown low-layer rule {self.rule!r}; choose one of {', '.join(LOW_RULES)}")
        if self.rule == "gamma" and not (self.gamma >= 0 and self.gamma < float("inf")):
            raise ValueError(f"the gamma rule needs a finite gamma >= 0, got {self.gamma}")
        if self.rule == "epsilon" and not (self.epsilon > 0 and self.epsilon < float("inf")):
            raise ValueError(f"the epsilon rule needs a finite epsilon > 0, got {self.epsilon}")

    def describe(self) -> str:
        value = f"gamma = {self.gamma:g}" if self.rule == "gamma" else f"epsilon = {self.epsilon:g}"
        return f"{self.rule} ({value}) for the convolutions up to {self.through}"


LOW_RULE_FORMAT = "RULE:LAYER[:VALUE] with RULE gamma or epsilon (e.g. gamma:_blocks.2:0.25), or none"


def parse_low_rule(text: str) -> LowRule | None:
    """``gamma:LAYER[:GAMMA]`` or ``epsilon:LAYER[:EPSILON]`` -> a LowRule (the value defaults to LowRule's,
    0.25); ``none`` -> None (z+ everywhere). The text the ``--low-rule`` option takes and manifests record;
    ValueError naming LOW_RULE_FORMAT otherwise. Whether LAYER is a module of the model is checked where the
    model is loaded (FGCAM's constructor)."""
    if text.strip().lower() == "none":
        return None
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise ValueError(f"expected {LOW_RULE_FORMAT}, got {text!r}")
    rule, layer = parts[0].strip().lower(), parts[1].strip()
    values = {}
    if len(parts) == 3:
        try:
            values = {rule: float(parts[2])}
        except ValueError:
            raise ValueError(f"the value in {text!r} is not a number ({LOW_RULE_FORMAT})") from None
    try:
        return LowRule(rule, layer, **{k: v for k, v in values.items() if k in ("gamma", "epsilon")})
    except ValueError as error:
        raise ValueError(f"{error} ({LOW_RULE_FORMAT})") from None


def low_rule_text(rule: LowRule | None) -> str | None:
    """The text of a LowRule that ``parse_low_rule`` reads back (what manifests and results record); None for
    z+ everywhere."""
    if rule is None:
        return None
    return f"{rule.rule}:{rule.through}:{rule.gamma if rule.rule == 'gamma' else rule.epsilon:g}"


def _below(through: str) -> Callable[[ModelGraph, fx.Node], bool]:
    def applies(graph: ModelGraph, node: fx.Node) -> bool:
        return node in graph.cached(("at or below", through), lambda: graph.ancestors(graph.node_for(through)))
    return applies


def kind_table(low_rule: LowRule | None = None) -> tuple[Kind, ...]:
    """``KINDS``, with ``low_rule``'s row for the low convolutions placed after the image's convolution and
    before every other convolution (the first match wins). The same table for equal rules."""
    return KINDS if low_rule is None else _with_low_rule(low_rule, KINDS)


@functools.cache
def _with_low_rule(low_rule: LowRule, kinds: tuple[Kind, ...]) -> tuple[Kind, ...]:
    if low_rule.rule == "gamma":
        words = (f"generalised gamma, gamma = {low_rule.gamma:g} (Montavon et al. 2019, as zennit's Gamma; biases "
                 "ignored); where z = 0, the conv's z+ and its fallbacks (ours)")
    else:
        words = (f"epsilon, epsilon = {low_rule.epsilon:g} (Bach et al. 2015, as zennit's Epsilon; biases ignored): "
                 "absorbs epsilon / (|z| + epsilon) of each output's relevance")
    row = Kind(f"low conv ({low_rule.rule})", CONVOLUTIONS, words, reads_x, _low_conv(low_rule),
               applies=_below(low_rule.through))
    return (kinds[0], row, *kinds[1:])


def kind_of(graph: ModelGraph, node: fx.Node, table: tuple[Kind, ...] | None = None) -> Kind | None:
    """The first row of ``table`` (the explainer's, ``kind_table``; default ``KINDS``) that covers ``node``'s
    op; None for an op without a rule."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    module = graph.module(node)
    for kind in KINDS if table is None else table:
        if kind.ops.match(node, module) and (kind.applies is None or kind.applies(graph, node)):
            return kind
    return None


def is_nonnegative(graph: ModelGraph, node: fx.Node, kind: Kind | None, known: set[fx.Node]) -> bool:
    """Whether ``node``'s value is >= 0 by construction, given the nodes ``known`` to be."""
    if NONNEGATIVE.match(node, graph.module(node)):
        return True
    keeps_sign = kind is not None and kind.keeps_sign
    if keeps_sign and PADS.match(node, graph.module(node)):
        value = pad_value(graph, node)
        keeps_sign = value is None or value >= 0  # nan (a value the graph does not give): not known
    return keeps_sign and bool(node.all_input_nodes) and all(n in known for n in node.all_input_nodes)


def describe(graph: ModelGraph, node: fx.Node) -> str:
    """An op as the user knows it: the module and its class, or the function and where it is called."""
    if node.op == "call_module":
        return f"module '{node.target}' ({type(graph.module(node)).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    where = graph.module_name(node) or graph.enclosing_module(node)
    return f"op '{target}' (graph node '{node.name}'{f', in {where}' if where else ''})"
