"""The machinery under FG-CAM: a model as a torch.fx graph that can be run while keeping the values the
relevance rules need, with module names (as in ``model.named_modules()``) mapped to graph nodes.

Why a graph and not module hooks: relevance must follow the model's real data flow (residual additions,
concatenations, functional calls, a ReLU module reused twice), which hooks on modules cannot see.
The graph is traced once; running it calls the model's own submodules, so weights are always current.
No hook is ever registered on the model, and its train/eval mode is never touched.
"""
from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from . import opsets
from .conv import Conv
from .opsets import UnsupportedOperation, argument  # noqa: F401  (UnsupportedOperation: re-exported, the old home)


class _NamingTracer(fx.Tracer):
    """A tracer that remembers, for every module call (containers too), the node of its output."""

    def __init__(self) -> None:
        super().__init__()
        self.module_outputs: dict[str, list[fx.Node]] = {}

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        try:
            name = self.path_of_module(m)
        except NameError:  # a module created on the fly is not part of the model's hierarchy
            name = ""
        if name and isinstance(out, fx.Proxy):
            self.module_outputs.setdefault(name, []).append(out.node)
        return out


class ModelGraph:
    """A traced model: run it, name its nodes, find the default CAM layer and the image-reading convolution."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        tracer = _NamingTracer()
        try:
            self.graph = tracer.trace(model)
        except Exception as error:  # fx raises many types; the message is what matters to the user
            raise UnsupportedOperation(
                f"could not trace {type(model).__name__} with torch.fx ({type(error).__name__}: {error}); "
                "the engine follows the model's graph and needs a traceable forward") from error
        self.module_outputs = tracer.module_outputs
        self.nodes: list[fx.Node] = list(self.graph.nodes)
        self.order = {node: i for i, node in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if not placeholders:
            raise UnsupportedOperation(f"{type(model).__name__}.forward takes no input")
        self.input_node = placeholders[0]
        self.output_node = next(n for n in self.nodes if n.op == "output")
        self._inplace: set[fx.Node] = {n for n in self.nodes if self._looks_inplace(n)}
        self.reads_image = self._nodes_reading_image()
        self._engine_ops = {n: kind for n in self.nodes if (kind := self._engine_op(n)) is not None}
        self.live = self.descendants(self.input_node)  # nodes whose value depends on the image
        self._cache: dict[Hashable, Any] = {}

    # ----------------------------------------------------------------------------------------------- naming
    def module_name(self, node: fx.Node) -> str | None:
        """The most specific module name whose output is ``node`` (a module called once preferred)."""
        names = [name for name, outs in self.module_outputs.items() if node in outs]
        if not names:
            return None
        once = [name for name in names if len(self.module_outputs[name]) == 1]
        return max(once or names, key=lambda name: (name.count("."), len(name)))

    def enclosing_module(self, node: fx.Node) -> str | None:
        """The innermost module whose forward makes the call of ``node`` (None: the model's own forward)."""
        stack = node.meta.get("nn_module_stack") or {}
        return next(reversed(stack), None) or None

    def node_for(self, name: str) -> fx.Node:
        """The node whose value is the output of module ``name`` (its last call), or the input for "input"."""
        if name == "input":
            return self.input_node
        if name not in self.module_outputs:
            known = [n for n, _ in self.model.named_modules() if n]
            hint = ", ".join(known[-8:])
            raise ValueError(f"unknown layer {name!r}: not a module of {type(self.model).__name__} that is called "
                             f"in forward (use a name from model.named_modules(), e.g. {hint}; or 'input')")
        return self.module_outputs[name][-1]

    def default_cam_layer(self) -> str:
        """The last module that outputs a spatial feature map before the classifier head.

        Walk back from the output along the data argument: through the head (linear layers, dropout,
        activations) until an op that reduces the spatial map (adaptive pooling, flatten, view, mean);
        the first node below the reductions is the CAM layer. A functional activation there (DenseNet's
        ``F.relu``) is stepped over to the module that produced its input.
        """
        node = self.output_node.args[0]
        node = node[0] if isinstance(node, (tuple, list)) else node
        passed_reduction = False
        while isinstance(node, fx.Node) and node.op != "placeholder":
            reducing = self._is_reducing(node)
            if passed_reduction and not reducing and not self._is_transparent(node):
                break
            passed_reduction = passed_reduction or reducing
            if not reducing and not self._is_head(node) and not self._is_transparent(node):
                break
            node = node.args[0] if node.args else None
        while isinstance(node, fx.Node) and node.op != "placeholder":
            name = self.module_name(node)
            if name is not None:
                return name
            node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        raise ValueError(f"could not find the last spatial layer of {type(self.model).__name__}; "
                         "pass cam_layer=<module name>")

    def module(self, node: fx.Node) -> nn.Module | None:
        """The module a call_module node calls (None for other nodes)."""
        return self.model.get_submodule(node.target) if node.op == "call_module" else None

    def _is_reducing(self, node: fx.Node) -> bool:
        return opsets.REDUCING.match(node, self.module(node))

    def _is_transparent(self, node: fx.Node) -> bool:
        return opsets.TRANSPARENT.match(node, self.module(node))

    def _is_head(self, node: fx.Node) -> bool:
        return opsets.HEAD.match(node, self.module(node))

    # ------------------------------------------------------------------------------------------- structure
    def _nodes_reading_image(self) -> set[fx.Node]:
        """Nodes whose value is still the image up to element-wise and shape ops (no conv or linear yet)."""
        reading = {self.input_node}
        for node in self.nodes:
            if node.op in ("call_function", "call_method", "call_module") and \
                    any(inp in reading for inp in node.all_input_nodes) and not self._mixes_pixels(node):
                reading.add(node)
        return reading

    def _mixes_pixels(self, node: fx.Node) -> bool:
        return opsets.MIXES_PIXELS.match(node, self.module(node))

    def ancestors(self, node: fx.Node) -> set[fx.Node]:
        seen, stack = {node}, [node]
        while stack:
            for inp in stack.pop().all_input_nodes:
                if inp not in seen:
                    seen.add(inp)
                    stack.append(inp)
        return seen

    def descendants(self, node: fx.Node) -> set[fx.Node]:
        seen, stack = {node}, [node]
        while stack:
            for user in stack.pop().users:
                if user not in seen:
                    seen.add(user)
                    stack.append(user)
        return seen

    def path(self, low: fx.Node, high: fx.Node) -> frozenset[fx.Node]:
        """Nodes through which relevance flows from ``high`` down to ``low``, both included (computed once)."""
        return self.cached(("path", low, high), lambda: frozenset(self.ancestors(high) & self.descendants(low)))

    def cached(self, key: Hashable, compute: Callable[[], Any], stamp: tuple = ()) -> Any:
        """``compute()``, once per ``key`` for this graph (paths, walk plans), and again whenever ``stamp``
        changes (its tensors are compared by identity, the rest by value)."""
        entry = self._cache.get(key)
        if entry is None or not _same_stamp(entry[0], stamp):
            entry = self._cache[key] = (stamp, compute())
        return entry[1]

    def conv(self, node: fx.Node, env: dict[fx.Node, Any]) -> Conv:
        """The ``Conv`` of a convolution node, kept while its weight is the same tensor with the same contents
        (an optimizer step, a new parameter or ``model.to()`` makes a new one)."""
        module = self.module(node)
        if module is not None:
            if module.padding_mode != "zeros":
                raise UnsupportedOperation(f"module '{node.target}' ({type(module).__name__}) pads with "
                                           f"'{module.padding_mode}'")
            weight, bias = module.weight, module.bias
            geometry = (module.stride, module.padding, module.dilation, module.groups)
        else:
            weight, bias = argument(node, env, 1, "weight", None), argument(node, env, 2, "bias", None)
            geometry = (argument(node, env, 3, "stride", 1), argument(node, env, 4, "padding", 0),
                        argument(node, env, 5, "dilation", 1), argument(node, env, 6, "groups", 1))
        stamp = (weight, weight.data_ptr(), weight._version, weight.dtype, weight.device, geometry,
                 bias, None if bias is None else (bias.data_ptr(), bias._version))
        return self.cached(("conv", node), lambda: Conv(weight, bias, *geometry), stamp)

    def padding(self, node: fx.Node, env: dict[fx.Node, Any], like: Tensor) -> tuple[Tensor, float] | None:
        """For a constant pad op, where its output holds padding: [1, ...] of the output's size, 1 where a value
        of the input went, 0 at the padding; and the padding's value. None for any other op (a reflect or
        replicate pad copies values: every position holds one).

        Only the input's shape is used (``env`` may hold a stand-in); ``like`` gives the dtype and device.
        """
        if not opsets.PADS.match(node, self.module(node)):
            return None
        value = pad_value(self, node)
        if value is None:
            return None
        x_node = node.args[0]
        shape = (1, *env[x_node].shape[1:])

        def compute() -> Tensor:
            ones = torch.ones(shape, dtype=like.dtype, device=like.device)
            return self.call(node, {**env, x_node: ones}) - self.call(node, {**env, x_node: torch.zeros_like(ones)})

        return self.cached(("padding", node, shape, like.dtype, like.device), compute), value

    def _engine_value(self, node: fx.Node, env: dict[fx.Node, Any], overwrite_input: bool) -> Any:
        """A plain convolution's or an eval-mode batch norm's output computed the engine's way, or None where
        the model's own call must run (another op, a subclass with its own forward, a hook, gradients, another
        device or dtype).

        The numbers are the same up to float rounding; the time is not. Convolutions run with packed weights
        (``conv.py``). A batch norm whose input nothing else needs overwrites it, as ``x * a + b`` with the
        per-channel a and b of the inference kernel: on CPU a new activation-sized tensor costs more than the
        arithmetic (its pages are faulted in one by one).
        """
        kind = self._engine_ops.get(node)
        if kind is None or torch.is_grad_enabled() or _global_hooks():
            return None
        module = self.module(node)
        if module is not None and (module._forward_hooks or module._forward_pre_hooks):
            return None
        x = env[node.args[0]]
        if not isinstance(x, Tensor):
            return None
        if kind == "conv":
            conv = self.conv(node, env)
            return conv.output(x) if conv.packs_for(x) else None
        if module.training or module.running_mean is None or not overwrite_input or not _dense(x):
            return None
        stamp = tuple(t if t is None else (t, t._version, t.data_ptr())
                      for t in (module.running_mean, module.running_var, module.weight, module.bias)) + (module.eps,)
        scale, shift = self.cached(("batch_norm", node), lambda: _batch_norm_affine(module), stamp)
        return torch.addcmul(shift, x, scale, out=x)

    def _engine_op(self, node: fx.Node) -> str | None:
        module = self.module(node)
        if opsets.CONVOLUTIONS.match(node, module) and (module is None or (
                type(module).forward is nn.Conv2d.forward and type(module)._conv_forward is nn.Conv2d._conv_forward
                and module.padding_mode == "zeros")):
            return "conv"
        if isinstance(module, nn.BatchNorm2d) and type(module).forward is nn.BatchNorm2d.forward:
            return "batch_norm"
        return None

    # ------------------------------------------------------------------------------------------- running
    def _looks_inplace(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return getattr(self.module(node), "inplace", False) is True
        if node.op == "call_method":
            return node.target.endswith("_") and not node.target.startswith("_")
        if node.op == "call_function":
            name = getattr(node.target, "__name__", "")
            return (node.kwargs.get("inplace") is True or any(a is True for a in node.args[1:])
                    or node.target in (operator.iadd, operator.imul, operator.isub, operator.itruediv)
                    or (name.endswith("_") and not name.startswith("_")))
        return False

    def _fetch_attr(self, target: str) -> Any:
        value: Any = self.model
        for part in target.split("."):
            value = getattr(value, part)
        return value

    def call(self, node: fx.Node, env: dict[fx.Node, Any], overwrite_input: bool = False) -> Any:
        """Evaluate one node on the values in ``env`` (which may replace some inputs, as the rules do).

        An op that works in place gets a copy of its first argument, unless ``overwrite_input`` says that
        nothing else needs that value.
        """
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if not overwrite_input and node in self._inplace and args and isinstance(args[0], Tensor):
            args = (args[0].clone(),) + tuple(args[1:])
        if node.op == "call_module":
            return self.module(node)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return self._fetch_attr(node.target)
        raise AssertionError(node.op)

    def run(self, images: Tensor, keep: Iterable[fx.Node] = (), shapes: Iterable[fx.Node] = (),
            grad_from: fx.Node | None = None) -> tuple[Any, dict[fx.Node, Any]]:
        """Run the model on ``images``; return its output and the values of the ``keep`` nodes.

        For the ``shapes`` nodes only a stand-in on the meta device is returned (type, shape, dtype and
        strides, no data): what the relevance walk checks where it reads no value, at no memory cost.
        Nothing tracks gradients, except, when ``grad_from`` is given, the part of the graph above it:
        its value is returned as a leaf that requires grad, so that the output can be differentiated with
        respect to it alone (the classifier head only, no parameter gradients).
        """
        for _ in range(2):
            try:
                return self._run(images, set(keep), set(shapes), grad_from)
            except _MutatedInput:
                continue  # the node was marked in-place; the second run clones its input
        raise AssertionError("unreachable")

    def _run(self, images: Tensor, keep: set[fx.Node], shapes: set[fx.Node], grad_from: fx.Node | None
             ) -> tuple[Any, dict]:
        env: dict[fx.Node, Any] = {}
        stand_ins: dict[fx.Node, Any] = {}
        uses = {node: len(node.users) for node in self.nodes}
        # Storages seen by more than one value: an in-place op may overwrite only a value that nothing else
        # sees (the images and the model's own tensors are seen from outside, so they are never overwritten).
        holders = _StorageCount()
        holders.add(images)
        for tensor in (*self.model.parameters(), *self.model.buffers()):
            holders.add(tensor)
        grad_before = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            for node in self.nodes:
                if node.op == "placeholder":
                    if node is not self.input_node:
                        raise UnsupportedOperation(f"forward takes more than one input ({node.name})")
                    value = images
                elif node.op == "output":
                    values = {n: env[n] for n in keep if n in env}
                    return fx.node.map_arg(node.args[0], env.__getitem__), {**stand_ins, **values}
                else:
                    inputs = [env[n] for n in node.all_input_nodes if isinstance(env[n], Tensor)]
                    versions = [t._version for t in inputs]
                    first = node.args[0] if node.args else None
                    overwrite = (isinstance(first, fx.Node) and first not in keep and first is not grad_from
                                 and uses[first] == 1 and holders.only_one(env[first]))
                    value = self._engine_value(node, env, overwrite)
                    if value is None:
                        value = self.call(node, env, overwrite_input=overwrite)
                        if node not in self._inplace and any(t._version != v for t, v in zip(inputs, versions)):
                            self._inplace.add(node)
                            raise _MutatedInput(node)
                if node is grad_from:
                    value = value.detach().requires_grad_(True)
                    torch.set_grad_enabled(True)
                env[node] = value
                holders.add(value)
                if node in shapes and node not in keep:
                    stand_ins[node] = stand_in(value)
                for inp in node.all_input_nodes:
                    uses[inp] -= 1
                    if uses[inp] == 0 and inp not in keep:
                        holders.remove(env.pop(inp))
            raise AssertionError("graph without output")
        finally:
            torch.set_grad_enabled(grad_before)


def _batch_norm_affine(module: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode batch norm as x * scale + shift, [1, C, 1, 1] each (how torch's inference kernel computes it)."""
    scale = torch.rsqrt(module.running_var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    shift = -module.running_mean * scale
    if module.bias is not None:
        shift = shift + module.bias
    return scale.detach().view(1, -1, 1, 1), shift.detach().view(1, -1, 1, 1)


def _global_hooks() -> bool:
    return bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks)


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _same_stamp(old: tuple, new: tuple) -> bool:
    return len(old) == len(new) and all(
        a is b or not (isinstance(a, Tensor) or isinstance(b, Tensor)) and a == b for a, b in zip(old, new))


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for t in value if isinstance(t, Tensor)]
    return []


class _StorageCount:
    """How many recorded values use each storage (views and in-place results share their input's)."""

    def __init__(self) -> None:
        self._count: Counter[int] = Counter()

    @staticmethod
    def _key(tensor: Tensor) -> int:
        return tensor.untyped_storage().data_ptr()

    def add(self, value: Any) -> None:
        for tensor in _tensors(value):
            self._count[self._key(tensor)] += 1

    def remove(self, value: Any) -> None:
        for tensor in _tensors(value):
            self._count[self._key(tensor)] -= 1

    def only_one(self, value: Any) -> bool:
        return isinstance(value, Tensor) and self._count[self._key(value)] == 1


def stand_in(value: Any) -> Any:
    """A value's meta-device twin: same type, shape, dtype and strides, no data."""
    if isinstance(value, Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(stand_in(v) for v in value)
    return value


class _MutatedInput(Exception):
    """A node changed one of its inputs in place; that input's recorded value is no longer valid."""


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
