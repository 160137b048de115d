"""`python -m analysis explain`: explain a whole labelled dataset into a resumable, shardable cache.

Method (what is computed per batch) is `explain_batch`; machinery (validation, sharding, resume, ranks,
data loading, commits) is the rest. Image id = index in the sorted dataset list (after --limit); shard k
holds ids [k*S, (k+1)*S); with torchrun, rank r takes the shards k with k % world_size == r. A shard is
committed atomically (see analysis.cache), so a rerun skips committed shards: no duplicates, no gaps.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.cli_types import non_negative_int as _non_negative_int, positive_int as _positive_int
from analysis.cache import (BOX_COLUMNS, COMPACT_PREFIX, FORMAT_VERSION, MANIFEST_NAME, SHARD_PREFIX, SHARDS_DIR,
                           SIZE_COLUMNS, CacheError, CacheLocked, CacheWriter, ShardRecords, WriterLock, is_cache_entry,
                           load, new_cache_id, now_iso, probability_arrays)
from analysis.faithfulness import cost_note, faithfulness_scores
from analysis.channel_relevance import channel_relevance_arrays
from analysis.cli_types import low_rule_text
from analysis.models import (LoadedModel, ModelSpecError, add_low_rule_argument, add_model_arguments, load_model,
                             preprocessing_fingerprint)
from analysis.scores import all_scores, descriptors, resize_maps
from data.datasets import (Batch, DatasetError, DatasetListing, ExplainDataset, attach_boxes, attach_masks,
                           collate_items, evenly_spaced, list_dataset, load_image, read_text, to_model_mode)

COMMAND = "explain"
HELP = "explain a labelled dataset into a resumable cache (the dashboard's input)"
BASES = ("gradcam", "scorecam", "gradcam++", "xgradcam", "layercam")
# Options that do not change any stored number: they may differ between a run and its resume.
RUNTIME_OPTIONS = ("batch_size", "device", "workers")
SCORE_COLUMNS = ("background_share", "background_hotspot", "border_share", "concentration")
FAITHFULNESS_COLUMNS = ("deletion_auc", "insertion_auc")


class SetupError(Exception):
    """A problem found before any work starts: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------





def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `explain` options on a (sub)parser."""
    io = parser.add_argument_group("data and output")
    io.add_argument("--data", required=True, type=Path,
                    help="an ImageFolder tree root/<class>/<image>, or a CSV manifest with columns path,label "
                         "[,mask][,x0,y0,x1,y1] (paths relative to the CSV)")
    io.add_argument("--out", required=True, type=Path,
                    help="cache directory; re-running the same command on it resumes where it stopped")
    io.add_argument("--overwrite", action="store_true",
                    help="wipe an existing cache in --out (needed when the options differ); its tags "
                         "(review.sqlite) are kept aside in review-<old cache's date>.sqlite, not carried over")
    io.add_argument("--limit", type=_positive_int, default=None,
                    help="explain only N images, evenly spaced over the sorted list (all classes appear)")
    io.add_argument("--classes", type=Path, default=None,
                    help="class names, one per line, line i = model output i (default: the sorted class "
                         "folder / label names, or the torchvision weights' categories when the labels are "
                         "among them)")
    add_model_arguments(parser)
    method = parser.add_argument_group("explanation")
    method.add_argument("--base", default="gradcam", choices=BASES, help="the CAM whose components FG-CAM refines")
    method.add_argument("--target-layer", default="input",
                        help="module name whose output the maps explain, or 'input' for pixel-level maps")
    method.add_argument("--cam-layer", default=None,
                        help="module name of the CAM layer (default: the last spatial layer before the head)")
    method.add_argument("--denoise", action="store_true", help="FG-CAM's low-rank denoising of the components")
    add_low_rule_argument(method)
    method.add_argument("--faithfulness", type=_positive_int, nargs="?", const=20, default=0, metavar="STEPS",
                        help="also store each map's deletion and insertion AUC (RISE, blurred baseline) with "
                             f"STEPS steps (20 when given alone): {cost_note(20).split(': ', 1)[1]} "
                             "(default: off)")
    method.add_argument("--map-size", type=_positive_int, default=64,
                        help="stored map resolution (maps are area-resized to SIZE x SIZE)")
    method.add_argument("--descriptor-size", type=_positive_int, default=16,
                        help="descriptor resolution D (D x D unit-mass pooled map, for clustering)")
    fg = method.add_mutually_exclusive_group()
    fg.add_argument("--masks", type=Path, default=None,
                    help="folder of foreground mask PNGs mirroring the image tree (a/b.jpg -> MASKS/a/b.png)")
    fg.add_argument("--boxes", type=Path, default=None,
                    help="CSV path,x0,y0,x1,y1 of foreground boxes in pixels (x1, y1 exclusive; several rows "
                         "per image: union)")
    run_group = parser.add_argument_group("execution")
    run_group.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward pass")
    run_group.add_argument("--shard-size", type=_positive_int, default=None,
                           help="images per committed shard (default: the batch size, or the existing cache's "
                                "shard size when resuming); a crash loses at most one shard per rank")
    run_group.add_argument("--device", default=None,
                           help="torch device (default: cuda when available, else cpu; with torchrun, "
                                "cuda:LOCAL_RANK)")
    run_group.add_argument("--workers", type=_non_negative_int, default=min(4, os.cpu_count() or 1),
                           help="data loading worker processes (0: load in the main process)")
    run_group.add_argument("--quiet", action="store_true", help="no progress bar")
    run_group.add_argument("--no-cluster", action="store_true",
                           help="do not run `python -m analysis cluster` (default settings) on the finished cache")


# ----------------------------------------------------------------------------------------------------------
# Ranks
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised: bool = False

    @classmethod
    def from_environment(cls) -> "Ranks":
        try:
            return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError:
            raise SetupError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun)") from None

    def _group(self) -> Any:
        import torch.distributed as dist

        if not self.initialised:
            # gloo on CPU is enough: the ranks only wait for each other and agree on go / no-go, no tensors.
            # A long timeout: rank 0 waits at the end for the slowest rank to finish its shards.
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size, timeout=timedelta(days=7))
            self.initialised = True
        return dist

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        self._group().barrier()

    def agree(self, problem: str | None) -> str | None:
        """Go / no-go of every rank before any work: None when no rank has a problem, else the first problem
        (another rank's prefixed with it), the same text on every rank. Without this a rank whose set-up
        failed would leave the others waiting at the next barrier, or writing a cache the job has no right
        to write."""
        if self.world_size == 1:
            return problem
        verdicts: list[str | None] = [None] * self.world_size
        self._group().all_gather_object(verdicts, problem)
        for rank, verdict in enumerate(verdicts):
            if verdict is not None:
                return verdict if rank == 0 else f"rank {rank}: {verdict}"
        return None

    def close(self) -> None:
        if self.initialised:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.initialised = False


# ----------------------------------------------------------------------------------------------------------
# Validation (everything before any work)
# ----------------------------------------------------------------------------------------------------------

@dataclass
class JobPlan:
    out: Path
    listing: DatasetListing
    labels: list[int]                 # model output index of each listed image's label
    class_names: list[str]            # index = model output
    loaded: LoadedModel
    explainer: Any                    # analysis.fgcam.FGCAM
    device: torch.device
    target_layer: str
    map_size: int
    descriptor_size: int
    faithfulness_steps: int           # 0: no deletion / insertion curves
    shard_size: int
    batch_size: int
    workers: int
    manifest: dict[str, Any]          # the manifest to write (or the existing one when resuming)
    existing: bool                    # an identical cache exists: resume it
    wipe: bool                        # --overwrite on an existing cache
    quiet: bool
    cluster: bool                     # cluster every scope when the cache is complete (not --no-cluster)
    seen: tuple                       # what --out held when the plan was made (_out_snapshot)

    @property
    def n_shards(self) -> int:
        return (len(self.listing.samples) + self.shard_size - 1) // self.shard_size


def _normalised_spec(spec: str) -> str:
    """A spec that is the same from any working directory (file paths made absolute)."""
    if ":" in spec:
        target, name = spec.rsplit(":", 1)
        if target.endswith(".py"):
            return f"{Path(target).resolve()}:{name}"
    return spec


def _software_versions() -> dict[str, str]:
    import PIL
    import pyarrow
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "pandas": pd.__version__, "pyarrow": pyarrow.__version__,
            "pillow": PIL.__version__}


def _pick_device(requested: str | None, ranks: Ranks) -> torch.device:
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise SetupError(f"--device {requested!r}: not a torch device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError(f"--device {requested}: CUDA is not available here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise SetupError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _class_mapping(listing: DatasetListing, loaded: LoadedModel, classes_file: Path | None) -> list[str]:
    if classes_file is not None:
        if not classes_file.is_file():
            raise SetupError(f"--classes {classes_file}: no such file")
        try:
            text = read_text(classes_file, f"--classes {classes_file}")
        except DatasetError as error:
            raise SetupError(str(error)) from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if len(set(names)) != len(names):
            raise SetupError(f"--classes {classes_file}: a class name appears twice")
        missing = sorted(set(listing.label_names) - set(names))
        if missing:
            raise SetupError(f"--classes {classes_file}: dataset labels not listed: {', '.join(missing[:10])}"
                             + (" ..." if len(missing) > 10 else ""))
        return names
    if loaded.output_names and set(listing.label_names) <= set(loaded.output_names):
        return list(loaded.output_names)
    return list(listing.label_names)


def _dry_run(plan_model: LoadedModel, explainer: Any, listing: DatasetListing, device: torch.device,
             target_layer: str) -> int:
    """Explain one image (the first readable one) to check layers and ops; returns the number of outputs."""
    from PIL import Image

    image = None
    for sample in listing.samples[:20]:
        try:
            image = load_image(listing.root / sample.path)
            break
        except Exception:
            continue
    if image is None:
        image = Image.new("RGB", (64, 64), (128, 128, 128))
    try:
        tensor = plan_model.transform(to_model_mode(image, plan_model.in_channels))
    except Exception as error:
        raise SetupError(f"the model's preprocessing fails on {listing.samples[0].path}: "
                         f"{type(error).__name__}: {error}") from None
    try:
        result = explainer(tensor[None].to(device), target_layer=target_layer)
    except ValueError as error:
        raise SetupError(str(error).splitlines()[0]) from None
    except Exception as error:  # UnsupportedOperation, shape errors of a wrong --image-size, ...
        raise SetupError(f"explaining a first image failed: {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}") from None
    if result.maps.dim() != 3 or result.logits.dim() != 2:
        raise SetupError(f"the engine returned maps {tuple(result.maps.shape)} and logits "
                         f"{tuple(result.logits.shape)}; expected [N, H, W] and [N, classes]")
    return int(result.logits.shape[1])


def _geometry_record(loaded: LoadedModel, listing: DatasetListing) -> dict[str, Any]:
    """The manifest's `geometry` (how each image's crop box is found), checked on the first readable image.

    A derived box whose input size disagrees with what the transform really returns (a torchvision release
    that changed its arithmetic) is replaced by a measured one; a transform whose box cannot be measured
    there (random, flipping, warping) gets no boxes at all: the cache says "unknown" rather than guess.
    """
    from PIL import Image

    from analysis.geometry import MeasuredGeometry, NoGeometry

    image, where = Image.new("RGB", (64, 48), (128, 128, 128)), "a grey 64x48 image"
    for sample in listing.samples[:20]:
        try:
            image, where = load_image(listing.root / sample.path), sample.path
            break
        except Exception:
            continue
    tensor = loaded.transform(to_model_mode(image, loaded.in_channels))  # the dry run showed that it works
    input_size = (int(tensor.shape[-1]), int(tensor.shape[-2]))
    located = loaded.geometry.locate(*image.size)
    if located is not None and located[1] != input_size:
        loaded.geometry = MeasuredGeometry(loaded.transform, loaded.in_channels)
        located = loaded.geometry.locate(*image.size)
    if located is None:
        loaded.geometry = NoGeometry(f"the preprocessing is not a deterministic resize/crop (probed on {where})")
    return {"method": loaded.geometry.method, "transform": loaded.geometry.describe(),
            "input_size": list(input_size)}


def _identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The parts of a manifest that must match for a resume."""
    options = {k: v for k, v in manifest.get("options", {}).items() if k not in RUNTIME_OPTIONS}
    model = {k: manifest.get("model", {}).get(k) for k in ("spec", "weights_sha256", "checkpoint", "num_classes",
                                                           "preprocessing")}
    dataset = {k: manifest.get("dataset", {}).get(k) for k in ("root", "fingerprint", "n_images")}
    return {"options": options, "model": model, "dataset": dataset, "class_names": manifest.get("class_names")}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _identity(old), _identity(new)
    names = {"model.spec": "--model", "model.weights_sha256": "model weights", "model.checkpoint": "--checkpoint",
             "model.num_classes": "--num-classes", "dataset.root": "--data", "dataset.fingerprint": "dataset files",
             "dataset.n_images": "number of images", "class_names": "class names"}
    diffs = []
    for section in ("model", "dataset", "options"):
        for key in sorted(set(a[section]) | set(b[section])):
            if a[section].get(key) != b[section].get(key):
                label = names.get(f"{section}.{key}", "--" + key.replace("_", "-"))
                if key == "preprocessing" and section == "model":
                    diffs.append(_preprocessing_difference(a[section].get(key), b[section].get(key)))
                elif label == "dataset files" or label == "model weights":
                    diffs.append(label)
                else:
                    diffs.append(f"{label} {a[section].get(key)!r} -> {b[section].get(key)!r}")
    if a["class_names"] != b["class_names"]:
        diffs.append("class names")
    return diffs


def _preprocessing_difference(old: dict[str, str] | None, new: dict[str, str]) -> str:
    """How the model's preprocessing changed, in words: the part of the descriptions that differs, with some
    context (a whole torchvision Compose would not fit one line)."""
    if not old:
        return "preprocessing (not recorded in this cache: made by an older version of the job)"
    before, after = str(old.get("description", "?")), str(new["description"])
    if before == after:
        shown = after if len(after) <= 120 else after[:117] + "..."
        return (f"preprocessing output (same description {shown}, but other pixels on a probe image: the "
                "transform's code changed)")
    prefix = len(os.path.commonprefix([before, after]))
    suffix = len(os.path.commonprefix([before[prefix:][::-1], after[prefix:][::-1]]))

    def changed(text: str, context: int = 40) -> str:
        start, stop = max(0, prefix - context), min(len(text), len(text) - suffix + context)
        return ("..." if start else "") + text[start:stop] + ("..." if stop < len(text) else "")

    return f"preprocessing {changed(before)} -> {changed(after)}"


def _out_snapshot(out: Path) -> tuple:
    """What --out holds that the plan depends on: the manifest's bytes, and whether there are committed parts.
    Compared again once the lock is held, in case another job wrote --out in between."""
    manifest = out / MANIFEST_NAME
    parts = out.is_dir() and (any(p.name.startswith(COMPACT_PREFIX) for p in out.iterdir()) or (
        (out / SHARDS_DIR).is_dir() and any(p.name.startswith(SHARD_PREFIX) for p in (out / SHARDS_DIR).iterdir())))
    return (manifest.read_bytes() if manifest.is_file() else None, bool(parts))


def _absolute(path: Path | None) -> str | None:
    return None if path is None else str(path.resolve())


def _check_writable(out: Path) -> None:
    """--out (or the folder it will be made in) takes new files: tried with a probe file, because permission
    bits do not tell (root ignores them; a read-only mount or an immutable folder refuses root too)."""
    folder = out
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    for target in (folder, folder / SHARDS_DIR):
        if target != folder and not target.is_dir():
            continue
        try:
            handle, probe = tempfile.mkstemp(prefix=".tmp-write-probe-", dir=target)
            os.close(handle)
            Path(probe).unlink(missing_ok=True)  # (a running job's clean-up may have taken it already)
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise SetupError(f"--out {out}: cannot write in {target} ({reason}); choose a writable --out") from None


def prepare(args: argparse.Namespace, ranks: Ranks) -> JobPlan:
    """Validate everything and build the plan; raises SetupError (nothing has been written yet)."""
    from analysis.fgcam import FGCAM

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise SetupError(f"--out {out}: exists and is not a directory")
    _check_writable(out)  # before the model loads: a read-only --out must not cost the user a model load
    existing_manifest = None
    if out.is_dir():
        manifest_path = out / MANIFEST_NAME
        if manifest_path.exists():
            try:
                existing_manifest = CacheWriter(out).read_manifest()
            except CacheError as error:
                if not args.overwrite:
                    raise SetupError(f"{error}; use --overwrite to replace it") from None
        else:
            foreign = [p.name for p in out.iterdir() if not is_cache_entry(p.name)]
            if foreign:
                raise SetupError(f"--out {out}: exists, is not empty and holds no explanation cache; "
                                 "choose a new or empty directory")
            if _out_snapshot(out)[1] and not args.overwrite:
                raise SetupError(f"--out {out} holds explanation shards but no {MANIFEST_NAME}, so nobody knows "
                                 "which options made them and they cannot be resumed; use --overwrite to remove "
                                 "them, or another --out")
    seen = _out_snapshot(out)

    for option, path in (("--masks", args.masks), ("--boxes", args.boxes), ("--classes", args.classes),
                         ("--checkpoint", args.checkpoint)):
        if path is not None and not path.exists():
            raise SetupError(f"{option} {path}: no such file or directory")
    try:
        listing = list_dataset(args.data)
        if args.masks is not None:
            attach_masks(listing, args.masks)
        if args.boxes is not None:
            attach_boxes(listing, args.boxes)
    except (DatasetError, OSError) as error:
        raise SetupError(str(error).splitlines()[0]) from None
    listed = len(listing.samples)
    listing.samples = [listing.samples[i] for i in evenly_spaced(listed, args.limit)]

    device = _pick_device(args.device, ranks)
    try:
        loaded = load_model(args.model, weights=args.weights, checkpoint=args.checkpoint,
                            num_classes=args.num_classes, image_size=args.image_size, mean=args.mean, std=args.std)
    except ModelSpecError as error:
        raise SetupError(str(error)) from None
    model = loaded.model.to(device)
    try:
        explainer = FGCAM(model, base=args.base, cam_layer=args.cam_layer, denoise=args.denoise,
                          low_rule=args.low_rule)
    except ValueError as error:
        raise SetupError(str(error).splitlines()[0]) from None
    except Exception as error:  # UnsupportedOperation: a model the engine cannot trace
        raise SetupError(f"{type(error).__name__}: {str(error).splitlines()[0]}") from None
    outputs = _dry_run(loaded, explainer, listing, device, args.target_layer)
    geometry = _geometry_record(loaded, listing)
    if listing.has_foreground and geometry["method"] == "unknown":
        raise SetupError(f"foreground masks/boxes cannot be placed: {geometry['transform']}; give the model a "
                         "transform that only resizes and crops (or use --image-size/--mean/--std)")

    class_names = _class_mapping(listing, loaded, args.classes)
    if outputs != len(class_names):
        source = f"--classes {args.classes} lists" if args.classes else "the dataset has"
        raise SetupError(f"the model has {outputs} outputs but {source} {len(class_names)} classes; "
                         "pass --classes FILE with one class name per model output (line i = output i)")
    index_of = {name: i for i, name in enumerate(class_names)}
    labels = [index_of[s.label_name] for s in listing.samples]

    shard_size = args.shard_size
    if shard_size is None:
        previous = (existing_manifest or {}).get("options", {}).get("shard_size")
        shard_size = int(previous) if previous and not args.overwrite else args.batch_size
    options = {
        "base": args.base, "target_layer": args.target_layer, "cam_layer": explainer.cam_layer,
        "denoise": bool(args.denoise), "low_rule": low_rule_text(args.low_rule),
        "batch_size": args.batch_size, "map_size": args.map_size,
        "descriptor_size": args.descriptor_size, "faithfulness_steps": args.faithfulness,
        "masks": _absolute(args.masks), "boxes": _absolute(args.boxes),
        "limit": args.limit, "shard_size": shard_size, "classes": _absolute(args.classes),
        "weights": args.weights, "image_size": args.image_size, "mean": args.mean, "std": args.std,
        "preprocessing": loaded.preprocessing, "device": str(device), "workers": args.workers,
    }
    now = now_iso()
    manifest = {
        "format_version": FORMAT_VERSION, "cache_id": new_cache_id(), "created": now, "updated": now,
        "finished": None,
        "model": {"spec": _normalised_spec(args.model), "weights_sha256": loaded.weights_sha256,
                  "checkpoint": _absolute(args.checkpoint), "num_classes": outputs,
                  "preprocessing": preprocessing_fingerprint(loaded.transform, loaded.in_channels)},
        "dataset": {"root": str(listing.root), "kind": listing.kind, "fingerprint": listing.fingerprint(),
                    "n_images": len(listing.samples), "n_listed": listed,
                    "foreground": listing.has_foreground},
        "options": options, "class_names": class_names, "geometry": geometry,
        "counts": {"images": len(listing.samples), "explained": 0, "errors": 0, "correct": 0},
        "software": _software_versions(), "world_size": ranks.world_size,
    }
    existing = False
    if existing_manifest is not None and not args.overwrite:
        diffs = _differences(existing_manifest, manifest)
        if diffs:
            raise SetupError(f"--out {out} holds a cache made with different options ({'; '.join(diffs)}); "
                             "use --overwrite to replace it, or another --out")
        existing = True
        manifest = {**existing_manifest, "world_size": ranks.world_size, "geometry": geometry,
                    "options": {**existing_manifest["options"], **{k: options[k] for k in RUNTIME_OPTIONS}}}
    return JobPlan(out=out, listing=listing, labels=labels, class_names=class_names, loaded=loaded,
                   explainer=explainer, device=device, target_layer=args.target_layer, map_size=args.map_size,
                   descriptor_size=args.descriptor_size, faithfulness_steps=args.faithfulness,
                   shard_size=shard_size, batch_size=args.batch_size,
                   workers=args.workers, manifest=manifest, existing=existing,
                   wipe=bool(args.overwrite and out.is_dir()), quiet=args.quiet, seen=seen,
                   cluster=not args.no_cluster)


# ----------------------------------------------------------------------------------------------------------
# Method: one batch
# ----------------------------------------------------------------------------------------------------------

@dataclass
class BatchOutput:
    """CPU results for the explained images of one batch (row order = batch.ids)."""

    ids: np.ndarray
    labels: np.ndarray
    pred: np.ndarray
    confidence: np.ndarray
    top_classes: np.ndarray
    top_probs: np.ndarray
    maps_pred: np.ndarray             # float32 [n, M, M]
    maps_true: np.ndarray             # float32 [n_wrong, M, M] (rows where pred != label, in order)
    scores: dict[str, np.ndarray]
    descriptors_positive: np.ndarray
    descriptors_absolute: np.ndarray
    foreground: np.ndarray | None
    has_foreground: np.ndarray
    sizes: np.ndarray                 # int [n, 2] original (width, height)
    boxes: np.ndarray                 # float [n, 4] crop boxes in original pixels (NaN: unknown)
    row_arrays: dict[str, np.ndarray] = field(default_factory=dict)   # analysis.cache.ROW_ARRAYS, [n, ...] each


def explain_batch(explainer: Any, batch: Batch, device: torch.device, target_layer: str, map_size: int,
                  descriptor_size: int, faithfulness_steps: int = 0) -> BatchOutput:
    """Explain the predicted class of every image, and the true class of the misclassified ones.

    Predictions come from the engine's logits (no second forward pass). Scores and descriptors are computed
    on the predicted-class map at map size, on the device; with ``faithfulness_steps``, the deletion and
    insertion AUCs of the full-resolution predicted-class map too. Every image's class probabilities are
    kept (float16; the top 20 for more than 100 classes) for the label-error ranking, and each CAM-layer
    channel's relevance for the predicted and the true class (``analysis.channel_relevance``).
    """
    images = batch.images.to(device, non_blocking=True)
    labels = batch.labels.to(device)
    result = explainer(images, target_layer=target_layer)
    probs = torch.softmax(result.logits.float(), dim=1)
    pred = result.classes.to(device)
    top = probs.topk(min(5, probs.shape[1]), dim=1)
    maps_pred = resize_maps(result.maps.detach(), map_size)
    wrong = pred != labels
    true_result = None
    if wrong.any():
        true_result = explainer(images[wrong], target_layer=target_layer, classes=labels[wrong])
        maps_true = resize_maps(true_result.maps.detach(), map_size)
    else:
        maps_true = maps_pred.new_zeros((0, map_size, map_size))
    foreground = batch.foreground.to(device) if batch.foreground is not None else None
    scores = all_scores(maps_pred, foreground, batch.has_foreground)
    if faithfulness_steps:
        scores.update({name: torch.as_tensor(values) for name, values in faithfulness_scores(
            explainer.model, images, result.maps, pred, steps=faithfulness_steps).items()})
    return BatchOutput(
        ids=batch.ids.numpy(), labels=batch.labels.numpy(), pred=pred.cpu().numpy(),
        confidence=probs.gather(1, pred[:, None])[:, 0].cpu().numpy().astype(np.float32),
        top_classes=top.indices.cpu().numpy(), top_probs=top.values.cpu().numpy().astype(np.float32),
        maps_pred=maps_pred.cpu().numpy(), maps_true=maps_true.cpu().numpy(),
        scores={name: value.cpu().numpy().astype(np.float32) for name, value in scores.items()},
        descriptors_positive=descriptors(maps_pred, descriptor_size, "positive").cpu().numpy(),
        descriptors_absolute=descriptors(maps_pred, descriptor_size, "absolute").cpu().numpy(),
        foreground=None if batch.foreground is None else batch.foreground.numpy(),
        has_foreground=batch.has_foreground.numpy(),
        sizes=batch.sizes.numpy() if batch.sizes is not None else np.zeros((len(batch.ids), 2), np.int64),
        boxes=batch.boxes.numpy() if batch.boxes is not None else np.full((len(batch.ids), 4), np.nan),
        row_arrays={**probability_arrays(probs.cpu().numpy()), **channel_relevance_arrays(
            result.channel_relevance, None if true_result is None else true_result.channel_relevance, wrong)},
    )


def shard_records(outputs: list[BatchOutput], errors: list[tuple[int, str]], plan: JobPlan) -> ShardRecords:
    """Assemble one shard's rows from its batches (ids ascending)."""
    m = plan.map_size
    outputs = [o for o in outputs if len(o.ids)]
    cat = (lambda name, shape, dtype: np.concatenate([getattr(o, name) for o in outputs]) if outputs
           else np.zeros(shape, dtype))
    ids = cat("ids", (0,), np.int64)
    labels, pred = cat("labels", (0,), np.int64), cat("pred", (0,), np.int64)
    samples = plan.listing.samples
    names = plan.class_names
    rows = pd.DataFrame({
        "id": ids.astype(np.int64),
        "path": [samples[i].path for i in ids],
        "label": labels.astype(np.int64), "pred": pred.astype(np.int64),
        "label_name": [names[i] for i in labels], "pred_name": [names[i] for i in pred],
        "confidence": cat("confidence", (0,), np.float32),
        "top5_classes": [list(map(int, r)) for r in cat("top_classes", (0, 5), np.int64)],
        "top5_probs": [list(map(float, r)) for r in cat("top_probs", (0, 5), np.float32)],
        "correct": labels == pred,
        **{name: (np.concatenate([o.scores[name] for o in outputs]) if outputs else np.zeros(0, np.float32))
           for name in SCORE_COLUMNS + (FAITHFULNESS_COLUMNS if plan.faithfulness_steps else ())},
        "has_foreground": cat("has_foreground", (0,), bool).astype(bool),
        **{name: column for name, column in zip(SIZE_COLUMNS, cat("sizes", (0, 2), np.int64).astype(np.int32).T)},
        **{name: column for name, column in zip(BOX_COLUMNS, cat("boxes", (0, 4), np.float64).astype(np.float32).T)},
    })
    foreground = None
    if plan.listing.has_foreground:
        parts = [o.foreground if o.foreground is not None else np.zeros((len(o.ids), m, m), bool) for o in outputs]
        foreground = np.concatenate(parts) if parts else np.zeros((0, m, m), bool)
    d2 = plan.descriptor_size ** 2
    return ShardRecords(
        rows=rows, maps_pred=cat("maps_pred", (0, m, m), np.float32), maps_true=cat("maps_true", (0, m, m), np.float32),
        descriptors_positive=cat("descriptors_positive", (0, d2), np.float32),
        descriptors_absolute=cat("descriptors_absolute", (0, d2), np.float32), foreground=foreground,
        errors=pd.DataFrame({"id": [i for i, _ in errors], "path": [samples[i].path for i, _ in errors],
                             "reason": [r for _, r in errors]}),
        row_arrays={name: np.concatenate([o.row_arrays[name] for o in outputs])
                    for name in (outputs[0].row_arrays if outputs else ())},
    )


# ----------------------------------------------------------------------------------------------------------
# Machinery: the shard loop
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _ShardProgress:
    index: int
    batches_left: int
    outputs: list[BatchOutput] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)


def _batches_for(shards: list[int], plan: JobPlan) -> tuple[list[list[int]], list[int]]:
    """Batches never straddle shards, so a shard is complete right after its last batch."""
    n = len(plan.listing.samples)
    batches, owner = [], []
    for shard in shards:
        ids = list(range(shard * plan.shard_size, min((shard + 1) * plan.shard_size, n)))
        for start in range(0, len(ids), plan.batch_size):
            batches.append(ids[start:start + plan.batch_size])
            owner.append(shard)
    return batches, owner


def _commit(writer: CacheWriter, shard: int, records: ShardRecords) -> None:
    try:
        writer.write_shard(shard, records)
    except FileExistsError:
        # Cannot happen while the job holds the cache's lock and the ranks take disjoint shards; should it
        # anyway, the shard was made with the same options (checked under the lock), so keeping the first copy
        # keeps the cache free of duplicates.
        print(f"shard {shard} was committed by another process; kept that copy", file=sys.stderr)


def explain_shards(plan: JobPlan, writer: CacheWriter, shards: list[int], show_progress: bool) -> int:
    """Explain and commit `shards`; returns the number of images processed. Commits run in a writer thread
    (at most two shards queued) so disk syncs overlap the model."""
    from tqdm import tqdm

    batches, owner = _batches_for(shards, plan)
    if not batches:
        return 0
    dataset = ExplainDataset(plan.listing, plan.labels, plan.loaded.transform, plan.loaded.in_channels,
                             plan.map_size, plan.loaded.geometry)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=plan.workers, collate_fn=collate_items,
        pin_memory=plan.device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if plan.workers > 0 else None)
    progress_by_shard: dict[int, _ShardProgress] = {}
    for shard in owner:
        progress_by_shard.setdefault(shard, _ShardProgress(shard, 0)).batches_left += 1
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, unit="img", disable=not show_progress, dynamic_ncols=True, smoothing=0.05,
               desc=f"explain ({len(shards)} shards)")
    pending: deque[Future] = deque()
    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as pool:
        for batch, shard in zip(loader, owner):
            state = progress_by_shard[shard]
            if len(batch.ids):
                state.outputs.append(explain_batch(plan.explainer, batch, plan.device, plan.target_layer,
                                                   plan.map_size, plan.descriptor_size, plan.faithfulness_steps))
            state.errors.extend(batch.errors)
            state.batches_left -= 1
            size = len(batch.ids) + len(batch.errors)
            done += size
            bar.update(size)
            if state.batches_left == 0:
                records = shard_records(state.outputs, sorted(state.errors), plan)
                del progress_by_shard[shard]
                while len(pending) >= 2:  # bounded memory: at most two finished shards wait for the disk
                    pending.popleft().result()
                pending.append(pool.submit(_commit, writer, shard, records))
        while pending:
            pending.popleft().result()
    bar.close()
    return done


def _finish(plan: JobPlan, writer: CacheWriter) -> dict[str, Any]:
    """Rank 0, after every rank is done: compact, count, stamp the manifest as finished."""
    committed = writer.committed_shards()
    complete = committed >= set(range(plan.n_shards))
    if complete:
        writer.compact()
    cache = load(plan.out)
    table = cache.table
    manifest = writer.read_manifest() or plan.manifest
    manifest["updated"] = now_iso()
    manifest["counts"] = {"images": len(plan.listing.samples), "explained": int(len(table)),
                          "errors": int(len(cache.errors)), "correct": int(table["correct"].sum())}
    if complete and not manifest.get("finished"):
        manifest["finished"] = now_iso()
    writer.write_manifest(manifest)
    return manifest


def _take_the_cache(plan: JobPlan) -> WriterLock:
    """Rank 0: the cache's writer lock, before anything is written; then --out must still hold what the plan
    was made from (another job may have written it while this one loaded its model)."""
    lock = WriterLock(plan.out)
    try:
        lock.acquire()
    except CacheLocked as error:
        raise SetupError(f"--out {error}") from None
    except OSError as error:
        raise SetupError(f"--out {plan.out}: cannot take the writer lock ({error.strerror or error})") from None
    if _out_snapshot(plan.out) != plan.seen:
        lock.release()
        raise SetupError(f"--out {plan.out} was changed by another job while this one was starting; run the "
                         "command again")
    return lock


def _keep_tags_aside(out: Path) -> None:
    """Tags name images by id, which a new cache may give to other images: they stay with the old cache."""
    from analysis.review import ReviewError, keep_tags_aside

    try:
        moved = keep_tags_aside(out)
    except ReviewError as error:  # the job's own work does not depend on the tags
        print(f"warning: the tags of the replaced cache were not set aside: {error}", file=sys.stderr)
        return
    if moved is not None:
        print(f"the replaced cache's tags were kept aside in {moved}; the new cache starts without tags",
              file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """The `explain` subcommand: 0 on success, 2 for a setup problem (one line on stderr)."""
    try:
        ranks = Ranks.from_environment()
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Every rank validates on its own, then all agree; rank 0 then takes the cache's lock for the whole job
    # (the other ranks write their shards under it), and all agree again: no rank starts alone.
    plan, lock, problem = None, None, None
    try:
        plan = prepare(args, ranks)
    except SetupError as error:
        problem = str(error)
    problem = ranks.agree(problem)
    if problem is None and ranks.rank == 0:
        try:
            lock = _take_the_cache(plan)
        except SetupError as error:
            problem = str(error)
    problem = ranks.agree(problem)
    if problem is not None:
        if ranks.rank == 0:
            print(f"error: {problem}", file=sys.stderr)
        ranks.close()
        return 2
    try:
        return _run_locked(plan, ranks)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(plan: JobPlan, ranks: Ranks) -> int:
    writer = CacheWriter(plan.out)
    if ranks.rank == 0:
        writer.initialise(wipe=plan.wipe)
        writer.remove_stale_temporaries()
        if plan.existing:
            for part, problem, target in writer.set_aside_damaged_parts(plan.map_size, plan.descriptor_size,
                                                                        plan.shard_size):
                print(f"warning: {part} of the cache cannot be read ({problem}); moved to {target}, its images are "
                      "explained again", file=sys.stderr)
            manifest = writer.read_manifest() or plan.manifest
            manifest["updated"] = now_iso()
            manifest["options"] = plan.manifest["options"]
            manifest["geometry"] = plan.manifest["geometry"]
            manifest["world_size"] = ranks.world_size
            writer.write_manifest(manifest)
        else:
            writer.write_manifest(plan.manifest)
            if plan.wipe:
                _keep_tags_aside(plan.out)
    ranks.barrier()  # nobody lists committed shards before rank 0 wiped or cleaned the directory
    committed = writer.committed_shards()
    mine = [k for k in range(plan.n_shards) if k % ranks.world_size == ranks.rank and k not in committed]
    show = ranks.rank == 0 and not plan.quiet
    if show and committed:
        print(f"resuming: {len(committed)} of {plan.n_shards} shards already committed", file=sys.stderr)
    started = time.perf_counter()
    try:
        processed = explain_shards(plan, writer, mine, show)
    except BaseException:
        if ranks.rank == 0:
            print(f"the job stopped; committed shards are kept in {plan.out}: re-run the same command to resume",
                  file=sys.stderr)
        raise
    if ranks.world_size > 1 and not plan.quiet:
        print(f"rank {ranks.rank}: explained {processed} images in {len(mine)} shards", file=sys.stderr)
    ranks.barrier()  # the cache is complete only when every rank has committed its shards
    if ranks.rank == 0:
        manifest = _finish(plan, writer)
        if not plan.quiet:
            seconds = time.perf_counter() - started
            counts = manifest["counts"]
            print(f"explained {counts['explained']} images ({counts['errors']} skipped, see the errors table) "
                  f"into {plan.out}; this run: {processed} images in {seconds:.1f} s", file=sys.stderr)
    ranks.close()
    if ranks.rank == 0 and plan.cluster:
        from analysis.cluster_cli import cluster_after_explain

        return cluster_after_explain(plan.out, quiet=plan.quiet)
    return 0
