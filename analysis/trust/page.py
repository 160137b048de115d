"""What the Trust page shows, computed: its tables, composited images and plain-language verdicts (its charts are
analysis.present.trust_charts, its tiles analysis.present.tiles).

The page (dashboard/views/trust.py) only loads, calls this module and draws. Three families of results:

* **Faithfulness** (deletion / insertion, `python -m analysis compare-methods`): `trust_page_data` (the
  stored comparison; its curves drawn by `trust_charts.curve_chart`), `comparison_table`.
* **Sanity checks** (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018; `analysis.trust.sanity`,
  stored by the same command): `sanity_page_data` (rank correlation or SSIM with the original map against
  how much of the model is re-initialised, per method, mean and 95% band; drawn by
  `trust_charts.sanity_curve_chart`, the class check by `trust_charts.class_check_chart`), and
  `sanity_verdict`, one plain sentence of what the numbers mean for this model.
* **Region tests**: the causal shortcut test (`analysis.trust.region_removal`, run on the page; `shortcut_verdict`,
  `region_tile`) and the artefact insertion test (`analysis.trust.region_insertion`, stored by `python -m analysis
  insertion-test`; `insertion_table`, drawn by `trust_charts.insertion_chart`).

Ours: the verdict thresholds. A rank correlation of at least `SIMILAR` (0.5) with the original map counts as
"changes little", under `DIFFERENT` (0.2) as "changes a lot", in between as "changes partly". On a real
pretrained EfficientNet-Lite0 the plain CAM, which does depend on the model, scores 0.04-0.11 when the top
of the model is randomised and FG-CAM 0.62-0.88 (issue 16); the thresholds put these on either side. The
shortcut test's verdict compares the share of predictions changed by blurring the region with the share
changed by blurring a random region of the same size: a gap of at least `REGION_MATTERS` (20 points) is
evidence that the model uses the region, under `REGION_NO_EFFECT` (5 points) none.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.explore import statistics as explore
from analysis.present import overlay
from analysis.present.tiles import mean_model_view, tint_region
from analysis.trust.compare import read_comparison
from analysis.trust.sanity import sanity_curves

SIMILAR = 0.5          # rank correlation with the original map from which a map "changes little"
DIFFERENT = 0.2        # ... under which it "changes a lot"
WIDE_INTERVAL = 0.2    # a 95% half-width above which the sentence gets a caveat
REGION_MATTERS = 0.20  # shortcut test: region minus control share of changed predictions
REGION_NO_EFFECT = 0.05
SENTENCE_NUMBERS = "In brackets: the rank correlation with the original map (1: unchanged, 0: unrelated)."


# ------------------------------------------------------------------------------------------------ faithfulness
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
    comparison = read_comparison(directory)
    if comparison.sanity is None:
        return None
    table = comparison.sanity
    classes = table[(table["check"] == "class") & (table["variant"] == variant)].reset_index(drop=True)
    return sanity_curves(table, variant, metric), classes, comparison.meta["sanity"]


def comparison_table(table: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """The comparison's table for people: mean ± 95% CI half-width and std of both AUCs, best per layer."""
    sizes = meta.get("layer_sizes", {})
    out = pd.DataFrame({
        "layer": [f"{layer} ({sizes[layer][0]}×{sizes[layer][1]})" if layer in sizes else layer
                  for layer in table["layer"]],
        "method": table["label"],
        "images": table["n"].astype(int),
        "deletion AUC ↓": [f"{m:.3f} ± {c:.3f}" for m, c in zip(table["deletion_auc_mean"], table["deletion_auc_ci95"])],
        "deletion std": table["deletion_auc_std"].round(3),
        "insertion AUC ↑": [f"{m:.3f} ± {c:.3f}" for m, c in zip(table["insertion_auc_mean"],
                                                                 table["insertion_auc_ci95"])],
        "insertion std": table["insertion_auc_std"].round(3),
    })
    best_deletion = table.groupby("layer")["deletion_auc_mean"].transform("min") == table["deletion_auc_mean"]
    best_insertion = table.groupby("layer")["insertion_auc_mean"].transform("max") == table["insertion_auc_mean"]
    out["best at its layer"] = np.select([best_deletion & best_insertion, best_deletion, best_insertion],
                                         ["deletion and insertion", "deletion", "insertion"], "")
    if "constant_maps" in table.columns and (table["constant_maps"] > 0).any():
        out["constant maps"] = table["constant_maps"].map("{:.0%}".format)
    return out


# ------------------------------------------------------------------------------------------------ sanity checks
def _level(value: float) -> str:
    return "little" if value >= SIMILAR else "partly" if value >= DIFFERENT else "a lot"


def _steps_of(curves: pd.DataFrame, layer: str, method: str) -> pd.DataFrame:
    """The cascade's steps (not the original model) of `method` at `layer` where the mean is defined, in order."""
    rows = curves[(curves["layer"] == layer) & (curves["method"] == method) & (curves["step"] > 0)]
    return rows.dropna(subset=["mean"]).sort_values("step")


def sanity_verdict(curves: pd.DataFrame, classes: pd.DataFrame | None, layer: str = "input",
                   method: str = "fgcam", name: str = "FG-CAM") -> str:
    """One plain sentence of what the sanity checks say about `method`'s map at `layer`, from the Spearman
    means (in brackets; `SENTENCE_NUMBERS` says what they are): the cascade's first step (the top of the model re-initialised), its last step when it tells
    otherwise, and the class check. Empty when none of them was measured (or the map was always constant)."""
    steps = _steps_of(curves, layer, method)
    other = float("nan")
    if classes is not None:
        rows = classes[(classes["layer"] == layer) & (classes["method"] == method)]["spearman_mean"].dropna()
        other = float(rows.iloc[0]) if len(rows) else float("nan")
    clauses, model = [], None
    if len(steps):
        top, last = steps.iloc[0], steps.iloc[-1]
        top_level, last_level = _level(float(top["mean"])), _level(float(last["mean"]))
        clause = (f"changes {top_level} when the top of the model ({top['step_label']}) is replaced by random "
                  f"weights ({top['mean']:.2f})")
        if len(steps) > 1 and last_level != top_level:
            whole = str(last["step_label"]).startswith("all")
            clause += (f", {'but ' if top_level == 'little' else ''}{last_level} when "
                       f"{'the whole model is' if whole else str(last['step_label']) + ' are'} ({last['mean']:.2f})")
        clauses.append(clause)
        model = ("image" if last_level == "little" else "lower") if top_level == "little" else top_level
    if math.isfinite(other):
        clauses.append(f"{'it ' if clauses else ''}changes {_level(other)} when another class is explained "
                       f"({other:.2f})")
    if not clauses:
        return ""
    conclusion = _conclusion(model, _level(other) if math.isfinite(other) else None)
    return f"{name}'s map {', and '.join(clauses)}: {conclusion}."


def sanity_caveat(curves: pd.DataFrame, layer: str = "input", method: str = "fgcam") -> str:
    """A line saying the sentence rests on too few images when the 95% interval of `method`'s first cascade step
    at `layer` is wider than ±`WIDE_INTERVAL` (empty otherwise)."""
    steps = _steps_of(curves, layer, method)
    if steps.empty:
        return ""
    top = steps.iloc[0]
    if (top["high"] - top["low"]) / 2 <= WIDE_INTERVAL:
        return ""
    low, high = max(float(top["low"]), -1.0), min(float(top["high"]), 1.0)   # a correlation stays in [-1, 1]
    return (f"Uncertain: the 95% interval of {top['mean']:.2f} runs from {low:.2f} to {high:.2f}; "
            "run compare-methods with a larger --sample for a firmer verdict.")


def _conclusion(model: str | None, cls: str | None) -> str:
    """What the two findings mean together. `model`: "image" (little change even with the whole model random),
    "lower" (little change with the top random, more further down), "partly", "a lot"; `cls`: "little",
    "partly", "a lot"; None: not measured."""
    about_model = {"image": "it describes the image more than the model",
                   "lower": "it reflects the model's lower layers more than the top ones that make the decision",
                   "partly": "it shows partly the image, partly what the model learnt",
                   "a lot": "it depends on what the model learnt"}
    about_class = {"little": "it shows where the object is more than why the model chose its class",
                   "partly": "it follows the class asked about only in part",
                   "a lot": "it explains the class asked about"}
    if model is None:
        return about_class[cls]
    if cls is None:
        return about_model[model]
    if model == "a lot" and cls == "a lot":
        return "it depends on what the model learnt and on the class, as an explanation of the decision should"
    if model == "image" and cls == "little":
        return "it describes the image more than the model or its decision"
    if cls == "little":
        return f"{about_model[model]}, and hardly depends on which class is asked about"
    return f"{about_model[model]}, and {about_class[cls].removeprefix('it ')}"


# ------------------------------------------------------------------------------------------------ region tests
def shortcut_verdict(summary: dict[str, float]) -> str:
    """The causal shortcut test's verdict: blurring the region against blurring a random one."""
    gap = round(summary["changed_prototype"] - summary["changed_random"], 9)   # 0.3 - 0.1 is 20 points
    if gap >= REGION_MATTERS:
        return ("The region matters much more than a random one of the same size: evidence that the model uses "
                "what it holds.")
    if abs(gap) < REGION_NO_EFFECT:
        return ("Blurring the region changes about as much as blurring a random one: no evidence that the model "
                "depends on this region in particular.")
    return "The region matters somewhat more than a random one."


def shortcut_selection(table: pd.DataFrame, by: str, label: int, limit: int) -> np.ndarray:
    """The ids the shortcut test runs on: the images whose `by` column ("label" or "pred") is `label`, a seeded
    sample of at most `limit` of them (explore.sample_rows, seed 0: the same images on every run)."""
    ids = table["id"].to_numpy()[table[by].to_numpy() == label]
    return ids[explore.sample_rows(len(ids), int(limit), seed=0)]


def region_tile(cache: Any, ids: np.ndarray, region: np.ndarray, size: int = 256) -> np.ndarray:
    """The mean of what the model saw of the images `ids` (up to 64 of them) with `region` (bool [h, w], the
    model's input) tinted red and outlined: uint8 [size, size, 3]."""
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[np.isin(ids, cache.ids)]   # (a saved run may name images the cache no longer holds)
    tile = mean_model_view(cache, ids[explore.sample_rows(len(ids), 64)], size) if len(ids) else None
    if tile is None:
        tile = overlay.placeholder(size, "no image")
    return tint_region(tile, region)


def insertion_table(saved: Sequence[Any]) -> pd.DataFrame:
    """One row per saved insertion test (`analysis.trust.region_insertion.read_insertion_reports`, newest first): the
    selection, the class counted, the region, the targets, flips with the region and with a random region of
    the same size, mean probabilities and the verdict. A run whose summary lacks a number is left out."""
    from analysis.trust.region_insertion import SUMMARY_KEYS, verdict

    rows = []
    for run in saved:
        s = run.summary
        if not set(SUMMARY_KEYS) <= set(s):
            continue   # written by another version
        eligible = int(s["n"] - s["already_into"])
        rows.append({
            "selection": run.description, "flips to": run.into_name,
            "region": f"top {s['q']:g}%, {s['region_share']:.1%} of the image",
            "sources": int(s["sources"]), "targets": eligible,
            "flipped, region pasted": s["flipped_prototype"], "flipped, random region": s["flipped_random"],
            "p before": s["probability_before"], "p region": s["probability_prototype"],
            "p random": s["probability_random"], "verdict": verdict(s),
            "saved": datetime.fromtimestamp(run.modified).strftime("%Y-%m-%d %H:%M"), "name": run.name})
    return pd.DataFrame(rows, columns=["selection", "flips to", "region", "sources", "targets",
                                       "flipped, region pasted", "flipped, random region", "p before", "p region",
                                       "p random", "verdict", "saved", "name"])


def made_before_cache(modified: float, manifest: dict[str, Any]) -> bool:
    """Whether a result saved at `modified` (seconds since the epoch) is older than the cache (made for a cache
    this directory held before: its ids may name other images now)."""
    try:
        created = datetime.strptime(str(manifest.get("created")), "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return False
    return modified < created.timestamp()
