"""Sanity checks for relevance maps: does a map depend on the model, and on the class explained?

Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim, "Sanity Checks for Saliency Maps", NeurIPS 2018; Sixt,
Granz, Landgraf, "When Explanations Lie: Why Many Modified BP Attributions Fail", ICML 2020 (z+-style rules,
as FG-CAM and LRP use below the CAM layer, can fail the randomisation check: products of non-negative
propagation matrices converge to a map that no longer depends on the relevance above them).

* **Cascading model randomisation.** On a copy of the model, re-initialise the classifier head, then the
  top block, then the next one down, cumulatively, and after each step compare each method's map (for the
  class the original model predicted) with the map of the original model. A map that barely changes
  describes the image, not what the model learnt.
* **Class sensitivity.** Compare the map of the predicted class with the map of another class, drawn at
  random per image (seeded). A map that barely changes does not explain the decision.

How the blocks are found (`randomisation_blocks`, ours; the paper randomises Inception v3's named blocks):
every module that owns parameters or buffers and is used in the traced forward pass is one *unit*. Units
above the model's last spatial layer (the default CAM layer, whichever CAM layer the explainer uses, so
that the cascade is the same for every choice of it) form the **head**. The others are grouped by the
shortest prefix of their module name whose parent is a container (``nn.Sequential``, ``nn.ModuleList``,
``nn.ModuleDict``), else by their top-level module: ResNet's ``layer3.1``, EfficientNet-Lite's
``_blocks.7``, VGG's ``features.10``, Inception's ``Mixed_6b``. A group without a weight of two or more
dimensions (a batch norm on its own) joins the group before it in the graph (VGG's ``features.0 +
features.1``, ResNet's ``conv1 + bn1``). Blocks are ordered by where they start in the graph; the cascade
goes from the last one down.

How a unit is re-initialised: its own ``reset_parameters()`` (what a freshly built model holds before
training: Kaiming-uniform weights for convolutions and linear layers; a batch norm becomes weight 1, bias 0,
running mean 0 and variance 1); a unit without one gets each parameter's entries randomly permuted (its
weight distribution kept, what it learnt destroyed). Seeded per block, on the CPU, so the random weights
do not depend on the device, the batch or the depths chosen. The caller's model is never touched.

How maps are compared (per image; the mean and a 95% Student-t confidence interval over the images):

* variants: ``abs`` -- |map| at the map's own resolution (the input's, the intermediate layer's; the CAM's
  own for the CAM), Adebayo et al.'s main variant; ``signed`` -- the map itself (a map whose sign flips
  scores -1 here and 1 in ``abs``); ``positive_pooled`` -- the positive part adaptive-average-pooled to
  D x D and scaled to unit mass, what the dashboard's clustering reads (`analysis.scores.descriptors`; a
  map without positive relevance has no descriptor: undefined).
* Spearman rank correlation (average ranks for ties; scipy.stats.spearmanr's definition); undefined (NaN,
  left out of the mean and counted) when a map is constant.
* SSIM (Wang et al. 2004) with scikit-image's defaults (7 x 7 uniform window, K1 0.01, K2 0.03, sample
  covariance, mean over the windows inside the map) on each map min-max scaled to [0, 1]; a smaller window
  (the largest odd size that fits) on maps under 7 pixels a side, NaN under 3.

Methods that ignore the model (the random map, the edge map) score exactly 1 in both checks: they are the
reference for "the map shows the image". The CAM's map is compared at its own layer for every layer row.
"""
from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.compare import BASE_LABELS, METHODS, Explainers, method_label, method_maps
from analysis.scores import descriptors

VARIANTS = ("abs", "signed", "positive_pooled")
VARIANT_LABELS = {"abs": "|map| at the map's resolution", "signed": "the signed map at its resolution",
                  "positive_pooled": "positive part pooled to {d}x{d} (what clustering reads)"}
METRICS = ("spearman", "ssim")
CHECKS = ("randomise", "class")
DEFAULT_POOLED_SIZE = 16        # the explain job's default --descriptor-size
SSIM_WINDOW = 7                 # scikit-image's default
SSIM_K1, SSIM_K2 = 0.01, 0.03
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


# ----------------------------------------------------------------------------------------------------------
# Blocks of the model and their randomisation
# ----------------------------------------------------------------------------------------------------------

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


def _own_tensors(module: nn.Module) -> dict[str, Tensor]:
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
                values[name] = {key: value.detach().clone() for key, value in _own_tensors(twin).items()}
            else:
                values[name] = {key: value.detach().flatten()[torch.randperm(value.numel(), generator=generator)]
                                .view_as(value).clone() for key, value in twin.named_parameters(recurse=False)}
                how[name] = "permuted"
    return values, how


def load_tensors(model: nn.Module, values: dict[str, dict[str, Tensor]]) -> None:
    """Copy {module name: {tensor name: value}} into the model's own tensors, in place."""
    with torch.no_grad():
        for name, tensors in values.items():
            own = _own_tensors(model.get_submodule(name))
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


# ----------------------------------------------------------------------------------------------------------
# Cascade steps
# ----------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------
# Similarity of maps
# ----------------------------------------------------------------------------------------------------------

def map_variants(maps: Tensor, pooled_size: int) -> dict[str, np.ndarray]:
    """{variant: float64 [N, h, w]} of maps [N, h, w] (see the module docstring)."""
    maps = maps.detach().float().cpu()
    pooled = descriptors(maps, pooled_size, "positive").view(len(maps), pooled_size, pooled_size)
    return {"abs": maps.abs().double().numpy(), "signed": maps.double().numpy(),
            "positive_pooled": pooled.double().numpy()}


def rank_rows(values: np.ndarray) -> np.ndarray:
    """float64 [N, P]: each row's average ranks (ties share their mean rank), as spearmanr ranks."""
    from scipy.stats import rankdata

    return rankdata(values.reshape(len(values), -1), axis=1).astype(np.float64)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=1) / denominator, np.nan)


def spearman_rows(a: np.ndarray, b: np.ndarray, ranks_a: np.ndarray | None = None) -> np.ndarray:
    """float64 [N]: Spearman rank correlation of a[i] and b[i] ([N, ...] each); NaN where a map is constant.
    `ranks_a` (``rank_rows(a)``) saves ranking a again."""
    return _pearson_rows(rank_rows(a) if ranks_a is None else ranks_a, rank_rows(b))


def ssim_window(height: int, width: int) -> int | None:
    """The SSIM window for a map: 7, or the largest odd size that fits; None under 3 pixels a side."""
    side = min(SSIM_WINDOW, height, width)
    side -= 1 - side % 2
    return side if side >= 3 else None


def _unit_range(maps: Tensor) -> tuple[Tensor, Tensor]:
    flat = maps.flatten(1)
    low, high = flat.amin(1), flat.amax(1)
    span = high - low
    scaled = (maps - low[:, None, None]) / torch.where(span > 0, span, 1)[:, None, None]
    return scaled, span > 0


def ssim_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 [N]: SSIM of a[i] and b[i] ([N, h, w] each), each min-max scaled to [0, 1] (data range 1), with
    scikit-image's defaults; NaN where a map is constant or smaller than 3 x 3."""
    a_t, b_t = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    window = ssim_window(*a_t.shape[-2:])
    if window is None or len(a_t) == 0:
        return np.full(len(a_t), np.nan)
    (x, x_ok), (y, y_ok) = _unit_range(a_t), _unit_range(b_t)
    x, y = x[:, None], y[:, None]

    def mean(t: Tensor) -> Tensor:   # the window's mean at every position where it fits inside the map
        return F.avg_pool2d(t, window, stride=1)

    n = window * window
    covariance = n / (n - 1)   # sample covariance, as scikit-image's default
    ux, uy = mean(x), mean(y)
    vx = covariance * (mean(x * x) - ux * ux)
    vy = covariance * (mean(y * y) - uy * uy)
    vxy = covariance * (mean(x * y) - ux * uy)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    out = s.mean(dim=(1, 2, 3)).numpy()
    return np.where((x_ok & y_ok).numpy(), out, np.nan)


# ----------------------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------------------

@dataclass
class SanityChecks:
    """Per-image similarities, their summary, and what was randomised at each step (``meta``)."""

    table: pd.DataFrame       # `summarise_sanity`: one row per (check, step, layer, method, variant)
    per_image: pd.DataFrame   # image, class, other_class, check, step, layer, method, variant, spearman, ssim
    meta: dict[str, Any] = field(default_factory=dict)


def other_classes(classes: Tensor, num_classes: int, image_indices: Sequence[int], seed: int) -> Tensor:
    """long [N]: a class other than classes[i], uniform over the others, drawn per image from (seed, index)."""
    if num_classes < 2:
        raise ValueError("the class check needs a model with at least two outputs")
    out = []
    for top, index in zip(classes.tolist(), image_indices):
        draw = int(np.random.default_rng([seed, int(index), 1]).integers(num_classes - 1))
        out.append(draw + int(draw >= top))
    return torch.tensor(out, dtype=torch.long, device=classes.device)


def layer_size(explainers: Explainers, layer: str, images: Tensor) -> tuple[int, int]:
    """The spatial size of `layer`'s output for `images` (the images' own for "input")."""
    if layer == "input":
        return tuple(images.shape[-2:])
    graph = explainers.fgcam.graph
    node = graph.node_for(layer)
    parameter = next(explainers.fgcam.model.parameters(), None)
    image = images[:1] if parameter is None else images[:1].to(parameter.device, parameter.dtype)
    with torch.no_grad():
        _, values = graph.run(image, shapes={node})
    return tuple(values[node].shape[-2:])


def _maps(explainers: Explainers, methods: Sequence[str], layers: Sequence[str], images: Tensor, classes: Tensor,
          sizes: dict[str, tuple[int, int]], image_indices: Sequence[int], seed: int,
          pooled_size: int) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """{(layer, method): variants} for one batch; the CAM once, at its own layer, for every layer."""
    out = {}
    cam = None
    if "cam" in methods:
        cam = map_variants(explainers.fgcam(images, target_layer=explainers.fgcam.cam_layer, classes=classes).maps,
                           pooled_size)
    for layer in layers:
        for method in methods:
            if method == "cam":
                out[(layer, method)] = cam
            else:
                maps = method_maps(explainers, method, images, layer, classes, sizes[layer], image_indices, seed)
                out[(layer, method)] = map_variants(maps, pooled_size)
    return out


def _compare(reference: dict, ranks: dict, maps: dict) -> dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]]:
    return {(layer, method, variant): (spearman_rows(ref, maps[(layer, method)][variant],
                                                     ranks[(layer, method, variant)]),
                                       ssim_rows(ref, maps[(layer, method)][variant]))
            for (layer, method), variants in reference.items() for variant, ref in variants.items()}


def sanity_checks(model: nn.Module, images: Tensor, layers: Sequence[str] = ("input",),
                  methods: Sequence[str] = METHODS, base: str = "gradcam", cam_layer: str | None = None,
                  depths: Sequence[int] | None = None, class_check: bool = True, seed: int = 0,
                  batch_size: int = 16, pooled_size: int = DEFAULT_POOLED_SIZE,
                  progress: Callable[[int], Any] | None = None, low_rule: Any = None) -> SanityChecks:
    """Both checks for every method at every layer on `images` [N, C, H, W], explaining the class the
    original model predicts. `depths`: the cascade's steps in blocks below the head (0: the head alone;
    None: `default_depths`; empty: no randomisation). Costs, per image, one explanation per method and
    layer for the original model, for the other class, and for each step. `progress(k)` after each k
    images of a step. The caller's model is not changed (a copy is randomised). `low_rule`: the engine's rule
    for the lowest convolutions (``analysis.fgcam.LowRule``; None: z+ everywhere)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be [N, C, H, W] with N >= 1, got shape {tuple(images.shape)}")
    twin = copy.deepcopy(model)   # randomised in place, step by step; the caller's model is never touched
    explainers = Explainers.build(twin, base=base, cam_layer=cam_layer, low_rule=low_rule)
    blocks = model_blocks(explainers.fgcam.graph, explainers.fgcam.cam_layer)
    depths = default_depths(blocks) if depths is None else resolve_depths(list(depths), blocks)
    has_head = len(blocks) > blocks_below_head(blocks)
    # Block i of `blocks` is randomised from the step whose depth reaches it (the head is depth 0).
    needed = blocks[:max(depths) + int(has_head)] if depths else []
    randomised, how = {}, {}
    for block in needed:
        values, block_how = randomised_tensors(twin, block, seed)
        randomised[block.name] = values
        how.update(block_how)
    original = {name: {key: value.detach().clone() for key, value in _own_tensors(twin.get_submodule(name)).items()}
                for block in needed for name in block.modules}
    parameter = next(twin.parameters(), None)
    device = parameter.device if parameter is not None else images.device
    sizes = {layer: layer_size(explainers, layer, images) for layer in layers}
    rows: list[pd.DataFrame] = []

    def add(check: str, step: int, index: np.ndarray, classes: Tensor, other: Tensor | None, scores: dict) -> None:
        for (layer, method, variant), (spearman, ssim) in scores.items():
            rows.append(pd.DataFrame({
                "image": index, "class": classes.cpu().numpy(),
                "other_class": other.cpu().numpy() if other is not None else np.full(len(index), -1),
                "check": check, "step": step, "layer": layer, "method": method, "variant": variant,
                "spearman": spearman, "ssim": ssim}))

    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        index = np.arange(start, start + len(batch))
        load_tensors(twin, original)
        logits = explainers.fgcam.logits(batch.to(device, parameter.dtype if parameter is not None else batch.dtype))
        classes = logits.argmax(dim=1)
        reference = _maps(explainers, methods, layers, batch, classes, sizes, index, seed, pooled_size)
        ranks = {(layer, method, variant): rank_rows(values) for (layer, method), variants in reference.items()
                 for variant, values in variants.items()}
        if class_check:
            other = other_classes(classes, logits.shape[1], index, seed)
            add("class", 0, index, classes, other, _compare(reference, ranks, _maps(
                explainers, methods, layers, batch, other, sizes, index, seed, pooled_size)))
            if progress is not None:
                progress(len(batch))
        done = 0
        for step, depth in enumerate(depths, start=1):
            for block in needed[done:depth + int(has_head)]:
                load_tensors(twin, randomised[block.name])
            done = depth + int(has_head)
            add("randomise", step, index, classes, None, _compare(reference, ranks, _maps(
                explainers, methods, layers, batch, classes, sizes, index, seed, pooled_size)))
            if progress is not None:
                progress(len(batch))
    per_image = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["image", "class", "other_class", "check", "step", "layer", "method", "variant", "spearman", "ssim"])
    order = {"check": {c: i for i, c in enumerate(CHECKS)}, "layer": {l: i for i, l in enumerate(layers)},
             "method": {m: i for i, m in enumerate(methods)}, "variant": {v: i for i, v in enumerate(VARIANTS)}}
    keys = [per_image[column].map(mapping) for column, mapping in order.items()]
    per_image = per_image.assign(**{f"_{c}": k for c, k in zip(order, keys)}).sort_values(
        ["_check", "step", "_layer", "_method", "_variant", "image"], kind="stable").drop(
        columns=[f"_{c}" for c in order]).reset_index(drop=True)
    steps = [{"step": step, "depth": depth, "label": step_label(depth, blocks),
              "blocks": [b.name for b in blocks[:depth + int(has_head)]],
              "modules": [m for b in blocks[:depth + int(has_head)] for m in b.modules]}
             for step, depth in enumerate(depths, start=1)]
    labels = {m: method_label(m, base) for m in methods}
    if "cam" in labels:   # compared at its own layer here, not upsampled
        cam_size = "x".join(map(str, layer_size(explainers, explainers.fgcam.cam_layer, images[:1])))
        labels["cam"] = f"{BASE_LABELS.get(base, base)} at {explainers.fgcam.cam_layer} ({cam_size})"
    meta = {"methods": list(methods), "layers": list(layers), "layer_sizes": {k: list(v) for k, v in sizes.items()},
            "cam_layer": explainers.fgcam.cam_layer, "base": base, "n_images": int(len(images)), "seed": seed,
            "pooled_size": pooled_size, "class_check": bool(class_check),
            "variants": {v: VARIANT_LABELS[v].format(d=pooled_size) for v in VARIANTS},
            "blocks": [{"name": b.name, "modules": list(b.modules)} for b in blocks],
            "reinitialised_with": how, "steps": steps, "labels": labels}
    table = summarise_sanity(per_image, steps, labels)
    meta["sentence"] = sanity_sentence(table, meta)
    return SanityChecks(table=table, per_image=per_image, meta=meta)


# ----------------------------------------------------------------------------------------------------------
# Summaries for the table, the Trust page and the sentence
# ----------------------------------------------------------------------------------------------------------

def mean_and_ci(values: np.ndarray) -> tuple[int, float, float, float]:
    """(n, mean, std (ddof 1), 95% Student-t half-width) of the finite values."""
    from scipy import stats

    values = values[np.isfinite(values)]
    n = len(values)
    if n == 0:
        return 0, float("nan"), float("nan"), float("nan")
    std = float(values.std(ddof=1)) if n > 1 else float("nan")
    ci = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else float("nan")
    return n, float(values.mean()), std, ci


def summarise_sanity(per_image: pd.DataFrame, steps: Sequence[dict], labels: dict[str, str] | None = None
                     ) -> pd.DataFrame:
    """One row per (check, step, layer, method, variant), in the per-image order: step label and depth,
    the method's label, and per metric n, mean, std, ci95 over the images where it is defined, plus
    ``undefined`` (images where a map was constant)."""
    by_step = {s["step"]: s for s in steps}
    rows = []
    for (check, step, layer, method, variant), group in per_image.groupby(
            ["check", "step", "layer", "method", "variant"], sort=False):
        row: dict[str, Any] = {
            "check": check, "step": int(step),
            "depth": by_step[step]["depth"] if check == "randomise" else -1,
            "step_label": by_step[step]["label"] if check == "randomise" else "another class",
            "layer": layer, "method": method, "label": (labels or {}).get(method, method), "variant": variant,
            "images": len(group)}
        for metric in METRICS:
            n, mean, std, ci = mean_and_ci(group[metric].to_numpy(np.float64))
            row.update({f"{metric}_n": n, f"{metric}_mean": mean, f"{metric}_std": std, f"{metric}_ci95": ci})
        row["undefined"] = int(len(group) - row["spearman_n"])
        rows.append(row)
    return pd.DataFrame(rows)


def sanity_curves(table: pd.DataFrame, variant: str = "abs", metric: str = "spearman") -> pd.DataFrame:
    """The randomisation curves for a chart: layer, method, label, step (0 = the original model, where a map
    equals itself: 1), step_label, depth, mean, low and high (the 95% interval)."""
    data = table[(table["check"] == "randomise") & (table["variant"] == variant)]
    curves = pd.DataFrame({"layer": data["layer"], "method": data["method"], "label": data["label"],
                           "step": data["step"], "step_label": data["step_label"], "depth": data["depth"],
                           "mean": data[f"{metric}_mean"],
                           "low": data[f"{metric}_mean"] - data[f"{metric}_ci95"].fillna(0),
                           "high": data[f"{metric}_mean"] + data[f"{metric}_ci95"].fillna(0)})
    origin = curves.drop_duplicates(["layer", "method"]).assign(step=0, step_label="original", depth=-1,
                                                                 mean=1.0, low=1.0, high=1.0)
    return pd.concat([origin, curves], ignore_index=True).sort_values(["layer", "method", "step"], kind="stable",
                                                                       key=_first_appearance).reset_index(drop=True)


def _first_appearance(column: pd.Series) -> pd.Series:
    if column.name == "step":
        return column
    return column.map({value: i for i, value in enumerate(dict.fromkeys(column))})


def _range(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}" if round(low, 2) == round(high, 2) else f"{low:.2f} to {high:.2f}"


def sanity_sentence(table: pd.DataFrame, meta: dict[str, Any], layer: str = "input") -> str:
    """One plain sentence of what the checks say about FG-CAM's map at `layer` (|map|, Spearman), next to the
    plain CAM."""
    abs_rows = table[(table["variant"] == "abs") & (table["layer"] == layer)]
    randomise = abs_rows[abs_rows["check"] == "randomise"]
    other = abs_rows[abs_rows["check"] == "class"]

    def values(frame: pd.DataFrame, method: str) -> list[float]:
        return [v for v in frame.loc[frame["method"] == method, "spearman_mean"] if np.isfinite(v)]

    fgcam, cam = values(randomise, "fgcam"), values(randomise, "cam")
    cam_name = f"the plain {BASE_LABELS.get(meta.get('base'), meta.get('base') or 'CAM')}"
    where = "the pixels" if layer == "input" else f"{layer}"
    parts = []
    if fgcam:
        worst = max(fgcam)
        verdict = ("so much of its detail shows the image rather than what the model learnt" if worst >= 0.5 else
                   "so part of it shows the image rather than the model" if worst >= 0.3 else
                   "so it depends on what the model learnt")
        parts.append(f"with the model's top layers replaced by random ones, FG-CAM's map at {where} still has a "
                     f"rank correlation of {_range(fgcam)} with the original"
                     + (f" ({cam_name}: {_range(cam)}; 1 would mean it ignores the model)" if cam else
                        " (1 would mean it ignores the model)") + f", {verdict}")
    fg_other, cam_other = values(other, "fgcam"), values(other, "cam")
    if fg_other:
        parts.append(f"explaining another class gives {_range(fg_other)}"
                     + (f" ({cam_name}: {_range(cam_other)})" if cam_other else ""))
    if not parts:
        return ""
    sentence = "; ".join(parts)
    return sentence[0].upper() + sentence[1:] + "."


def format_sanity_table(table: pd.DataFrame, meta: dict[str, Any], variant: str = "abs",
                        metric: str = "spearman") -> str:
    """A printed table: rows (layer, method), columns the cascade's steps and the class check; cells mean ±
    95% half-width of `metric` on `variant` maps."""
    data = table[table["variant"] == variant]
    blocks = sum(1 for b in meta.get("blocks", []) if b["name"] != "head")
    steps = {s["step"]: s for s in meta.get("steps", [])}
    columns = sorted(dict.fromkeys(zip(data["check"], data["step"])), key=lambda c: (c[0] != "randomise", c[1]))
    columns = [(check, step, short_step_label(steps[step], blocks) if check == "randomise" else "other class")
               for check, step in columns]
    sizes = meta.get("layer_sizes", {})
    name = {"spearman": "Spearman rank correlation", "ssim": "SSIM"}[metric]
    title = (f"{name} with the original map, {meta.get('variants', {}).get(variant, variant)}; mean ± 95% "
             f"half-width over {meta.get('n_images')} images (1: the map did not change). Columns: blocks "
             f"re-initialised below the head (of {blocks}), and the class check")
    width = 13
    header = f"{'layer':22}{'method':38}" + "".join(f"{label:>{width}}" for *_, label in columns)
    lines = [title, header, "-" * len(header)]
    previous = None
    for (layer, method), group in data.groupby(["layer", "method"], sort=False):
        if previous is not None and layer != previous:
            lines.append("")
        previous = layer
        shown = f"{layer} ({sizes[layer][0]}x{sizes[layer][1]})" if layer in sizes else layer
        cells = {(r.check, r.step): (getattr(r, f"{metric}_mean"), getattr(r, f"{metric}_ci95"))
                 for r in group.itertuples(index=False)}
        text = []
        for check, step, _ in columns:
            mean, ci = cells.get((check, step), (float("nan"), float("nan")))
            cell = "n/a" if not np.isfinite(mean) else f"{mean:.2f}" + (f"±{ci:.2f}" if np.isfinite(ci) else "")
            text.append(f"{cell:>{width}}")
        label = group["label"].iloc[0]
        lines.append(f"{shown[:21]:22}{label[:37]:38}" + "".join(text))
    undefined = data.assign(share=data["undefined"] / data["images"]).groupby(["layer", "method", "label"], sort=False)[
        "share"].max()
    for (layer, _, label), share in undefined[undefined > 0].items():
        lines.append(f"note: {label} at {layer}: up to {share:.0%} of the pairs have a constant map "
                     f"({'no positive relevance, ' if variant == 'positive_pooled' else ''}undefined; left out)")
    return "\n".join(lines)


def format_blocks(meta: dict[str, Any]) -> str:
    """What each step re-initialised, one line per step."""
    lines = ["randomisation cascade (cumulative, from the top; " + ", ".join(
        sorted(set(meta.get("reinitialised_with", {}).values()))) + "):"]
    blocks = meta.get("blocks", [])
    for step in meta.get("steps", []):
        names = step["blocks"]
        shown = ", ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])}, ..., {names[-1]}"
        lines.append(f"  {step['label']:>24}: {shown}")
    if blocks:
        lines.append(f"  ({len(blocks)} blocks in all; the deepest is {blocks[-1]['name']})")
    return "\n".join(lines)
