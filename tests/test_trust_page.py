"""analysis.trust.page and the Trust page's drawing (analysis.present.trust_charts, analysis.present.tiles): the
verdicts against hand-computed cases, the charts' data, the region tint, and the insertion-test table from real
saved runs."""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pandas as pd
import pytest

from analysis.present import tiles, trust_charts
from analysis.trust import page as trust_page
from analysis.trust.region_insertion import (INSERTION_DIR, CacheInsertionReport, InsertionTestResult, read_insertion_reports,
                                     save_insertion_report)
from analysis.trust.sanity import sanity_curves, summarise_sanity


def curves_for(values: dict[str, list[float]], layer: str = "input") -> pd.DataFrame:
    """Curves as `sanity_curves` gives them: per method, step 0 (the original model, 1) then the steps' means."""
    labels = ["head", "head + 1 block", "all (head + 2 blocks)"]
    rows = []
    for method, means in values.items():
        rows.append({"layer": layer, "method": method, "label": method, "step": 0, "step_label": "original",
                     "depth": -1, "mean": 1.0, "low": 1.0, "high": 1.0})
        for step, mean in enumerate(means, start=1):
            rows.append({"layer": layer, "method": method, "label": method, "step": step,
                         "step_label": labels[step - 1], "depth": step - 1, "mean": mean, "low": mean, "high": mean})
    return pd.DataFrame(rows)


def classes_for(values: dict[str, float], layer: str = "input") -> pd.DataFrame:
    return pd.DataFrame([{"check": "class", "layer": layer, "method": m, "label": m, "spearman_mean": v,
                          "spearman_ci95": 0.0, "spearman_n": 4, "ssim_mean": v, "ssim_ci95": 0.0, "ssim_n": 4}
                         for m, v in values.items()])


# ------------------------------------------------------------------------------------------------ the sentence
def test_a_map_that_survives_the_top_but_not_the_whole_model_and_ignores_the_class() -> None:
    sentence = trust_page.sanity_verdict(curves_for({"fgcam": [0.92, 0.55, -0.39]}), classes_for({"fgcam": 0.89}))
    assert sentence == ("FG-CAM's map changes little when the top of the model (head) is replaced by random weights "
                        "(0.92), but a lot when the whole model is (-0.39), and it changes little when another class "
                        "is explained (0.89): it reflects the model's lower layers more than the top ones that make "
                        "the decision, and hardly depends on which class is asked about.")


def test_a_map_that_never_changes_describes_the_image() -> None:
    sentence = trust_page.sanity_verdict(curves_for({"fgcam": [0.88, 0.86, 0.62]}), classes_for({"fgcam": 0.60}))
    assert sentence == ("FG-CAM's map changes little when the top of the model (head) is replaced by random weights "
                        "(0.88), and it changes little when another class is explained (0.60): it describes the "
                        "image more than the model or its decision.")


def test_a_map_that_follows_model_and_class_passes() -> None:
    """The plain CAM's numbers on EfficientNet-Lite0 (issue 16): 0.04 with the head and a block random."""
    sentence = trust_page.sanity_verdict(curves_for({"cam": [0.04, 0.11, -0.08]}), classes_for({"cam": 0.1}),
                                         method="cam", name="Grad-CAM")
    assert sentence == ("Grad-CAM's map changes a lot when the top of the model (head) is replaced by random weights "
                        "(0.04), and it changes a lot when another class is explained (0.10): it depends on what "
                        "the model learnt and on the class, as an explanation of the decision should.")


@pytest.mark.parametrize("value, level", [(1.0, "little"), (0.5, "little"), (0.4999, "partly"), (0.2, "partly"),
                                          (0.1999, "a lot"), (-0.6, "a lot")])
def test_the_thresholds(value: float, level: str) -> None:
    sentence = trust_page.sanity_verdict(curves_for({"fgcam": [value]}), None)
    assert sentence.startswith(f"FG-CAM's map changes {level} when the top of the model (head) is replaced by "
                               f"random weights ({value:.2f}): ")
    assert sentence.endswith({"little": "it describes the image more than the model.",
                              "partly": "it shows partly the image, partly what the model learnt.",
                              "a lot": "it depends on what the model learnt."}[level])


def test_only_the_class_check_or_nothing() -> None:
    empty = curves_for({"fgcam": []})
    assert trust_page.sanity_verdict(empty, classes_for({"fgcam": 0.3})) == (
        "FG-CAM's map changes partly when another class is explained (0.30): it follows the class asked about only "
        "in part.")
    assert trust_page.sanity_verdict(empty, None) == ""
    # A map that was constant on every image (NaN means) says nothing either; another layer's rows are not read.
    assert trust_page.sanity_verdict(curves_for({"fgcam": [math.nan, math.nan]}), classes_for({"fgcam": math.nan})) == ""
    assert trust_page.sanity_verdict(curves_for({"fgcam": [0.9]}, layer="features.2"), None, layer="input") == ""


def test_the_sentence_from_per_image_numbers_through_the_real_summary() -> None:
    """Per-image correlations through `summarise_sanity` and `sanity_curves` (the stored format): the sentence uses
    the means, the chart the 95% Student-t band clipped to [-1, 1]."""
    steps = [{"step": 1, "depth": 0, "label": "head"}, {"step": 2, "depth": 1, "label": "all (head + 1 block)"}]
    per_image = pd.DataFrame({
        "image": [0, 1, 0, 1, 0, 1], "check": ["randomise"] * 4 + ["class"] * 2, "step": [1, 1, 2, 2, 0, 0],
        "layer": "input", "method": "fgcam", "variant": "abs",
        "spearman": [0.8, 0.6, 0.1, 0.2, 0.3, 0.5], "ssim": [0.5, 0.5, 0.1, 0.1, 0.2, 0.2]})
    table = summarise_sanity(per_image, steps)
    curves = sanity_curves(table)
    classes = table[table["check"] == "class"]
    assert trust_page.sanity_verdict(curves, classes) == (
        "FG-CAM's map changes little when the top of the model (head) is replaced by random weights (0.70), but a "
        "lot when the whole model is (0.15), and it changes partly when another class is explained (0.40): it "
        "reflects the model's lower layers more than the top ones that make the decision, and follows the class "
        "asked about only in part.")
    # Two images: t(0.975, 1) = 12.7062; std of (0.8, 0.6) = 0.141421 -> half-width 1.27062.
    data = trust_charts.sanity_curve_chart(curves, "input").layer[0].data
    head = data[data["step"] == 1].iloc[0]
    assert head["mean"] == pytest.approx(0.7)
    assert head["low"] == pytest.approx(0.7 - 12.7062 * 0.141421 / math.sqrt(2), abs=1e-4)
    assert head["high"] == 1.0   # 1.97 clipped
    bars = trust_charts.class_check_chart(classes, "input").data   # (both layers share it)
    assert bars["mean"].tolist() == pytest.approx([0.4]) and bars["high"].tolist() == [1.0]


# ------------------------------------------------------------------------------------------------ region tests
@pytest.mark.parametrize("changed, control, start", [
    (0.30, 0.10, "The region matters much more"), (0.21, 0.0, "The region matters much more"),
    (0.12, 0.08, "Blurring the region changes about as much"), (0.08, 0.12, "Blurring the region changes about"),
    (0.15, 0.05, "The region matters somewhat more")])
def test_shortcut_verdict_thresholds(changed: float, control: float, start: str) -> None:
    assert trust_page.shortcut_verdict({"changed_prototype": changed, "changed_random": control}).startswith(start)


def test_tint_region_blends_red_inside_and_leaves_the_rest() -> None:
    tile = np.zeros((32, 32, 3), np.uint8)
    region = np.zeros((8, 8), bool)
    region[2:6, 2:6] = True            # -> pixels 8..23 of the 32-pixel tile
    out = tiles.tint_region(tile, region)
    # 0.45 * 0 + 0.55 * (178, 24, 43), rounded; the centre is inside the outline's 2-pixel band.
    assert out[16, 16].tolist() == [98, 13, 24]
    assert out[0, 0].tolist() == [0, 0, 0] and out[30, 30].tolist() == [0, 0, 0] and out[16, 4].tolist() == [0, 0, 0]
    assert out.shape == tile.shape and out.dtype == np.uint8


def saved_run(directory, description: str, summary: dict) -> None:
    frame = pd.DataFrame({"target": [0], "source": [0]})
    result = InsertionTestResult(summary=summary, per_image=frame, region=np.eye(4, dtype=bool))
    report = CacheInsertionReport(source_ids=np.array([3, 5]), target_ids=np.array([7]), into_name="bag",
                                  description=description, result=result, skipped=[])
    save_insertion_report(report, directory)


def summary(n: float, already: float, flipped: float, control: float) -> dict:
    return {"n": n, "sources": 2.0, "q": 5.0, "region_pixels": 4.0, "region_share": 0.25, "into": 8.0,
            "already_into": already, "flipped_prototype": flipped, "flipped_random": control,
            "probability_before": 0.01, "probability_prototype": 0.7, "probability_random": 0.02}


def test_insertion_table_from_saved_runs(tmp_path) -> None:
    saved_run(tmp_path / INSERTION_DIR / "a", "tagged shortcut", summary(200, 4, 0.9, 0.02))
    saved_run(tmp_path / INSERTION_DIR / "b", "predicted as shirt", summary(50, 0, 0.1, 0.08))
    later = time.time() + 10
    os.utime(tmp_path / INSERTION_DIR / "b" / "summary.json", (later, later))
    table = trust_page.insertion_table(read_insertion_reports(tmp_path))
    assert table["selection"].tolist() == ["predicted as shirt", "tagged shortcut"]   # newest first
    assert table["targets"].tolist() == [50, 196]
    assert table["flipped, region pasted"].tolist() == [0.1, 0.9]
    assert table["region"].tolist() == ["top 5%, 25.0% of the image"] * 2
    assert table["verdict"].iloc[1].startswith("Pasting the region flips far more")
    assert table["verdict"].iloc[0].startswith("Pasting the region flips about as many")
    chart = trust_charts.insertion_chart(table)
    assert sorted(chart.data["flipped"].tolist()) == sorted([0.1, 0.9, 0.08, 0.02])
    assert trust_page.insertion_table([]).empty


def test_made_before_cache() -> None:
    manifest = {"created": "2026-12-01T02:00:00+0000"}
    created = pd.Timestamp("2026-12-01T02:00:00Z").timestamp()
    assert trust_page.made_before_cache(created - 1, manifest)
    assert not trust_page.made_before_cache(created + 1, manifest)
    assert not trust_page.made_before_cache(0.0, {"created": "garbage"}) and not trust_page.made_before_cache(0.0, {})


def test_the_saved_summary_is_plain_json(tmp_path) -> None:
    """What the page reads is what the command line wrote (no pickles): the summary round-trips as JSON numbers."""
    saved_run(tmp_path / "run", "tagged shortcut", summary(10, 0, 0.5, 0.0))
    meta = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert meta["summary"]["flipped_prototype"] == 0.5 and meta["description"] == "tagged shortcut"


def test_a_wide_interval_gets_a_caveat() -> None:
    """The caveat names the first step's interval when its half-width passes 0.2."""
    wide = curves_for({"fgcam": [0.7, 0.1]}).assign(low=lambda d: np.where(d["step"] == 1, -0.57, d["low"]))
    assert trust_page.sanity_caveat(wide) == ("Uncertain: the 95% interval of 0.70 runs from -0.57 to 0.70; run "
                                              "compare-methods with a larger --sample for a firmer verdict.")
    narrow = curves_for({"fgcam": [0.7]}).assign(low=lambda d: d["mean"] - 0.15, high=lambda d: d["mean"] + 0.15)
    assert trust_page.sanity_caveat(narrow) == ""
    just_wide = curves_for({"fgcam": [0.7]}).assign(low=lambda d: d["mean"] - 0.25, high=lambda d: d["mean"] + 0.25)
    assert trust_page.sanity_caveat(just_wide).startswith("Uncertain: the 95% interval of 0.70 runs from 0.45 to 0.95")
    assert trust_page.sanity_caveat(curves_for({"fgcam": []})) == ""
    past_one = curves_for({"fgcam": [0.81]}).assign(low=lambda d: d["mean"] - 0.27, high=lambda d: d["mean"] + 0.27)
    assert trust_page.sanity_caveat(past_one).startswith("Uncertain: the 95% interval of 0.81 runs from 0.54 to 1.00;")
