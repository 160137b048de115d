"""The sanity checks themselves: cascading model randomisation and class sensitivity on a batch of images."""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from analysis.trust.methods import BASE_LABELS, METHODS, Explainers, method_label, method_maps
from analysis.trust.sanity.blocks import (CHECKS, DEFAULT_POOLED_SIZE, VARIANTS, VARIANT_LABELS, own_tensors,
                                          blocks_below_head, default_depths, load_tensors, model_blocks,
                                          randomised_tensors, resolve_depths, step_label)
from analysis.trust.sanity.similarity import map_variants, rank_rows, spearman_rows, ssim_rows
from analysis.trust.sanity.summary import sanity_sentence, summarise_sanity


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


@dataclass
class _Cascade:
    """The caller's model copied (`twin`, randomised in place, step by step) and what each step loads into it."""

    twin: nn.Module
    explainers: Explainers          # explain `twin`
    blocks: list                    # `model_blocks` of the model
    depths: list[int]               # the steps, in blocks below the head
    has_head: bool
    needed: list                    # the blocks some step randomises, bottom (the head) first
    randomised: dict[str, dict]     # block name -> its re-initialised tensors
    original: dict[str, dict]       # module name -> its tensors before any step
    how: dict[str, str]             # module name -> how it was re-initialised

    @classmethod
    def build(cls, model: nn.Module, base: str, cam_layer: str | None, low_rule: Any,
              depths: Sequence[int] | None, seed: int) -> _Cascade:
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
        original = {name: {key: value.detach().clone()
                           for key, value in own_tensors(twin.get_submodule(name)).items()}
                    for block in needed for name in block.modules}
        return cls(twin, explainers, blocks, depths, has_head, needed, randomised, original, how)

    def steps(self) -> list[dict[str, Any]]:
        """What each step randomises: the meta's "steps"."""
        return [{"step": step, "depth": depth, "label": step_label(depth, self.blocks),
                 "blocks": [b.name for b in self.blocks[:depth + int(self.has_head)]],
                 "modules": [m for b in self.blocks[:depth + int(self.has_head)] for m in b.modules]}
                for step, depth in enumerate(self.depths, start=1)]


def _score_rows(check: str, step: int, index: np.ndarray, classes: Tensor, other: Tensor | None,
                scores: dict) -> list[pd.DataFrame]:
    """The per-image rows of one check (or step) on one batch, from `_compare`'s scores."""
    return [pd.DataFrame({
        "image": index, "class": classes.cpu().numpy(),
        "other_class": other.cpu().numpy() if other is not None else np.full(len(index), -1),
        "check": check, "step": step, "layer": layer, "method": method, "variant": variant,
        "spearman": spearman, "ssim": ssim})
        for (layer, method, variant), (spearman, ssim) in scores.items()]


def _check_batch(cascade: _Cascade, batch: Tensor, index: np.ndarray, methods: Sequence[str],
                 layers: Sequence[str], sizes: dict[str, tuple[int, int]], seed: int, pooled_size: int,
                 class_check: bool, progress: Callable[[int], Any] | None) -> list[pd.DataFrame]:
    """Both checks on one batch (on the model's device): the class check, then every step of the cascade,
    each compared with the original model's maps."""
    explainers, twin = cascade.explainers, cascade.twin
    parameter = next(twin.parameters(), None)
    rows: list[pd.DataFrame] = []
    load_tensors(twin, cascade.original)
    logits = explainers.fgcam.logits(batch.to(batch.device, parameter.dtype if parameter is not None else batch.dtype))
    classes = logits.argmax(dim=1)
    reference = _maps(explainers, methods, layers, batch, classes, sizes, index, seed, pooled_size)
    ranks = {(layer, method, variant): rank_rows(values) for (layer, method), variants in reference.items()
             for variant, values in variants.items()}
    if class_check:
        other = other_classes(classes, logits.shape[1], index, seed)
        rows += _score_rows("class", 0, index, classes, other, _compare(reference, ranks, _maps(
            explainers, methods, layers, batch, other, sizes, index, seed, pooled_size)))
        if progress is not None:
            progress(len(batch))
    done = 0
    for step, depth in enumerate(cascade.depths, start=1):
        for block in cascade.needed[done:depth + int(cascade.has_head)]:
            load_tensors(twin, cascade.randomised[block.name])
        done = depth + int(cascade.has_head)
        rows += _score_rows("randomise", step, index, classes, None, _compare(reference, ranks, _maps(
            explainers, methods, layers, batch, classes, sizes, index, seed, pooled_size)))
        if progress is not None:
            progress(len(batch))
    return rows


def _in_order(rows: list[pd.DataFrame], layers: Sequence[str], methods: Sequence[str]) -> pd.DataFrame:
    """The per-image rows ordered by check, step, layer, method (as given), variant, then image."""
    per_image = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["image", "class", "other_class", "check", "step", "layer", "method", "variant", "spearman", "ssim"])
    order = {"check": {c: i for i, c in enumerate(CHECKS)}, "layer": {l: i for i, l in enumerate(layers)},
             "method": {m: i for i, m in enumerate(methods)}, "variant": {v: i for i, v in enumerate(VARIANTS)}}
    keys = [per_image[column].map(mapping) for column, mapping in order.items()]
    return per_image.assign(**{f"_{c}": k for c, k in zip(order, keys)}).sort_values(
        ["_check", "step", "_layer", "_method", "_variant", "image"], kind="stable").drop(
        columns=[f"_{c}" for c in order]).reset_index(drop=True)


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
    cascade = _Cascade.build(model, base, cam_layer, low_rule, depths, seed)
    explainers, blocks = cascade.explainers, cascade.blocks
    parameter = next(cascade.twin.parameters(), None)
    device = parameter.device if parameter is not None else images.device
    sizes = {layer: layer_size(explainers, layer, images) for layer in layers}
    rows: list[pd.DataFrame] = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        index = np.arange(start, start + len(batch))
        rows += _check_batch(cascade, batch, index, methods, layers, sizes, seed, pooled_size, class_check, progress)
    per_image = _in_order(rows, layers, methods)
    steps = cascade.steps()
    labels = {m: method_label(m, base) for m in methods}
    if "cam" in labels:   # compared at its own layer here, not upsampled
        cam_size = "x".join(map(str, layer_size(explainers, explainers.fgcam.cam_layer, images[:1])))
        labels["cam"] = f"{BASE_LABELS.get(base, base)} at {explainers.fgcam.cam_layer} ({cam_size})"
    meta = {"methods": list(methods), "layers": list(layers), "layer_sizes": {k: list(v) for k, v in sizes.items()},
            "cam_layer": explainers.fgcam.cam_layer, "base": base, "n_images": int(len(images)), "seed": seed,
            "pooled_size": pooled_size, "class_check": bool(class_check),
            "variants": {v: VARIANT_LABELS[v].format(d=pooled_size) for v in VARIANTS},
            "blocks": [{"name": b.name, "modules": list(b.modules)} for b in blocks],
            "reinitialised_with": cascade.how, "steps": steps, "labels": labels}
    table = summarise_sanity(per_image, steps, labels)
    meta["sentence"] = sanity_sentence(table, meta)
    return SanityChecks(table=table, per_image=per_image, meta=meta)
