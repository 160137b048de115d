"""The machinery under FG-CAM: a model as a torch.fx graph that can be run while keeping the values the
relevance rules need, with module names (as in ``model.named_modules()``) mapped to graph nodes.

Why a graph and not module hooks: relevance must follow the model's real data flow (residual additions,
concatenations, functional calls, a ReLU module reused twice), which hooks on modules cannot see.
The graph is traced once; running it calls the model's own submodules, so weights are always current.
No hook is ever registered on the model, and its train/eval mode is never touched.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn


class UnsupportedOperation(RuntimeError):
    """The engine met an operation it has no relevance rule for (never a silently wrong map)."""


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


# Ops that turn a spatial feature map into a vector: the classifier head starts at the first of them.
_REDUCING_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                     nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten)
_REDUCING_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.adaptive_avg_pool1d,
                       F.adaptive_max_pool1d, torch.flatten, torch.reshape, torch.mean, torch.amax,
                       torch.squeeze}
_REDUCING_METHODS = {"view", "reshape", "flatten", "mean", "amax", "squeeze"}
# Head layers above the reduction (an MLP classifier), and layers that change no value at inference,
# which may also sit between two reductions (Inception v3: pool, dropout, flatten).
_HEAD_MODULES = (nn.Linear, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.BatchNorm1d, nn.LayerNorm)
_HEAD_FUNCTIONS = {F.linear, F.relu, torch.relu}
_TRANSPARENT_MODULES = (nn.Dropout, nn.Identity)
_TRANSPARENT_FUNCTIONS = {F.dropout}


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
        self.live = self.descendants(self.input_node)  # nodes whose value depends on the image
        self._paths: dict[tuple[fx.Node, fx.Node], frozenset[fx.Node]] = {}

    # ----------------------------------------------------------------------------------------------- naming
    def module_name(self, node: fx.Node) -> str | None:
        """The most specific module name whose output is ``node`` (a module called once preferred)."""
        names = [name for name, outs in self.module_outputs.items() if node in outs]
        if not names:
            return None
        once = [name for name in names if len(self.module_outputs[name]) == 1]
        return max(once or names, key=lambda name: (name.count("."), len(name)))

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

    def _module(self, node: fx.Node) -> nn.Module | None:
        return self.model.get_submodule(node.target) if node.op == "call_module" else None

    def _is_reducing(self, node: fx.Node) -> bool:
        return (isinstance(self._module(node), _REDUCING_MODULES)
                or (node.op == "call_function" and node.target in _REDUCING_FUNCTIONS)
                or (node.op == "call_method" and node.target in _REDUCING_METHODS))

    def _is_transparent(self, node: fx.Node) -> bool:
        return isinstance(self._module(node), _TRANSPARENT_MODULES) or \
            (node.op == "call_function" and node.target in _TRANSPARENT_FUNCTIONS)

    def _is_head(self, node: fx.Node) -> bool:
        return (isinstance(self._module(node), _HEAD_MODULES)
                or (node.op == "call_function" and node.target in _HEAD_FUNCTIONS))

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
        module = self._module(node)
        return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or \
            (node.op == "call_function" and node.target in (F.conv2d, torch.conv2d, F.linear))

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
        if (low, high) not in self._paths:
            self._paths[low, high] = frozenset(self.ancestors(high) & self.descendants(low))
        return self._paths[low, high]

    def values_needed(self, low: fx.Node, high: fx.Node) -> frozenset[fx.Node]:
        """The nodes whose values a forward run must keep to carry relevance from ``high`` to ``low``."""
        path = self.path(low, high)
        return path | {inp for node in path for inp in node.all_input_nodes}

    # ------------------------------------------------------------------------------------------- running
    @staticmethod
    def _looks_inplace(node: fx.Node) -> bool:
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

    def call(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        """Evaluate one node on the values in ``env`` (which may replace some inputs, as the rules do)."""
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            if getattr(module, "inplace", False) is True and args and isinstance(args[0], Tensor):
                args = (args[0].clone(),) + tuple(args[1:])
            return module(*args, **kwargs)
        if node in self._inplace and args and isinstance(args[0], Tensor):
            args = (args[0].clone(),) + tuple(args[1:])
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return self._fetch_attr(node.target)
        raise AssertionError(node.op)

    def run(self, images: Tensor, keep: Iterable[fx.Node] = (), grad_from: fx.Node | None = None
            ) -> tuple[Any, dict[fx.Node, Any]]:
        """Run the model on ``images``; return its output and the values of the ``keep`` nodes.

        Nothing tracks gradients, except, when ``grad_from`` is given, the part of the graph above it:
        its value is returned as a leaf that requires grad, so that the output can be differentiated with
        respect to it alone (the classifier head only, no parameter gradients).
        """
        for _ in range(2):
            try:
                return self._run(images, set(keep), grad_from)
            except _MutatedInput:
                continue  # the node was marked in-place; the second run clones its input
        raise AssertionError("unreachable")

    def _run(self, images: Tensor, keep: set[fx.Node], grad_from: fx.Node | None) -> tuple[Any, dict]:
        env: dict[fx.Node, Any] = {}
        uses = {node: len(node.users) for node in self.nodes}
        grad_before = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            for node in self.nodes:
                if node.op == "placeholder":
                    if node is not self.input_node:
                        raise UnsupportedOperation(f"forward takes more than one input ({node.name})")
                    value = images
                elif node.op == "output":
                    return fx.node.map_arg(node.args[0], env.__getitem__), {n: env[n] for n in keep if n in env}
                else:
                    inputs = [env[n] for n in node.all_input_nodes if isinstance(env[n], Tensor)]
                    versions = [t._version for t in inputs]
                    value = self.call(node, env)
                    if node not in self._inplace and any(t._version != v for t, v in zip(inputs, versions)):
                        self._inplace.add(node)
                        raise _MutatedInput(node)
                if node is grad_from:
                    value = value.detach().requires_grad_(True)
                    torch.set_grad_enabled(True)
                env[node] = value
                for inp in node.all_input_nodes:
                    uses[inp] -= 1
                    if uses[inp] == 0 and inp not in keep:
                        del env[inp]
            raise AssertionError("graph without output")
        finally:
            torch.set_grad_enabled(grad_before)


class _MutatedInput(Exception):
    """A node changed one of its inputs in place; that input's recorded value is no longer valid."""
