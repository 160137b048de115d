"""Confusion views that scale with the number of classes (issue 24, item 2): only the classes that occur, at most
what a person can read, the open cell's and a searched class always in; checked by hand on small matrices and on
the real Mistakes page (AppTest) of a synthetic 1,000-class cache. The browser timings are in
tests/test_browser_classes.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.explore import statistics as explore


def _matrix() -> np.ndarray:
    """6 outputs; class 4 never occurs; 0 <-> 1 confused most, 2 -> 3 once, 5 only ever predicted."""
    m = np.zeros((6, 6), np.int64)
    m[0, 0], m[0, 1], m[1, 1], m[1, 0] = 5, 4, 6, 3
    m[2, 2], m[2, 3], m[3, 3] = 7, 1, 2
    m[3, 5] = 2
    return m


def test_occurring_and_matrix_classes() -> None:
    m = _matrix()
    assert explore.occurring_classes(m).tolist() == [0, 1, 2, 3, 5]
    assert explore.matrix_classes(m, 10) == [0, 1, 2, 3, 5]
    # mistakes (row + column off-diagonal): 0: 4+3, 1: 3+4, 2: 1, 3: 2+1, 5: 0+2; ties: more images, then index
    assert explore.matrix_classes(m, 2) == [0, 1]
    assert explore.matrix_classes(m, 3) == [0, 1, 3]
    assert explore.matrix_classes(m, 4) == [0, 1, 3, 5]    # 5 (2 mistakes, 2 images) before 2 (1 mistake)
    assert explore.matrix_classes(m, 2, keep=(2, 4)) == [0, 1, 2]   # 4 does not occur: not drawn


def test_confusion_frame_of_some_classes_keeps_indices_and_whole_row_shares() -> None:
    m = _matrix()
    frame = explore.confusion_frame(m, list("abcdef"), [0, 3, 5])
    assert len(frame) == 9 and frame["true"].tolist() == [0, 0, 0, 3, 3, 3, 5, 5, 5]
    cell = frame[(frame["true"] == 3) & (frame["pred"] == 5)].iloc[0]
    assert cell["count"] == 2 and cell["row_share"] == pytest.approx(2 / 4)   # row 3 holds 4 images in all
    assert cell["true_name"] == "d" and cell["pred_name"] == "f"
    assert (explore.confusion_frame(m, list("abcdef"))["count"].sum()) == m.sum()


def test_top_confusions_all_and_of_one_class() -> None:
    m = _matrix()
    top = explore.top_confusions(m, list("abcdef"), k=10)
    assert list(zip(top["true"], top["pred"], top["count"])) == [(0, 1, 4), (1, 0, 3), (3, 5, 2), (2, 3, 1)]
    assert top["row_share"].tolist() == pytest.approx([4 / 9, 3 / 9, 2 / 4, 1 / 8])
    assert top["true_name"].tolist() == ["a", "b", "d", "c"]
    of_three = explore.top_confusions(m, list("abcdef"), k=10, involving=3)
    assert list(zip(of_three["true"], of_three["pred"])) == [(3, 5), (2, 3)]
    assert explore.top_confusions(np.eye(3, dtype=np.int64), list("abc")).empty


def _chart_cells(at) -> pd.DataFrame:
    """The (true, pred) cells of the page's confusion matrix: the data Streamlit sends the browser with the
    chart (Arrow IPC bytes)."""
    import pyarrow as pa

    for chart in at.get("vega_lite_chart"):
        for dataset in chart.proto.datasets:
            frame = pa.ipc.open_stream(dataset.data.data).read_all().to_pandas()
            if {"true", "pred", "count"} <= set(frame.columns):
                return frame
    raise AssertionError("no confusion matrix on the page")


def test_the_mistakes_page_draws_only_a_readable_part_of_a_1000_class_matrix(tmp_path: Path, monkeypatch) -> None:
    """A real cache (the cache writer, synthetic rows) of a 1,000-output model in which 240 classes occur: the
    page's matrix holds the default 20 classes (400 cells, not a million), then as many as asked for; the open
    cell's classes and a class searched by name are always among them; the search lists its confusions only."""
    from analysis.cache import CacheWriter
    from tests.helpers import open_page, synthetic_manifest, synthetic_records

    writer = CacheWriter(tmp_path / "cache")
    writer.initialise()
    manifest = synthetic_manifest(tmp_path / "images", 240)
    manifest["class_names"] = [f"class {i:03d}" for i in range(1000)]
    manifest["model"]["num_classes"] = 1000
    writer.write_manifest(manifest)
    writer.write_shard(0, synthetic_records(np.arange(240), num_classes=1000))   # label = id, every 3rd wrong
    writer.compact()

    at = open_page(monkeypatch, tmp_path / "cache", "mistakes")
    assert not at.exception
    cells = _chart_cells(at)
    assert cells["true"].nunique() == 20 and len(cells) == 400
    assert "Classes in the matrix (240 of 1,000 occur)" in [n.label for n in at.number_input]
    at.number_input(key="mk_classes").set_value(30).run()
    assert _chart_cells(at)["true"].nunique() == 30 and at.query_params["classes"] == "30"

    at.query_params["true"], at.query_params["pred"] = "201", "202"       # id 201 (201 % 3 == 0) is wrong
    at.run()
    assert {201, 202} <= set(_chart_cells(at)["true"])
    at.selectbox(key="mk_find").set_value(150).run()
    assert not at.exception and 150 in set(_chart_cells(at)["true"])
    assert at.query_params["find"] == "150"
    confusions = [b.label for b in at.button if b.key and b.key.startswith("mk_top_")]
    assert confusions == ["class 150 → class 151: 1 (100% of class 150)"]
    assert "**Top confusions** of **class 150**" in [m.value for m in at.markdown]
