"""`python -m analysis compare-methods`: how faithful are the maps, compared with the alternatives, and do
they pass the sanity checks?

On the same N sampled images and the same explained class (the model's prediction), six maps are scored
with deletion and insertion curves (Petsiuk et al., "RISE", BMVC 2018; Gaussian-blurred baseline; see
`analysis.trust.faithfulness`) at two layers -- the input, and an intermediate layer:

  fgcam            FG-CAM (Qiu, Jin, Zhang, AAAI 2024, arXiv 2303.09171) on the chosen base CAM
  fgcam_denoised   the same with FG-CAM's low-rank denoising
  cam              the plain base CAM: the components summed at the CAM layer
                   (``explainer(images, target_layer=explainer.cam_layer).maps``), upsampled bilinearly to the
                   layer's resolution
  lrp              LRP from the logit, z+ rule for hidden layers and z^B for the image-reading convolution
  random           uniform noise at the layer's resolution (the floor every method must beat)
  edge             the Sobel gradient magnitude of the image, area-averaged to the layer's resolution: a map
                   that ignores the model (Adebayo et al., NeurIPS 2018, show edge detectors resemble saliency
                   maps); the reference for "this map shows the image"

A map at an intermediate layer orders input pixels after bilinear upsampling, as in the FG-CAM paper; the
paper's claim is that FG-CAM beats CAMs at shallow and intermediate layers and LRP at the input layer.

The same methods then go through the sanity checks of `analysis.trust.sanity` (cascading model randomisation
and class sensitivity, on a seeded subset of the sample: --sanity-sample, --randomise, --no-class-check).

Method: `default_intermediate_layer`, `method_maps`, `compare_methods`, `summarise`. Machinery: sampling and
loading images, `write_comparison` / `read_comparison` (the files the dashboard's "Trust" page reads, by
default in CACHE/trust/). The command line (`python -m analysis compare-methods`) is
analysis/commands/compare_methods.py.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.cache import TRUST_DIR, cache_identity
from analysis.fgcam.ops import PADS
from analysis.trust.faithfulness import (DEFAULT_BLUR_SIGMA, DEFAULT_FORWARD_BATCH, DEFAULT_STEPS,
                                         deletion_insertion_curves)


METHODS = ("fgcam", "fgcam_denoised", "cam", "lrp", "random", "edge")
BASE_LABELS = {"gradcam": "Grad-CAM", "scorecam": "Score-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM",
               "layercam": "LayerCAM"}
TRUST_DIR_NAME = TRUST_DIR            # compare-methods --cache DIR writes DIR/trust/ (the Trust page reads it)


# Version 2 added the sanity checks (SANITY_FILE, SANITY_PER_IMAGE_FILE, meta["sanity"]); version 1 is still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE, TABLE_FILE, CURVES_FILE, PER_IMAGE_FILE = ("comparison.json", "table.parquet", "curves.parquet",
                                                      "per_image.parquet")
SANITY_FILE, SANITY_PER_IMAGE_FILE = "sanity.parquet", "sanity_per_image.parquet"
DEFAULT_SAMPLE = 100


def method_label(method: str, base: str) -> str:
    """The name a table shows for a method."""
    return {"fgcam": f"FG-CAM ({BASE_LABELS.get(base, base)})",
            "fgcam_denoised": f"FG-CAM ({BASE_LABELS.get(base, base)}), denoised",
            "cam": f"{BASE_LABELS.get(base, base)}, upsampled",
            "lrp": "LRP (z+, z^B)", "random": "random map", "edge": "edge map (Sobel)"}[method]


def default_intermediate_layer(explainer: Any, image: Tensor) -> str:
    """A middle layer between the input and the CAM layer, from the model's own structure.

    The modules (called once) strictly between the input and the CAM layer are grouped by the spatial size
    of their output; of the distinct sizes, largest first, the middle one is taken (VGG-16: 56 x 56,
    ResNet-50: 28 x 28), and at that size the outermost module, the last one in the graph (a stage's
    output: ResNet's ``layer2``, VGG's last ReLU at 56 x 56). `image` [1, C, H, W] gives the shapes.
    """
    graph = explainer.graph
    cam = graph.node_for(explainer.cam_layer)
    between = graph.path(graph.input_node, cam) - {graph.input_node, cam}
    # a pad module's output (EfficientNet's `static_padding`) is the layer below with a border: not a layer of
    # its own, and its odd size would stand for a resolution of its own
    candidates = [(name, outs[0]) for name, outs in graph.module_outputs.items()
                  if len(outs) == 1 and outs[0] in between and not PADS.match(outs[0], graph.module(outs[0]))]
    parameter = next(explainer.model.parameters(), None)
    if parameter is not None:
        image = image.to(parameter.device, parameter.dtype)
    with torch.no_grad():
        _, values = graph.run(image[:1], shapes={node for _, node in candidates})
    spatial = [(name, node, tuple(values[node].shape[-2:])) for name, node in candidates
               if isinstance(values.get(node), Tensor) and values[node].dim() == 4]
    if not spatial:
        raise ValueError(f"no module between the input and the CAM layer {explainer.cam_layer!r} outputs a "
                         "spatial map; pass --layer NAME")
    sizes = sorted({size for *_, size in spatial}, key=lambda s: (s[0] * s[1], s), reverse=True)
    middle = sizes[len(sizes) // 2]
    at_size = [(name, node) for name, node, size in spatial if size == middle]
    outermost = min(name.count(".") for name, _ in at_size)
    return max(((name, node) for name, node in at_size if name.count(".") == outermost),
               key=lambda item: (graph.order[item[1]], -len(item[0])))[0]


def check_intermediate_layer(explainers: "Explainers", layer: str) -> None:
    """ValueError (one line) unless `layer` names a module whose output lies between the input and the CAM
    layer, where FG-CAM, the upsampled CAM and LRP all have a map."""
    graph = explainers.fgcam.graph
    if layer == "input":
        raise ValueError("--layer input: the input is always compared; name an intermediate layer")
    node = graph.node_for(layer)  # ValueError naming known layers for an unknown name
    cam = graph.node_for(explainers.fgcam.cam_layer)
    if node is not cam and node not in graph.path(graph.input_node, cam):
        raise ValueError(f"--layer {layer}: not between the input and the CAM layer {explainers.fgcam.cam_layer!r}; "
                         "name a module below the CAM layer (or pass --cam-layer)")


@dataclass
class Explainers:
    """The explainers of one comparison (each traces the model once)."""

    fgcam: Any
    fgcam_denoised: Any
    lrp: Any
    base: str

    @classmethod
    def build(cls, model: nn.Module, base: str = "gradcam", cam_layer: str | None = None,
              low_rule: Any = None) -> "Explainers":
        """``low_rule``: the engine's rule for the lowest convolutions (``analysis.fgcam.LowRule``; None: z+),
        for FG-CAM, denoised or not, and LRP alike."""
        from analysis.fgcam import FGCAM, LRP

        plain = FGCAM(model, base=base, cam_layer=cam_layer, denoise=False, low_rule=low_rule)
        denoised = FGCAM(model, base=base, cam_layer=plain.cam_layer, denoise=True, low_rule=low_rule)
        return cls(plain, denoised, LRP(model, low_rule=low_rule), base)


def random_maps(count_or_indices: Sequence[int], layer: str, size: tuple[int, int], seed: int) -> Tensor:
    """float32 [N, h, w] uniform noise; image i's map depends only on (seed, its index, layer), so it does not
    change with the batch size or with the other layers compared."""
    out = torch.empty((len(count_or_indices), *size))
    for row, index in enumerate(count_or_indices):
        state = np.random.SeedSequence([seed, int(index), zlib.crc32(layer.encode())]).generate_state(2)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        out[row] = torch.rand(size, generator=generator)
    return out


def edge_maps(images: Tensor, size: tuple[int, int]) -> Tensor:
    """float32 [N, h, w]: the Sobel gradient magnitude of each image's channel mean (edges replicated),
    resized to `size` like a map of that layer (`upsample_maps`: area-like when shrinking). It reads the
    image only: the reference a map that shows the image, not the model, looks like."""
    from analysis.trust.faithfulness import upsample_maps

    gray = F.pad(images.float().mean(dim=1, keepdim=True), (1, 1, 1, 1), mode="replicate")
    derivative = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
    gx = F.conv2d(gray, derivative.view(1, 1, 3, 3))
    gy = F.conv2d(gray, derivative.t().contiguous().view(1, 1, 3, 3))
    return upsample_maps(torch.sqrt(gx * gx + gy * gy)[:, 0], *size)


def method_maps(explainers: Explainers, method: str, images: Tensor, layer: str, classes: Tensor,
                layer_size: tuple[int, int], image_indices: Sequence[int], seed: int = 0) -> Tensor:
    """[N, h, w] maps of `method` for `classes` at `layer` (h, w = `layer_size`, the layer's resolution;
    the input's for "input"); the faithfulness metrics upsample them to the input size. `image_indices`
    and `seed` make the random maps reproducible per image."""
    if method == "fgcam":
        return explainers.fgcam(images, target_layer=layer, classes=classes).maps
    if method == "fgcam_denoised":
        return explainers.fgcam_denoised(images, target_layer=layer, classes=classes).maps
    if method == "cam":
        cam = explainers.fgcam(images, target_layer=explainers.fgcam.cam_layer, classes=classes).maps
        if tuple(cam.shape[-2:]) == tuple(layer_size):
            return cam
        return F.interpolate(cam[:, None].float(), size=layer_size, mode="bilinear", align_corners=False)[:, 0]
    if method == "lrp":
        return explainers.lrp(images, target_layer=layer, classes=classes).maps
    if method == "random":
        return random_maps(image_indices, layer, layer_size, seed).to(images.device)
    if method == "edge":
        return edge_maps(images, layer_size)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@dataclass
class MethodComparison:
    """A comparison's results; what `write_comparison` stores and the Trust page shows."""

    table: pd.DataFrame       # one row per (layer, method): see `summarise`
    curves: pd.DataFrame      # layer, method, label, curve ("deletion"/"insertion"), fraction, probability (mean)
    per_image: pd.DataFrame   # image, path, class, layer, method, deletion_auc, insertion_auc
    meta: dict[str, Any] = field(default_factory=dict)   # meta["sanity"]: the sanity checks' meta, when run
    sanity: pd.DataFrame | None = None            # analysis.trust.sanity.summarise_sanity's table, when run
    sanity_per_image: pd.DataFrame | None = None  # per image: spearman and ssim per check, step, layer, method


def summarise(per_image: pd.DataFrame, labels: dict[str, str] | None = None) -> pd.DataFrame:
    """Per (layer, method), in first-appearance order: n, mean, std (ddof 1) and the half-width of the 95%
    confidence interval of the mean (Student t) of the deletion and insertion AUCs, and constant_maps (the
    share of images whose map was constant, when per_image has a constant_map column)."""
    from scipy import stats

    rows = []
    for (layer, method), group in per_image.groupby(["layer", "method"], sort=False):
        row: dict[str, Any] = {"layer": layer, "method": method,
                               "label": (labels or {}).get(method, method), "n": len(group)}
        for metric in ("deletion_auc", "insertion_auc"):
            values = group[metric].to_numpy(np.float64)
            n = len(values)
            std = float(values.std(ddof=1)) if n > 1 else float("nan")
            row[f"{metric}_mean"] = float(values.mean())
            row[f"{metric}_std"] = std
            row[f"{metric}_ci95"] = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else float("nan")
        if "constant_map" in group:
            row["constant_maps"] = float(group["constant_map"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def compare_methods(model: nn.Module, images: Tensor, layers: Sequence[str] = ("input",),
                    methods: Sequence[str] = METHODS, base: str = "gradcam", cam_layer: str | None = None,
                    steps: int = DEFAULT_STEPS, blur_sigma: float = DEFAULT_BLUR_SIGMA, seed: int = 0,
                    batch_size: int = 16, forward_batch: int = DEFAULT_FORWARD_BATCH,
                    explainers: Explainers | None = None, progress: Any = None) -> MethodComparison:
    """Deletion / insertion curves of every method at every layer on `images` [N, C, H, W] (on the model's
    device), explaining each image's predicted class. Costs N * len(layers) * len(methods) *
    `forward_passes_per_image(steps)` perturbed forward passes plus the explanations."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be [N, C, H, W] with N >= 1, got shape {tuple(images.shape)}")
    explainers = explainers or Explainers.build(model, base=base, cam_layer=cam_layer)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else images.device
    per_image: list[pd.DataFrame] = []
    curve_sums: dict[tuple[str, str], np.ndarray] = {}
    layer_sizes: dict[str, list[int]] = {}
    fractions = None
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        index = np.arange(start, start + len(batch))
        classes = None
        for layer in layers:
            reference = explainers.fgcam(batch, target_layer=layer, classes=classes)
            classes = reference.classes if classes is None else classes
            layer_size = tuple(reference.maps.shape[-2:])
            layer_sizes[layer] = list(layer_size)
            for method in methods:
                maps = reference.maps if method == "fgcam" else method_maps(
                    explainers, method, batch, layer, classes, layer_size, index, seed)
                curves = deletion_insertion_curves(model, batch, maps.detach(), classes, steps=steps,
                                                   blur_sigma=blur_sigma, forward_batch=forward_batch)
                fractions = curves.fractions
                flat = maps.detach().flatten(1)
                # A constant map ranks nothing (pixels go in row-major order): flagged, not hidden.
                constant = (flat.amax(1) == flat.amin(1)).cpu().numpy()
                per_image.append(pd.DataFrame({"image": index, "class": classes.cpu().numpy(), "layer": layer,
                                               "method": method, "deletion_auc": curves.deletion_auc,
                                               "insertion_auc": curves.insertion_auc, "constant_map": constant}))
                sums = curve_sums.setdefault((layer, method), np.zeros((2, steps + 1)))
                sums[0] += curves.deletion.sum(axis=0)
                sums[1] += curves.insertion.sum(axis=0)
        if progress is not None:
            progress(len(batch))
    labels = {m: method_label(m, explainers.base) for m in methods}
    frame = pd.concat(per_image, ignore_index=True)
    # Batches were appended batch by batch: order the rows by layer, method (as given), then image.
    frame["_layer"] = frame["layer"].map({name: i for i, name in enumerate(layers)})
    frame["_method"] = frame["method"].map({name: i for i, name in enumerate(methods)})
    frame = frame.sort_values(["_layer", "_method", "image"], kind="stable").drop(columns=["_layer", "_method"])
    frame = frame.reset_index(drop=True)
    order = {(layer, method): i for i, (layer, method) in enumerate((l, m) for l in layers for m in methods)}
    curves_rows = []
    for (layer, method), sums in sorted(curve_sums.items(), key=lambda item: order[item[0]]):
        for which, values in (("deletion", sums[0]), ("insertion", sums[1])):
            curves_rows.append(pd.DataFrame({"layer": layer, "method": method, "label": labels[method],
                                             "curve": which, "fraction": fractions,
                                             "probability": values / len(images)}))
    return MethodComparison(table=summarise(frame, labels), curves=pd.concat(curves_rows, ignore_index=True),
                            per_image=frame, meta={"base": explainers.base, "cam_layer": explainers.fgcam.cam_layer,
                                                   "layers": list(layers), "layer_sizes": layer_sizes,
                                                   "methods": list(methods),
                                                   "steps": steps, "blur_sigma": blur_sigma, "seed": seed,
                                                   "n_images": int(len(images))})


class ComparisonError(Exception):
    """A comparison directory that is missing or unreadable (one-line message)."""


def write_comparison(comparison: MethodComparison, directory: Path) -> Path:
    """Write DIR/table.parquet, curves.parquet, per_image.parquet, with the sanity checks sanity.parquet and
    sanity_per_image.parquet, and comparison.json (meta, last: a reader that finds it finds the rest). Each
    file is replaced atomically; sanity files of an earlier run are removed when this one has none."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    frames = [(TABLE_FILE, comparison.table), (CURVES_FILE, comparison.curves), (PER_IMAGE_FILE, comparison.per_image)]
    if comparison.sanity is not None:
        frames += [(SANITY_FILE, comparison.sanity), (SANITY_PER_IMAGE_FILE, comparison.sanity_per_image)]
    else:
        for name in (SANITY_FILE, SANITY_PER_IMAGE_FILE):
            (directory / name).unlink(missing_ok=True)
    for name, frame in frames:
        tmp = directory / f".tmp-{name}.{os.getpid()}"
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, directory / name)
    meta = {"format_version": FORMAT_VERSION, **comparison.meta}
    if comparison.sanity is None:
        meta.pop("sanity", None)
    tmp = directory / f".tmp-{META_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, directory / META_FILE)
    return directory


def read_comparison(directory: Path) -> MethodComparison:
    """The comparison in `directory` (for the Trust page: `.table` and `.curves`, and `.sanity` when the
    sanity checks were run: None for a version 1 comparison); ComparisonError when there is none or it
    cannot be read."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        cache = shlex.quote(str(directory.parent)) if directory.name == TRUST_DIR else "CACHE"
        raise ComparisonError(f"no method comparison in {directory} (run `python -m analysis compare-methods "
                              f"--cache {cache}` to make one)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"format version {meta.get('format_version')!r}, expected one of "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        names = [TABLE_FILE, CURVES_FILE, PER_IMAGE_FILE]
        if "sanity" in meta:
            names += [SANITY_FILE, SANITY_PER_IMAGE_FILE]
        frames = [pd.read_parquet(directory / name) for name in names] + [None, None]
    except Exception as error:
        raise ComparisonError(f"unreadable method comparison in {directory}: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}") from None
    return MethodComparison(table=frames[0], curves=frames[1], per_image=frames[2], meta=meta, sanity=frames[3],
                            sanity_per_image=frames[4])


def made_for_another_cache(meta: dict[str, Any], manifest: dict[str, Any]) -> str | None:
    """Why a comparison does not belong to the cache of `manifest` (None: it does, or it cannot be told).

    A comparison made with --cache records the cache's identity (analysis.cache.cache_identity); one made
    before identities were recorded is stale when it is older than the cache."""
    recorded = meta.get("cache_identity")
    if recorded is not None:
        if recorded != cache_identity(manifest):
            return f"it was made {meta.get('created', '?')} for another cache (one this directory held before)"
        return None
    try:
        made = datetime.strptime(str(meta.get("created")), "%Y-%m-%dT%H:%M:%S%z")
        created = datetime.strptime(str(manifest.get("created")), "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return None
    if made < created:
        return f"it was made {meta['created']}, before this cache ({manifest['created']})"
    return None


def trust_page_data(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(table, mean curves, meta) of the comparison in `directory` (e.g. CACHE/trust), for the Trust page."""
    comparison = read_comparison(directory)
    return comparison.table, comparison.curves, comparison.meta


def sanity_page_data(directory: Path, variant: str = "abs", metric: str = "spearman"
                     ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]] | None:
    """For the Trust page: (randomisation curves -- `analysis.trust.sanity.sanity_curves`: mean and 95% band of
    `metric` against the step, from the original model at step 0 --, the class check's rows of the
    summary, the sanity meta with its "sentence"), or None when the comparison has no sanity checks.
    ComparisonError as `read_comparison`."""
    from analysis.trust.sanity import sanity_curves

    comparison = read_comparison(directory)
    if comparison.sanity is None:
        return None
    table = comparison.sanity
    classes = table[(table["check"] == "class") & (table["variant"] == variant)].reset_index(drop=True)
    return sanity_curves(table, variant, metric), classes, comparison.meta["sanity"]


def _cell(row: Any, metric: str) -> str:
    mean, ci95, std = (getattr(row, f"{metric}_{part}") for part in ("mean", "ci95", "std"))
    return f"{mean:.3f} ± {ci95:.3f} [{std:.3f}]"


def format_table(comparison: MethodComparison) -> str:
    """The printed table: mean AUC +- 95% CI half-width [std] per layer and method."""
    meta = comparison.meta
    sizes = meta.get("layer_sizes", {})
    header = (f"{'layer':24}{'method':34}{'deletion AUC (lower is better)':>32}"
              f"{'insertion AUC (higher is better)':>34}")
    lines = [header, "-" * len(header)]
    previous = None
    for row in comparison.table.itertuples(index=False):
        layer = row.layer
        if layer in sizes:
            layer = f"{layer} ({sizes[layer][0]}x{sizes[layer][1]})"
        if previous is not None and row.layer != previous:
            lines.append("")
        previous = row.layer
        lines.append(f"{layer[:23]:24}{row.label[:33]:34}{_cell(row, 'deletion_auc'):>32}"
                     f"{_cell(row, 'insertion_auc'):>34}")
    if "constant_maps" in comparison.table:
        for row in comparison.table[comparison.table["constant_maps"] > 0].itertuples(index=False):
            lines.append(f"note: {row.label} at {row.layer}: {row.constant_maps:.0%} of the maps are constant (no "
                         "ranking; pixels removed in row-major order)"
                         + (" -- FG-CAM's denoising keeps rank floor(0.1 min(K, h w)), 0 for fewer than 10 "
                            "channels" if row.method == "fgcam_denoised" else ""))
    lines.append(f"mean ± 95% confidence half-width [standard deviation] over {meta.get('n_images')} images; "
                 f"{meta.get('steps')} steps, Gaussian-blurred baseline (sigma {meta.get('blur_sigma')} px); "
                 "explained class: the prediction")
    return "\n".join(lines)
