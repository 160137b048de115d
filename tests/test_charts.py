"""analysis.present.charts: the pre-aggregated chart data, the selections the dashboard reads back, and the offline
SVG / PNG export through vl-convert."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from analysis.explore import statistics as explore
from analysis.present import charts


def _params(spec: dict) -> dict[str, dict]:
    """Selection parameters by name, wherever Vega-Lite put them (top level or inside layers)."""
    found = {}
    for param in spec.get("params", []):
        found[param["name"]] = param
    for layer in spec.get("layer", []):
        found.update(_params(layer))
    return found


def test_histogram_frame_counts_finite_values_only():
    frame = charts.histogram_frame(np.array([0.0, 0.1, 0.5, 0.9, 1.0, np.nan, np.inf]), bins=2,
                                   value_range=(0.0, 1.0))
    assert frame["count"].tolist() == [2, 3]   # [0, 0.5) and [0.5, 1]
    assert frame["start"].tolist() == [0.0, 0.5] and frame["end"].tolist() == [0.5, 1.0]
    constant = charts.histogram_frame(np.array([2.0, 2.0]), bins=4)
    assert constant["count"].sum() == 2       # a constant score still gets a (widened) range


def test_class_score_frame_quartiles():
    table = pd.DataFrame({"label_name": ["a"] * 5 + ["b"], "border_share": [0, 1, 2, 3, 4, np.nan]})
    frame = charts.class_score_frame(table, "border_share")
    row = frame.set_index("label_name").loc["a"]
    assert (row["q0"], row["q1"], row["median"], row["q3"], row["q4"], row["n"]) == (0, 1, 2, 3, 4, 5)
    assert "b" not in frame["label_name"].tolist()   # no finite value, no box


def test_confusion_chart_cell_selection_and_numbers():
    matrix = explore.confusion_matrix([0, 0, 1, 2], [0, 1, 1, 0], 3)
    frame = explore.confusion_frame(matrix, ["a", "b", "c"])
    spec = charts.confusion_chart(frame, selected=(0, 1)).to_dict()
    cell = _params(spec)[charts.CONFUSION_CELL]
    assert cell["select"]["fields"] == ["true", "pred"]
    marks = [layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in spec["layer"]]
    assert marks == ["rect", "text", "rect"]     # heatmap, counts, outline of the selected cell
    static = charts.confusion_chart(frame, selectable=False).to_dict()
    assert charts.CONFUSION_CELL not in _params(static)


def test_cluster_scatter_marks_mistakes_by_shape_and_offers_both_selections():
    frame = pd.DataFrame({"id": [1, 2, 3], "x": [0.0, 1.0, 2.0], "y": [0.0, 1.0, 0.0], "cluster": [0, 1, -1],
                          "label_name": ["a", "b", "a"], "pred_name": ["a", "a", "a"],
                          "correct": [True, False, True]})
    spec = charts.cluster_scatter(frame).to_dict()
    assert spec["mark"]["type"] == "point"   # a "circle" mark would ignore the shape channel
    assert spec["encoding"]["shape"]["field"] == "correct"
    params = _params(spec)
    assert params[charts.CLUSTER_BOX]["select"]["type"] == "interval"
    assert params[charts.CLUSTER_PICK]["select"]["fields"] == ["id"]
    values = next(iter(spec["datasets"].values()))
    assert [v["cluster_name"] for v in values] == ["C0", "C1", "noise"]


def test_offline_export_svg_and_png():
    matrix = explore.confusion_matrix([0, 1, 1], [0, 1, 0], 2)
    chart = charts.confusion_chart(explore.confusion_frame(matrix, ["cat", "dog"]), selectable=False)
    svg = charts.chart_svg(chart)
    assert svg.lstrip().startswith("<svg") and "cat" in svg and "dog" in svg
    external = set(re.findall(r"https?://[^\"' )]+", svg)) - {"http://www.w3.org/2000/svg",
                                                              "http://www.w3.org/1999/xlink"}
    assert not external   # only XML namespaces, nothing a browser would fetch
    png = charts.chart_png(charts.eigenvalue_chart(np.array([0.0, 0.0, 0.4, 0.5]), 2), scale=1)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    import io
    with Image.open(io.BytesIO(png)) as image:
        assert image.width > 200 and image.height > 100
