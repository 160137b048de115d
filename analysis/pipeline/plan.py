"""Everything the explain job checks and decides before any work: the ranks (torchrun), the dataset, the
model, the device, the cache to write or resume (JobPlan, made by `prepare`). A problem is a SetupError: one
line, exit code 2, nothing written."""
from __future__ import annotations

import os
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.cache import (COMPACT_PREFIX, FORMAT_VERSION, MANIFEST_NAME, SHARD_PREFIX, SHARDS_DIR, CacheError,
                            CacheWriter, is_cache_entry, new_cache_id, now_iso)
from analysis.fgcam import LowRule, low_rule_text
from analysis.pipeline.models import LoadedModel, ModelSpecError, load_model, preprocessing_fingerprint
from analysis.cache.identity import RUNTIME_OPTIONS  # options that may differ between a run and its resume
from analysis.pipeline.devices import pick_device
from analysis.pipeline.datasets import (DatasetError, DatasetListing, attach_boxes, attach_masks, evenly_spaced,
                                        list_dataset, load_image, read_text, to_model_mode)


class SetupError(Exception):
    """A problem found before any work starts: printed as one line, exit code 2."""


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclass
class ExplainOptions:
    """What the explain job is asked to do: `python -m analysis explain`'s options, typed, with its defaults
    (the command builds one from argparse; from Python, build one and call ``job.explain_dataset``). Each
    field is the option of the same name (``faithfulness``: --faithfulness STEPS, 0 for off)."""

    data: Path
    out: Path
    model: str
    overwrite: bool = False
    limit: int | None = None
    classes: Path | None = None
    weights: str | None = None
    checkpoint: Path | None = None
    num_classes: int | None = None
    image_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    base: str = "gradcam"
    target_layer: str = "input"
    cam_layer: str | None = None
    denoise: bool = False
    low_rule: LowRule | None = None
    faithfulness: int = 0
    map_size: int = 64
    descriptor_size: int = 16
    masks: Path | None = None
    boxes: Path | None = None
    batch_size: int = 32
    shard_size: int | None = None
    device: str | None = None
    workers: int = field(default_factory=_default_workers)
    quiet: bool = False

    def __post_init__(self) -> None:
        for name in ("data", "out", "classes", "checkpoint", "masks", "boxes"):   # a str from Python is a path
            if isinstance(getattr(self, name), str):
                setattr(self, name, Path(getattr(self, name)))


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
    seen: tuple                       # what --out held when the plan was made (out_snapshot)

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
    try:
        return pick_device(requested, ranks.local_rank)
    except ValueError as error:
        raise SetupError(str(error)) from None


def class_mapping(listing: DatasetListing, loaded: LoadedModel, classes_file: Path | None) -> list[str]:
    """The class names in model output order: --classes FILE, else the weights' categories when the labels are
    among them, else the sorted label names (raises SetupError for a FILE that cannot be used)."""
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

    from analysis.pipeline.geometry import MeasuredGeometry, NoGeometry

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


def out_snapshot(out: Path) -> tuple:
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


def _existing_manifest(options: ExplainOptions) -> dict[str, Any] | None:
    """Check --out before any work: a directory we may write, holding nothing but a cache; the manifest of the
    cache already there (None: no cache, or an unreadable one that --overwrite replaces)."""
    out: Path = options.out
    if out.exists() and not out.is_dir():
        raise SetupError(f"--out {out}: exists and is not a directory")
    _check_writable(out)  # before the model loads: a read-only --out must not cost the user a model load
    if not out.is_dir():
        return None
    if (out / MANIFEST_NAME).exists():
        try:
            return CacheWriter(out).read_manifest()
        except CacheError as error:
            if not options.overwrite:
                raise SetupError(f"{error}; use --overwrite to replace it") from None
            return None
    foreign = [p.name for p in out.iterdir() if not is_cache_entry(p.name)]
    if foreign:
        raise SetupError(f"--out {out}: exists, is not empty and holds no explanation cache; "
                         "choose a new or empty directory")
    if out_snapshot(out)[1] and not options.overwrite:
        raise SetupError(f"--out {out} holds explanation shards but no {MANIFEST_NAME}, so nobody knows "
                         "which options made them and they cannot be resumed; use --overwrite to remove "
                         "them, or another --out")
    return None


def _listing(options: ExplainOptions) -> tuple[DatasetListing, int]:
    """The dataset with its masks and boxes, cut to --limit; and how many images it listed before the cut."""
    for option, path in (("--masks", options.masks), ("--boxes", options.boxes), ("--classes", options.classes),
                         ("--checkpoint", options.checkpoint)):
        if path is not None and not path.exists():
            raise SetupError(f"{option} {path}: no such file or directory")
    try:
        listing = list_dataset(options.data)
        if options.masks is not None:
            attach_masks(listing, options.masks)
        if options.boxes is not None:
            attach_boxes(listing, options.boxes)
    except (DatasetError, OSError) as error:
        raise SetupError(str(error).splitlines()[0]) from None
    listed = len(listing.samples)
    listing.samples = [listing.samples[i] for i in evenly_spaced(listed, options.limit)]
    return listing, listed


def _model_and_explainer(options: ExplainOptions, device: torch.device) -> tuple[LoadedModel, Any]:
    """The model, moved to `device`, and its FG-CAM explainer."""
    from analysis.fgcam import FGCAM

    try:
        loaded = load_model(options.model, weights=options.weights, checkpoint=options.checkpoint,
                            num_classes=options.num_classes, image_size=options.image_size, mean=options.mean,
                            std=options.std)
    except ModelSpecError as error:
        raise SetupError(str(error)) from None
    model = loaded.model.to(device)
    try:
        explainer = FGCAM(model, base=options.base, cam_layer=options.cam_layer, denoise=options.denoise,
                          low_rule=options.low_rule)
    except ValueError as error:
        raise SetupError(str(error).splitlines()[0]) from None
    except Exception as error:  # UnsupportedOperation: a model the engine cannot trace
        raise SetupError(f"{type(error).__name__}: {str(error).splitlines()[0]}") from None
    return loaded, explainer


def _class_names_and_labels(options: ExplainOptions, listing: DatasetListing, loaded: LoadedModel,
                            outputs: int) -> tuple[list[str], list[int]]:
    """One class name per model output, and each image's label as an output index."""
    class_names = class_mapping(listing, loaded, options.classes)
    if outputs != len(class_names):
        source = f"--classes {options.classes} lists" if options.classes else "the dataset has"
        raise SetupError(f"the model has {outputs} outputs but {source} {len(class_names)} classes; "
                         "pass --classes FILE with one class name per model output (line i = output i)")
    index_of = {name: i for i, name in enumerate(class_names)}
    return class_names, [index_of[s.label_name] for s in listing.samples]


def _recorded_options(options: ExplainOptions, explainer: Any, loaded: LoadedModel, device: torch.device,
                      shard_size: int) -> dict[str, Any]:
    """The manifest's "options": what made the cache (a resume compares them), as plain JSON values."""
    return {
        "base": options.base, "target_layer": options.target_layer, "cam_layer": explainer.cam_layer,
        "denoise": bool(options.denoise), "low_rule": low_rule_text(options.low_rule),
        "batch_size": options.batch_size, "map_size": options.map_size,
        "descriptor_size": options.descriptor_size, "faithfulness_steps": options.faithfulness,
        "masks": _absolute(options.masks), "boxes": _absolute(options.boxes),
        "limit": options.limit, "shard_size": shard_size, "classes": _absolute(options.classes),
        "weights": options.weights, "image_size": options.image_size, "mean": options.mean, "std": options.std,
        "preprocessing": loaded.preprocessing, "device": str(device), "workers": options.workers,
    }


def _new_manifest(options: ExplainOptions, ranks: Ranks, loaded: LoadedModel, listing: DatasetListing, listed: int,
                  outputs: int, recorded: dict[str, Any], class_names: list[str],
                  geometry: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a new cache, nothing explained yet."""
    now = now_iso()
    return {
        "format_version": FORMAT_VERSION, "cache_id": new_cache_id(), "created": now, "updated": now,
        "finished": None,
        "model": {"spec": _normalised_spec(options.model), "weights_sha256": loaded.weights_sha256,
                  "checkpoint": _absolute(options.checkpoint), "num_classes": outputs,
                  "preprocessing": preprocessing_fingerprint(loaded.transform, loaded.in_channels)},
        "dataset": {"root": str(listing.root), "kind": listing.kind, "fingerprint": listing.fingerprint(),
                    "n_images": len(listing.samples), "n_listed": listed,
                    "foreground": listing.has_foreground},
        "options": recorded, "class_names": class_names, "geometry": geometry,
        "counts": {"images": len(listing.samples), "explained": 0, "errors": 0, "correct": 0},
        "software": _software_versions(), "world_size": ranks.world_size,
    }


def prepare(options: ExplainOptions, ranks: Ranks) -> JobPlan:
    """Validate everything and build the plan; raises SetupError (nothing has been written yet). Problems are
    worded with the command line's option names (--out, --masks, ...), which are the fields of `options`."""
    out: Path = options.out
    existing_manifest = _existing_manifest(options)
    seen = out_snapshot(out)
    listing, listed = _listing(options)
    device = _pick_device(options.device, ranks)
    loaded, explainer = _model_and_explainer(options, device)
    outputs = _dry_run(loaded, explainer, listing, device, options.target_layer)
    geometry = _geometry_record(loaded, listing)
    if listing.has_foreground and geometry["method"] == "unknown":
        raise SetupError(f"foreground masks/boxes cannot be placed: {geometry['transform']}; give the model a "
                         "transform that only resizes and crops (or use --image-size/--mean/--std)")
    class_names, labels = _class_names_and_labels(options, listing, loaded, outputs)

    shard_size = options.shard_size
    if shard_size is None:
        previous = (existing_manifest or {}).get("options", {}).get("shard_size")
        shard_size = int(previous) if previous and not options.overwrite else options.batch_size
    recorded = _recorded_options(options, explainer, loaded, device, shard_size)
    manifest = _new_manifest(options, ranks, loaded, listing, listed, outputs, recorded, class_names, geometry)
    existing = False
    if existing_manifest is not None and not options.overwrite:
        diffs = _differences(existing_manifest, manifest)
        if diffs:
            raise SetupError(f"--out {out} holds a cache made with different options ({'; '.join(diffs)}); "
                             "use --overwrite to replace it, or another --out")
        existing = True
        manifest = {**existing_manifest, "world_size": ranks.world_size, "geometry": geometry,
                    "options": {**existing_manifest["options"], **{k: recorded[k] for k in RUNTIME_OPTIONS}}}
    return JobPlan(out=out, listing=listing, labels=labels, class_names=class_names, loaded=loaded,
                   explainer=explainer, device=device, target_layer=options.target_layer, map_size=options.map_size,
                   descriptor_size=options.descriptor_size, faithfulness_steps=options.faithfulness,
                   shard_size=shard_size, batch_size=options.batch_size,
                   workers=options.workers, manifest=manifest, existing=existing,
                   wipe=bool(options.overwrite and out.is_dir()), quiet=options.quiet, seen=seen)
