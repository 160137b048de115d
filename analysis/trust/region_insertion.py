"""Artefact insertion test: does pasting what a cluster's maps point to make other images look like its class?

Reveal-to-Revise (Pahde, Dreyer, Samek, Lapuschkin, "Reveal to Revise: An Explainable AI Life Cycle for
Iterative Bias Correction of Deep Models", MICCAI 2023, arXiv 2303.12641) checks a suspected artefact by
inserting it into clean images and counting how often the prediction follows it. Here: the region the
selection's prototype map points to -- the top q% of its mean map, as in the causal shortcut test
(`analysis.trust.region_removal.top_region`) -- is cut out of the selection's own images (each source image's
pixels under that mask) and pasted at the same place into images of other classes; we count the
predictions that flip to the selection's class. The control pastes a region of the same size and shape at
a random place (`control_regions`) from the same source image into the same target. A shortcut flips far
more predictions than the control; a region that only holds the object's own evidence flips few (a piece of
a bag rarely makes a shirt a bag).

Ours: the pairing (target i receives source i modulo the number of sources, in a seeded random order), the
default targets (images whose label and prediction are both another class, a seeded sample), and that the
paste happens on the model's input (after its preprocessing), so that it lands exactly where the map points.

Method: `paste_regions`, `insertion_test`. Machinery: `insertion_test_on_cache` (the dashboard and the
command line), `save_insertion_report` / `read_insertion_reports` (CACHE/trust/insertion/, read by the Trust
page). The command line is `analysis/commands/region_insertion.py`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from analysis.cache.derived import INSERTION_TESTS
from analysis.pipeline.faithfulness import DEFAULT_FORWARD_BATCH
from analysis.pipeline.models import model_from_manifest
from analysis.trust.region_removal import (DEFAULT_Q, check_q, control_regions, known_outputs, load_inputs,
                                           model_probabilities, prototype_map, top_region)

DEFAULT_TARGETS = 200          # images of other classes the region is pasted into
MAX_SOURCES = 500              # source images loaded at most (a seeded sample of a larger selection)
INSERTION_DIR = Path(*INSERTION_TESTS.parts)   # under the cache directory, next to compare-methods
FORMAT_VERSION = 1
SUMMARY_FILE, PER_IMAGE_FILE = "summary.json", "per_image.parquet"


# ----------------------------------------------------------------------------------------------------------
# Method
# ----------------------------------------------------------------------------------------------------------

def paste_regions(targets: Tensor, sources: Tensor, regions: Tensor) -> Tensor:
    """targets [N, C, H, W] with the pixels of `regions` (bool [H, W] or [N, H, W]) taken from `sources`
    [N, C, H, W] (all channels of a pixel); a new tensor."""
    if targets.shape != sources.shape:
        raise ValueError(f"sources {tuple(sources.shape)} and targets {tuple(targets.shape)} differ in shape")
    if regions.dim() == 2:
        regions = regions[None]
    if regions.shape[-2:] != targets.shape[-2:] or regions.shape[0] not in (1, targets.shape[0]):
        raise ValueError(f"regions {tuple(regions.shape)} do not fit images {tuple(targets.shape)}")
    return torch.where(regions.to(targets.device)[:, None], sources, targets)


@dataclass
class InsertionTestResult:
    summary: dict[str, float]   # see SUMMARY_KEYS
    per_image: pd.DataFrame     # one row per target image (columns: see `insertion_test`)
    region: np.ndarray          # bool [H, W]: the prototype region at the input size


SUMMARY_KEYS = ("n", "sources", "q", "region_pixels", "region_share", "into", "already_into",
                "flipped_prototype", "flipped_random", "probability_before", "probability_prototype",
                "probability_random")


def insertion_test(model: nn.Module, sources: Tensor, targets: Tensor, into: int, prototype: np.ndarray | Tensor,
                   q: float = DEFAULT_Q, seed: int = 0, forward_batch: int = DEFAULT_FORWARD_BATCH,
                   before: Tensor | None = None) -> InsertionTestResult:
    """Paste each target's source image under the top-q% region of `prototype`, and under a random region
    of the same size and shape, and count the predictions that become class `into`.

    per_image columns: target (row in `targets`), source (row in `sources`), pred_before, pred_prototype,
    pred_random, probability_before / _prototype / _random (of class `into`), flipped_prototype,
    flipped_random (the prediction is `into` after the paste and was not before), control_overlap. Summary:
    n targets, sources, the region, into, already_into (targets already predicted `into`: they cannot
    flip), flipped_* = flips / targets not already `into`, probability_* = mean p(into). 3 forward passes
    per target (2 with `before`: the model's softmax outputs on `targets` where already known).
    """
    if targets.dim() != 4 or len(targets) == 0 or sources.dim() != 4 or len(sources) == 0:
        raise ValueError(f"sources and targets must be [N, C, H, W] with N >= 1, got {tuple(sources.shape)} "
                         f"and {tuple(targets.shape)}")
    if sources.shape[1:] != targets.shape[1:]:
        raise ValueError(f"sources {tuple(sources.shape[1:])} and targets {tuple(targets.shape[1:])} differ in "
                         "size (a model transform without a fixed resize?)")
    check_q(q)
    if not isinstance(forward_batch, int) or forward_batch < 1:
        raise ValueError(f"forward_batch must be a positive integer, got {forward_batch!r}")
    n, _, height, width = targets.shape
    region = top_region(prototype, q, height, width)
    controls = control_regions(region, n, seed=seed)
    generator = np.random.default_rng(seed)
    pairing = generator.permutation(len(sources))[np.arange(n) % len(sources)]
    paired = sources[torch.from_numpy(pairing)]
    before = known_outputs(before, model, targets, forward_batch)
    if not 0 <= into < before.shape[1]:
        raise ValueError(f"class {into} is not an output of the model ({before.shape[1]} classes)")
    pasted = model_probabilities(model, paste_regions(targets, paired, region), forward_batch)
    control = model_probabilities(model, paste_regions(targets, paired, controls), forward_batch)
    frame = pd.DataFrame({
        "target": np.arange(n), "source": pairing,
        "pred_before": before.argmax(1).numpy(), "pred_prototype": pasted.argmax(1).numpy(),
        "pred_random": control.argmax(1).numpy(),
        "probability_before": before[:, into].numpy(), "probability_prototype": pasted[:, into].numpy(),
        "probability_random": control[:, into].numpy(),
    })
    could_flip = frame["pred_before"] != into
    frame["flipped_prototype"] = could_flip & (frame["pred_prototype"] == into)
    frame["flipped_random"] = could_flip & (frame["pred_random"] == into)
    frame["control_overlap"] = (controls & region).flatten(1).sum(1).numpy()
    eligible = int(could_flip.sum())
    rate = (lambda column: float(frame[column].sum()) / eligible if eligible else float("nan"))
    summary = {
        "n": float(n), "sources": float(len(sources)), "q": float(q), "region_pixels": float(region.sum()),
        "region_share": float(region.sum()) / (height * width), "into": float(into),
        "already_into": float(n - eligible),
        "flipped_prototype": rate("flipped_prototype"), "flipped_random": rate("flipped_random"),
        "probability_before": float(frame["probability_before"].mean()),
        "probability_prototype": float(frame["probability_prototype"].mean()),
        "probability_random": float(frame["probability_random"].mean()),
    }
    return InsertionTestResult(summary=summary, per_image=frame, region=region.numpy())


# ----------------------------------------------------------------------------------------------------------
# Machinery: on a cache
# ----------------------------------------------------------------------------------------------------------

@dataclass
class CacheInsertionReport:
    source_ids: np.ndarray               # the source images used (loaded), in `per_image.source` order
    target_ids: np.ndarray               # the target images used (loaded), in `per_image.target` order
    into_name: str
    description: str                     # what the sources are, in words
    result: InsertionTestResult          # per_image with target_id, source_id, target_path, label added
    skipped: list[tuple[int, str]]       # (id, reason) of images that could not be loaded


def default_targets(table: pd.DataFrame, into: int, exclude: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Ids of a seeded sample of `count` images whose label and prediction are both not `into`, outside
    `exclude` (sorted)."""
    eligible = (table["label"].to_numpy() != into) & (table["pred"].to_numpy() != into)
    eligible &= ~np.isin(table["id"].to_numpy(np.int64), exclude)
    ids = table["id"].to_numpy(np.int64)[eligible]
    if len(ids) > count:
        ids = np.sort(np.random.default_rng(seed).choice(ids, size=count, replace=False))
    return ids


def _checked_targets(table: pd.DataFrame, known: set[int], names: list[str],
                     target_ids: Sequence[int] | np.ndarray | None, into: int, source_ids: np.ndarray,
                     n_targets: int, seed: int) -> np.ndarray:
    """The target ids, sorted and unique: the given ones, else `default_targets`; ValueError (one line) for
    none, or for an id not in the cache."""
    if target_ids is None:
        target_ids = default_targets(table, into, source_ids, n_targets, seed)
        if len(target_ids) == 0:
            raise ValueError(f"no image outside the selection has a label and a prediction other than "
                             f"{names[into] if into < len(names) else into!r}: nothing to paste into")
    target_ids = np.unique(np.asarray(target_ids, dtype=np.int64))
    missing = [int(i) for i in target_ids if int(i) not in known]
    if missing:
        raise ValueError(f"{len(missing)} target id(s) are not in the cache (e.g. {missing[:5]})")
    return target_ids


def _load_images(cache: Any, loaded: Any, source_ids: np.ndarray,
                 target_ids: np.ndarray) -> tuple[Tensor, Tensor, np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """The source and target images as the model sees them, the ids of those that loaded, and (id, reason)
    of those that did not; ValueError when no source or no target loads."""
    sources, source_positions, source_errors = load_inputs(cache.image_paths(source_ids),
                                                           loaded.transform, loaded.in_channels)
    targets, target_positions, target_errors = load_inputs(cache.image_paths(target_ids),
                                                           loaded.transform, loaded.in_channels)
    skipped = ([(int(source_ids[p]), reason) for p, reason in source_errors]
               + [(int(target_ids[p]), reason) for p, reason in target_errors])
    if not source_positions:
        raise ValueError(f"none of the {len(source_ids)} selected images could be loaded")
    if not target_positions:
        raise ValueError(f"none of the {len(target_ids)} target images could be loaded")
    return sources, targets, source_ids[source_positions], target_ids[target_positions], skipped


def insertion_test_on_cache(cache: Any, source_ids: Sequence[int] | np.ndarray, into: int | None = None,
                            target_ids: Sequence[int] | np.ndarray | None = None,
                            n_targets: int = DEFAULT_TARGETS, q: float = DEFAULT_Q, loaded: Any = None,
                            prototype: np.ndarray | None = None, device: str | torch.device = "cpu",
                            seed: int = 0, forward_batch: int = 64,
                            description: str = "") -> CacheInsertionReport:
    """The insertion test with the images `source_ids` of an `analysis.cache.Cache` (a cluster, a tag, ...).

    `into` (a class index) defaults to the sources' most common prediction; `target_ids` to
    `default_targets(..., n_targets)`; `prototype` (a [h, w] map) to `prototype_map` of the sources' stored
    maps of the predicted class; `loaded` (a LoadedModel) to `model_from_manifest(cache.manifest)`, which
    raises ModelSpecError when the model cannot be loaded here. ValueError (one line) for an unusable
    selection.
    """
    source_ids = np.unique(np.asarray(source_ids, dtype=np.int64))
    if len(source_ids) == 0:
        raise ValueError("the selection is empty")
    check_q(q)
    table = cache.table
    known = set(cache.ids.tolist())
    missing = [int(i) for i in source_ids if int(i) not in known]
    if missing:
        raise ValueError(f"{len(missing)} id(s) are not in the cache (e.g. {missing[:5]})")
    names = list(cache.manifest.get("class_names") or [])
    rows = table.set_index("id")
    if into is None:
        into = int(rows.loc[source_ids, "pred"].value_counts().idxmax())
    if not 0 <= int(into) < max(len(names), 1):
        raise ValueError(f"class {into} is not a class of the cache")
    into = int(into)
    target_ids = _checked_targets(table, known, names, target_ids, into, source_ids, n_targets, seed)
    if len(source_ids) > MAX_SOURCES:
        source_ids = np.sort(np.random.default_rng(seed).choice(source_ids, size=MAX_SOURCES, replace=False))
    if prototype is None:
        prototype = prototype_map(cache.maps(source_ids, "pred"))
    if loaded is None:
        loaded = model_from_manifest(cache.manifest)
    model = loaded.model.to(device)
    sources, targets, used_sources, used_targets, skipped = _load_images(cache, loaded, source_ids, target_ids)
    result = insertion_test(model, sources, targets, into, prototype, q=q, seed=seed, forward_batch=forward_batch)
    frame = result.per_image
    frame.insert(0, "source_id", used_sources[frame["source"].to_numpy()])
    frame.insert(0, "label", rows.loc[used_targets, "label"].to_numpy())
    frame.insert(0, "target_path", rows.loc[used_targets, "path"].to_numpy())
    frame.insert(0, "target_id", used_targets)
    into_name = names[into] if into < len(names) else str(into)
    return CacheInsertionReport(source_ids=used_sources, target_ids=used_targets, into_name=into_name,
                                description=description or f"{len(used_sources)} selected images",
                                result=result, skipped=skipped)


# ----------------------------------------------------------------------------------------------------------
# Machinery: results next to the cache (the Trust page lists them)
# ----------------------------------------------------------------------------------------------------------

def report_name(description: str, into_name: str, q: float) -> str:
    """A file-system-safe name for a saved run: the same selection, class and q overwrite each other."""
    text = f"{description} into {into_name} q{q:g}"
    return re.sub(r"[^0-9A-Za-z.+-]+", "-", text).strip("-.")[:120] or "run"


def save_insertion_report(report: CacheInsertionReport, directory: Path) -> Path:
    """Write `summary.json` (summary, region, ids, description) and `per_image.parquet` into `directory`,
    replacing an earlier run there atomically."""
    from analysis.cache.files import folder_replaced_atomically

    directory = Path(directory)
    with folder_replaced_atomically(directory) as tmp:
        meta = {"format_version": FORMAT_VERSION, "description": report.description, "into_name": report.into_name,
                "summary": report.result.summary, "region": report.result.region.astype(int).tolist(),
                "source_ids": report.source_ids.tolist(), "skipped": [list(s) for s in report.skipped]}
        (tmp / SUMMARY_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        report.result.per_image.to_parquet(tmp / PER_IMAGE_FILE, index=False)
    return directory


@dataclass
class SavedInsertionTest:
    name: str
    description: str
    into_name: str
    summary: dict[str, float]
    region: np.ndarray               # bool [H, W]
    per_image: pd.DataFrame
    source_ids: np.ndarray
    modified: float                  # time the run was saved (seconds since the epoch)


def read_insertion_reports(cache_root: Path) -> list[SavedInsertionTest]:
    """Every saved run in CACHE/trust/insertion/, newest first; unreadable ones are left out."""
    base = INSERTION_TESTS.path(cache_root)
    if not base.is_dir():
        return []
    found = []
    for entry in sorted(base.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            modified = (entry / SUMMARY_FILE).stat().st_mtime
            meta = json.loads((entry / SUMMARY_FILE).read_text(encoding="utf-8"))
            if meta.get("format_version") != FORMAT_VERSION:
                continue
            found.append(SavedInsertionTest(
                name=entry.name, description=str(meta["description"]), into_name=str(meta["into_name"]),
                summary={k: float(v) for k, v in meta["summary"].items()},
                region=np.asarray(meta["region"], dtype=bool), per_image=pd.read_parquet(entry / PER_IMAGE_FILE),
                source_ids=np.asarray(meta["source_ids"], dtype=np.int64), modified=modified))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced right now, or not ours
    return sorted(found, key=lambda saved: saved.modified, reverse=True)


def verdict(summary: dict[str, float]) -> str:
    """One sentence for a result (the command line and the Trust page)."""
    region, control = summary["flipped_prototype"], summary["flipped_random"]
    if math.isnan(region):
        return "Every target was already predicted as the class: nothing could flip."
    if region - control >= 0.2:
        return ("Pasting the region flips far more predictions than a random region of the same size: the "
                "model treats what the region holds as evidence for the class (an artefact it can be fooled by).")
    if abs(region - control) < 0.05:
        return "Pasting the region flips about as many predictions as a random region: no sign of an artefact."
    return "Pasting the region flips somewhat more predictions than a random region."
