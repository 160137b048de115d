"""What the Trust page shows, computed: its tables, charts, composited images and plain-language verdicts.

The page (dashboard/views/trust.py) only loads, calls this module and draws. Three families of results:

* **Faithfulness** (deletion / insertion, `python -m analysis compare-methods`): `trust_page_data` (the
  stored comparison), `comparison_table`, `curve_chart`.
* **Sanity checks** (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018; `analysis.trust.sanity`,
  stored by the same command): `sanity_curve_chart` (rank correlation or SSIM with the original map against
  how much of the model is re-initialised, per method, mean and 95% band), `class_check_chart`, and
  `sanity_verdict`, one plain sentence of what the numbers mean for this model.
* **Region tests**: the causal shortcut test (`analysis.trust.region_removal`, run on the page; `shortcut_verdict`,
  `region_tile`) and the artefact insertion test (`analysis.trust.region_insertion`, stored by `python -m analysis
  insertion-test`; `insertion_table`, `insertion_chart`).

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

import altair as alt
import numpy as np
import pandas as pd
from PIL import Image

from analysis.explore import overlay, statistics as explore
from analysis.trust.compare import read_comparison
from analysis.trust.sanity import sanity_curves

SIMILAR = 0.5          # rank correlation with the original map from which a map "changes little"
DIFFERENT = 0.2        # ... under which it "changes a lot"
WIDE_INTERVAL = 0.2    # a 95% half-width above which the sentence gets a caveat
REGION_MATTERS = 0.20  # shortcut test: region minus control share of changed predictions
REGION_NO_EFFECT = 0.05
CURVE_WIDTH = 300
SANITY_WIDTH = 360
REGION_COLOR = (178, 24, 43)
SANITY_METRICS = {"spearman": "rank correlation (Spearman)", "ssim": "SSIM"}
SENTENCE_NUMBERS = "In brackets: the rank correlation with the original map (1: unchanged, 0: unrelated)."
REFERENCE_METHODS = ("random", "edge")   # ignore the model: their maps never change (drawn dashed)


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


def curve_chart(curves: pd.DataFrame, layer: str, curve: str) -> alt.Chart:
    """The deletion or insertion curve of every method at `layer` (mean probability of the class)."""
    data = curves[(curves["layer"] == layer) & (curves["curve"] == curve)]
    better = "lower" if curve == "deletion" else "higher"
    what = "most relevant pixels blurred" if curve == "deletion" else "most relevant pixels restored"
    return alt.Chart(data, width=CURVE_WIDTH, height=220,
                     title=f"{curve.capitalize()} at {layer} ({better} curve is better)").mark_line().encode(
        x=alt.X("fraction:Q", title=f"fraction of {what}", axis=alt.Axis(format="%")),
        y=alt.Y("probability:Q", title="mean probability of the class", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("label:N", title="method", sort=data.drop_duplicates("label")["label"].tolist(),
                        legend=alt.Legend(orient="bottom", columns=2, labelLimit=0)),
        strokeDash=alt.condition(alt.datum.method == "random", alt.value([4, 3]), alt.value([1, 0])),
        tooltip=["label:N", alt.Tooltip("fraction:Q", format=".0%"), alt.Tooltip("probability:Q", format=".3f")],
    )


# ------------------------------------------------------------------------------------------------ sanity checks
def sanity_curve_chart(curves: pd.DataFrame, layer: str, metric: str = "spearman") -> alt.LayerChart:
    """`curves` (`sanity_page_data`'s first item for `metric`) at `layer`: the mean similarity
    with the original map against the cascade's step (left: the original model, 1), one line per method, with
    its 95% band; the methods that ignore the model dashed."""
    data = curves[curves["layer"] == layer].dropna(subset=["mean"]).assign(
        low=lambda d: d["low"].clip(-1, 1), high=lambda d: d["high"].clip(-1, 1),   # a ±CI may pass ±1
        band=lambda d: d["label"])
    steps = data.drop_duplicates("step").sort_values("step")["step_label"].tolist()
    methods = data.drop_duplicates("label")["label"].tolist()
    x = alt.X("step_label:N", sort=steps, title="re-initialised from the top (cumulative)",
              axis=alt.Axis(labelAngle=-40, labelLimit=160, labelOverlap=False))
    color = alt.Color("label:N", title="method", sort=methods, legend=alt.Legend(orient="bottom", columns=2,
                                                                                  labelLimit=0))
    base = alt.Chart(data, width=SANITY_WIDTH, height=240, title="Model randomised from the top")
    # The band fills by a copy of the label (same domain order, so the same colours): a legend merged with the
    # lines' would be drawn faded, or dropped with legend=None.
    band = base.mark_area(opacity=0.15).encode(x=x, y=alt.Y("low:Q"), y2="high:Q",
                                                fill=alt.Fill("band:N", sort=methods, legend=None))
    line = base.mark_line(point=True).encode(
        x=x, y=alt.Y("mean:Q", title=f"{SANITY_METRICS.get(metric, metric)} with the original map",
                     scale=alt.Scale(domain=[-1, 1])),
        color=color,
        strokeDash=alt.condition(alt.FieldOneOfPredicate("method", list(REFERENCE_METHODS)),
                                 alt.value([4, 3]), alt.value([1, 0])),
        tooltip=["label:N", alt.Tooltip("step_label:N", title="re-initialised"),
                 alt.Tooltip("mean:Q", format=".3f"), alt.Tooltip("low:Q", format=".3f", title="95% low"),
                 alt.Tooltip("high:Q", format=".3f", title="95% high")])
    zero = alt.Chart(pd.DataFrame({"y": [0.0]})).mark_rule(color="#999", strokeDash=[2, 2]).encode(y="y:Q")
    return alt.layer(band, line, zero)


def class_check_chart(classes: pd.DataFrame, layer: str, metric: str = "spearman") -> alt.LayerChart:
    """`classes` (`sanity_page_data`'s second item) at `layer`: per method, the mean similarity between the map
    of the predicted class and the map of another class, with its 95% interval."""
    data = classes[classes["layer"] == layer]
    data = pd.DataFrame({"label": data["label"], "method": data["method"], "mean": data[f"{metric}_mean"],
                         "low": (data[f"{metric}_mean"] - data[f"{metric}_ci95"].fillna(0)).clip(-1, 1),
                         "high": (data[f"{metric}_mean"] + data[f"{metric}_ci95"].fillna(0)).clip(-1, 1),
                         "images": data[f"{metric}_n"]}).dropna(subset=["mean"])
    y = alt.Y("label:N", sort=data["label"].tolist(), title=None, axis=alt.Axis(labelLimit=200))
    x_title = f"{SANITY_METRICS.get(metric, metric)} with the predicted class's map"
    base = alt.Chart(data, width=CURVE_WIDTH, height=max(24 * len(data), 60), title="Another class explained")
    bars = base.mark_bar(opacity=0.7).encode(
        x=alt.X("mean:Q", title=x_title, scale=alt.Scale(domain=[-1, 1])), y=y,
        color=alt.Color("label:N", legend=None, sort=data["label"].tolist()),
        tooltip=["label:N", alt.Tooltip("mean:Q", format=".3f"), alt.Tooltip("low:Q", format=".3f", title="95% low"),
                 alt.Tooltip("high:Q", format=".3f", title="95% high"), "images:Q"])
    whiskers = base.mark_rule(color="black").encode(x="low:Q", x2="high:Q", y=y)
    return alt.layer(bars, whiskers)


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
    from analysis.explore.report import mean_model_view

    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[np.isin(ids, cache.ids)]   # (a saved run may name images the cache no longer holds)
    tile = mean_model_view(cache, ids[explore.sample_rows(len(ids), 64)], size) if len(ids) else None
    if tile is None:
        tile = overlay.placeholder(size, "no image")
    return tint_region(tile, region)


def tint_region(tile: np.ndarray, region: np.ndarray) -> np.ndarray:
    """`tile` (uint8 [s, s, 3]) with `region` (bool [h, w], resized nearest) blended 55% red and outlined."""
    side = tile.shape[0]
    mask = np.asarray(Image.fromarray(np.asarray(region, bool).astype(np.uint8) * 255).resize(
        (tile.shape[1], side), Image.NEAREST)) > 127
    tinted = tile.astype(np.float32)
    tinted[mask] = 0.45 * tinted[mask] + 0.55 * np.array(REGION_COLOR, np.float32)
    return overlay.with_outline(np.round(tinted).astype(np.uint8), np.asarray(region, bool))


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


def insertion_chart(table: pd.DataFrame) -> alt.Chart:
    """Per saved run (`insertion_table`), the share of targets flipped to the class by pasting the region and
    by pasting a random region of the same size."""
    runs = (table["selection"] + " → " + table["flips to"] + ", " + table["region"]).tolist()
    data = pd.DataFrame({
        "run": runs * 2,
        "pasted": ["the region"] * len(table) + ["a random region"] * len(table),
        "flipped": table["flipped, region pasted"].tolist() + table["flipped, random region"].tolist()})
    return alt.Chart(data, width=420, height=alt.Step(20), title="Predictions flipped to the class").mark_bar().encode(
        x=alt.X("flipped:Q", title="share of targets flipped", axis=alt.Axis(format="%"),
                scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("pasted:N", title=None, sort=["the region", "a random region"]),
        row=alt.Row("run:N", title=None, sort=runs, header=alt.Header(labelAngle=0, labelAlign="left",
                                                                      labelLimit=400)),
        color=alt.Color("pasted:N", title=None, sort=["the region", "a random region"],
                        scale=alt.Scale(range=["#b2182b", "#999999"])),
        tooltip=["run:N", "pasted:N", alt.Tooltip("flipped:Q", format=".1%")])


def made_before_cache(modified: float, manifest: dict[str, Any]) -> bool:
    """Whether a result saved at `modified` (seconds since the epoch) is older than the cache (made for a cache
    this directory held before: its ids may name other images now)."""
    try:
        created = datetime.strptime(str(manifest.get("created")), "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return False
    return modified < created.timestamp()
