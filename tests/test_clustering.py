"""Unit tests of analysis.explore.clustering on descriptors with a known cluster structure."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from analysis.explore import clustering, statistics as explore
from tests.helpers import blobs


def test_knn_affinity_is_symmetric_binary_without_self_loops():
    x = np.array([[0.0], [1.0], [2.0], [10.0]])
    graph = clustering.knn_affinity(x, n_neighbors=1).toarray()
    np.testing.assert_array_equal(graph, graph.T)
    assert set(np.unique(graph)) <= {0.0, 1.0} and np.all(np.diag(graph) == 0)
    assert graph[3, 2] == 1 and graph[0, 1] == 1   # 10's nearest is 2; made symmetric


@pytest.mark.parametrize("centres", [2, 3, 5])
def test_eigengap_suggests_the_number_of_separated_groups(centres):
    x, _ = blobs(centres, per=30, dim=20)
    gap = clustering.eigengap(x, n_neighbors=8)
    assert gap.suggested_k == centres
    assert np.all(gap.eigenvalues[:centres] < 1e-8) and gap.eigenvalues[centres] > 0.05


def test_eigengap_large_components_use_lanczos_and_agree_with_dense():
    # Two groups of 700 points: each component is above the dense-solver size, so Lanczos runs on each.
    x, _ = blobs(2, per=700, dim=16, spread=0.05)
    gap = clustering.eigengap(x, n_neighbors=10)
    assert gap.suggested_k == 2
    from scipy.sparse.csgraph import laplacian
    component = clustering.knn_affinity(x[:700], 10)
    sparse_values = clustering._smallest_laplacian_eigenvalues(component, 6)
    dense_values = np.linalg.eigvalsh(laplacian(component.astype(float), normed=True).toarray())[:6]
    np.testing.assert_allclose(sparse_values, dense_values, atol=1e-5)


@pytest.mark.parametrize("algorithm", clustering.ALGORITHMS)
def test_every_algorithm_recovers_separated_groups(algorithm):
    x, truth = blobs(3, per=40)
    labels = clustering.cluster_labels(x, algorithm, n_clusters=3, n_neighbors=8)
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    assert set(labels.tolist()) == {0, 1, 2}


def test_relabel_by_size_orders_clusters_and_keeps_noise():
    assert clustering.relabel_by_size(np.array([5, 5, 7, 7, 7, -1, 2])).tolist() == [1, 1, 0, 0, 0, -1, 2]


@pytest.mark.parametrize("method", clustering.EMBEDDINGS)
def test_embedding_separates_groups(method):
    x, truth = blobs(2, per=30)
    coords = clustering.embed_2d(x, method, n_neighbors=8)
    assert coords.shape == (60, 2) and np.isfinite(coords).all()
    # Every point's 5 nearest neighbours in the plane belong to its own group (the groups do not mix).
    from sklearn.neighbors import NearestNeighbors
    _, nearest = NearestNeighbors(n_neighbors=6).fit(coords).kneighbors(coords)
    assert np.all(truth[nearest[:, 1:]] == truth[:, None])


def test_tiny_inputs_do_not_crash():
    x = np.ones((2, 4), np.float32) / 4
    assert clustering.cluster_labels(x, "kmeans", 3).tolist() == [0, 0]
    assert clustering.embed_2d(x, "tsne").shape == (2, 2)
    assert clustering.eigengap(x).suggested_k >= 1


def test_scope_ids():
    table = pd.DataFrame({"id": [3, 4, 5, 6], "label": [0, 1, 1, 2], "correct": [True, False, True, False]})
    assert clustering.scope_ids(table, "class", 1).tolist() == [4, 5]
    assert clustering.scope_ids(table, "all").tolist() == [3, 4, 5, 6]
    assert clustering.scope_ids(table, "mistakes").tolist() == [4, 6]
    with pytest.raises(ValueError):
        clustering.scope_ids(table, "class")


def test_suspicion_score_is_mean_of_available_components():
    assert clustering.suspicion_score(0.8, 0.4, 0.5, 0.3) == pytest.approx(0.5)
    assert clustering.suspicion_score(np.nan, 0.4, 0.2, 0.0) == pytest.approx(0.2)


def test_summary_ranks_a_shortcut_cluster_first():
    # Two clusters of class 0. Cluster A (rows 0-3): attention on the object, all correct, maps like the class.
    # Cluster B (rows 4-5): attention in the background/border, half wrong, maps unlike the class consensus.
    descriptors = np.array([[1, 0, 0, 0]] * 4 + [[0, 0, 0, 1]] * 2, np.float32)
    rows = pd.DataFrame({
        "id": np.arange(6), "label": [0] * 6, "pred": [0, 0, 0, 0, 0, 1],
        "correct": [True, True, True, True, True, False],
        "background_share": [0.1] * 4 + [0.9, 0.7], "background_hotspot": [0.0] * 4 + [1.0, 1.0],
        "border_share": [0.0] * 4 + [0.6, 0.4],
    })
    labels = np.array([0, 0, 0, 0, 1, 1])
    consensus = explore.class_consensus(descriptors, rows["pred"].to_numpy(), rows["correct"].to_numpy(), 2)
    summary, prototypes = clustering.summarize_clusters(labels, rows, descriptors, consensus, ["cat", "dog"])
    assert summary["cluster"].tolist() == [1, 0] and summary["rank"].tolist() == [1, 2]
    shortcut = summary.iloc[0]
    assert shortcut["size"] == 2 and shortcut["accuracy"] == pytest.approx(0.5)
    assert shortcut["background_share"] == pytest.approx(0.8) and shortcut["border_share"] == pytest.approx(0.5)
    # consensus of class 0 = mean of the 5 correct rows = [0.8, 0, 0, 0.2]; class 1 never correct -> its own row.
    reference = (np.array([0.8, 0, 0, 0.2]) + np.array([0, 0, 0, 1])) / 2
    expected_unlike = 1 - reference[3] / np.linalg.norm(reference)
    assert shortcut["unlike_class"] == pytest.approx(expected_unlike, abs=1e-6)
    # The off-object part is background_hotspot (1.0 here), not background_share (0.8).
    assert shortcut["background_hotspot"] == pytest.approx(1.0)
    assert shortcut["suspicion"] == pytest.approx((1.0 + 0.5 + 0.5 + expected_unlike) / 4, abs=1e-6)
    assert shortcut["class_mix"] == "cat 100%"
    np.testing.assert_allclose(prototypes[0], [0, 0, 0, 1])
    normal = summary.iloc[1]
    assert normal["accuracy"] == 1.0 and normal["suspicion"] < shortcut["suspicion"]


def test_noise_cluster_is_ranked_last():
    descriptors = np.eye(3, dtype=np.float32)
    rows = pd.DataFrame({"id": [0, 1, 2], "label": [0, 0, 0], "pred": [0, 1, 1], "correct": [True, False, False],
                         "background_share": [0.0, 1.0, 1.0], "background_hotspot": [np.nan] * 3,
                         "border_share": [0.0, 1.0, 1.0]})
    consensus = np.eye(3, dtype=np.float32)[:2]
    summary, _ = clustering.summarize_clusters(np.array([0, -1, -1]), rows, descriptors, consensus, ["a", "b"])
    assert summary["cluster"].tolist() == [0, -1]
    assert np.isnan(summary.iloc[0]["background_hotspot"])


def test_run_save_load_roundtrip(tmp_path):
    x, _ = blobs(3, per=20)
    ids = np.arange(100, 160)
    settings = clustering.ClusteringSettings(scope="all", algorithm="kmeans", embedding="spectral",
                                             n_neighbors=6)
    result = clustering.run_clustering(ids, x, settings, scope_size=600)
    assert result.suggested_k == 3 and result.n_clusters == 3 and result.scope_size == 600
    path = tmp_path / "dashboard" / f"clusters-{settings.digest('state')}.parquet"
    clustering.save_result(path, result)
    loaded = clustering.load_result(path)
    np.testing.assert_array_equal(loaded.ids, ids)
    np.testing.assert_array_equal(loaded.labels, result.labels)
    np.testing.assert_allclose(loaded.embedding, result.embedding)
    assert loaded.settings == settings and loaded.suggested_k == 3
    assert settings.digest("state") != settings.digest("other state")
    path.write_bytes(b"garbage")
    assert clustering.load_result(path) is None


def test_settings_validation():
    with pytest.raises(ValueError):
        clustering.ClusteringSettings(algorithm="dbscan").validate()
    with pytest.raises(ValueError):
        clustering.ClusteringSettings(embedding="umap").validate()


def test_connect_components_adds_one_weak_edge_per_extra_component():
    from scipy.sparse.csgraph import connected_components
    x, _ = blobs(3, per=10)
    graph = clustering.knn_affinity(x, 3)
    assert connected_components(graph, directed=False)[0] == 3
    joined = clustering.connect_components(x, graph, weight=0.01)
    assert connected_components(joined, directed=False)[0] == 1
    added = (joined - graph).toarray()
    np.testing.assert_array_equal(added, added.T)
    assert np.count_nonzero(added) == 4 and set(np.unique(added)) == {0.0, 0.01}


# ---------------------------------------------------------------------------------------- degenerate input
DEGENERATE_SCRIPT = r'''
import json, sys
import numpy as np
from analysis.explore import clustering

out = {}
uniform = np.full((40, 16), 1 / 16, np.float32)       # the descriptor of every map without positive relevance
zeros = np.zeros((40, 16), np.float32)
jitter = uniform + np.float32(1e-9) * np.random.default_rng(0).standard_normal(uniform.shape).astype(np.float32)
for name, x in {"uniform": uniform, "zeros": zeros, "float32_jitter": jitter}.items():
    for algorithm in clustering.ALGORITHMS:
        for embedding in clustering.EMBEDDINGS:
            settings = clustering.ClusteringSettings(algorithm=algorithm, embedding=embedding, n_clusters=4)
            r = clustering.run_clustering(np.arange(40), x, settings)
            out[f"{name}/{algorithm}/{embedding}"] = [r.n_clusters, sorted(set(r.labels.tolist())), r.identical,
                                                     r.note, float(np.abs(r.embedding).max())]
    out[f"{name}/embed_2d"] = float(np.abs(clustering.embed_2d(x, "tsne")).max())
    out[f"{name}/cluster_labels"] = sorted(set(clustering.cluster_labels(x, "kmeans", 4).tolist()))
    out[f"{name}/eigengap"] = clustering.eigengap(x).suggested_k
print(json.dumps(out))
'''


def test_identical_or_zero_descriptors_give_one_cluster_and_a_message_never_a_crash():
    """t-SNE on identical points crashed scikit-learn's native code (SIGSEGV), taking the process with it: run in
    a child process, so that a regression fails this test instead of killing the test run."""
    import json
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    done = subprocess.run([sys.executable, "-c", DEGENERATE_SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    results = json.loads(done.stdout)
    for key, value in results.items():
        if key.endswith("/embed_2d"):
            assert value == 0.0, key                       # every point at the origin
        elif key.endswith("/cluster_labels"):
            assert value == [0], key
        elif key.endswith("/eigengap"):
            assert value == 1, key
        else:
            n_clusters, labels, identical, note, spread = value
            assert n_clusters == 1 and labels == [0] and identical and spread == 0.0, (key, value)
            assert note.startswith("All 40 maps of this scope give the same descriptor"), (key, note)


def test_non_finite_descriptors_are_left_out_or_refused_and_k_is_capped_by_distinct_maps():
    x, _ = blobs(3, per=10)
    x[[2, 5]] = np.nan
    result = clustering.run_clustering(np.arange(30), x, clustering.ClusteringSettings(n_clusters=3))
    assert len(result.ids) == 28 and 2 not in result.ids and 5 not in result.ids and result.scope_size == 30
    assert result.note.startswith("2 image(s) left out: their maps hold NaN or inf.")
    for call in (lambda: clustering.embed_2d(x), lambda: clustering.cluster_labels(x, "kmeans", 3),
                 lambda: clustering.eigengap(x), lambda: clustering.knn_affinity(x)):
        with pytest.raises(ValueError, match="descriptors hold NaN or inf"):
            call()
    three = np.repeat(np.eye(16, dtype=np.float32)[:3], 8, axis=0)  # 24 maps, 3 different ones
    result = clustering.run_clustering(np.arange(24), three, clustering.ClusteringSettings(n_clusters=6))
    assert result.n_clusters == 3 and sorted(set(result.labels.tolist())) == [0, 1, 2]
    assert result.note == "Only 3 different maps: 3 clusters instead of 6."
