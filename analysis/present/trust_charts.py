"""The Trust page's charts (altair), drawn from the frames analysis.trust.page computes: the deletion and insertion
curves of the methods compared (`curve_chart`), the sanity checks' randomisation curves and class check
(`sanity_curve_chart`, `class_check_chart`) and the saved insertion tests (`insertion_chart`). No streamlit here.
"""
from __future__ import annotations

import altair as alt
import pandas as pd

CURVE_WIDTH = 300
SANITY_WIDTH = 360
SANITY_METRICS = {"spearman": "rank correlation (Spearman)", "ssim": "SSIM"}
REFERENCE_METHODS = ("random", "edge")   # ignore the model: their maps never change (drawn dashed)


# ------------------------------------------------------------------------------------------------ faithfulness
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


# ------------------------------------------------------------------------------------------------ region tests
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
