"""The model's blocks and their randomisation, and the steps of the cascade (which blocks are randomised at
each step; see the package docstring)."""
from __future__ import annotations

import copy
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


VARIANTS = ("abs", "signed", "positive_pooled")
VARIANT_LABELS = {"abs": "|map| at the map's resolution", "signed": "the signed map at its resolution",
                  "positive_pooled": "positive part pooled to {d}x{d} (what clustering reads)"}
METRICS = ("spearman", "ssim")
CHECKS = ("randomise", "class")
DEFAULT_POOLED_SIZE = 16        # the explain job's default --descriptor-size
SSIM_WINDOW = 7                 # scikit-image's default
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Block:
    """One step of the cascade: the modules (that own parameters or buffers) re-initialised together."""

    name: str                  # "head", or the block's module name(s), e.g. "layer4.2", "conv1 + bn1"
    modules: tuple[str, ...]   # module names, in graph order


def _owns_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _owner_positions(graph: Any) -> dict[str, list[Any]]:
    """Module name -> the graph nodes that use its own parameters or buffers (a called leaf module, or the
    users of a ``get_attr`` of one of its tensors, as in a functional ``F.conv2d(x, self.weight)``)."""
    model = graph.model
    owners = {name for name, module in model.named_modules() if _owns_tensors(module)}
    uses: dict[str, list[Any]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in owners:
            uses.setdefault(node.target, []).append(node)
        elif node.op == "get_attr":
            owner = node.target.rsplit(".", 1)[0] if "." in node.target else ""
            if owner in owners:
                uses.setdefault(owner, []).extend(node.users or [node])
    return uses


def _block_key(model: nn.Module, name: str) -> str:
    """The shortest prefix of `name` whose parent module is a container, else its top-level module."""
    if not name:
        return ""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        if isinstance(model.get_submodule(".".join(parts[:i - 1])), _CONTAINERS):
            return ".".join(parts[:i])
    return parts[0]


def _mixes(model: nn.Module, names: Sequence[str]) -> bool:
    """Whether a group holds a weight of two or more dimensions (a convolution, a linear layer)."""
    return any(p.dim() >= 2 for name in names for p in model.get_submodule(name).parameters(recurse=False))


def model_blocks(graph: Any, cam_layer: str | None = None) -> list[Block]:
    """`randomisation_blocks` split at the model's default CAM layer (`cam_layer` where the graph has none)."""
    try:
        last_spatial = graph.default_cam_layer()
    except ValueError:
        if cam_layer is None:
            raise
        last_spatial = cam_layer
    return randomisation_blocks(graph, last_spatial)


def randomisation_blocks(graph: Any, cam_layer: str) -> list[Block]:
    """The cascade's blocks, top first: the head (modules above the CAM layer; left out when it has none),
    then the blocks below it from the last to the first (see the module docstring). `graph` is an
    explainer's ``ModelGraph``. Modules not used on the way to the output are never randomised."""
    model = graph.model
    uses = _owner_positions(graph)
    reaches_output = graph.ancestors(graph.output_node)
    below_cam = graph.ancestors(graph.node_for(cam_layer))
    position = {name: min(graph.order[n] for n in nodes) for name, nodes in uses.items()
                if any(n in reaches_output for n in nodes)}
    ordered = sorted(position, key=lambda name: (position[name], name))
    head = tuple(name for name in ordered if not any(n in below_cam for n in uses[name]))
    groups: list[list[str]] = []   # in graph order
    keys: list[str] = []
    for name in ordered:
        if name in head:
            continue
        key = _block_key(model, name)
        if keys and keys[-1] == key:
            groups[-1].append(name)
        elif key in keys:   # a block whose modules are interleaved with another's: keep it one block
            groups[keys.index(key)].append(name)
        else:
            keys.append(key)
            groups.append([name])
    names = [key or type(model).__name__ for key in keys]
    merged: list[tuple[list[str], list[str]]] = []   # (display names, modules)
    for key_name, group in zip(names, groups):
        if merged and not _mixes(model, group):
            merged[-1][0].append(key_name)
            merged[-1][1].extend(group)
        else:
            merged.append(([key_name], list(group)))
    if len(merged) > 1 and not _mixes(model, merged[0][1]):   # a norm before any weight: join the next block
        first = merged.pop(0)
        merged[0] = (first[0] + merged[0][0], first[1] + merged[0][1])
    blocks = [Block(" + ".join(display), tuple(modules)) for display, modules in reversed(merged)]
    return ([Block("head", head)] if head else []) + blocks


def _block_seed(seed: int, block: Block) -> int:
    state = np.random.SeedSequence([seed, zlib.crc32(block.name.encode())]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def own_tensors(module: nn.Module) -> dict[str, Tensor]:
    """A module's own parameters and buffers by name (not its children's): what re-initialising it replaces."""
    return dict([*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)])


def randomised_tensors(model: nn.Module, block: Block, seed: int
                       ) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]]:
    """({module name: {tensor name: re-initialised value (CPU)}}, {module name: how}) for `block`, computed on
    CPU copies of its modules (the model is not changed)."""
    values: dict[str, dict[str, Tensor]] = {}
    how: dict[str, str] = {}
    generator = torch.Generator().manual_seed(_block_seed(seed, block))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_block_seed(seed, block))
        for name in block.modules:
            module = model.get_submodule(name)
            twin = copy.deepcopy(module).cpu()
            if callable(getattr(twin, "reset_parameters", None)):
                with torch.no_grad():
                    twin.reset_parameters()
                how[name] = "reset_parameters"
                values[name] = {key: value.detach().clone() for key, value in own_tensors(twin).items()}
            else:
                values[name] = {key: value.detach().flatten()[torch.randperm(value.numel(), generator=generator)]
                                .view_as(value).clone() for key, value in twin.named_parameters(recurse=False)}
                how[name] = "permuted"
    return values, how


def load_tensors(model: nn.Module, values: dict[str, dict[str, Tensor]]) -> None:
    """Copy {module name: {tensor name: value}} into the model's own tensors, in place."""
    with torch.no_grad():
        for name, tensors in values.items():
            own = own_tensors(model.get_submodule(name))
            for key, value in tensors.items():
                own[key].copy_(value)


def randomised_copy(model: nn.Module, depth: int, seed: int = 0, cam_layer: str | None = None
                    ) -> tuple[nn.Module, list[Block]]:
    """(a copy of `model` with the head and the top `depth` blocks re-initialised -- the model the cascade
    explains at that depth --, the blocks re-initialised, top first)."""
    from analysis.fgcam import FGCAM

    twin = copy.deepcopy(model)
    explainer = FGCAM(twin, cam_layer=cam_layer)
    blocks = model_blocks(explainer.graph, explainer.cam_layer)
    chosen = blocks[:resolve_depths([depth], blocks)[0] + int(len(blocks) > blocks_below_head(blocks))]
    for block in chosen:
        load_tensors(twin, randomised_tensors(twin, block, seed)[0])
    return twin, chosen


def blocks_below_head(blocks: Sequence[Block]) -> int:
    return len(blocks) - int(bool(blocks) and blocks[0].name == "head")


def default_depths(blocks: Sequence[Block]) -> list[int]:
    """The head alone, then 1, 2, 4, 8, ... blocks below it, and all of them."""
    count = blocks_below_head(blocks)
    has_head = len(blocks) > count
    depths = ([0] if has_head else []) + [2 ** k for k in range(count.bit_length()) if 2 ** k < count] + [count]
    return sorted(set(d for d in depths if d > 0 or has_head))


def parse_depths(text: str) -> list[int | str] | None:
    """--randomise's value: None for "none", else the tokens ("head", "all", or integers >= 0), unchecked
    against a model (`resolve_depths` does that). ValueError for a malformed list."""
    text = text.strip().lower()
    if text == "none":
        return None
    if text == "default":
        return ["default"]
    tokens: list[int | str] = []
    for token in (t.strip() for t in text.split(",")):
        if token in ("head", "all"):
            tokens.append(token)
        elif token.isdigit():
            tokens.append(int(token))
        else:
            raise ValueError(f"expected 'none', 'default' or comma-separated depths (head, 1, 2, ..., all), got "
                             f"{text!r}")
    return tokens


def resolve_depths(tokens: Sequence[int | str], blocks: Sequence[Block]) -> list[int]:
    """Sorted distinct depths (blocks below the head) for `tokens`; a one-line ValueError naming the model's
    block count for a depth it does not have."""
    count = blocks_below_head(blocks)
    has_head = len(blocks) > count
    if list(tokens) == ["default"]:
        return default_depths(blocks)
    depths = set()
    for token in tokens:
        depth = 0 if token == "head" else count if token == "all" else int(token)
        if depth > count:
            raise ValueError(f"--randomise {token}: the model has {count} blocks below the head "
                             f"(the deepest step is {count}, or 'all')")
        if depth == 0 and not has_head:
            raise ValueError("--randomise head: the model has no parameters above the CAM layer; start at 1")
        depths.add(depth)
    return sorted(depths)


def short_step_label(step: dict[str, Any], blocks: int) -> str:
    """A column header for a printed table: head, +1, +2, ..., all 18."""
    depth = step["depth"]
    return "head" if depth == 0 else f"all {depth}" if depth == blocks else f"+{depth}"


def step_label(depth: int, blocks: Sequence[Block]) -> str:
    count = blocks_below_head(blocks)
    has_head = len(blocks) > count
    if depth == count:
        return f"all ({'head + ' if has_head else ''}{count} blocks)"
    if depth == 0:
        return "head"
    plural = "s" if depth > 1 else ""
    return f"head + {depth} block{plural}" if has_head else f"top {depth} block{plural}"
