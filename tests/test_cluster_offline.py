"""The offline clustering (analysis/explore/cluster_offline/, `python -m analysis cluster`): its method on descriptors
with a known structure, its storage and reading API on real caches, staleness, a killed run, the command line,
and the causal verification's rule. The demo-based acceptance tests are in tests/test_cluster_acceptance.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from analysis.explore import cluster_offline as offline
from analysis.explore import clustering, statistics as explore
from analysis.cache import CacheWriter, load
from tests.helpers import (REPO_ROOT, blobs, job_arguments, run_command, run_main, synthetic_manifest,
                           synthetic_records, write_synthetic_cache)


def table_rows(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n)
    return pd.DataFrame({"id": np.arange(n), "label": label, "pred": label, "correct": np.ones(n, bool),
                         "background_share": rng.random(n), "background_hotspot": np.full(n, np.nan),
                         "border_share": rng.random(n)})


def neighbour_purity(coords: np.ndarray, truth: np.ndarray, k: int = 5) -> float:
    """Share of each point's k nearest neighbours in the plane that belong to its own group."""
    from sklearn.neighbors import NearestNeighbors

    _, nearest = NearestNeighbors(n_neighbors=k + 1).fit(coords).kneighbors(coords)
    return float((truth[nearest[:, 1:]] == truth[:, None]).mean())


# ----------------------------------------------------------------------------------------------------------
# Method
# ----------------------------------------------------------------------------------------------------------

def test_exact_knn_matches_scikit_learn_and_excludes_each_point_itself():
    from sklearn.neighbors import NearestNeighbors

    x = np.random.default_rng(0).random((500, 12)).astype(np.float32)
    graph = clustering.knn_graph(x, 7)
    assert graph.method == "exact" and graph.indices.shape == (500, 7)
    distances, indices = NearestNeighbors(n_neighbors=8).fit(x.astype(np.float64)).kneighbors(x.astype(np.float64))
    np.testing.assert_allclose(graph.distances, distances[:, 1:], rtol=1e-5, atol=1e-6)
    assert (graph.indices == indices[:, 1:]).mean() > 0.99     # only exact ties may be ordered differently
    assert not (graph.indices == np.arange(500)[:, None]).any()
    adjacency = graph.adjacency()
    assert (adjacency != adjacency.T).nnz == 0 and adjacency.diagonal().sum() == 0
    assert set(np.unique(adjacency.data)) == {1.0}


def test_exact_knn_with_duplicates_never_returns_the_point_itself():
    x = np.zeros((40, 4), np.float32)                       # all identical: every distance is 0
    graph = clustering.knn_graph(x, 5)
    assert not (graph.indices == np.arange(40)[:, None]).any() and (graph.distances == 0).all()


def test_approximate_neighbour_lists_drop_the_point_itself_and_fill_gaps():
    """What pynndescent returns (k + 1 neighbours, the point itself usually first but not always, -1 where it
    found too few) becomes k neighbours; pynndescent itself runs in bench/bench_cluster.py, which prints its
    recall against the exact graph (its just-in-time compilation costs about a minute per process)."""
    found = np.array([[0, 1, 2], [2, 1, 0], [1, 2, -1]])   # point 1 behind a duplicate; point 2 not found
    distances = np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0], [0.5, 0.7, np.inf]], np.float32)
    indices, kept = clustering.without_self(found, distances)
    np.testing.assert_array_equal(indices, [[1, 2], [2, 0], [1, 1]])
    np.testing.assert_allclose(kept, [[1.0, 2.0], [0.0, 3.0], [0.5, 0.5]])


def test_cluster_qr_is_scikit_learns():
    from sklearn.cluster._spectral import cluster_qr as reference

    vectors = np.random.default_rng(3).standard_normal((300, 4))
    np.testing.assert_array_equal(clustering.cluster_qr(vectors), reference(vectors))


@pytest.mark.parametrize("centres", [2, 3, 5])
def test_spectrum_eigengap_and_both_algorithms_recover_separated_groups(centres):
    x, truth = blobs(centres, per=40, dim=20)
    graph = clustering.knn_graph(x, 10)
    values, vectors = clustering.graph_spectrum(graph.adjacency(), 13, with_vectors=True)
    assert clustering.suggest_k(values, 12, len(x)) == centres
    assert np.all(values[:centres] < 1e-8)
    degree = np.asarray(graph.adjacency().sum(axis=1)).ravel()
    for labels in (clustering.spectral_labels(vectors, degree, centres), clustering.kmeans_labels(x, centres, 0)):
        assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
        assert np.bincount(labels).tolist() == [40] * centres     # relabelled by size, 0 first


def test_more_separate_groups_than_max_k_suggest_max_k_and_need_no_solver():
    x, truth = blobs(16, per=20, dim=32, spread=0.01)
    adjacency = clustering.knn_graph(x, 8).adjacency()
    values, vectors = clustering.graph_spectrum(adjacency, 13, with_vectors=True)
    assert np.all(values == 0) and clustering.suggest_k(values, 12, len(x)) == 12
    # Each vector is its component's D^1/2 1, normalised: constant within one group, zero elsewhere.
    for column in range(13):
        support = np.unique(truth[np.abs(vectors[:, column]) > 0])
        assert len(support) == 1
        np.testing.assert_allclose(np.linalg.norm(vectors[:, column]), 1.0)
    labels = clustering.spectral_labels(vectors, np.asarray(adjacency.sum(axis=1)).ravel(), 12)
    assert len(set(labels)) == 12


def test_graph_spectrum_matches_a_dense_solver_on_a_connected_graph():
    from scipy.sparse.csgraph import laplacian

    x, _ = blobs(2, per=400, dim=16, spread=0.3)              # one connected graph above the dense size
    adjacency = clustering.knn_graph(x, 10).adjacency()
    values, vectors = clustering.graph_spectrum(adjacency, 6, with_vectors=True)
    lap = laplacian(adjacency.astype(float), normed=True).toarray()
    np.testing.assert_allclose(values, np.linalg.eigvalsh(lap)[:6], atol=1e-5)
    np.testing.assert_allclose(lap @ vectors, vectors * values, atol=1e-4)   # they are eigenvectors


def test_tsne_separates_groups_and_the_subsample_path_places_every_point():
    x, truth = blobs(3, per=400, dim=16, spread=0.04)
    graph = clustering.knn_graph(x, 15)
    full, info = clustering.tsne_layout(x, graph, seed=0, threads=1)
    assert full.shape == (1200, 2) and np.isfinite(full).all() and info.placed == 0
    assert neighbour_purity(full, truth) > 0.99
    sampled, info = clustering.tsne_layout(x, graph, seed=0, threads=1, embed_max=500, polish_iterations=50)
    assert info.embedded == 500 and info.placed == 700 and np.isfinite(sampled).all()
    assert neighbour_purity(sampled, truth) > 0.98
    # Starting from a given layout keeps its orientation: the groups stay where they were.
    start = np.repeat(np.array([[-30.0, 0.0], [0.0, 30.0], [30.0, 0.0]]), 400, axis=0) + \
        np.random.default_rng(0).normal(0, 1, (1200, 2))
    refined, info = clustering.tsne_layout(x, graph, seed=0, threads=1, init=start)
    assert info.iterations == clustering.REFINE_ITERATIONS
    centres = np.stack([refined[truth == c].mean(axis=0) for c in range(3)])
    assert centres[0, 0] < centres[1, 0] < centres[2, 0] and centres[1, 1] > max(centres[0, 1], centres[2, 1])


@pytest.mark.parametrize("per", [10, 17, 40])   # 30 points: scikit-learn; 51 and 120: refined
def test_a_small_scope_started_from_a_layout_is_refined_from_it(per):
    """From REFINE_MIN to OPENTSNE_MIN points with a start layout (a scope's points in the all-images map),
    t-SNE refines it: the groups keep their places and stay apart; without one, or with fewer points,
    scikit-learn's t-SNE from PCA."""
    x, truth = blobs(3, per=per, dim=16, spread=0.04)
    graph = clustering.knn_graph(x, min(15, len(x) - 1))
    start = np.repeat(np.array([[-30.0, 0.0], [0.0, 30.0], [30.0, 0.0]]), per, axis=0) + \
        np.random.default_rng(0).normal(0, 1, (3 * per, 2))
    refined, info = clustering.tsne_layout(x, graph, seed=0, threads=1, init=start)
    if 3 * per < clustering.REFINE_MIN:
        assert info.method == "tsne (scikit-learn)"
        return
    assert info.method == "tsne (from the all-images layout)" and info.iterations == clustering.REFINE_ITERATIONS
    centres = np.stack([refined[truth == c].mean(axis=0) for c in range(3)])
    assert centres[0, 0] < centres[1, 0] < centres[2, 0] and centres[1, 1] > max(centres[0, 1], centres[2, 1])
    assert np.isfinite(refined).all() and refined.std(axis=0).min() > 1.0 and neighbour_purity(refined, truth) > 0.95
    _, info = clustering.tsne_layout(x, graph, seed=0, threads=1)
    assert info.method == "tsne (scikit-learn)"


def test_placement_from_neighbours_by_hand():
    coords = np.array([[0.0, 0.0], [2.0, 0.0], [9.0, 9.0], [9.0, 9.0]])
    placed = np.array([True, True, False, False])
    # Point 2's neighbours (0 and 1) are placed; point 3's only neighbour is 2, so it is placed through it.
    out = clustering.place_from_neighbours(coords, placed, np.array([[1, 1], [0, 0], [0, 1], [2, 2]]))
    np.testing.assert_allclose(out[2], [1.0, 0.0])
    np.testing.assert_allclose(out[3], [1.0, 0.0])
    np.testing.assert_allclose(out[:2], coords[:2])


@pytest.mark.parametrize("x, expected", [
    (np.zeros((50, 9), np.float32), "zero"),
    (np.full((50, 9), 1 / 9, np.float32), "identical"),
])
def test_degenerate_scopes_give_one_cluster_and_a_message(x, expected):
    rows = table_rows(len(x))
    result = offline.cluster_scope("all", rows["id"].to_numpy(), x, rows, np.full((3, 9), 1 / 9),
                                   ["a", "b", "c"], clustering.ClusteringSettings(null_partitions=10))
    assert any(expected in m and "one cluster" in m for m in result.messages)
    for labels in result.labels.values():
        assert (labels == 0).all()
    assert result.summary["size"].tolist() == [50, 50] and np.isfinite(result.coords).all()


def test_non_finite_descriptors_are_zeroed_with_a_message_and_tiny_scopes_work():
    x, _ = blobs(2, per=20)
    x[3] = np.nan
    rows = table_rows(len(x))
    result = offline.cluster_scope("all", rows["id"].to_numpy(), x, rows, np.full((3, 16), 1 / 16),
                                   ["a", "b", "c"],
                                   clustering.ClusteringSettings(null_partitions=10, embedding="spectral"))
    assert any("NaN or infinite" in m for m in result.messages)
    for n in (1, 2):
        small = offline.cluster_scope("all", np.arange(n), x[:n] * 0 + 1 / 16, rows.iloc[:n],
                                      np.full((3, 16), 1 / 16), ["a", "b", "c"],
                                      clustering.ClusteringSettings(null_partitions=5))
        assert small.coords.shape == (n, 2) and small.summary["size"].sum() == n * len(small.labels)


def test_calibration_of_a_planted_suspicious_cluster_against_random_partitions():
    rng = np.random.default_rng(0)
    n = 600
    x, _ = blobs(3, per=200)
    rows = pd.DataFrame({"id": np.arange(n), "label": np.repeat([0, 1, 2], 200), "pred": np.repeat([0, 1, 2], 200),
                         "correct": np.ones(n, bool), "background_share": rng.uniform(0.2, 0.4, n),
                         "background_hotspot": np.nan, "border_share": rng.uniform(0.1, 0.3, n)})
    labels = rng.integers(0, 6, n)
    planted = np.arange(40)                               # a group off the object, on the border, all wrong
    labels[planted] = 6
    rows.loc[planted, ["background_share", "border_share", "correct"]] = [0.95, 0.9, False]
    consensus = explore.class_consensus(x, rows["pred"].to_numpy(), rows["correct"].to_numpy(), 3)
    calibration = clustering.calibrate_suspicion(labels, rows, x, consensus, partitions=200, seed=1)
    top = calibration.top()
    assert top["p"] == pytest.approx(1 / 201) and top["z"] > 10
    frame = calibration.frame().set_index("cluster")
    assert frame.loc[6, "suspicion_p"] == pytest.approx(1 / 201)
    assert (frame.drop(index=6)["suspicion_p"] > 0.05).all()   # random groups are not unusual
    # The observed suspicion is the summary's.
    summary, _ = clustering.summarize_clusters(labels, rows, x, consensus, ["a", "b", "c"])
    np.testing.assert_allclose(summary.set_index("cluster").loc[frame.index, "suspicion"], frame.index.map(
        dict(zip(calibration.clusters, calibration.suspicion))), atol=1e-12)
    # One cluster (the whole scope) is exactly what chance gives.
    single = clustering.calibrate_suspicion(np.zeros(n, int), rows, x, consensus, partitions=20)
    assert single.top()["p"] == 1.0 and np.isnan(single.z[0])
    # No partitions: not calibrated (NaN), rather than "as chance".
    none = clustering.calibrate_suspicion(labels, rows, x, consensus, partitions=0)
    assert np.isnan(none.p).all() and np.isnan(none.top()["z"])


# ----------------------------------------------------------------------------------------------------------
# A whole run on real caches: storage, reading API, staleness
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clustered(small_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session cache (3 classes x 8 images) as `explain` left it: clustered at its end."""
    copy = tmp_path_factory.mktemp("clustered") / "cache"
    shutil.copytree(small_cache, copy)
    return copy


def test_explain_clusters_every_scope_at_its_end(clustered: Path):
    cache = load(clustered)
    names = cache.manifest["class_names"]
    expected = ["all", "mistakes"] + [f"true:{c}" for c in names] + [f"pred:{c}" for c in names]
    assert offline.fresh_scopes(cache) == [s for s in expected if s in offline.fresh_scopes(cache)]
    assert {"all", "mistakes", *[f"true:{c}" for c in names]} <= set(offline.fresh_scopes(cache))
    for scope in offline.fresh_scopes(cache):
        stored = offline.read_clustering(cache, scope)
        mask = offline.scope_mask(cache.table, scope, names)
        assert sorted(stored.assignments["id"]) == sorted(cache.table["id"][mask])     # every image, once
        assert stored.summary["size"].sum() == mask.sum()
        assert stored.prototypes.shape == (len(stored.summary), 16)
        np.testing.assert_allclose(stored.prototypes.sum(axis=1), 1.0, atol=1e-5)
        assert stored.suggested_k >= 1 and len(stored.eigenvalues) >= 1
        if stored.n >= 4:   # a real layout, not every point in one place
            assert (stored.assignments[["x", "y"]].std() > 1e-3).all() and np.isfinite(stored.assignments[["x", "y"]]).all().all()


def test_reading_api_switches_settings_and_serves_the_page(clustered: Path):
    cache = load(clustered)
    default = offline.read_clustering(cache, "all")
    assert default.algorithm == "kmeans" and default.k_from == "eigengap" and default.k == default.suggested_k
    other = offline.read_clustering(cache, "all", algorithm="spectral")
    assert other.name == f"spectral_k{default.suggested_k}"
    assert set(default.choices["name"]) == {default.name, other.name}
    assert {"suspicion", "suspicion_z", "suspicion_p", "accuracy", "majority_name", "class_mix", "rank"} <= \
        set(default.summary.columns)
    assert default.summary["rank"].tolist() == list(range(1, len(default.summary) + 1))
    assert set(default.calibration) >= {"z", "p", "null_max_mean", "partitions"}
    frame = default.assignments
    assert list(frame.columns) == ["id", "cluster", "x", "y", "sample_rank"]
    # Display subsample: small clusters whole, then the stored random order.
    shown = default.display_points(budget=10, keep_whole=3)
    sizes = frame["cluster"].value_counts()
    for cluster in sizes[sizes <= 3].index:
        assert set(frame.loc[frame["cluster"] == cluster, "id"]) <= set(shown["id"])
    assert len(shown) == max(10, int(sizes[sizes <= 3].sum()))
    counts, x_edges, y_edges = default.density()
    assert counts.sum() == len(frame) and len(x_edges) == counts.shape[0] + 1
    everything = default.ids_in_box(x_edges[0], x_edges[-1], y_edges[0], y_edges[-1])
    assert sorted(everything) == sorted(frame["id"])
    top = int(default.summary["cluster"].iloc[0])
    assert sorted(default.members(top)) == sorted(frame.loc[frame["cluster"] == top, "id"])
    with pytest.raises(offline.ClusteringNotFound, match="available"):
        offline.read_clustering(cache, "all", k=99)
    with pytest.raises(offline.ClusteringNotFound, match="python -m analysis cluster"):
        offline.read_clustering(cache, "pred:nothing")


def test_class_aggregates_stream_to_the_full_computation(clustered: Path):
    cache = load(clustered)
    stored = offline.read_class_aggregates(cache)
    table = cache.table
    streamed = offline.compute_class_aggregates(cache, chunk_rows=5)      # several chunks
    maps = explore.unit_mass(cache.maps(table["id"]), "positive")
    labels, correct = table["label"].to_numpy(), table["correct"].to_numpy(bool)
    for result in (stored.maps, streamed.maps):
        expected = explore.class_mean_maps(maps.reshape(len(maps), -1), labels, correct, 3)
        np.testing.assert_allclose(result.correct, expected.correct, atol=1e-6)
        np.testing.assert_allclose(result.wrong, expected.wrong, atol=1e-6)
        np.testing.assert_array_equal(result.n_wrong, expected.n_wrong)
        wrong_true = explore.unit_mass(cache.maps(table["id"][~correct], "true"), "positive")
        for c in range(3):
            rows = labels[~correct] == c
            if rows.any():
                np.testing.assert_allclose(result.wrong_true[c], wrong_true[rows].mean(axis=0), atol=1e-6)
    expected = explore.class_consensus(cache.descriptors(), table["pred"].to_numpy(), correct, 3)
    np.testing.assert_allclose(stored.consensus["positive"], expected, atol=1e-6)


def test_results_are_tied_to_the_cache_and_stale_ones_are_not_shown(tmp_path: Path, capsys):
    out = tmp_path / "cache"
    writer = write_synthetic_cache(out, n_images=90, shard_size=30, compact=False)
    code, _, err = run_main(capsys, "cluster", "--cache", str(out), "--scopes", "all", "pred", "--quiet",
                            "--embedding", "spectral", "--null-partitions", "10")
    assert code == 0, err
    cache = load(out)
    assert offline.fresh_scopes(cache) == ["all", "pred:dog", "pred:fox"]   # nothing is predicted "cat"
    assert offline.read_class_aggregates(cache) is not None
    # A resume that adds a shard changes what the cache holds: the results are stale, not shown.
    writer.write_shard(3, synthetic_records(np.arange(90, 120)))
    grown = load(out)
    assert len(grown) == 120 and offline.fresh_scopes(grown) == [] and offline.read_class_aggregates(grown) is None
    with pytest.raises(offline.ClusteringNotFound):
        offline.read_clustering(grown, "all")
    code, _, err = run_main(capsys, "cluster", "--cache", str(out), "--scopes", "all", "--quiet",
                            "--embedding", "spectral", "--null-partitions", "10")
    assert code == 0, err
    assert len(offline.read_clustering(load(out), "all").assignments) == 120
    # --overwrite (a new generation of the cache) makes them stale too, even with the same images.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["created"] = "2030-01-01T00:00:00"
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert offline.fresh_scopes(load(out)) == []


@pytest.mark.slow
def test_a_killed_run_keeps_its_finished_scopes_and_the_rerun_continues(tmp_path: Path):
    out = tmp_path / "cache"
    writer = CacheWriter(out)
    writer.initialise()
    writer.write_manifest(synthetic_manifest(out / "images", 3000))
    for shard in range(3):
        writer.write_shard(shard, synthetic_records(np.arange(shard * 1000, (shard + 1) * 1000)))
    writer.compact()
    arguments = ["cluster", "--cache", str(out), "--quiet", "--threads", "1"]
    command = [sys.executable, "-m", "analysis", *arguments]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    run_folder = offline.run_dir(out, clustering.ClusteringSettings())
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    finished = []
    while process.poll() is None and time.monotonic() < deadline:
        finished = sorted(run_folder.glob(f"{offline.SCOPE_PREFIX}*")) if run_folder.is_dir() else []
        if finished:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read().decode()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    kept = {p.name: json.loads((p / "meta.json").read_text())["created"]
            for p in run_folder.glob(f"{offline.SCOPE_PREFIX}*")}
    assert 1 <= len(kept) < 7          # 7 scopes: all, mistakes, true:x3, pred:dog, pred:fox (no "cat" predicted)
    cache = load(out)
    assert set(offline.fresh_scopes(cache)) == {json.loads((run_folder / n / "meta.json").read_text())["scope"]
                                              for n in kept}
    code, printed, err = run_command(*arguments)   # the rerun, in this process
    assert code == 0, err
    assert printed == ""
    for name, created in kept.items():   # finished scopes were kept, not recomputed
        assert json.loads((run_folder / name / "meta.json").read_text())["created"] == created
    assert len(offline.fresh_scopes(load(out))) == 7
    assert not list(run_folder.glob(".tmp-*"))


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

def test_help_documents_every_option(capsys):
    from analysis.__main__ import main

    with pytest.raises(SystemExit):
        main(["cluster", "--help"])
    text = capsys.readouterr().out
    for option in ("--cache", "--scopes", "--descriptor", "--algorithm", "--k", "--max-k", "--neighbours",
                   "--embedding", "--embed-max", "--null-partitions", "--seed", "--threads", "--verify-top",
                   "--verify-q", "--verify-images", "--device", "--batch-size", "--quiet"):
        assert option in text


@pytest.mark.parametrize("argv, message", [
    (["--scopes", "pred:zebra"], "'zebra' is not a class of the cache"),
    (["--scopes", "everything"], "unknown scope 'everything'"),
    (["--k", "1"], "k must be 0"),
    (["--algorithm", "hdbscan"], "invalid choice"),
    (["--verify-top", "3"], "cannot load the cache's model here"),
])
def test_bad_options_fail_before_any_work_with_one_line(tmp_path: Path, capsys, argv, message):
    out = tmp_path / "cache"
    write_synthetic_cache(out, n_images=30, shard_size=30)
    code, _, err = run_main(capsys, "cluster", "--cache", str(out), *argv)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (out / offline.RESULTS_DIR).exists()


def test_a_missing_cache_is_one_line(tmp_path: Path, capsys):
    code, _, err = run_main(capsys, "cluster", "--cache", str(tmp_path / "nothing"))
    assert code == 2 and "cache directory not found" in err and err.count("\n") == 1


def test_explain_with_no_cluster_skips_it(small_cache: Path, tmp_path: Path):
    out = tmp_path / "cache"
    code, _, err = run_command(*job_arguments(small_cache.parent / "images", out, "--checkpoint",
                                              str(small_cache.parent / "tiny_cnn.pth"), "--quiet", "--no-cluster"))
    assert code == 0, err
    assert load(out).complete and not (out / offline.RESULTS_DIR).exists()


def test_runtime_options_match_the_jobs():
    from analysis.pipeline.plan import RUNTIME_OPTIONS

    assert tuple(offline.RUNTIME_OPTIONS) == tuple(RUNTIME_OPTIONS)


# ----------------------------------------------------------------------------------------------------------
# The causal verification's rule and its run on a real model
# ----------------------------------------------------------------------------------------------------------

def test_mcnemar_by_hand():
    region = np.array([True] * 6 + [False] * 4)
    control = np.array([False] * 5 + [True] + [False] * 4)   # 5 images changed by the region only, none by the control only
    assert offline.mcnemar_greater(region, control) == pytest.approx(0.5 ** 5)
    assert offline.mcnemar_greater(control, region) == pytest.approx(1.0)
    assert offline.mcnemar_greater(np.zeros(4, bool), np.zeros(4, bool)) == 1.0


NAN = float("nan")


@pytest.mark.parametrize("off, region, control, p, mass, removal, q, inserted, expected", [
    (0.9, 0.6, 0.05, 1e-6, 0.5, 0.5, 5.0, (0.20, 0.00, 1e-6), "shortcut"),               # a mark off the object
    (0.9, 0.6, 0.05, 1e-6, 0.5, 0.5, 5.0, (0.02, 0.01, 0.5), "undecided"),               # off, but carries nothing
    (0.9, 0.11, 0.0, 1e-6, 0.5, 0.5, 5.0, (0.07, 0.00, 1e-4), "shortcut"),   # off: a small carry, significant
    (0.9, 0.11, 0.0, 1e-6, 0.5, 0.5, 5.0, (0.07, 0.00, 0.02), "undecided"),  # ... the same, not significant
    (0.9, 0.11, 0.0, 1e-6, 0.5, 0.5, 5.0, (0.04, 0.00, 1e-5), "undecided"),  # ... significant, under 5 points
    (0.1, 0.6, 0.05, 1e-6, 0.5, 0.5, 5.0, (0.02, 0.01, 0.5, 0.9), "uses the object"),    # pasted, it carries nothing
    (0.1, 0.6, 0.05, 1e-6, 0.5, 0.5, 5.0, (0.02, 0.01, 0.5, 0.24), "undecided"),   # ... toward a class 24% predict
    # on the object, what carries the class elsewhere may be a mark or a part of the object: never "shortcut"
    (0.1, 0.6, 0.05, 1e-6, 0.5, 0.5, 5.0, (0.60, 0.02, 1e-9), "undecided"),              # a stamp, or a part
    (0.1, 0.6, 0.05, 1e-6, 0.5, 0.5, 5.0, (NAN, NAN, NAN), "undecided"),                 # the insertion could not run
    (0.1, 0.6, 0.05, 1e-6, 0.5, 0.5, 5.0, (0.17, 0.01, 1e-6), "undecided"),              # ... carrying less
    (0.9, 0.6, 0.05, 0.2, 0.5, 0.5, 5.0, (NAN, NAN, NAN), "undecided"),    # a large effect, not significant
    (0.9, 0.08, 0.05, 0.2, 0.5, 0.5, 5.0, (NAN, NAN, NAN), "off the object, not used"),   # a small one
    (0.9, 0.12, 0.05, 1e-6, 0.5, 0.5, 5.0, (NAN, NAN, NAN), "off the object, not used"),  # < 10 points more
    (0.1, 0.0, 0.0, 1.0, 0.5, 0.5, 5.0, (NAN, NAN, NAN), "not used"),
    (0.1, 0.0, 0.0, 1.0, 0.15, 0.5, 5.0, (NAN, NAN, NAN), "undecided"),                  # the evidence is spread
    (0.9, 0.0, 0.0, 1.0, 0.5, 0.05, 5.0, (NAN, NAN, NAN), "undecided"),                  # the blur changes nothing
    (NAN, 0.6, 0.0, 1e-6, 0.5, 0.5, 5.0, (0.0, 0.0, 1.0, 0.5), "uses the object"),
    (NAN, 0.6, 0.0, 1e-6, 0.5, 0.5, 5.0, (0.0, 0.0, 1.0, NAN), "undecided"),      # who was pasted toward: unknown
    (0.1, 0.6, 0.05, 1e-6, 0.5, 0.5, 25.0, (0.60, 0.02, 1e-9), "undecided"),         # a grown region: a big object part
])
def test_verdict_reassures_only_where_the_test_could_have_shown_the_opposite(off, region, control, p, mass, removal,
                                                                            q, inserted, expected):
    evidence = offline.Evidence(region, control, p, off, mass, removal, q, *inserted)
    found, reason = offline.verdict(evidence, alpha=0.001)
    assert found == expected
    assert expected in offline.VERDICTS
    assert f"{region:.0%}" in reason       # every verdict carries its numbers
    if expected == "undecided":
        assert "decide" in reason


def test_benjamini_hochberg_by_hand():
    # sorted p: 0.01, 0.02, 0.03, 0.5 (m = 4): p * m / rank = 0.04, 0.04, 0.04, 0.5; the running minimum from the top
    adjusted = offline.benjamini_hochberg(np.array([0.03, 0.5, 0.01, float("nan"), 0.02]))
    np.testing.assert_allclose(adjusted[[0, 1, 2, 4]], [0.04, 0.5, 0.04, 0.04])
    assert np.isnan(adjusted[3])


def test_region_grows_with_the_spread_of_the_prototype():
    growing = offline.VerifyOptions(q=5.0, q_max=25.0)
    compact = np.zeros((10, 10)); compact[0, :5] = 1.0            # all the mass in 5% of the cells
    assert offline.region_for(compact, growing) == pytest.approx((5.0, 1.0))
    spread = np.ones((10, 10))                                     # half the mass needs half the cells: capped
    assert offline.region_for(spread, growing) == pytest.approx((25.0, 0.25))
    text = np.zeros((10, 10)); text[4:6, :] = 1.0                  # a line of text: 20 cells, half in 10
    assert offline.region_for(text, growing)[0] == pytest.approx(10.0)
    # With q_max = q the region stays the top 5% and says how much of the evidence it holds.
    assert offline.region_for(text, offline.VerifyOptions(q_max=5.0)) == pytest.approx((5.0, 0.25))
    # A smallest region asked above q_max (`cluster --verify-q 25`, q_max 5 by default) is that region, not
    # q_max's 5% (it was, silently, until a watermark row was tried with --verify-q 25).
    assert offline.region_for(text, offline.VerifyOptions(q=25.0, q_max=5.0)) == pytest.approx((25.0, 1.0))


def test_region_off_object_by_mask_and_by_border():
    region = np.zeros((20, 20), bool)
    region[0:2, 0:2] = True                                  # a corner
    mask = np.zeros((1, 10, 10), bool)
    mask[0, 3:7, 3:7] = True                                 # the object in the middle (map size 10)
    share, rule = offline.region_off_object(region, mask)
    assert share == 1.0 and "mask" in rule
    mask[0, :, :] = True                                     # the object everywhere
    assert offline.region_off_object(region, mask)[0] == 0.0
    share, rule = offline.region_off_object(region, None)    # no foreground: the border strip
    assert share == 1.0 and "border" in rule
    middle = np.zeros((20, 20), bool)
    middle[9:11, 9:11] = True
    assert offline.region_off_object(middle, None)[0] == 0.0


def test_verify_top_on_a_real_model_stores_flip_rates_and_verdicts(clustered: Path, capsys):
    code, out, err = run_main(capsys, "cluster", "--cache", str(clustered), "--verify-top", "2",
                              "--device", "cpu", "--scopes", "all", "true:cat")
    assert code == 0, err
    cache = load(clustered)
    for scope in ("all", "true:cat"):
        for algorithm in clustering.ALGORITHMS:
            checked = offline.read_clustering(cache, scope, algorithm=algorithm).verification
            assert checked is not None and set(checked["rank"]) <= {1, 2} and len(checked)
            tested = checked[checked["tested"] > 0]
            assert ((tested["changed_region"] >= 0) & (tested["changed_region"] <= 1)).all()
            assert tested["verdict"].isin(list(offline.VERDICTS)).all()
            np.testing.assert_allclose(tested["alpha"], 0.01)          # a false discovery rate over the run
            assert (tested["p_value"] >= tested["p_raw"] - 1e-12).all()  # adjusted over 2 ranks x 2 clusterings x 2 scopes
    assert "verdict" in out
