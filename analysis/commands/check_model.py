"""`python -m analysis check-model`: one screen, before a long job, on whether and how FG-CAM explains a model.

It says which CAM layer the job will use (and the other candidates: the last layer at each finer
resolution), every op on the way from the CAM layer down to the target with the rule it gets (the engine's
table, ``analysis/fgcam/ops.py``) and how often, any op without a rule (named, with its module), how much of
the relevance reaches the target on a few images (``--images``, else random ones through the model's own
preprocessing), every layer that loses or gains more than 1% of it (the per-layer table that found the
depthwise losses of issue 11), the time per image with an estimate for a whole dataset, and the peak memory.

Exit status: 0 when the model can be explained (a conservation warning does not change that), 1 when it
cannot (it does not trace, an op has no rule, the explanation fails on the images), 2 for an option that
cannot be used (one line on stderr, before any work).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from analysis.commands.check_labels import warn_about_labels
from analysis.commands.cli_types import add_model_arguments, positive_int
from analysis.pipeline.devices import pick_device
from analysis.pipeline.models import LoadedModel, ModelSpecError, load_model
from analysis.pipeline.datasets import IMAGE_EXTENSIONS, evenly_spaced, load_image, to_model_mode

COMMAND = "check-model"
HELP = "check before a job that FG-CAM can explain a model: CAM layer, rule per op, conservation, time, memory"
BASES = ("gradcam", "scorecam", "gradcam++", "xgradcam", "layercam")
LOSS_THRESHOLD = 0.01  # a layer that loses or gains more than this share of the relevance is listed
MAX_CANDIDATES = 5


class OptionError(Exception):
    """An option that cannot be used: one line, exit status 2."""


@dataclass
class OpCount:
    op: str                 # module class, function or tensor method
    kind: str | None        # the row of the engine's op table (None: no rule)
    count: int


@dataclass
class LayerChange:
    layer: str
    kind: str | None
    change: float           # (passed on - received) / |components' sum|, the image where it is largest
    received: float         # that image's relevance at the op's output, and what it passed on
    passed: float


@dataclass
class ModelCheck:
    model: str
    parameters: int
    input_shape: list[int]                    # [C, H, W] after preprocessing
    target_layer: str
    cam_layer: str | None = None
    cam_shape: list[int] | None = None
    cam_layer_is_default: bool = True
    candidates: list[dict[str, Any]] = field(default_factory=list)   # {"layer", "shape"}, finest last
    ops: list[OpCount] = field(default_factory=list)
    rules: dict[str, str] = field(default_factory=dict)               # kind -> its rule, in words
    unsupported: list[str] = field(default_factory=list)
    images: str = ""
    conservation: list[float] = field(default_factory=list)           # per image: target sum / components' sum
    changes: list[LayerChange] = field(default_factory=list)
    device: str = "cpu"
    batch_size: int = 0
    seconds_per_image: float | None = None
    forward_seconds_per_image: float | None = None
    estimate_for: int = 0
    peak_memory_bytes: int | None = None
    memory_measure: str = ""
    notes: list[str] = field(default_factory=list)
    error: str | None = None                  # why the model cannot be explained

    @property
    def explainable(self) -> bool:
        return self.error is None

    @property
    def conserved(self) -> bool:
        return bool(self.conservation) and all(abs(k - 1) <= LOSS_THRESHOLD for k in self.conservation)


# ----------------------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------------------

def check_model(loaded: LoadedModel, images: Tensor, image_source: str, spec: str, base: str = "gradcam",
                cam_layer: str | None = None, target_layer: str = "input", device: torch.device | None = None,
                batch_size: int = 8, estimate_for: int = 10_000, timing: bool = True) -> ModelCheck:
    """Everything the report says (``timing`` False: no time and memory); OptionError for an unknown layer."""
    from analysis.fgcam import FGCAM, UnsupportedOperation, require_feature_map
    from analysis.fgcam.propagate import node_kinds

    device = device or torch.device("cpu")
    model = loaded.model.to(device)
    images = images.to(device)
    check = ModelCheck(model=spec, parameters=sum(p.numel() for p in model.parameters()),
                       input_shape=list(images.shape[1:]), target_layer=target_layer, images=image_source,
                       device=str(device), batch_size=batch_size, estimate_for=estimate_for,
                       cam_layer_is_default=cam_layer is None)
    try:
        explainer = FGCAM(model, base=base, cam_layer=cam_layer)
    except UnsupportedOperation as error:  # the model does not trace
        check.error = _first_line(error)
        return check
    except ValueError as error:
        if cam_layer is not None:
            raise OptionError(f"--cam-layer: {_first_line(error)}") from None
        check.error = _first_line(error)  # no spatial layer before the head was found
        return check
    check.cam_layer = explainer.cam_layer
    try:
        target = explainer.graph.node_for(target_layer)
    except ValueError as error:
        raise OptionError(f"--target-layer: {_first_line(error)}") from None
    described = _describe_layers(check, explainer, images, target)
    if described is None:
        return check
    shapes, cam = described
    kinds = node_kinds(explainer.graph)
    _tabulate_ops(check, explainer.graph, _path_ops(explainer.graph, shapes, target, cam), kinds)
    try:
        require_feature_map(shapes.get(cam), explainer.cam_layer)  # before a real forward pass: a ViT's tokens
        flow = _measure_conservation(check, explainer, images, target_layer)
    except UnsupportedOperation as error:
        check.error = _first_line(error)
        if check.unsupported:
            check.error += f" ({len(check.unsupported)} op(s) on the way without a rule, listed above)"
        return check
    except (RuntimeError, ValueError) as error:
        check.error = f"{type(error).__name__}: {_first_line(error)}"
        return check
    _tabulate_ops(check, explainer.graph, [step.node for step in flow], kinds)  # where relevance really went
    try:
        if timing:
            _measure_speed(check, explainer, model, images, target_layer)
    except RuntimeError as error:  # out of memory at --batch-size
        check.notes.append(f"timing a batch of {batch_size} failed ({type(error).__name__}: {_first_line(error)}); "
                           "try a smaller --batch-size")
    return check


def _describe_layers(check: ModelCheck, explainer, images: Tensor, target) -> tuple[dict, Any] | None:
    """The CAM layer's shape, the finer candidates, notes; every node's shape and the CAM layer's node (None:
    the model's forward fails on the images)."""
    graph = explainer.graph
    try:
        shapes = graph.run(images[:1], shapes=graph.nodes)[1]  # every node's value as a shape-only stand-in
    except Exception as error:  # the model's own forward fails on these images (size, channels)
        check.error = f"the model fails on the preprocessed images {tuple(images.shape[1:])}: " \
                      f"{type(error).__name__}: {_first_line(error)}"
        return None
    cam = graph.node_for(explainer.cam_layer)
    if target not in graph.path(target, cam):
        raise OptionError(f"--target-layer {check.target_layer!r} is not below the CAM layer {explainer.cam_layer!r}")
    check.cam_shape = _shape_of(shapes.get(cam))
    calls = len(graph.module_outputs.get(explainer.cam_layer, []))
    if calls > 1:
        check.notes.append(f"module {explainer.cam_layer!r} is called {calls} times in forward: the CAM layer is "
                           "its last call")
    check.candidates = _candidates(graph, shapes, cam)
    return shapes, cam


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _shape_of(value: Any) -> list[int] | None:
    return list(value.shape[1:]) if isinstance(value, Tensor) else None


def _holds_tensor(value: Any) -> bool:
    return isinstance(value, Tensor) or (isinstance(value, (tuple, list))
                                         and any(isinstance(v, Tensor) for v in value))


def _candidates(graph, shapes: dict, cam) -> list[dict[str, Any]]:
    """Other CAM layers: at each spatial resolution finer than the CAM layer's, the outermost module whose
    output all of the model's data passes through (a stage's output rather than a layer inside a block)."""
    from analysis.fgcam.opsets import PADS

    cam_shape = _shape_of(shapes.get(cam))
    best: dict[tuple[int, int], tuple[int, str, list[int]]] = {}  # resolution -> (depth, name, shape)
    for node in _cut_nodes(graph, cam):
        shape = _shape_of(shapes.get(node))
        if node is cam or shape is None or len(shape) != 3 or shape[1] * shape[2] <= 1 or \
                PADS.match(node, graph.module(node)):
            continue
        names = [name for name, outs in graph.module_outputs.items() if outs == [node]]
        if not names or (cam_shape and len(cam_shape) == 3 and shape[1:] == cam_shape[1:]):
            continue
        name = min(names, key=lambda n: (n.count("."), len(n)))
        resolution = (shape[1], shape[2])
        if resolution not in best or name.count(".") <= best[resolution][0]:  # the later of two as outer
            best[resolution] = (name.count("."), name, shape)
    ordered = sorted(best.values(), key=lambda entry: -entry[2][1] * entry[2][2], reverse=True)
    return [{"layer": name, "shape": shape} for _, name, shape in ordered[:MAX_CANDIDATES]]


def _cut_nodes(graph, cam) -> list:
    """The nodes between the input and ``cam`` that every path from one to the other passes through, in graph
    order: in a topological order, the nodes that no edge jumps over."""
    between = sorted(graph.path(graph.input_node, cam), key=graph.order.__getitem__)
    cuts, reach = [], -1
    for node in between:
        position = graph.order[node]
        if reach <= position:
            cuts.append(node)
        reach = max([reach, *(graph.order[user] for user in node.users if user in graph.order)])
    return cuts


def _op_label(graph, node) -> str:
    if node.op == "call_module":
        return type(graph.module(node)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def _tabulate_ops(check: ModelCheck, graph, nodes, kinds: dict) -> None:
    """``nodes`` by op and rule, with the rules in words; the ones without a rule, named."""
    from analysis.fgcam.ops import describe

    counts: Counter[tuple[str, str | None]] = Counter()
    check.rules, check.unsupported = {}, []
    for node in nodes:
        kind = kinds[node]
        counts[(_op_label(graph, node), kind.name if kind else None)] += 1
        if kind is None:
            check.unsupported.append(describe(graph, node))
        else:
            check.rules[kind.name] = kind.rule
    check.ops = [OpCount(op, kind, count) for (op, kind), count in
                 sorted(counts.items(), key=lambda item: (-item[1], item[0][0]))]


def _path_ops(graph, shapes: dict, target, cam) -> list:
    """The ops between the CAM layer and the target that hold a tensor (a size or a shape holds no relevance).
    Some of them may receive none at all (a gate's branch): the walk's flow says which do."""
    from analysis.fgcam.propagate import walk_plan

    return [node for node in walk_plan(graph, target, cam).order
            if node is not target and node.op in ("call_module", "call_function", "call_method")
            and _holds_tensor(shapes.get(node))]


def _measure_conservation(check: ModelCheck, explainer, images: Tensor, target_layer: str) -> list:
    """Conservation per image and the layers that change the relevance by more than 1%; returns the flow."""
    from analysis.fgcam.ops import describe

    flow: list = []
    graph = explainer.graph
    total = explainer(images, target_layer=target_layer, flow=flow).maps.double().sum(dim=(1, 2))
    components = explainer(images, target_layer=explainer.cam_layer).maps.double().sum(dim=(1, 2))
    scale = components.abs().clamp(min=torch.finfo(torch.float64).tiny)
    check.conservation = [float(v) for v in (total / scale * components.sign()).cpu()]
    for step in flow:
        change = ((step.passed - step.received) / scale.to(step.passed.device)).cpu()
        worst = int(change.abs().argmax())
        if abs(float(change[worst])) > LOSS_THRESHOLD:
            layer = graph.module_name(step.node) or describe(graph, step.node)
            check.changes.append(LayerChange(layer, step.kind, float(change[worst]), float(step.received[worst]),
                                             float(step.passed[worst])))
    if (components.abs() < 1e-6 * components.abs().max().clamp(min=1e-30)).any():
        check.notes.append("an image's components add up to about 0: its conservation ratio is not meaningful")
    return flow


def _measure_speed(check: ModelCheck, explainer, model: nn.Module, images: Tensor, target_layer: str,
                   repeats: int = 2) -> None:
    """Median time of FG-CAM and of a plain forward pass on one batch (after a warm-up), and the peak memory
    while FG-CAM runs."""
    batch = images[torch.arange(check.batch_size) % len(images)]
    cuda = batch.device.type == "cuda"

    def forward() -> None:
        with torch.no_grad():
            model(batch)

    def explain() -> None:
        explainer(batch, target_layer=target_layer)

    times: dict[str, list[float]] = {"forward": [], "explain": []}
    for round_ in range(repeats + 1):
        for name, fn in (("forward", forward), ("explain", explain)):
            if round_ == repeats and name == "explain":
                _reset_peak_memory(cuda)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if round_:
                times[name].append(time.perf_counter() - start)
    check.forward_seconds_per_image = statistics.median(times["forward"]) / len(batch)
    check.seconds_per_image = statistics.median(times["explain"]) / len(batch)
    check.peak_memory_bytes, check.memory_measure = _peak_memory(cuda)


def _reset_peak_memory(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 resets the process's peak resident set (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory(cuda: bool) -> tuple[int | None, str]:
    if cuda:
        return int(torch.cuda.max_memory_allocated()), "GPU memory allocated by torch"
    try:
        status = Path("/proc/self/status").read_text().splitlines()
    except OSError:  # not Linux
        return None, "not measurable here"
    peak = [int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")]
    return (peak[0], "peak resident memory of the process") if peak else (None, "not measurable here")


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------

def load_images(folder: Path | None, loaded: LoadedModel, count: int, seed: int = 0) -> tuple[Tensor, str, int]:
    """``count`` images through the model's preprocessing: evenly spaced over the image files under ``folder``
    (unreadable ones skipped), else random noise images; with a description, and how many files were found."""
    if folder is None:
        rng = np.random.default_rng(seed)
        mode = "RGB" if loaded.in_channels == 3 else "L"
        shape = (256, 256, 3) if mode == "RGB" else (256, 256)
        pictures = [Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode) for _ in range(count)]
        return torch.stack([loaded.transform(p) for p in pictures]), f"{count} random noise images", 0
    if not folder.is_dir():
        raise OptionError(f"--images {folder}: no such directory")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise OptionError(f"--images {folder}: no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    tensors, skipped = [], []
    for index in evenly_spaced(len(files), min(count, len(files))):
        try:
            tensors.append(loaded.transform(to_model_mode(load_image(files[index]), loaded.in_channels)))
        except Exception as error:  # a corrupt file is skipped and named, never a traceback
            skipped.append(f"{files[index].name} ({type(error).__name__})")
    if not tensors:
        raise OptionError(f"--images {folder}: none of the images could be read ({'; '.join(skipped[:3])})")
    sizes = {tuple(t.shape) for t in tensors}
    if len(sizes) > 1:
        raise OptionError(f"--images {folder}: the preprocessing gives images of different sizes "
                          f"({', '.join(str(s) for s in sorted(sizes))}); pass --image-size")
    description = f"{len(tensors)} images from {folder}"
    if skipped:
        description += f" ({len(skipped)} unreadable skipped: {', '.join(skipped[:3])})"
    return torch.stack(tensors), description, len(files)


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------

def _shape_text(shape: list[int] | None) -> str:
    return " x ".join(str(s) for s in shape) if shape else "?"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _bytes(count: int) -> str:
    return f"{count / 2 ** 30:.2f} GiB" if count >= 2 ** 30 else f"{count / 2 ** 20:.0f} MiB"


def format_report(check: ModelCheck) -> str:
    parameters = f"{check.parameters / 1e6:.1f} M" if check.parameters >= 1e6 else f"{check.parameters:,}"
    lines = [f"model: {check.model} ({parameters} parameters, input {_shape_text(check.input_shape)})"]
    if check.cam_layer is not None:
        how = "the default: the last spatial layer before the head" if check.cam_layer_is_default else "--cam-layer"
        lines.append(f"CAM layer: {check.cam_layer} [{_shape_text(check.cam_shape)}] ({how})")
        if check.candidates:
            lines.append("  finer candidates (--cam-layer): " + ", ".join(
                f"{c['layer']} [{_shape_text(c['shape'])}]" for c in check.candidates))
    if check.ops:
        lines.append(f"ops from the CAM layer down to {check.target_layer}, and the rule each gets:")
        width = max(len(o.op) for o in check.ops)
        for o in check.ops:
            lines.append(f"  {o.count:>5}  {o.op:<{width}}  {o.kind or 'NO RULE'}")
        lines.append("  rules: " + "\n         ".join(f"{kind}: {rule}" for kind, rule in check.rules.items()))
    if check.unsupported:
        lines.append("ops without a rule: " + "; ".join(check.unsupported))
    elif check.ops:
        lines.append("ops without a rule: none")
    if check.conservation:
        kept = ", ".join(f"{100 * k:.1f}%" for k in check.conservation)
        lines.append(f"conservation on {check.images} (sum at {check.target_layer} / components' sum): {kept}")
        if check.changes:
            lines.append(f"layers that lose or gain more than {100 * LOSS_THRESHOLD:.0f}% of the relevance:")
            width = max(len(c.layer) for c in check.changes)
            for c in check.changes:
                lines.append(f"  {c.layer:<{width}}  {c.kind or '-':<10}  {c.received:+.4g} -> {c.passed:+.4g}  "
                             f"({100 * c.change:+.1f}% of the components' sum)")
        else:
            lines.append(f"layers that lose or gain more than {100 * LOSS_THRESHOLD:.0f}% of the relevance: none")
    if check.seconds_per_image is not None:
        cost = check.seconds_per_image / max(check.forward_seconds_per_image or 0, 1e-12)
        lines.append(f"time: {check.seconds_per_image:.3g} s per image (batch {check.batch_size} on {check.device}; "
                     f"{cost:.1f} forward passes); {check.estimate_for:,} images: about "
                     f"{_duration(check.seconds_per_image * check.estimate_for)} of explanation (image loading and "
                     "scores not included)")
    if check.peak_memory_bytes is not None:
        lines.append(f"memory: {_bytes(check.peak_memory_bytes)} ({check.memory_measure}, while explaining a "
                     f"batch of {check.batch_size})")
    lines.extend(f"note: {note}" for note in check.notes)
    if not check.explainable:
        lines.append(f"verdict: FG-CAM cannot explain this model: {check.error}")
    elif not check.conserved:
        lines.append("verdict: explainable, but relevance is not conserved (see the layers above); the maps "
                     "show only part of the evidence")
    else:
        lines.append("verdict: explainable; relevance is conserved")
    return "\n".join(lines)


def to_json(check: ModelCheck) -> str:
    payload = asdict(check)
    payload.update(explainable=check.explainable, conserved=check.conserved)
    return json.dumps(payload, indent=2)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `check-model` options (the model options are `explain`'s)."""
    add_model_arguments(parser)
    method = parser.add_argument_group("explanation (as for `explain`)")
    method.add_argument("--base", default="gradcam", choices=BASES, help="the CAM whose components FG-CAM refines")
    method.add_argument("--cam-layer", default=None,
                        help="module name of the CAM layer (default: the last spatial layer before the head)")
    method.add_argument("--target-layer", default="input",
                        help="module name whose output the maps explain, or 'input' for pixel-level maps")
    check = parser.add_argument_group("check")
    check.add_argument("--images", type=Path, default=None,
                       help="a folder of images (searched recursively) to check conservation on (default: random "
                            "noise images through the model's preprocessing)")
    check.add_argument("--count", type=positive_int, default=4, help="images to check conservation on")
    check.add_argument("--batch-size", type=positive_int, default=8, help="images per batch when timing")
    check.add_argument("--estimate-for", type=positive_int, default=None, metavar="N",
                       help="images the time estimate is for (default: the images under --images, else 10,000)")
    check.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """The `check-model` subcommand: 0 explainable, 1 not explainable, 2 an option that cannot be used."""
    try:
        device = pick_device(args.device)
        with contextlib.redirect_stdout(sys.stderr):  # what a model factory prints must not spoil --json
            loaded = load_model(args.model, weights=args.weights, checkpoint=args.checkpoint,
                                num_classes=args.num_classes, image_size=args.image_size, mean=args.mean,
                                std=args.std)
        images, source, found = load_images(args.images, loaded, args.count)
        estimate_for = args.estimate_for or found or 10_000
        check = check_model(loaded, images, source, args.model, base=args.base, cam_layer=args.cam_layer,
                            target_layer=args.target_layer, device=device, batch_size=args.batch_size,
                            estimate_for=estimate_for)
    except (OptionError, ModelSpecError, ValueError) as error:
        print(f"error: {_first_line(error)}", file=sys.stderr)
        return 2
    print(to_json(check) if args.json else format_report(check))
    warn_about_labels(args.images, loaded, device)
    return 0 if check.explainable else 1
