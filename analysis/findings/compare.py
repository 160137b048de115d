"""Two caches of the same images compared: before and after a fix, or model A against model B.

`compare_caches(a, b)` matches the images by their path (relative to the dataset root) and measures, with no
drawing: accuracy and mean score changes per class; for each finding of A what became of its images in B (what
B predicts for them, the share back to their own label, and the finding's verdict run again in B: the findings
of B of the same kind over the same images); the images whose prediction changed; and the findings new in B.
Caches of other datasets (other class names, or too few shared paths) are refused with a one-line
`CachesNotComparable` (a ValueError) before any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from analysis.cache.classes import class_names
from analysis.findings.kinds import SAME_CLUSTER_OVERLAP, plural
from analysis.findings.model import Finding

# At least this share of the smaller cache's images must be in both (ours: half; two caches of one test split
# share all of them, two datasets almost none).
MIN_SHARED_SHARE = 0.5
# Mean explanation scores compared per class, when both caches hold them.
SCORES = ("background_hotspot", "border_share", "concentration")
GONE = "gone"        # the verdict in B of a finding of A that no finding of B repeats
EXAMPLES = 6
_COLUMNS = ["id", "path", "label", "pred", "correct", "confidence"]


class CachesNotComparable(ValueError):
    """Two caches that do not hold the same images with the same classes; the message is one line."""


@dataclass
class FindingFate:
    """What became in B of the images of one finding of A. `predicted_b`: B's predicted class name -> images,
    most first; `matches`: the findings of B of the same kind over the same images (their verdicts are the
    finding's verdict run again in B; none: GONE); `examples`: (id in A, id in B) pairs, those whose prediction
    changed first."""

    finding: Finding
    images: int
    same_prediction: int
    wrong_in_a: int
    back_to_label: int
    predicted_b: dict[str, int]
    matches: list[Finding]
    examples: list[tuple[int, int]] = field(default_factory=list)

    @property
    def verdict_b(self) -> str:
        return self.matches[0].verdict if self.matches else GONE

    @property
    def share_back(self) -> float:
        """Of the finding's images A got wrong, the share B calls by their own label (NaN: none was wrong)."""
        return self.back_to_label / self.wrong_in_a if self.wrong_in_a else float("nan")

    def text(self) -> str:
        """What became of the finding, in words from the numbers above."""
        if not self.images:
            return "None of its images is in B."
        called = ", ".join(f'{n} "{name}"' for name, n in list(self.predicted_b.items())[:3])
        words = [f"B keeps the prediction of A for {self.same_prediction} of its {self.images} images "
                 f"(B calls {called})."]
        if self.wrong_in_a:
            words.append(f"Of the {self.wrong_in_a} {plural(self.wrong_in_a, 'image', 'images')} A got wrong, "
                         f"{self.back_to_label} ({self.share_back:.0%}) are back to their own label in B.")
        words.append("No finding of this kind over these images in B: gone." if not self.matches else
                     f"In B: {self.matches[0].title} [{self.verdict_b}].")
        return " ".join(words)


@dataclass
class Comparison:
    """Cache A against cache B (see the module docstring). `images`: one row per shared path (ids, labels,
    predictions and scores of both); `classes`: per true class; `changed`: the images whose prediction changed."""

    root_a: Path
    root_b: Path
    only_a: int
    only_b: int
    images: pd.DataFrame
    classes: pd.DataFrame
    fates: list[FindingFate]
    changed: pd.DataFrame
    findings_b: list[Finding]
    new_in_b: list[Finding]

    @property
    def accuracy_a(self) -> float:
        return float(self.images["correct_a"].mean())

    @property
    def accuracy_b(self) -> float:
        return float(self.images["correct_b"].mean())

    def summary(self) -> list[str]:
        """The comparison in a few sentences, from its numbers."""
        fixed = int((~self.images["correct_a"] & self.images["correct_b"]).sum())
        broken = int((self.images["correct_a"] & ~self.images["correct_b"]).sum())
        gone = sum(fate.verdict_b == GONE for fate in self.fates)
        lines = [f"{len(self.images):,} images in both caches ({self.only_a:,} only in A, {self.only_b:,} only in B): "
                 f"accuracy {self.accuracy_a:.1%} in A, {self.accuracy_b:.1%} in B.",
                 f"{len(self.changed):,} predictions changed: {fixed:,} now right, {broken:,} now wrong.",
                 f"{gone} of the {len(self.fates)} {plural(len(self.fates), 'finding', 'findings')} of A "
                 f"{plural(gone, 'is', 'are')} gone in B; {len(self.new_in_b)} "
                 f"{plural(len(self.new_in_b), 'finding is', 'findings are')} new in B."]
        return lines


def _frame(cache: Any) -> pd.DataFrame:
    scores = [s for s in SCORES if s in cache.table.columns]
    return cache.columns(_COLUMNS + scores)


def check_comparable(a: Any, b: Any) -> None:
    """Raise CachesNotComparable (one line) unless A and B have the same class names and share at least
    MIN_SHARED_SHARE of the smaller cache's image paths."""
    names_a, names_b = class_names(a), class_names(b)
    if names_a != names_b:
        differ = sorted(set(names_a) ^ set(names_b))[:3]
        raise CachesNotComparable(
            f"{b.root} has other classes than {a.root} ({len(names_b)} against {len(names_a)}"
            + (f"; e.g. {', '.join(differ)}" if differ else ", in another order") + "): not the same dataset")
    paths_a, paths_b = set(a.table["path"]), set(b.table["path"])
    shared = len(paths_a & paths_b)
    smaller = max(1, min(len(paths_a), len(paths_b)))
    if shared < MIN_SHARED_SHARE * smaller:
        raise CachesNotComparable(f"{a.root} and {b.root} share {shared} of {smaller} image paths (at least "
                                  f"{MIN_SHARED_SHARE:.0%} needed): not the same images")


def matched_images(a: Any, b: Any) -> tuple[pd.DataFrame, int, int]:
    """(one row per path in both caches: id/pred/correct/confidence/scores with suffixes _a and _b, label once;
    the number of paths only in A; only in B)."""
    frame_a, frame_b = _frame(a), _frame(b)
    joined = frame_a.merge(frame_b, on="path", suffixes=("_a", "_b"), how="inner")
    joined = joined.rename(columns={"label_a": "label"}).drop(columns=["label_b"])
    joined["correct_a"] = joined["correct_a"].astype(bool)
    joined["correct_b"] = joined["correct_b"].astype(bool)
    return joined.sort_values("id_a", kind="stable").reset_index(drop=True), \
        len(frame_a) - len(joined), len(frame_b) - len(joined)


def per_class(images: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Per true class: images, accuracy and mean confidence and scores in A and B, and their changes (B - A)."""
    measures = ["correct", "confidence"] + [s for s in SCORES if f"{s}_a" in images and f"{s}_b" in images]
    rows = []
    for label, group in images.groupby("label", sort=True):
        row: dict[str, Any] = {"class": names[int(label)], "images": len(group)}
        for measure in measures:
            name = "accuracy" if measure == "correct" else measure
            before = float(group[f"{measure}_a"].astype(float).mean())
            after = float(group[f"{measure}_b"].astype(float).mean())
            row.update({f"{name}_a": before, f"{name}_b": after, f"{name}_change": after - before})
        rows.append(row)
    return pd.DataFrame(rows)


def changed_predictions(images: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """The images whose predicted class differs between A and B, with what the change did ("now right",
    "now wrong", "still wrong")."""
    moved = images[images["pred_a"] != images["pred_b"]]
    outcome = np.where(moved["correct_b"], "now right", np.where(moved["correct_a"], "now wrong", "still wrong"))
    return pd.DataFrame({"path": moved["path"], "id_a": moved["id_a"], "id_b": moved["id_b"],
                         "label": [names[int(i)] for i in moved["label"]],
                         "pred_a": [names[int(i)] for i in moved["pred_a"]],
                         "pred_b": [names[int(i)] for i in moved["pred_b"]],
                         "confidence_a": moved["confidence_a"], "confidence_b": moved["confidence_b"],
                         "outcome": outcome}).reset_index(drop=True)


def same_images(ids: set[int], other: set[int]) -> bool:
    """Two findings over the same images: half of the smaller one's images in both (SAME_CLUSTER_OVERLAP, the
    rule that merges one shortcut found in several scopes)."""
    return len(ids & other) / max(1, min(len(ids), len(other))) >= SAME_CLUSTER_OVERLAP


def finding_fate(finding: Finding, images: pd.DataFrame, findings_b: list[tuple[Finding, set[int]]],
                 names: Sequence[str]) -> FindingFate:
    """What became of one finding of A in B (`findings_b`: B's findings with their ids translated to A's)."""
    mine = images[images["id_a"].isin(finding.ids)]
    wrong = mine[~mine["correct_a"]]
    counts = mine["pred_b"].value_counts(sort=True)
    ids = set(int(i) for i in mine["id_a"])
    matches = [other for other, other_ids in findings_b if other.kind == finding.kind and same_images(ids, other_ids)]
    # The finding's own examples first, then its other images; those whose prediction changed before the rest
    # (what the comparison is about).
    pairs, moved = mine.set_index("id_a")["id_b"], set(mine.loc[mine["pred_a"] != mine["pred_b"], "id_a"])
    listed = [i for i in finding.examples if i in ids]
    shown = sorted(listed + sorted(ids - set(listed)), key=lambda i: i not in moved)
    return FindingFate(finding=finding, images=len(mine), same_prediction=int((mine["pred_a"] == mine["pred_b"]).sum()),
                       wrong_in_a=len(wrong), back_to_label=int(wrong["correct_b"].sum()),
                       predicted_b={names[int(c)]: int(n) for c, n in counts.items()}, matches=matches,
                       examples=[(int(i), int(pairs[i])) for i in shown[:EXAMPLES]])


def compare_caches(a: Any, b: Any, findings_a: Sequence[Finding] | None = None,
                   findings_b: Sequence[Finding] | None = None) -> Comparison:
    """Compare loaded caches A and B (see the module docstring); their findings default to
    analysis.findings.current_findings (the stored ones when fresh). Raises CachesNotComparable first."""
    from analysis.findings import current_findings

    check_comparable(a, b)
    names = class_names(a)
    images, only_a, only_b = matched_images(a, b)
    findings_a = list(current_findings(a)[0] if findings_a is None else findings_a)
    findings_b = list(current_findings(b)[0] if findings_b is None else findings_b)
    to_a = dict(zip(images["id_b"].astype(int), images["id_a"].astype(int)))
    translated = [(f, {to_a[i] for i in f.ids if i in to_a}) for f in findings_b]
    fates = [finding_fate(f, images, translated, names) for f in findings_a]
    a_sets = [(f, {int(i) for i in f.ids}) for f in findings_a]
    new = [f for f, ids in translated
           if not any(f.kind == old.kind and same_images(ids, old_ids) for old, old_ids in a_sets)]
    return Comparison(root_a=Path(a.root), root_b=Path(b.root), only_a=only_a, only_b=only_b, images=images,
                      classes=per_class(images, names), fates=fates, changed=changed_predictions(images, names),
                      findings_b=findings_b, new_in_b=new)
