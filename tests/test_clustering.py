"""Unit tests of the clustering engine (analysis.explore.clustering) on descriptors with a known cluster
structure. The engine's kNN graph, spectrum, labels and t-SNE are tested on their own in test_cluster_offline.py;
here: what one call of `cluster_points` gives (the eigengap, both algorithms, both layouts, degenerate and damaged
input) and the suspicion summaries."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from analysis.explore import clustering, statistics as explore
from analysis.explore.cluster_offline import scope_mask
from tests.helpers import blobs


def _settings(**changes) -> clustering.ClusteringSettings:
    """Euclidean, 8 neighbours, the spectral layout (cheap): the settings these small blobs are tested with."""
    return clustering.ClusteringSettings(**{"metric": "euclidean", "n_neighbors": 8, "embedding": "spectral",
                                            "algorithms": ("kmeans",), **changes})


def test_knn_adjacency_is_symmetric_binary_without_self_loops():
    x = np.array([[0.0], [1.0], [2.0], [10.0]])
    graph = clustering.knn_graph(x, n_neighbors=1).adjacency().toarray()
    np.testing.assert_array_equal(graph, graph.T)
    assert set(np.unique(graph)) <= {0.0, 1.0} and np.all(np.diag(graph) == 0)
    assert graph[3, 2] == 1 and graph[0, 1] == 1   # 10's nearest is 2; made symmetric


@pytest.mark.parametrize("centres", [2, 3, 5])
def test_eigengap_suggests_the_number_of_separated_groups(centres):
    x, _ = blobs(centres, per=30, dim=20)
    found = clustering.cluster_points(x, _settings())
    assert found.suggested_k == centres and found.chosen == [("kmeans", centres, "eigengap")]
    assert np.all(found.eigenvalues[:centres] < 1e-8) and found.eigenvalues[centres] > 0.05


def test_eigengap_large_components_use_lanczos_and_agree_with_dense():
    # Two groups of 700 points: each component is above the dense-solver size, so Lanczos runs on each.
    x, _ = blobs(2, per=700, dim=16, spread=0.05)
    assert clustering.cluster_points(x, _settings(n_neighbors=10)).suggested_k == 2
    from scipy.sparse.csgraph import laplacian
    component = clustering.knn_graph(x[:700], 10).adjacency()
    sparse_values = clustering.laplacian_eigenpairs(component, 6)[0]
    dense_values = np.linalg.eigvalsh(laplacian(component.astype(float), normed=True).toarray())[:6]
    np.testing.assert_allclose(sparse_values, dense_values, atol=1e-5)


@pytest.mark.parametrize("metric", clustering.METRICS)
@pytest.mark.parametrize("algorithm", clustering.ALGORITHMS)
def test_every_algorithm_recovers_separated_groups(algorithm, metric):
    x, truth = blobs(3, per=40)
    found = clustering.cluster_points(x, _settings(algorithms=(algorithm,), ks=(3,), metric=metric))
    labels = found.labels[clustering.clustering_name(algorithm, 3)]
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    assert set(labels.tolist()) == {0, 1, 2}
    np.testing.assert_allclose(found.descriptors, x, rtol=1e-6)   # the cosine scaling is undone


def test_relabel_by_size_orders_clusters_and_keeps_noise():
    assert clustering.relabel_by_size(np.array([5, 5, 7, 7, 7, -1, 2])).tolist() == [1, 1, 0, 0, 0, -1, 2]


@pytest.mark.parametrize("method", clustering.EMBEDDINGS)
def test_embedding_separates_groups(method):
    x, truth = blobs(2, per=30)
    coords = clustering.cluster_points(x, _settings(embedding=method)).coords
    assert coords.shape == (60, 2) and np.isfinite(coords).all()
    # Every point's 5 nearest neighbours in the plane belong to its own group (the groups do not mix).
    from sklearn.neighbors import NearestNeighbors
    _, nearest = NearestNeighbors(n_neighbors=6).fit(coords).kneighbors(coords)
    assert np.all(truth[nearest[:, 1:]] == truth[:, None])


def test_tiny_inputs_do_not_crash():
    x = np.ones((2, 4), np.float32) / 4
    found = clustering.cluster_points(x, _settings(ks=(3,), embedding="tsne"))
    assert found.labels["kmeans_k1"].tolist() == [0, 0]
    assert found.coords.shape == (2, 2) and found.suggested_k >= 1


def test_scope_mask():
    table = pd.DataFrame({"id": [3, 4, 5, 6], "label": [0, 1, 1, 2], "pred": [0, 0, 1, 1],
                          "correct": [True, False, True, False]})
    names = ["a", "b", "c"]
    ids = table["id"].to_numpy()
    assert ids[scope_mask(table, "true:b", names)].tolist() == [4, 5]
    assert ids[scope_mask(table, "pred:a", names)].tolist() == [3, 4]
    assert ids[scope_mask(table, "all", names)].tolist() == [3, 4, 5, 6]
    assert ids[scope_mask(table, "mistakes", names)].tolist() == [4, 6]
    with pytest.raises(clustering.ClusteringInputError):
        scope_mask(table, "true:zebra", names)


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


def test_settings_validation():
    with pytest.raises(ValueError):
        clustering.ClusteringSettings(algorithms=("dbscan",)).validate()
    with pytest.raises(ValueError):
        clustering.ClusteringSettings(embedding="umap").validate()
    with pytest.raises(ValueError, match="agglomerative and HDBSCAN"):
        clustering.ClusteringSettings(algorithms=("hdbscan",)).validate()


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
            for k in (0, 4):
                settings = clustering.ClusteringSettings(algorithms=(algorithm,), embedding=embedding, ks=(k,))
                r = clustering.cluster_points(x, settings)
                (_, found_k, _), = r.chosen
                labels = r.labels[clustering.clustering_name(algorithm, found_k)]
                out[f"{name}/{algorithm}/{embedding}/k{k}"] = [found_k, sorted(set(labels.tolist())), r.suggested_k,
                                                               r.messages, float(np.abs(r.coords).max())]
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
    assert len(results) == 3 * 2 * 2 * 2
    for key, value in results.items():
        n_clusters, labels, suggested_k, messages, spread = value
        assert n_clusters == 1 and labels == [0] and suggested_k == 1 and spread == 0.0, (key, value)  # at the origin
        what = "zero (no positive relevance)" if key.startswith("zeros") else "identical"
        assert messages == [f"all 40 descriptors are {what}: nothing to tell apart, one cluster"], (key, messages)


def test_non_finite_descriptors_are_zeroed_or_refused_and_k_is_capped_by_distinct_maps():
    x, truth = blobs(3, per=10)
    x[[2, 5]] = np.nan
    found = clustering.cluster_points(x, _settings(ks=(3,)))
    assert found.messages == ["2 descriptor(s) held NaN or infinite values and were set to zero"]
    assert np.isfinite(found.descriptors).all() and not found.descriptors[[2, 5]].any()
    kept = np.setdiff1d(np.arange(30), [2, 5])   # the damaged rows say nothing; the others still cluster
    assert adjusted_rand_score(truth[kept], found.labels["kmeans_k3"][kept]) == pytest.approx(1.0)
    for call in (lambda: clustering.knn_graph(x, 5), lambda: clustering.checked_descriptors(x)):
        with pytest.raises(ValueError, match="descriptors hold NaN or inf"):
            call()
    three = np.repeat(np.eye(16, dtype=np.float32)[:3], 8, axis=0)  # 24 maps, 3 different ones
    for algorithm in clustering.ALGORITHMS:
        found = clustering.cluster_points(three, _settings(ks=(6,), algorithms=(algorithm,)))
        assert found.chosen == [(algorithm, 3, "given")] and sorted(set(found.labels[f"{algorithm}_k3"])) == [0, 1, 2]
        assert found.messages == ["only 3 different descriptors: 3 clusters instead of 6"]
