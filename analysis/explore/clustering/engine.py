"""The clustering engine: one set of descriptors -> kNN graph, spectrum and eigengap, every requested clustering,
and the 2-D layout. The offline run calls it once per scope (every image of it, analysis.explore.cluster_offline),
the Clusters page once per selection it re-clusters (analysis.explore.cluster_data.recluster_selection)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse.csgraph import connected_components

from analysis.explore.clustering.graph import check_descriptors, distinct_rows, geometry, knn_graph
from analysis.explore.clustering.labels import clustering_name, kmeans_labels, spectral_labels
from analysis.explore.clustering.layout import EmbeddingInfo, line_layout, spectral_layout, tsne_layout
from analysis.explore.clustering.settings import ClusteringSettings, Progress
from analysis.explore.clustering.spectrum import graph_spectrum, suggest_k


@dataclass
class PointsClustering:
    """What the engine found for one set of points."""

    descriptors: np.ndarray                     # float32 [n, P], as given but with NaN / inf rows zeroed
    labels: dict[str, np.ndarray]               # clustering name ("kmeans_k7") -> int64 [n], 0 = largest cluster
    chosen: list[tuple[str, int, str]]          # (algorithm, k, where k came from: eigengap, given, single)
    coords: np.ndarray                          # float32 [n, 2]
    eigenvalues: np.ndarray                     # the smallest eigenvalues of the graph's normalised Laplacian
    suggested_k: int
    messages: list[str]
    embedding: EmbeddingInfo
    knn_method: str = "none"
    n_components: int = 1
    timings: dict[str, float] = field(default_factory=dict)


class _Clock:
    """Seconds of each step, for the stored timings."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._last, 3)
        self._last = now


def chosen_ks(settings: ClusteringSettings, suggested: int, n: int, distinct: int
              ) -> tuple[list[tuple[str, int, str]], list[str]]:
    """(algorithm, k, source) of every clustering asked for, duplicates once: k 0 is the eigengap's; no k above
    the number of points or of different descriptors (k-means cannot find more groups), said in a message."""
    chosen, messages = [], []
    for algorithm in settings.algorithms:
        for k in settings.ks:
            k, source = (suggested, "eigengap") if k == 0 else (int(min(k, n)), "given")
            if 0 < distinct < k:
                messages.append(f"only {distinct} different descriptors: {distinct} clusters instead of {k}")
                k = distinct
            if all((a, kk) != (algorithm, k) for a, kk, _ in chosen):
                chosen.append((algorithm, k, source))
    return chosen, list(dict.fromkeys(messages))


def _one_cluster(x: np.ndarray, settings: ClusteringSettings, messages: list[str]) -> PointsClustering:
    """Fewer than 3 points, or all alike: one cluster, on a line (few) or at the origin (alike)."""
    n = len(x)
    if n < 3:
        messages.append(f"{n} image(s): too few to cluster, one cluster")
    chosen = [(algorithm, 1, "single") for algorithm in settings.algorithms]
    labels = {clustering_name(a, k): np.zeros(n, np.int64) for a, k, _ in chosen}
    coords = line_layout(n) if n < 3 else np.zeros((n, 2), np.float32)
    return PointsClustering(x, labels, chosen, coords, np.zeros(min(n, 1)), 1, messages,
                            EmbeddingInfo("none" if n >= 3 else "line", 0, 0, 0, 0.0))


def cluster_points(descriptors: np.ndarray, settings: ClusteringSettings, threads: int | None = None,
                   progress: Progress | None = None, init: np.ndarray | None = None,
                   overwrite: bool = False) -> PointsClustering:
    """Cluster descriptors [n, P] (rows with NaN or inf are zeroed, with a message): the kNN graph in the
    settings' metric, the spectrum of its normalised Laplacian (per connected component) and the eigengap's k,
    each asked clustering, and the layout (`init` [n, 2]: a layout to start t-SNE from, see `tsne_layout`).
    `overwrite`: the descriptors (float32) may be used as working memory -- they are scaled for the cosine
    metric and scaled back (a million images' worth is a GiB)."""
    say = progress or (lambda message: None)
    clock = _Clock()
    x, messages, degenerate = check_descriptors(descriptors)
    if not overwrite and x is descriptors:
        x = x.copy()
    n = len(x)
    if n < 3 or degenerate:
        return _one_cluster(x, settings, messages)
    say("kNN graph")
    norms = np.linalg.norm(x, axis=1).astype(np.float32)
    points = geometry(x, settings.metric, in_place=True)       # x is the points until it is scaled back
    graph = knn_graph(points, settings.n_neighbors, settings.seed, threads)
    adjacency = graph.adjacency()
    clock.lap("knn")
    say("spectrum")
    count = min(settings.max_k + 1, n)
    need_vectors = "spectral" in settings.algorithms or settings.embedding == "spectral"
    solve = min(max(count, max(settings.ks), 3), n) if need_vectors else count
    eigenvalues, vectors = graph_spectrum(adjacency, solve, with_vectors=need_vectors)
    suggested = suggest_k(eigenvalues[:count], settings.max_k, n)
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    clock.lap("spectrum")
    chosen, capped = chosen_ks(settings, suggested, n, distinct_rows(points))
    labels = {}
    for algorithm, k, _ in chosen:
        say(f"{algorithm}, k = {k}")
        labels[clustering_name(algorithm, k)] = (spectral_labels(vectors, degree, k) if algorithm == "spectral"
                                                 else kmeans_labels(points, k, settings.seed))
    clock.lap("clusters")
    if settings.embedding == "spectral":
        coords, embedding = spectral_layout(vectors, degree), EmbeddingInfo("spectral", n, 0, 0, 0.0)
    else:
        coords, embedding = tsne_layout(points, graph, settings.seed, threads, settings.embed_max, init=init,
                                        progress=say)
    clock.lap("embedding")
    if points is x and settings.metric == "cosine":
        x *= np.where(norms > 0, norms, 1.0)[:, None]          # back to the unit-mass descriptors
    return PointsClustering(x, labels, chosen, np.asarray(coords, np.float32),
                            np.asarray(eigenvalues[:count], np.float64), int(suggested), messages + capped, embedding,
                            graph.method, int(connected_components(adjacency, directed=False)[0]), clock.timings)
