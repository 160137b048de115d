"""What the Clusters page draws from a stored clustering (analysis/explore/cluster_display.py): the coarsened density
against a histogram computed here, the box's URL encoding against bad links, the chart's selection event."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.explore import cluster_display as display
from analysis.present.charts import CLUSTER_BOX


def test_coarse_density_keeps_every_point_in_the_right_cell():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 1, (5000, 2)), rng.normal(6, 0.2, (300, 2))])
    counts, x_edges, y_edges = np.histogram2d(points[:, 0], points[:, 1], bins=256)
    cells = display.coarse_density(counts, x_edges, y_edges, cells=64)
    assert cells["count"].sum() == len(points) and (cells["count"] > 0).all()
    # Each cell is a 4 x 4 block of the 256 bins: recount the points inside its bounds directly.
    for row in cells.sample(20, random_state=0).itertuples():
        inside = ((points[:, 0] >= row.x0) & (points[:, 0] < row.x1) & (points[:, 1] >= row.y0)
                  & (points[:, 1] < row.y1))
        assert inside.sum() == row.count
    assert np.allclose(cells["x1"] - cells["x0"], (x_edges[-1] - x_edges[0]) / 64)


def test_coarse_density_of_a_side_that_is_not_a_multiple():
    counts = np.arange(100 * 100).reshape(100, 100) % 3
    edges = np.linspace(0.0, 1.0, 101)
    cells = display.coarse_density(counts, edges, edges, cells=64)   # factor 2, padded to 102
    assert cells["count"].sum() == counts.sum()
    assert cells["x1"].max() == pytest.approx(1.0) and cells["x0"].min() == 0.0


@pytest.mark.parametrize("value", [None, "", "box:", "box:1,2,3", "box:1,2,3,4,5", "box:nan,1,2,3", "box:1,inf,2,3",
                                   "box:a,b,c,d", "ids:1,2,3,4", "1,2,3,4", "box:1e999,0,0,1"])
def test_a_bad_box_in_a_link_is_no_box(value):
    assert display.decode_box(value) is None


def test_a_box_round_trips_through_the_url_with_corners_in_any_order():
    assert display.decode_box(display.encode_box(3.5, -1.25, 2, 0.5)) == (-1.25, 3.5, 0.5, 2.0)
    assert display.decode_box("box:3,1,4,2") == (1.0, 3.0, 2.0, 4.0)


def test_box_from_the_chart_event():
    event = {"selection": {CLUSTER_BOX: {"x": [4.0, -2.0], "y": [1.0, 3.0]}}}
    assert display.box_from_event(event) == (-2.0, 4.0, 1.0, 3.0)
    for empty in (None, {}, {"selection": {}}, {"selection": {CLUSTER_BOX: {}}},
                  {"selection": {CLUSTER_BOX: {"x": [1.0], "y": [1.0, 2.0]}}},
                  {"selection": {CLUSTER_BOX: {"x": [float("nan"), 1.0], "y": [1.0, 2.0]}}}):
        assert display.box_from_event(empty) is None


def test_choice_labels_name_the_run_only_when_there_are_several():
    one = pd.DataFrame({"run": ["r1", "r1"], "descriptor": "positive", "metric": "cosine", "n_neighbors": 15,
                        "embedding": "tsne", "seed": 0, "algorithm": ["kmeans", "spectral"], "k": [7, 7],
                        "k_from": ["eigengap", "eigengap"], "name": ["kmeans_k7", "spectral_k7"]})
    assert display.choice_labels(one) == {"r1/kmeans_k7": "k-means, k = 7 (eigengap)",
                                          "r1/spectral_k7": "spectral, k = 7 (eigengap)"}
    two = pd.concat([one, one.assign(run="r2", metric="euclidean", k=[4, 4], k_from="given",
                                     name=["kmeans_k4", "spectral_k4"])])
    labels = display.choice_labels(two)
    assert labels["r2/kmeans_k4"] == "k-means, k = 4 · where: positive relevance, euclidean, 15 neighbours, tsne, seed 0"


def test_scope_labels():
    assert [display.scope_label(s) for s in ("all", "mistakes", "true:bag", "pred:a:b")] == \
        ["all images", "mistakes only", "true class: bag", "predicted: a:b"]
