"""The engine's one table of ops: which kind each op of a traced model is, the relevance rule the kind
gets, and the values the rule reads.

``KINDS`` is the table (read it like zennit's composites: one line per kind of op). Each ``Kind`` says
which ops it covers (module classes, functions, tensor methods), its rule in words (the README's rules
table, ``check-model``), which values the rule reads, and the rule's step. The walk plan
(``propagate._make_plan``) keeps exactly the values that ``reads`` names; the walk hands each step
exactly those values (``Step.values``; reading any other raises), so the two cannot drift apart.

The other op sets here are properties of ops, not rules: outputs that are >= 0 by construction (a ReLU's:
z+ then needs no sign check), gates of a product, and the ops the graph's search for the CAM layer walks
through. The mapping is by op, never by architecture; an op on the relevance path with no kind raises
``UnsupportedOperation`` naming it.

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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision.ops
from torch import Tensor, nn

from . import rules

if TYPE_CHECKING:
    from .graph import ModelGraph


class UnsupportedOperation(RuntimeError):
    """The engine met an operation it has no relevance rule for (never a silently wrong map)."""


@dataclass(frozen=True)
class Ops:
    """A set of ops: module classes (subclasses included), functions, and tensor method names."""
    modules: tuple[type, ...] = ()
    functions: frozenset = frozenset()
    methods: frozenset = frozenset()

    def __or__(self, other: "Ops") -> "Ops":
        return Ops(self.modules + other.modules, self.functions | other.functions, self.methods | other.methods)

    def match(self, node: fx.Node, module: nn.Module | None) -> bool:
        if node.op == "call_module":
            return isinstance(module, self.modules)
        if node.op == "call_function":
            return node.target in self.functions
        return node.op == "call_method" and node.target in self.methods


def ops(modules: Iterable[type] = (), functions: Iterable[Any] = (), methods: Iterable[str] = ()) -> Ops:
    return Ops(tuple(modules), frozenset(functions), frozenset(methods))


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
    [nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, torchvision.ops.StochasticDepth],
    [F.dropout, F.dropout2d, torchvision.ops.stochastic_depth])
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


def pad_value(graph: ModelGraph, node: fx.Node) -> float | None:
    """The value a pad op writes at the padding: a number for a constant pad, None for a pad that copies
    values (reflect, replicate, circular), nan where the graph does not say (a value computed in forward)."""
    module = graph.module(node)
    if module is not None:
        return float(module.value)
    def given(index: int, name: str, default: Any) -> Any:
        return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)

    if node.target is torch.constant_pad_nd:
        mode, value = "constant", given(2, "value", 0)
    else:
        mode, value = given(2, "mode", "constant"), given(3, "value", None)
    if isinstance(mode, fx.Node) or isinstance(value, fx.Node):
        return float("nan")
    return float(value or 0) if mode == "constant" else None


def argument(node: fx.Node, env: Mapping, index: int, name: str, default: Any) -> Any:
    """The value of a call's argument, given by position ``index`` or by keyword ``name``."""
    value = node.args[index] if len(node.args) > index else node.kwargs.get(name, default)
    return env[value] if isinstance(value, fx.Node) else value


def describe(graph: ModelGraph, node: fx.Node) -> str:
    """An op as the user knows it: the module and its class, or the function and where it is called."""
    if node.op == "call_module":
        return f"module '{node.target}' ({type(graph.module(node)).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    where = graph.module_name(node) or graph.enclosing_module(node)
    return f"op '{target}' (graph node '{node.name}'{f', in {where}' if where else ''})"
