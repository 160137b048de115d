"""What the Clusters page draws from a stored offline clustering (analysis.explore.cluster_offline.StoredClustering),
without Streamlit: the density of every point (drawn under a subsample of marks by
analysis.present.charts.density_scatter), the box selection's URL encoding, and the names of scopes, clusterings
and the suspicion's parts.

A million points cannot go to the browser as marks: the page draws the stored 256 x 256 histogram of every
point (coarsened to `DENSITY_CELLS` cells a side) under `StoredClustering.display_points` (a seeded random
subsample that keeps every small cluster whole). A box drawn on the chart is resolved on the server with
`StoredClustering.ids_in_box`, so it selects every image inside it, drawn or not.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.present.charts import CLUSTER_BOX
from analysis.explore.clustering import ALGORITHM_LABELS, DESCRIPTOR_LABELS

DENSITY_CELLS = 64          # cells a side of the drawn density (the stored histogram is summed down to this)

# The suspicion's parts as the summary stores them (analysis.explore.clustering.SUSPICION_COMPONENTS), with page labels.
SUSPICION_PARTS = {
    "off_object": "off the object",
    "border_share": "border",
    "error_rate": "errors",
    "unlike_class": "unlike its class",
}


def scope_label(scope: str) -> str:
    """'all' -> 'all images', 'true:bag' -> 'true class: bag', 'pred:bag' -> 'predicted: bag'."""
    if scope == "all":
        return "all images"
    if scope == "mistakes":
        return "mistakes only"
    kind, _, name = scope.partition(":")
    return {"true": f"true class: {name}", "pred": f"predicted: {name}"}.get(kind, scope)


def choice_key(run: str, name: str) -> str:
    """One clustering of a scope, as the page's URL holds it: '<run>/<name>'."""
    return f"{run}/{name}"


def choice_labels(choices: pd.DataFrame) -> dict[str, str]:
    """choice_key -> a menu label ('k-means, k = 7 (eigengap) · where: positive relevance, cosine, 15 neighbours,
    t-SNE'); the run's settings are named only when the scope holds more than one run."""
    several_runs = choices["run"].nunique() > 1
    labels = {}
    for row in choices.itertuples():
        label = f"{ALGORITHM_LABELS.get(row.algorithm, row.algorithm)}, k = {row.k}"
        if row.k_from == "eigengap":
            label += " (eigengap)"
        if several_runs:
            label += (f" · {DESCRIPTOR_LABELS.get(row.descriptor, row.descriptor)}, {row.metric}, "
                      f"{row.n_neighbors} neighbours, {row.embedding}, "
                      f"seed {row.seed}")
        labels[choice_key(row.run, row.name)] = label
    return labels


def suspicion_parts(summary: pd.DataFrame) -> pd.DataFrame:
    """The parts the suspicion averages, per summary row (analysis.explore.clustering.SuspicionInputs.statistics):
    off_object (background_hotspot, or background_share in results stored before it was used), border_share,
    error_rate (1 - accuracy), unlike_class. NaN where a part is unknown (no foreground)."""
    off = summary["background_hotspot"] if "background_hotspot" in summary else summary["background_share"]
    return pd.DataFrame({"off_object": off.to_numpy(np.float64),
                         "border_share": summary["border_share"].to_numpy(np.float64),
                         "error_rate": 1.0 - summary["accuracy"].to_numpy(np.float64),
                         "unlike_class": summary["unlike_class"].to_numpy(np.float64)}, index=summary.index)


# ------------------------------------------------------------------------------------------------ selection
def encode_box(x0: float, x1: float, y0: float, y1: float) -> str:
    (x0, x1), (y0, y1) = sorted((x0, x1)), sorted((y0, y1))
    return f"box:{x0:.6g},{x1:.6g},{y0:.6g},{y1:.6g}"


def decode_box(value: str | None) -> tuple[float, float, float, float] | None:
    """(x0, x1, y0, y1) from 'box:x0,x1,y0,y1' (as a copied link carries it); None for anything else."""
    if not value or not isinstance(value, str):
        return None
    kind, _, numbers = value.partition(":")
    if kind != "box":
        return None
    try:
        parts = [float(v) for v in numbers.split(",")]
    except ValueError:
        return None
    if len(parts) != 4 or not all(math.isfinite(p) for p in parts):
        return None
    (x0, x1), (y0, y1) = sorted(parts[:2]), sorted(parts[2:])
    return x0, x1, y0, y1


def box_from_event(event) -> tuple[float, float, float, float] | None:
    """The box dragged on the chart (st.altair_chart's selection event), or None."""
    selection = (event or {}).get("selection", {}) if isinstance(event, dict) else getattr(event, "selection", {})
    box = (selection or {}).get(CLUSTER_BOX) or {}
    xs, ys = box.get("x"), box.get("y")
    if not xs or not ys or len(xs) != 2 or len(ys) != 2:
        return None
    try:
        values = [float(v) for v in (*xs, *ys)]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in values):
        return None
    (x0, x1), (y0, y1) = sorted(values[:2]), sorted(values[2:])
    return x0, x1, y0, y1


# ------------------------------------------------------------------------------------------------ the chart
def coarse_density(counts: np.ndarray, x_edges: np.ndarray, y_edges: np.ndarray,
                   cells: int = DENSITY_CELLS) -> pd.DataFrame:
    """The non-empty cells of the histogram summed down to at most `cells` a side: x0, x1, y0, y1, count."""
    counts = np.asarray(counts)
    bins = counts.shape[0]
    factor = max(1, int(math.ceil(bins / cells)))
    keep = (bins // factor) * factor
    if keep != bins:   # a histogram whose side is not a multiple: pad with empty bins (edges extended evenly)
        pad = factor - bins % factor
        counts = np.pad(counts, ((0, pad), (0, pad)))
        step_x, step_y = x_edges[1] - x_edges[0], y_edges[1] - y_edges[0]
        x_edges = np.concatenate([x_edges, x_edges[-1] + step_x * np.arange(1, pad + 1)])
        y_edges = np.concatenate([y_edges, y_edges[-1] + step_y * np.arange(1, pad + 1)])
        bins = counts.shape[0]
    side = bins // factor
    summed = counts.reshape(side, factor, side, factor).sum(axis=(1, 3))
    xi, yi = np.nonzero(summed)
    xe, ye = x_edges[::factor], y_edges[::factor]
    return pd.DataFrame({"x0": xe[xi], "x1": xe[xi + 1], "y0": ye[yi], "y1": ye[yi + 1],
                         "count": summed[xi, yi].astype(np.int64)})
