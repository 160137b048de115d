"""`check-model --images` on a labelled folder: do the folder's labels and the model's outputs mean the same
classes? The check of analysis/pipeline/label_check.py on a few images per class, before a whole job is run."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from analysis.pipeline.datasets import DatasetError, DatasetListing, evenly_spaced, list_image_folder, load_image, to_model_mode
from analysis.pipeline.label_check import label_mismatch
from analysis.pipeline.models import LoadedModel
from analysis.pipeline.plan import class_mapping

PER_CLASS = 8        # images a class: enough for label_check's MIN_IMAGES with unreadable files skipped
MAX_IMAGES = 400     # a forward pass each: bounded, so many classes do not make the check a job
BATCH = 32


def sample_by_class(folder: Path, per_class: int = PER_CLASS,
                    limit: int = MAX_IMAGES) -> tuple[list[Path], list[str], DatasetListing]:
    """Up to `per_class` image files of each class folder (evenly spaced, at most `limit` in all): (files, their
    label names, the folder's listing). Raises DatasetError when `folder` has no class folders."""
    listing = list_image_folder(folder)
    per_class = max(1, min(per_class, limit // max(1, len(listing.label_names))))
    by_class: dict[str, list[str]] = {}
    for sample in listing.samples:
        by_class.setdefault(sample.label_name, []).append(sample.path)
    files, labels = [], []
    for name, paths in by_class.items():
        for index in evenly_spaced(len(paths), per_class):
            files.append(listing.root / paths[index])
            labels.append(name)
    return files, labels, listing


def labels_warning(folder: Path, loaded: LoadedModel, device: torch.device) -> str | None:
    """The one-line warning when the folder is labelled (root/<class>/...), its classes map to the model's
    outputs as the explain job would map them (without --classes) and the predictions look permuted; None
    otherwise, and when the labels are unknown."""
    try:
        files, labels, listing = sample_by_class(folder)
        names = class_mapping(listing, loaded, None)
    except DatasetError:
        return None
    index = {name: i for i, name in enumerate(names)}
    kept_labels, preds, confidence = [], [], []
    model = loaded.model.to(device).eval()
    for start in range(0, len(files), BATCH):
        batch, batch_labels = [], []
        for path, label in zip(files[start:start + BATCH], labels[start:start + BATCH]):
            try:
                batch.append(loaded.transform(to_model_mode(load_image(path), loaded.in_channels)))
                batch_labels.append(index[label])
            except Exception:   # unreadable files are named by the conservation check; here they only count less
                continue
        if not batch:
            continue
        with torch.no_grad():
            probs = torch.softmax(model(torch.stack(batch).to(device)).float(), dim=1)
        if probs.shape[1] != len(names):   # the job would refuse this folder without --classes: labels unknown
            return None
        top = probs.max(dim=1)
        preds += top.indices.tolist()
        confidence += top.values.tolist()
        kept_labels += batch_labels
    found = label_mismatch(kept_labels, preds, names, confidence) if preds else None
    return None if found is None else found.message


def warn_about_labels(folder: Path | None, loaded: LoadedModel, device: torch.device) -> None:
    """Print labels_warning's line on stderr (nothing without --images or when all looks right)."""
    line = labels_warning(folder, loaded, device) if folder is not None else None
    if line is not None:
        print(f"warning: {line}", file=sys.stderr)
