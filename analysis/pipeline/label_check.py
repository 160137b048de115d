"""Do the dataset's labels and the model's outputs mean the same classes?

A model trained with one class order and run on a dataset whose labels follow another (sorted folder names,
torchvision's or timm's order, a training script's) is not a bad model: its confusion matrix is almost a
permutation. `label_mismatch` finds that from labels and predictions alone (a pure function on arrays, so the
job, `check-model` and the dashboard all use the same check), and says how to fix it (`--classes FILE`).

The signal is a one-to-one mapping that the images of several classes follow: class a's images are mostly
predicted as one other output b, no other class's images go mostly to b, and b's own images (when the dataset
has any) go mostly somewhere else too -- an honest confusion (a shirt called a T-shirt) leaves the T-shirts
predicted as T-shirts. A second, independent sign is a model far more confident than it is accurate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Thresholds (measured in tests/test_label_check.py; margins in its comments).
DOMINANT_SHARE = 0.5      # a class is "mapped" when more than half its images go to one other output
MIN_IMAGES = 3            # classes with fewer images are not judged (noise)
MIN_MAPPED = 2            # a permutation moves at least two classes
MIN_GAIN = 0.15           # the mapping must explain at least this much accuracy (share of all images)
CONFIDENCE_GAP = 0.5      # mean confidence minus accuracy that says "labels and outputs disagree" on its own
SHOWN_PAIRS = 3           # pairs named in the message


@dataclass(frozen=True)
class LabelMismatch:
    """A likely mismatch between labels and model outputs."""

    mapping: dict[int, int]        # label index -> the model output its images mostly get (the mapped classes)
    accuracy: float                # share of images predicted as their label
    remapped_accuracy: float       # the same if each mapped label meant its output instead
    mean_confidence: float         # mean confidence of the predictions (NaN when not given)
    output_order: list[str]        # the suggested --classes file content: line i = the class output i means
    message: str                   # one line: what was seen and how to fix it


def _row_peaks(labels: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each label that occurs: (label, its most frequent prediction, that prediction's count, images).
    Sparse (only the occurring pairs), so 1,000 outputs cost what the occurring pairs cost."""
    width = int(max(labels.max(), preds.max())) + 1
    keys, counts = np.unique(labels * width + preds, return_counts=True)   # one key per (label, pred) cell
    cell_label, cell_pred = keys // width, keys % width
    order = np.lexsort((-counts, cell_label))          # per label, its largest cell first
    cell_label, cell_pred, counts = cell_label[order], cell_pred[order], counts[order]
    first = np.r_[True, cell_label[1:] != cell_label[:-1]]
    totals = np.add.reduceat(counts, np.flatnonzero(first))
    return cell_label[first], cell_pred[first], counts[first], totals


def likely_mapping(labels: np.ndarray, preds: np.ndarray) -> tuple[dict[int, int], float]:
    """The one-to-one label -> output mapping that the images follow (see the module's docstring), and the share
    of all images it would make correct that are wrong now (the accuracy it explains)."""
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    if labels.size == 0:
        return {}, 0.0
    label, peak, peak_count, total = _row_peaks(labels, preds)
    judged = total >= MIN_IMAGES
    candidate = judged & (peak != label) & (peak_count > DOMINANT_SHARE * total)
    targets, hits = np.unique(peak[candidate], return_counts=True)
    unique_target = np.isin(peak, targets[hits == 1])
    # b's own images must not be predicted b mostly: then b is mapped too, or the dataset has (next to) no b.
    stays = dict(zip(label[judged].tolist(), (peak[judged] == label[judged]).tolist()))
    closed = np.array([not stays.get(int(b), False) for b in peak], dtype=bool)
    mapped = candidate & unique_target & closed
    return ({int(a): int(b) for a, b in zip(label[mapped], peak[mapped])},
            float(peak_count[mapped].sum()) / labels.size)


def label_mismatch(labels: np.ndarray, preds: np.ndarray, class_names: list[str],
                   confidence: np.ndarray | None = None) -> LabelMismatch | None:
    """The likely label -> output mapping when labels and model outputs look permuted, else None.

    ``labels`` and ``preds`` are indices into ``class_names`` (= the model's outputs in the order the job used).
    """
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    if labels.size == 0:
        return None
    accuracy = float((labels == preds).mean())
    mean_confidence = float(np.mean(confidence)) if confidence is not None and len(confidence) else float("nan")
    mapping, gain = likely_mapping(labels, preds)
    overconfident = mean_confidence - accuracy >= CONFIDENCE_GAP
    if not ((len(mapping) >= MIN_MAPPED and gain >= MIN_GAIN) or overconfident):
        return None
    order = list(class_names)
    for a, b in mapping.items():
        order[b] = class_names[a]
    # A chain that ends in an output the dataset never shows leaves the name of its first output stale there
    # (that class is now named at its real output): the class of that output is unknown.
    targets = set(mapping.values())
    order = [f"output {i}" if i in mapping and i not in targets else name for i, name in enumerate(order)]
    result = LabelMismatch(mapping, accuracy, accuracy + gain, mean_confidence, order, "")
    return LabelMismatch(**{**result.__dict__, "message": mismatch_message(result, class_names)})


def mismatch_message(found: LabelMismatch, class_names: list[str]) -> str:
    """One line: what was seen, the likely mapping, and the fix (--classes FILE in the model's output order)."""
    seen = f"accuracy {found.accuracy:.0%}"
    if found.mean_confidence == found.mean_confidence:   # not NaN
        seen += f" at mean confidence {found.mean_confidence:.0%}"
    if not found.mapping:
        return (f"labels and model outputs may not match: {seen}; check that line i of --classes FILE names "
                "the class of the model's output i")
    pairs = sorted(found.mapping.items(), key=lambda pair: pair[0])
    named = ", ".join(f"{class_names[a]} -> output {b} ({class_names[b]})" for a, b in pairs[:SHOWN_PAIRS])
    more = f" and {len(pairs) - SHOWN_PAIRS} more" if len(pairs) > SHOWN_PAIRS else ""
    order = ", ".join(found.output_order[:12]) + (", ..." if len(found.output_order) > 12 else "")
    return (f"labels and model outputs look permuted: {len(pairs)} classes' images are mostly predicted as one "
            f"other output each ({named}{more}); {seen}, {found.remapped_accuracy:.0%} with that mapping. If the "
            f"model's outputs follow another order, rerun with --classes FILE, one class name per line in the "
            f"model's output order (here likely: {order})")
