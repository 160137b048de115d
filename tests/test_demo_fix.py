"""`python -m data.demo --fix` (issue 22, item 5): the demo trains its model again with the tag on every class,
explains the same test images into a second cache and compares the two. On the small demo, for real: the
tagged non-bags are back to their own class and the tag's shortcut cluster is gone.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from data import demo, demo_dashboard, demo_fix, fashion_mnist, shortcut
from tests.helpers import run_demo, seed_offset


@pytest.mark.skipif(not fashion_mnist.has_files(fashion_mnist.DEBIAN_DIR), reason="Fashion-MNIST not installed")
def test_the_fixed_training_tags_every_class_alike() -> None:
    """The fix's training marks: FIX_FRACTION of every class (among the images whose corner is free), so the
    tag says nothing about the class; seeded."""
    train = fashion_mnist.read_split(fashion_mnist.DEBIAN_DIR, "train")
    marked = demo_fix.fixed_marks(train.images)
    assert np.array_equal(marked, demo_fix.fixed_marks(train.images))
    free = shortcut.corner_is_free(train.images)
    assert not marked[~free].any()
    for label in range(10):
        share = marked[free & (train.labels == label)].mean()
        assert abs(share - demo_fix.FIX_FRACTION) < 0.02, (label, share)   # 6,000 images a class: +-0.6% sd


@pytest.fixture(scope="module")
def fixed_demo(small_demo: demo.DemoPaths) -> tuple[demo.DemoPaths, dict, str]:
    """`python -m data.demo --small --fix` (in this process) on the small demo (its own steps are skipped):
    (paths, the fix_report.json it wrote, what it printed)."""
    code, printed, err = run_demo("--small", "--fix", "--no-dashboard", "--offline", "--threads", "1",
                                  "--seed", str(seed_offset()), "--out", str(small_demo.out))
    assert code == 0, printed[-3000:] + err[-3000:]
    return small_demo, json.loads(demo_fix.FixedPaths(small_demo.out).fix_report.read_text()), printed


def test_after_the_fix_the_tagged_non_bags_are_back_and_the_tag_cluster_is_gone(fixed_demo) -> None:
    paths, report, printed = fixed_demo
    tagged = report["tagged_others"]
    # Measured (threads 1): 26 of 29 (0.90) with FGCAM_TEST_SEED=0, 29 of 31 (0.94) with FGCAM_TEST_SEED=1;
    # the bar is 0.8: a margin of 0.10 at least.
    assert tagged["wrong_in_a"] >= 20 and tagged["back_to_own_class"] >= 0.8
    assert tagged["called_bag_b"] <= 0.1 * tagged["tagged_others"]       # measured 0 with both seeds
    shortcuts = report["tag_shortcuts"]
    assert shortcuts["a"] and shortcuts["gone"] and shortcuts["b"] == []
    assert "the tag's shortcut findings:" in printed and "(gone)" in printed
    assert demo_fix.FixedPaths(paths.out).report.is_file()


def test_the_fix_report_numbers_are_the_caches(fixed_demo) -> None:
    """The tagged non-bags counted again from the two caches' tables and shortcut.csv, independently."""
    from analysis.cache import load

    paths, report, _ = fixed_demo
    rows = demo.read_shortcut_csv(paths.shortcut_csv)
    others = {r["path"] for r in rows if r["marked"] and r["label"] != shortcut.SHORTCUT_CLASS}
    a = load(paths.cache).table.set_index("path").loc[sorted(others)]
    b = load(demo_fix.FixedPaths(paths.out).cache).table.set_index("path").loc[sorted(others)]
    wrong = ~a["correct"].to_numpy(bool)
    tagged = report["tagged_others"]
    assert tagged["tagged_others"] == len(others)
    assert tagged["own_class_a"] == int(a["correct"].sum()) and tagged["own_class_b"] == int(b["correct"].sum())
    assert tagged["called_bag_a"] == int((a["pred_name"] == "bag").sum())
    assert tagged["called_bag_b"] == int((b["pred_name"] == "bag").sum())
    assert tagged["back_to_own_class"] == pytest.approx(b["correct"].to_numpy(bool)[wrong].mean())
    accuracy_b = load(demo_fix.FixedPaths(paths.out).cache).table["correct"].mean()
    assert report["accuracy_b"] == pytest.approx(accuracy_b)


def test_the_fix_opens_the_dashboard_on_both_caches(tmp_path) -> None:
    paths = demo.DemoPaths(tmp_path)
    command = demo_dashboard.dashboard_command(paths, 8501, compare=demo_fix.FixedPaths(tmp_path).cache)
    assert command[command.index("--") + 1:] == ["--cache", str(paths.cache), "--compare",
                                                 str(tmp_path / "cache_fixed")]
    assert "--compare" not in demo_dashboard.dashboard_command(paths, 8501)
