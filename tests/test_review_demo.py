"""Issue 14's acceptance on the small demo (real Fashion-MNIST images, the really trained demo CNN, the real
job): ten tagged images of the suspicious cluster find the other tagged non-bags; 100 images filed in another
class's folder come first in the label-error ranking; pasting the cluster's region flips predictions to bag,
a random region does not."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from analysis.cache import load
from analysis.review import Review, label_issues
from data import demo, demo_measure, shortcut
from data.demo_model import WEIGHTS_ENV


@pytest.fixture(scope="module")
def suspicious(small_demo: demo.DemoPaths) -> tuple:
    """(table with `marked`, ids of the suspicious cluster): the clusters among the three most suspicious
    whose prototype lies on the mark's corner (the reviewer sees the tag there), as the dashboard clusters
    by default."""
    cache, table = demo_measure.marked_table(small_demo)
    summary, _ = demo_measure.cluster_shortcut(cache, table)
    on_mark = summary.head(3)[summary.head(3)["corner_share"] >= 0.3]
    assert len(on_mark), summary.drop(columns=["class_mix", "members"])
    return table, np.concatenate(on_mark["members"].tolist())


def test_ten_tagged_images_find_the_other_tagged_non_bags(small_demo: demo.DemoPaths, suspicious: tuple,
                                                          tmp_path: Path) -> None:
    table, members = suspicious
    copy = tmp_path / "cache"
    shutil.copytree(small_demo.cache, copy)
    marked_ids = table.loc[table["marked"], "id"].to_numpy()
    seen_tag = members[np.isin(members, marked_ids)]       # the reviewer tags members that show the tag
    assert len(seen_tag) >= 10
    review = Review(copy)
    review.tag(np.random.default_rng(0).choice(seen_tag, 10, replace=False), "shortcut", who="test")
    ranking = review.rank_like(review.ids("shortcut"))
    assert len(ranking) == len(table) - 10
    rows = table.set_index("id").loc[ranking["id"]]
    others = (rows["label_name"] != shortcut.SHORTCUT_CLASS).to_numpy()   # the tagged non-bags are the finds
    precision = average_precision_score(rows["marked"].to_numpy(bool)[others], ranking["score"].to_numpy()[others])
    assert precision >= 0.8, precision            # chance: about 25 / 890 = 0.03
    assert ranking.attrs["probe"]["cv_roc_auc"] > 0.9


@pytest.fixture(scope="module")
def moved_cache(small_demo: demo.DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """2,000 other test images, 100 trousers filed as dresses, explained by the demo's model with the job."""
    from analysis.__main__ import main
    from data.label_noise import write_moved_split

    root = tmp_path_factory.mktemp("moved")
    moved = write_moved_split(root / "images", "trouser", "dress", count=100)
    previous = os.environ.get(WEIGHTS_ENV)
    os.environ[WEIGHTS_ENV] = str(small_demo.model)
    try:
        code = main(["explain", "--data", str(root / "images"), *demo.model_arguments(small_demo), "--out", str(root / "cache"),
                     "--map-size", "28", "--descriptor-size", "14", "--batch-size", "100", "--device", "cpu",
                     "--workers", "0", "--quiet", "--no-cluster"])   # the ranking reads no clustering
    finally:
        if previous is None:
            os.environ.pop(WEIGHTS_ENV, None)
        else:
            os.environ[WEIGHTS_ENV] = previous
    assert code == 0
    return root / "cache", moved


def test_images_filed_in_another_class_come_first_in_the_label_error_ranking(moved_cache: tuple) -> None:
    cache_dir, moved = moved_cache
    cache = load(cache_dir)
    assert len(cache) == 2000 and len(moved) == 100
    frame = label_issues(cache)
    paths = cache.table.set_index("id").loc[frame["id"], "path"]
    truth = paths.isin(moved).to_numpy()
    precision = average_precision_score(truth, -frame["label_quality"].to_numpy())
    assert precision >= 0.8, precision            # chance: 100 / 2000 = 0.05
    assert frame.attrs["probabilities"] == "stored"


def test_pasting_the_clusters_region_flips_predictions_to_bag(small_demo: demo.DemoPaths, suspicious: tuple,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from analysis.trust.region_insertion import insertion_test_on_cache

    monkeypatch.setenv(WEIGHTS_ENV, str(small_demo.model))
    _, members = suspicious
    report = insertion_test_on_cache(load(small_demo.cache), members, n_targets=200)
    s = report.result.summary
    assert report.into_name == shortcut.SHORTCUT_CLASS and s["n"] == 200 and not report.skipped
    assert s["flipped_prototype"] >= 0.5 and s["flipped_random"] <= 0.05, s
