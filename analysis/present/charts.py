"""Altair charts shared by the dashboard and the HTML report, built from small pre-aggregated frames (so a
100,000-image cache never ships 100,000 rows to the browser), and their offline export (SVG / PNG through
vl-convert, which bundles Vega: nothing is fetched from the network). No streamlit here.
"""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

CLUSTER_BOX = "box"        # interval (drag) selection on the cluster scatter
CLUSTER_PICK = "pick"      # point (click / shift-click) selection on the cluster scatter
LABEL_LIMIT = 120           # px of a class name on an axis (ImageNet's are long), the rest ellipsed
CONFUSION_CELL = "cell"    # point selection of a confusion-matrix cell

ACCENT = "#b2182b"


def histogram_frame(values: np.ndarray, bins: int = 30, value_range: tuple[float, float] | None = None
                    ) -> pd.DataFrame:
    """Counts of finite values in equal bins: columns start, end, count."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if value_range is None:
        value_range = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if value_range[0] == value_range[1]:
        value_range = (value_range[0] - 0.5, value_range[1] + 0.5)
    counts, edges = np.histogram(values, bins=bins, range=value_range)
    return pd.DataFrame({"start": edges[:-1], "end": edges[1:], "count": counts.astype(np.int64)})


def histogram_chart(frame: pd.DataFrame, title: str, threshold: float | None = None,
                    width: int = 260, height: int = 140) -> alt.Chart | alt.LayerChart:
    bars = alt.Chart(frame, title=title, width=width, height=height).mark_bar(color="#4393c3").encode(
        x=alt.X("start:Q", bin="binned", title=None),
        x2="end:Q",
        y=alt.Y("count:Q", title="images"),
        tooltip=[alt.Tooltip("start:Q", format=".3f"), alt.Tooltip("end:Q", format=".3f"), "count:Q"],
    )
    if threshold is None:
        return bars
    rule = alt.Chart(pd.DataFrame({"threshold": [threshold]})).mark_rule(color=ACCENT, strokeWidth=2).encode(
        x="threshold:Q")
    return bars + rule


def accuracy_chart(per_class: pd.DataFrame, height_per_class: int = 16, max_height: int = 900
                   ) -> alt.Chart:
    """Horizontal bars of per-class accuracy (frame from analysis.explore.statistics.per_class_accuracy), worst first."""
    height = int(min(max_height, max(120, height_per_class * len(per_class))))
    return alt.Chart(per_class, width=360, height=height, title="Accuracy per class").mark_bar().encode(
        x=alt.X("accuracy:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"), title="accuracy"),
        y=alt.Y("class_name:N", sort=alt.EncodingSortField("accuracy", order="ascending"), title=None,
                axis=alt.Axis(labelOverlap=False)),
        color=alt.Color("accuracy:Q", scale=alt.Scale(scheme="redyellowgreen", domain=[0, 1]), legend=None),
        tooltip=["class_name:N", "images:Q", "correct:Q", alt.Tooltip("accuracy:Q", format=".1%")],
    )


def class_score_frame(table: pd.DataFrame, score: str, group: str = "label_name") -> pd.DataFrame:
    """Per-class quartiles of a score for a box plot drawn from 5 numbers per class (not from every row)."""
    finite = table[[group, score]].dropna()
    if finite.empty:
        return pd.DataFrame(columns=[group, "q0", "q1", "median", "q3", "q4", "n"])
    grouped = finite.groupby(group, sort=True)[score]
    return pd.DataFrame({
        "q0": grouped.min(), "q1": grouped.quantile(0.25), "median": grouped.median(),
        "q3": grouped.quantile(0.75), "q4": grouped.max(), "n": grouped.size(),
    }).reset_index()


def class_score_chart(frame: pd.DataFrame, score: str, group: str = "label_name",
                      threshold: float | None = None) -> alt.LayerChart:
    height = int(min(900, max(120, 18 * len(frame))))
    base = alt.Chart(frame, width=360, height=height, title=f"{score} per class").encode(
        y=alt.Y(f"{group}:N", title=None, axis=alt.Axis(labelOverlap=False)))
    whisker = base.mark_rule(color="#555").encode(x=alt.X("q0:Q", title=score), x2="q4:Q")
    box = base.mark_bar(color="#92c5de", size=12).encode(x="q1:Q", x2="q3:Q", tooltip=[
        f"{group}:N", "n:Q", alt.Tooltip("q1:Q", format=".3f"), alt.Tooltip("median:Q", format=".3f"),
        alt.Tooltip("q3:Q", format=".3f")])
    median = base.mark_tick(color="black", thickness=2, size=12).encode(x="median:Q")
    layers = [whisker, box, median]
    if threshold is not None:
        layers.append(alt.Chart(pd.DataFrame({"t": [threshold]})).mark_rule(color=ACCENT, strokeDash=[4, 3])
                      .encode(x="t:Q"))
    return alt.layer(*layers)


def confusion_chart(frame: pd.DataFrame, value: str = "count", selectable: bool = True,
                    selected: tuple[int, int] | None = None, cell_size: int = 28) -> alt.LayerChart:
    """Heatmap of a confusion frame (analysis.explore.statistics.confusion_frame): rows true, columns predicted.

    With `selectable`, a click selects a cell (selection name CONFUSION_CELL, fields true/pred). Numbers are
    printed in the cells when there are few classes; the `selected` cell gets an outline.
    """
    n = int(frame["true"].nunique()) if len(frame) else 0
    side = int(min(720, max(200, cell_size * n)))
    order = frame.drop_duplicates("true").sort_values("true")["true_name"].tolist()
    base = alt.Chart(frame, width=side, height=side, title="Confusion matrix (rows: true, columns: predicted)")
    encoding = dict(
        x=alt.X("pred_name:N", sort=order, title="predicted",
                axis=alt.Axis(labelAngle=-45, labelOverlap=False, labelLimit=LABEL_LIMIT)),
        y=alt.Y("true_name:N", sort=order, title="true", axis=alt.Axis(labelOverlap=False, labelLimit=LABEL_LIMIT)),
    )
    fmt = ".0%" if value == "row_share" else "d"
    rect = base.mark_rect(stroke="white", strokeWidth=0.5).encode(
        **encoding,
        color=alt.Color(f"{value}:Q", scale=alt.Scale(scheme="blues"), title=value.replace("_", " ")),
        tooltip=["true_name:N", "pred_name:N", "count:Q", alt.Tooltip("row_share:Q", format=".1%")],
    )
    if selectable:
        cell = alt.selection_point(name=CONFUSION_CELL, fields=["true", "pred"], on="click")
        rect = rect.add_params(cell)
    layers = [rect]
    if n <= 25:
        maximum = float(frame[value].max()) if len(frame) else 0.0
        text = base.mark_text(fontSize=11).encode(
            **encoding,
            text=alt.Text(f"{value}:Q", format=fmt),
            color=alt.condition(alt.datum[value] > maximum / 2, alt.value("white"), alt.value("black")),
        ).transform_filter(alt.datum["count"] > 0)
        layers.append(text)
    if selected is not None:
        outline = base.mark_rect(fill=None, stroke=ACCENT, strokeWidth=3).encode(**encoding).transform_filter(
            (alt.datum.true == int(selected[0])) & (alt.datum.pred == int(selected[1])))
        layers.append(outline)
    return alt.layer(*layers)


def cluster_scatter(frame: pd.DataFrame, selectable: bool = True, highlight: int | None = None,
                    width: int = 520, height: int = 420) -> alt.Chart:
    """Embedding scatter coloured by cluster; drag a box (CLUSTER_BOX) or click/shift-click points
    (CLUSTER_PICK). frame: id, x, y, cluster, label_name, pred_name, correct."""
    data = frame.assign(cluster_name=np.where(frame["cluster"] < 0, "noise", "C" + frame["cluster"].astype(str)))
    # mark_point, not mark_circle: a circle mark ignores the shape channel that marks the mistakes.
    chart = alt.Chart(data, width=width, height=height).mark_point(size=42, opacity=0.85, filled=True).encode(
        x=alt.X("x:Q", axis=None, scale=alt.Scale(zero=False)),
        y=alt.Y("y:Q", axis=None, scale=alt.Scale(zero=False)),
        color=alt.Color("cluster_name:N", title="cluster", scale=alt.Scale(scheme="tableau20"),
                        sort=alt.EncodingSortField("cluster", order="ascending")),
        shape=alt.Shape("correct:N", title="correct", scale=alt.Scale(domain=[True, False],
                                                                     range=["circle", "cross"])),
        tooltip=["id:Q", "cluster_name:N", "label_name:N", "pred_name:N", "correct:N"],
    )
    if highlight is not None:
        chart = chart.encode(opacity=alt.condition(alt.datum.cluster == int(highlight), alt.value(0.95),
                                                   alt.value(0.15)))
    if selectable:
        chart = chart.add_params(
            alt.selection_interval(name=CLUSTER_BOX, encodings=["x", "y"]),
            alt.selection_point(name=CLUSTER_PICK, fields=["id"], on="click"),
        )
    return chart


def density_scatter(density: pd.DataFrame, points: pd.DataFrame, highlight: int | None = None,
                    selectable: bool = True, width: int = 560, height: int = 440) -> alt.LayerChart:
    """Every point as a grey density (log scale) under the drawn subsample coloured by cluster; drag a box
    (CLUSTER_BOX, x/y in the layout's coordinates) to select. points: id, x, y, cluster, label_name, pred_name,
    correct."""
    x_scale = alt.Scale(zero=False, nice=False, domain=[float(density["x0"].min()), float(density["x1"].max())]) \
        if len(density) else alt.Scale(zero=False)
    y_scale = alt.Scale(zero=False, nice=False, domain=[float(density["y0"].min()), float(density["y1"].max())]) \
        if len(density) else alt.Scale(zero=False)
    cells = alt.Chart(density).mark_rect(opacity=0.45).encode(
        x=alt.X("x0:Q", axis=None, scale=x_scale), x2="x1:Q",
        y=alt.Y("y0:Q", axis=None, scale=y_scale), y2="y1:Q",
        color=alt.Color("count:Q", scale=alt.Scale(type="log", scheme="greys"), legend=None),
        tooltip=[alt.Tooltip("count:Q", title="images in this cell")])
    data = points.assign(cluster_name=np.where(points["cluster"] < 0, "noise",
                                               "C" + points["cluster"].astype(str)))
    scheme = "tableau10" if data["cluster"].nunique() <= 10 else "tableau20"
    marks = alt.Chart(data).mark_point(size=36 if len(data) < 2000 else 12, opacity=0.85, filled=True).encode(
        x=alt.X("x:Q", axis=None, scale=x_scale), y=alt.Y("y:Q", axis=None, scale=y_scale),
        color=alt.Color("cluster_name:N", title="cluster", scale=alt.Scale(scheme=scheme),
                        sort=alt.EncodingSortField("cluster", order="ascending")),
        shape=alt.Shape("correct:N", title="correct", scale=alt.Scale(domain=[True, False],
                                                                     range=["circle", "cross"])),
        tooltip=["id:Q", "cluster_name:N", "label_name:N", "pred_name:N", "correct:N"])
    if highlight is not None:
        marks = marks.encode(opacity=alt.condition(alt.datum.cluster == int(highlight), alt.value(0.95),
                                                   alt.value(0.3)))
    if selectable:
        marks = marks.add_params(alt.selection_interval(name=CLUSTER_BOX, encodings=["x", "y"]))
    # Independent colour scales: the density's counts and the marks' clusters (a shared one mixes them up).
    return alt.layer(cells, marks).resolve_scale(color="independent").properties(width=width, height=height)


def eigenvalue_chart(eigenvalues: np.ndarray, suggested_k: int) -> alt.LayerChart:
    """The smallest Laplacian eigenvalues with the suggested k marked: the largest jump comes after it."""
    frame = pd.DataFrame({"index": np.arange(1, len(eigenvalues) + 1), "eigenvalue": eigenvalues})
    base = alt.Chart(frame, width=260, height=140, title=f"Laplacian eigenvalues (eigengap: k = {suggested_k})")
    line = base.mark_line(point=True).encode(
        x=alt.X("index:O", title="i", axis=alt.Axis(labelAngle=0)), y=alt.Y("eigenvalue:Q", title="λ_i"),
        tooltip=["index:O", alt.Tooltip("eigenvalue:Q", format=".4f")])
    rule = base.mark_rule(color=ACCENT, strokeDash=[4, 3]).encode(x="index:O").transform_filter(
        alt.datum.index == int(suggested_k))
    return alt.layer(line, rule)


def chart_svg(chart: alt.TopLevelMixin) -> str:
    """Static SVG of a chart, rendered offline by vl-convert (no base URL may be fetched)."""
    import vl_convert as vlc

    with alt.data_transformers.disable_max_rows():
        spec = chart.to_dict()
    return vlc.vegalite_to_svg(spec, allowed_base_urls=[])


def chart_png(chart: alt.TopLevelMixin, scale: float = 2.0) -> bytes:
    """PNG of a chart (for the dashboard's download buttons), rendered offline by vl-convert."""
    import vl_convert as vlc

    with alt.data_transformers.disable_max_rows():
        spec = chart.to_dict()
    return vlc.vegalite_to_png(spec, scale=scale, allowed_base_urls=[])
