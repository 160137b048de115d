"""Summaries of the sanity checks for the table, the Trust page and the one-sentence verdict."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.trust.methods import BASE_LABELS
from analysis.trust.sanity.blocks import METRICS, short_step_label


def mean_and_ci(values: np.ndarray) -> tuple[int, float, float, float]:
    """(n, mean, std (ddof 1), 95% Student-t half-width) of the finite values."""
    from scipy import stats

    values = values[np.isfinite(values)]
    n = len(values)
    if n == 0:
        return 0, float("nan"), float("nan"), float("nan")
    std = float(values.std(ddof=1)) if n > 1 else float("nan")
    ci = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else float("nan")
    return n, float(values.mean()), std, ci


def summarise_sanity(per_image: pd.DataFrame, steps: Sequence[dict], labels: dict[str, str] | None = None
                     ) -> pd.DataFrame:
    """One row per (check, step, layer, method, variant), in the per-image order: step label and depth,
    the method's label, and per metric n, mean, std, ci95 over the images where it is defined, plus
    ``undefined`` (images where a map was constant)."""
    by_step = {s["step"]: s for s in steps}
    rows = []
    for (check, step, layer, method, variant), group in per_image.groupby(
            ["check", "step", "layer", "method", "variant"], sort=False):
        row: dict[str, Any] = {
            "check": check, "step": int(step),
            "depth": by_step[step]["depth"] if check == "randomise" else -1,
            "step_label": by_step[step]["label"] if check == "randomise" else "another class",
            "layer": layer, "method": method, "label": (labels or {}).get(method, method), "variant": variant,
            "images": len(group)}
        for metric in METRICS:
            n, mean, std, ci = mean_and_ci(group[metric].to_numpy(np.float64))
            row.update({f"{metric}_n": n, f"{metric}_mean": mean, f"{metric}_std": std, f"{metric}_ci95": ci})
        row["undefined"] = int(len(group) - row["spearman_n"])
        rows.append(row)
    return pd.DataFrame(rows)


def sanity_curves(table: pd.DataFrame, variant: str = "abs", metric: str = "spearman") -> pd.DataFrame:
    """The randomisation curves for a chart: layer, method, label, step (0 = the original model, where a map
    equals itself: 1), step_label, depth, mean, low and high (the 95% interval)."""
    data = table[(table["check"] == "randomise") & (table["variant"] == variant)]
    curves = pd.DataFrame({"layer": data["layer"], "method": data["method"], "label": data["label"],
                           "step": data["step"], "step_label": data["step_label"], "depth": data["depth"],
                           "mean": data[f"{metric}_mean"],
                           "low": data[f"{metric}_mean"] - data[f"{metric}_ci95"].fillna(0),
                           "high": data[f"{metric}_mean"] + data[f"{metric}_ci95"].fillna(0)})
    origin = curves.drop_duplicates(["layer", "method"]).assign(step=0, step_label="original", depth=-1,
                                                                 mean=1.0, low=1.0, high=1.0)
    return pd.concat([origin, curves], ignore_index=True).sort_values(["layer", "method", "step"], kind="stable",
                                                                       key=_first_appearance).reset_index(drop=True)


def _first_appearance(column: pd.Series) -> pd.Series:
    if column.name == "step":
        return column
    return column.map({value: i for i, value in enumerate(dict.fromkeys(column))})


def _range(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}" if round(low, 2) == round(high, 2) else f"{low:.2f} to {high:.2f}"


def sanity_sentence(table: pd.DataFrame, meta: dict[str, Any], layer: str = "input") -> str:
    """One plain sentence of what the checks say about FG-CAM's map at `layer` (|map|, Spearman), next to the
    plain CAM."""
    abs_rows = table[(table["variant"] == "abs") & (table["layer"] == layer)]
    randomise = abs_rows[abs_rows["check"] == "randomise"]
    other = abs_rows[abs_rows["check"] == "class"]

    def values(frame: pd.DataFrame, method: str) -> list[float]:
        return [v for v in frame.loc[frame["method"] == method, "spearman_mean"] if np.isfinite(v)]

    fgcam, cam = values(randomise, "fgcam"), values(randomise, "cam")
    cam_name = f"the plain {BASE_LABELS.get(meta.get('base'), meta.get('base') or 'CAM')}"
    where = "the pixels" if layer == "input" else f"{layer}"
    parts = []
    if fgcam:
        worst = max(fgcam)
        verdict = ("so much of its detail shows the image rather than what the model learnt" if worst >= 0.5 else
                   "so part of it shows the image rather than the model" if worst >= 0.3 else
                   "so it depends on what the model learnt")
        parts.append(f"with the model's top layers replaced by random ones, FG-CAM's map at {where} still has a "
                     f"rank correlation of {_range(fgcam)} with the original"
                     + (f" ({cam_name}: {_range(cam)}; 1 would mean it ignores the model)" if cam else
                        " (1 would mean it ignores the model)") + f", {verdict}")
    fg_other, cam_other = values(other, "fgcam"), values(other, "cam")
    if fg_other:
        parts.append(f"explaining another class gives {_range(fg_other)}"
                     + (f" ({cam_name}: {_range(cam_other)})" if cam_other else ""))
    if not parts:
        return ""
    sentence = "; ".join(parts)
    return sentence[0].upper() + sentence[1:] + "."


def format_sanity_table(table: pd.DataFrame, meta: dict[str, Any], variant: str = "abs",
                        metric: str = "spearman") -> str:
    """A printed table: rows (layer, method), columns the cascade's steps and the class check; cells mean ±
    95% half-width of `metric` on `variant` maps."""
    data = table[table["variant"] == variant]
    blocks = sum(1 for b in meta.get("blocks", []) if b["name"] != "head")
    steps = {s["step"]: s for s in meta.get("steps", [])}
    columns = sorted(dict.fromkeys(zip(data["check"], data["step"])), key=lambda c: (c[0] != "randomise", c[1]))
    columns = [(check, step, short_step_label(steps[step], blocks) if check == "randomise" else "other class")
               for check, step in columns]
    sizes = meta.get("layer_sizes", {})
    name = {"spearman": "Spearman rank correlation", "ssim": "SSIM"}[metric]
    title = (f"{name} with the original map, {meta.get('variants', {}).get(variant, variant)}; mean ± 95% "
             f"half-width over {meta.get('n_images')} images (1: the map did not change). Columns: blocks "
             f"re-initialised below the head (of {blocks}), and the class check")
    width = 13
    header = f"{'layer':22}{'method':38}" + "".join(f"{label:>{width}}" for *_, label in columns)
    lines = [title, header, "-" * len(header)]
    previous = None
    for (layer, method), group in data.groupby(["layer", "method"], sort=False):
        if previous is not None and layer != previous:
            lines.append("")
        previous = layer
        shown = f"{layer} ({sizes[layer][0]}x{sizes[layer][1]})" if layer in sizes else layer
        cells = {(r.check, r.step): (getattr(r, f"{metric}_mean"), getattr(r, f"{metric}_ci95"))
                 for r in group.itertuples(index=False)}
        text = []
        for check, step, _ in columns:
            mean, ci = cells.get((check, step), (float("nan"), float("nan")))
            cell = "n/a" if not np.isfinite(mean) else f"{mean:.2f}" + (f"±{ci:.2f}" if np.isfinite(ci) else "")
            text.append(f"{cell:>{width}}")
        label = group["label"].iloc[0]
        lines.append(f"{shown[:21]:22}{label[:37]:38}" + "".join(text))
    undefined = data.assign(share=data["undefined"] / data["images"]).groupby(["layer", "method", "label"], sort=False)[
        "share"].max()
    for (layer, _, label), share in undefined[undefined > 0].items():
        lines.append(f"note: {label} at {layer}: up to {share:.0%} of the pairs have a constant map "
                     f"({'no positive relevance, ' if variant == 'positive_pooled' else ''}undefined; left out)")
    return "\n".join(lines)


def format_blocks(meta: dict[str, Any]) -> str:
    """What each step re-initialised, one line per step."""
    lines = ["randomisation cascade (cumulative, from the top; " + ", ".join(
        sorted(set(meta.get("reinitialised_with", {}).values()))) + "):"]
    blocks = meta.get("blocks", [])
    for step in meta.get("steps", []):
        names = step["blocks"]
        shown = ", ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])}, ..., {names[-1]}"
        lines.append(f"  {step['label']:>24}: {shown}")
    if blocks:
        lines.append(f"  ({len(blocks)} blocks in all; the deepest is {blocks[-1]['name']})")
    return "\n".join(lines)
