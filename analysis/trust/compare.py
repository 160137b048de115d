"""`python -m analysis compare-methods`: how faithful are the maps, compared with the alternatives, and do
they pass the sanity checks?

On the same N sampled images and the same explained class (the model's prediction), six maps are scored
with deletion and insertion curves (Petsiuk et al., "RISE", BMVC 2018; Gaussian-blurred baseline; see
`analysis.pipeline.faithfulness`) at two layers -- the input, and an intermediate layer:

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

Method: `compare_methods`, `summarise` (the maps: analysis.trust.methods). Machinery: sampling and loading
images, `write_comparison` / `read_comparison` (the files the dashboard's "Trust" page reads through
analysis.trust.page, by default in CACHE/trust/). The command line (`python -m analysis compare-methods`) is
analysis/commands/compare_methods.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from torch import Tensor, nn

from analysis.cache import TRUST_DIR, cache_identity
from analysis.cache.derived import COMPARISON
from analysis.cache.files import file_replaced_atomically, write_json_atomic
from analysis.pipeline.faithfulness import (DEFAULT_BLUR_SIGMA, DEFAULT_FORWARD_BATCH, DEFAULT_STEPS,
                                            deletion_insertion_curves)
from analysis.trust.methods import METHODS, Explainers, method_label, method_maps


TRUST_DIR_NAME = TRUST_DIR            # compare-methods --cache DIR writes DIR/trust/ (the Trust page reads it)


# Version 2 added the sanity checks (SANITY_FILE, SANITY_PER_IMAGE_FILE, meta["sanity"]); version 1 is still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE, TABLE_FILE, CURVES_FILE, PER_IMAGE_FILE = ("comparison.json", "table.parquet", "curves.parquet",
                                                      "per_image.parquet")
SANITY_FILE, SANITY_PER_IMAGE_FILE = "sanity.parquet", "sanity_per_image.parquet"
DEFAULT_SAMPLE = 100


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


def _in_layer_and_method_order(frame: pd.DataFrame, layers: Sequence[str], methods: Sequence[str]) -> pd.DataFrame:
    """The per-image rows, appended batch by batch, ordered by layer, method (as given), then image."""
    frame["_layer"] = frame["layer"].map({name: i for i, name in enumerate(layers)})
    frame["_method"] = frame["method"].map({name: i for i, name in enumerate(methods)})
    frame = frame.sort_values(["_layer", "_method", "image"], kind="stable").drop(columns=["_layer", "_method"])
    return frame.reset_index(drop=True)


def _mean_curves(curve_sums: dict[tuple[str, str], np.ndarray], layers: Sequence[str], methods: Sequence[str],
                 labels: dict[str, str], fractions: np.ndarray, n_images: int) -> pd.DataFrame:
    """The mean deletion and insertion curves from their sums over `n_images`, in layer then method order."""
    order = {(layer, method): i for i, (layer, method) in enumerate((l, m) for l in layers for m in methods)}
    curves_rows = []
    for (layer, method), sums in sorted(curve_sums.items(), key=lambda item: order[item[0]]):
        for which, values in (("deletion", sums[0]), ("insertion", sums[1])):
            curves_rows.append(pd.DataFrame({"layer": layer, "method": method, "label": labels[method],
                                             "curve": which, "fraction": fractions,
                                             "probability": values / n_images}))
    return pd.concat(curves_rows, ignore_index=True)


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
    frame = _in_layer_and_method_order(pd.concat(per_image, ignore_index=True), layers, methods)
    curves = _mean_curves(curve_sums, layers, methods, labels, fractions, len(images))
    return MethodComparison(table=summarise(frame, labels), curves=curves,
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
        with file_replaced_atomically(directory / name) as tmp:
            frame.to_parquet(tmp, index=False)
    meta = {"format_version": FORMAT_VERSION, **comparison.meta}
    if comparison.sanity is None:
        meta.pop("sanity", None)
    write_json_atomic(directory / META_FILE, meta)
    return directory


def read_comparison(directory: Path) -> MethodComparison:
    """The comparison in `directory` (for the Trust page: `.table` and `.curves`, and `.sanity` when the
    sanity checks were run: None for a version 1 comparison); ComparisonError when there is none or it
    cannot be read."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        command = COMPARISON.command_line(directory.parent if directory.name == TRUST_DIR else "CACHE")
        raise ComparisonError(f"no method comparison in {directory} (run `{command}` to make one)")
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
