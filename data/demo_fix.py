"""`python -m data.demo --fix`: the demo proves its own fix. After the demo's steps, it

  8. trains the demo CNN again, on the same training images with the same seed, without the shortcut
     -> OUT/model_fixed.pt, OUT/train_report_fixed.json;
  9. explains the same test split (the same PNGs, the tag still planted on the same test images) with it
     -> OUT/cache_fixed;
 10. runs the causal test (`python -m analysis cluster --verify-top 3`) on the fixed cache (the demo's cache had it
     in step 6), so that each has verified findings, and compares them (analysis.findings.compare):
     OUT/compare.html (the report with its compare section) and OUT/fix_report.json (the numbers, with the tagged
     images read from shortcut.csv);
 11. opens the dashboard on both (`--cache OUT/cache --compare OUT/cache_fixed`, the Compare page).

The fix: the tag pasted at random on every class in training (FIX_FRACTION of the images of every class whose
corner is free, whatever their class), rather than the tagged bags' corners cleaned. Both remove what made the tag
mean "bag", but a model trained on cleaned images has never seen the tag: at test time the tag is an unseen white
patch whose effect on the prediction is left to chance. A model that saw it on every class equally often has
learnt that it says nothing about the class, which is the fix one would make to real data one cannot clean image
by image (augmentation with the artefact, as in Lapuschkin et al.'s class artefact compensation).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.findings.compare import GONE
from data import demo, fashion_mnist, shortcut
from data.fashion_mnist import Split
from data.in_process import run_analysis

FIX_FRACTION = 0.5        # the share of every class's training images that carry the tag in the fixed training
FIX_SPLIT_CODE = 2        # the mark's seed for the fixed training draw: [shortcut.SEED, 2] (0, 1: train, test)
TAG_MAJORITY = 0.5        # a finding "over the tag": at least this share of its images carry it


@dataclass(frozen=True)
class FixedPaths(demo.DemoPaths):
    """The fixed model's outputs beside the demo's: the same test split, masks and shortcut.csv; its own model,
    report, cache and step stamps."""

    @property
    def model(self) -> Path:
        return self.out / "model_fixed.pt"

    @property
    def train_report(self) -> Path:
        return self.out / "train_report_fixed.json"

    @property
    def cache(self) -> Path:
        return self.out / "cache_fixed"

    @property
    def steps(self) -> Path:
        return self.out / "steps" / "fixed"

    @property
    def report(self) -> Path:
        return self.out / "compare.html"

    @property
    def fix_report(self) -> Path:
        return self.out / "fix_report.json"


def fixed_marks(images: np.ndarray) -> np.ndarray:
    """bool [N]: the training images that carry the tag in the fixed training: FIX_FRACTION of every class (the
    same draw for all classes, so the tag says nothing about the class), only where the corner is free."""
    draw = np.random.default_rng([shortcut.SEED, FIX_SPLIT_CODE]).random(len(images))
    return (draw < FIX_FRACTION) & shortcut.corner_is_free(images)


def step_fixed_model(fixed: FixedPaths, settings: demo.DemoSettings, train: Split, test: Split,
                     threads: int | None) -> bool:
    """Step 8; returns True when it trained a new model (skipped when trained with the same settings)."""
    import torch

    from data.demo_model import load_weights, save_weights
    from data.demo_model import train as train_model

    stamp = {"train_images": int(len(train.labels)), "epochs": settings.epochs, "seed": settings.seed,
             "fix_fraction": FIX_FRACTION, "mark": shortcut.MARK.tolist(), "mark_seed": shortcut.SEED}
    previous = demo.read_stamp(fixed, "model")
    if previous is not None and {k: previous.get(k) for k in stamp} == stamp and fixed.model.is_file() \
            and previous.get("model_sha256") == demo.file_sha256(fixed.model):
        demo.say(f"[8/11] fixed model: already trained, {fixed.model} (skipped)")
        return False
    if threads:
        torch.set_num_threads(threads)
    full_train = fashion_mnist.read_split(train.source, "train")
    marked = fixed_marks(full_train.images)[:len(train.labels)]
    demo.say(f"[8/11] training the demo CNN again without the shortcut: the tag on {int(marked.sum())} training "
             f"images of every class ({FIX_FRACTION:.0%} of each), {settings.epochs} epochs ...")
    result = train_model(shortcut.plant(train.images, marked), train.labels, epochs=settings.epochs,
                         seed=settings.seed, log=demo.say)
    report = {"train_seconds": round(result.seconds, 1), "train_images": result.images, "epochs": result.epochs,
              "fix": f"the tag on {FIX_FRACTION:.0%} of every class's training images",
              **demo.evaluate(result.model, test, demo.marked_test_images(test))}
    save_weights(result.model, fixed.model, report)
    load_weights(fixed.model)
    fixed.train_report.write_text(json.dumps(report, indent=2))
    demo.write_stamp(fixed, "model", {**stamp, "model_sha256": demo.file_sha256(fixed.model)})
    demo.say(f"        trained in {report['train_seconds']:.0f} s: test accuracy {report['test_accuracy']:.1%}; "
             f"tagged non-bags called 'bag': {report['marked_others_predicted_shortcut']:.0%}")
    return True


def tagged_back(paths: demo.DemoPaths, comparison: Any) -> dict[str, Any]:
    """The tagged test images of other classes than "bag" (from shortcut.csv, which the dashboard never reads):
    how many each model calls by their own class and "bag"."""
    import pandas as pd

    marks = pd.DataFrame(demo.read_shortcut_csv(paths.shortcut_csv))
    others = set(marks.loc[marks["marked"] & (marks["label"] != shortcut.SHORTCUT_CLASS), "path"])
    images = comparison.images[comparison.images["path"].isin(others)]
    from data.demo_model import CLASS_NAMES

    bag = CLASS_NAMES.index(shortcut.SHORTCUT_CLASS)    # the cache's class order (sorted folders), not idx order
    wrong = images[~images["correct_a"]]
    return {"tagged_others": len(images), "own_class_a": int(images["correct_a"].sum()),
            "own_class_b": int(images["correct_b"].sum()), "called_bag_a": int((images["pred_a"] == bag).sum()),
            "called_bag_b": int((images["pred_b"] == bag).sum()), "wrong_in_a": len(wrong),
            "back_to_own_class": float(wrong["correct_b"].mean()) if len(wrong) else None}


def tag_findings(paths: demo.DemoPaths, comparison: Any) -> dict[str, Any]:
    """The shortcut findings over the tag, before and after: those of A and B whose images carry the tag for
    the most part (TAG_MAJORITY, from shortcut.csv), with A's verdict run again in B. "The tag cluster is gone"
    when A has such a finding, every one of them is gone in B and B has none of its own."""
    marked = {row["path"] for row in demo.read_shortcut_csv(paths.shortcut_csv) if row["marked"]}
    images = comparison.images
    path_a, path_b = dict(zip(images["id_a"], images["path"])), dict(zip(images["id_b"], images["path"]))

    def on_tag(ids: list[int], paths_of: dict) -> bool:
        shown = [paths_of[i] for i in ids if i in paths_of]
        return bool(shown) and sum(p in marked for p in shown) / len(shown) >= TAG_MAJORITY

    before = [fate for fate in comparison.fates
              if fate.finding.verdict == "shortcut" and on_tag(fate.finding.ids, path_a)]
    after = [f for f in comparison.findings_b if f.verdict == "shortcut" and on_tag(f.ids, path_b)]
    return {"a": [{"title": fate.finding.title, "verdict_b": fate.verdict_b} for fate in before],
            "b": [f.title for f in after],
            "gone": bool(before) and all(fate.verdict_b == GONE for fate in before) and not after}


def fix_measurements(paths: demo.DemoPaths, comparison: Any) -> dict[str, Any]:
    """What the fix did, for OUT/fix_report.json and the tests: the comparison's summary and findings' fates, and
    the tagged non-bags (tagged_back)."""
    fates = [{"title": fate.finding.title, "kind": fate.finding.kind, "verdict_a": fate.finding.verdict,
              "verdict_b": fate.verdict_b, "images": fate.images, "wrong_in_a": fate.wrong_in_a,
              "back_to_label": fate.back_to_label, "share_back": None if fate.wrong_in_a == 0 else fate.share_back}
             for fate in comparison.fates]
    return {"summary": comparison.summary(), "accuracy_a": comparison.accuracy_a,
            "accuracy_b": comparison.accuracy_b, "changed": len(comparison.changed), "findings_a": fates,
            "shortcuts_b": sum(f.verdict == "shortcut" for f in comparison.findings_b),
            "new_in_b": [f.title for f in comparison.new_in_b], "tagged_others": tagged_back(paths, comparison),
            "tag_shortcuts": tag_findings(paths, comparison)}


def write_compare_report(fixed: FixedPaths, paths: demo.DemoPaths) -> None:
    """OUT/compare.html, by the real `python -m analysis report --compare` (it never overwrites: the demo's own
    previous one is removed first)."""
    fixed.report.unlink(missing_ok=True)
    code = run_analysis(["report", "--cache", str(paths.cache), "--compare", str(fixed.cache), "--out",
                         str(fixed.report)])
    if code != 0:
        raise demo.DemoError(f"the comparison report failed (exit code {code}, its message is above)")


def run_fix(paths: demo.DemoPaths, settings: demo.DemoSettings, train: Split, test: Split, threads: int | None,
            batch_size: int = 64) -> dict[str, Any]:
    """Steps 8-10 after the demo's own (see the module docstring); returns the measurements it wrote."""
    from analysis.cache import load
    from analysis.findings.compare import compare_caches

    fixed = FixedPaths(paths.out)
    fixed.steps.mkdir(parents=True, exist_ok=True)
    # The fixed cache explains the same test split: its stamp is the demo's (step_explain records it).
    demo.write_stamp(fixed, "testset", demo.read_stamp(paths, "testset") or {})
    step_fixed_model(fixed, settings, train, test, threads)
    demo.say("[9/11] explanations of the same test images by the fixed model:")
    demo.step_explain(fixed, batch_size=batch_size)
    demo.step_verify(paths.cache, "the demo's cache", "10/11")   # done in step 6 (a folder made before: now)
    demo.step_verify(fixed.cache, "the fixed cache", "10/11")
    comparison = compare_caches(load(paths.cache), load(fixed.cache))
    result = fix_measurements(paths, comparison)
    fixed.fix_report.write_text(json.dumps(result, indent=2))
    write_compare_report(fixed, paths)
    tagged = result["tagged_others"]
    demo.say("        " + "\n        ".join(comparison.summary()))
    demo.say(f"        tagged non-bags called by their own class: {tagged['own_class_a']} of "
             f"{tagged['tagged_others']} before, {tagged['own_class_b']} after; called 'bag': "
             f"{tagged['called_bag_a']} before, {tagged['called_bag_b']} after")
    gone = result["tag_shortcuts"]
    demo.say(f"        the tag's shortcut findings: {len(gone['a'])} before, {len(gone['b'])} after"
             + (" (gone)" if gone["gone"] else ""))
    demo.say(f"        the numbers: {fixed.fix_report}; the report: {fixed.report}")
    return result

