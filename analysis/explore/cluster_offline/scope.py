"""One scope clustered: graph, spectrum, clusterings, layout, summaries and calibrated suspicion."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from analysis.explore import clustering
from analysis.explore.cluster_offline.settings import OfflineSettings, Progress
from analysis.explore.cluster_offline.graph import (check_descriptors, geometry, kmeans_labels, knn_graph,
                                                    spectral_labels)
from analysis.explore.cluster_offline.tsne import EmbeddingInfo, _line_layout, tsne_layout


SUMMARY_ROW_COLUMNS = ["id", "label", "pred", "correct", *clustering.SUMMARY_SCORES]


@dataclass
class ScopeResult:
    """Everything stored for one scope of one run."""

    scope: str
    ids: np.ndarray                      # int64 [n]
    coords: np.ndarray                   # float32 [n, 2]
    labels: dict[str, np.ndarray]        # clustering name -> int64 [n]
    clusterings: list[dict[str, Any]]    # name, algorithm, k, k_from, calibration (top cluster)
    summary: pd.DataFrame                # one row per (clustering, cluster)
    prototypes: np.ndarray               # float32 [len(summary), P], row i = summary row i
    eigenvalues: np.ndarray
    suggested_k: int
    messages: list[str]
    embedding: EmbeddingInfo
    knn_method: str
    n_components: int
    timings: dict[str, float] = field(default_factory=dict)


def clustering_name(algorithm: str, k: int) -> str:
    return f"{algorithm}_k{k}"


def cluster_scope(scope: str, ids: np.ndarray, descriptors: np.ndarray, rows: pd.DataFrame,
                  consensus: np.ndarray, class_names: Sequence[str], settings: OfflineSettings,
                  threads: int | None = None, progress: Progress | None = None,
                  init: np.ndarray | None = None, overwrite_descriptors: bool = False,
                  summary_descriptors: np.ndarray | None = None) -> ScopeResult:
    """Cluster one scope: `ids` [n] with their `descriptors` [n, P] and table `rows` (same order); `init`
    [n, 2]: the scope's points in the all-images layout, to start t-SNE from (see `tsne_layout`).
    `overwrite_descriptors`: the descriptors (float32) may be used as working memory (a million images' worth
    is a GiB). `summary_descriptors` [n, D*D]: the spatial descriptors that summarise the clusters when the
    clustered ones are not spatial (the concepts descriptor: prototypes and suspicion from the positive maps,
    and each cluster's concept mix from `descriptors`)."""
    settings.validate()
    say = progress or (lambda message: None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    x, messages, degenerate = check_descriptors(descriptors)
    if not overwrite_descriptors and x is descriptors:
        x = x.copy()
    rows = rows.reset_index(drop=True)
    if n < 3 or degenerate:
        if n < 3:
            messages.append(f"{n} image(s): too few to cluster, one cluster")
        labels_one = np.zeros(n, np.int64)
        graph = None
        eigenvalues, suggested, n_components = np.zeros(min(n, 1)), 1, 1
        wanted = [(algorithm, 1, "single") for algorithm in settings.algorithms]
        coords = _line_layout(n) if n < 3 else np.zeros((n, 2), np.float32)
        embedding = EmbeddingInfo("none" if n >= 3 else "line", 0, 0, 0, 0.0)
        labels_by = {clustering_name(a, k): labels_one for a, k, _ in wanted}
        knn_method = "none"
    else:
        say("kNN graph")
        norms = np.linalg.norm(x, axis=1).astype(np.float32)
        points = geometry(x, settings.metric, in_place=True)     # x is the points until the summaries
        graph = knn_graph(points, settings.n_neighbors, settings.seed, threads)
        knn_method = graph.method
        adjacency = graph.adjacency()
        lap("knn")
        say("spectrum")
        from scipy.sparse.csgraph import connected_components

        n_components = int(connected_components(adjacency, directed=False)[0])
        count = min(settings.max_k + 1, n)
        need_vectors = "spectral" in settings.algorithms or settings.embedding == "spectral"
        solve = min(max(count, max(settings.ks), 3), n) if need_vectors else count
        eigenvalues, vectors = clustering.graph_spectrum(adjacency, solve, with_vectors=need_vectors)
        eigenvalues = eigenvalues[:count]
        suggested = clustering.suggest_k(eigenvalues, settings.max_k, n)
        degree = np.asarray(adjacency.sum(axis=1)).ravel()
        lap("spectrum")
        wanted = []
        for algorithm in settings.algorithms:
            for k in settings.ks:
                chosen_k, source = (suggested, "eigengap") if k == 0 else (int(min(k, n)), "given")
                if all((a, kk) != (algorithm, chosen_k) for a, kk, _ in wanted):
                    wanted.append((algorithm, chosen_k, source))
        labels_by = {}
        for algorithm, k, _ in wanted:
            say(f"{algorithm}, k = {k}")
            labels_by[clustering_name(algorithm, k)] = (spectral_labels(vectors, degree, k) if algorithm == "spectral"
                                                        else kmeans_labels(points, k, settings.seed))
        lap("clusters")
        if settings.embedding == "spectral":
            scaled = vectors[:, 1:3] / np.sqrt(np.maximum(degree, 1e-12))[:, None]
            coords = np.zeros((n, 2), np.float32)
            coords[:, :scaled.shape[1]] = scaled
            embedding = EmbeddingInfo("spectral", n, 0, 0, 0.0)
        else:
            coords, embedding = tsne_layout(points, graph, settings.seed, threads, settings.embed_max, init=init,
                                            progress=say)
        lap("embedding")
        if points is x and settings.metric == "cosine":
            x *= np.where(norms > 0, norms, 1.0)[:, None]        # back to the unit-mass descriptors
        del points

    say("summaries")
    maps, shares = (x, None) if summary_descriptors is None else (summary_descriptors, x)
    summaries, prototype_blocks, records = [], [], []
    for algorithm, k, source in wanted:
        name = clustering_name(algorithm, k)
        labels = labels_by[name]
        summary, prototypes = clustering.summarize_clusters(labels, rows, maps, consensus, list(class_names),
                                                            concept_shares=shares)
        calibration = clustering.calibrate_suspicion(labels, rows, maps, consensus, settings.null_partitions,
                                                     settings.seed)
        summary = summary.merge(calibration.frame(), on="cluster", how="left")
        summary.insert(0, "clustering", name)
        summaries.append(summary)
        prototype_blocks.append(prototypes)
        records.append({"name": name, "algorithm": algorithm, "k": int(k), "k_from": source,
                        "n_clusters": int(len(summary)), "calibration": calibration.top()})
    lap("summaries")
    return ScopeResult(scope=scope, ids=ids, coords=np.asarray(coords, np.float32), labels=labels_by,
                       clusterings=records, summary=pd.concat(summaries, ignore_index=True),
                       prototypes=np.concatenate(prototype_blocks).astype(np.float32),
                       eigenvalues=np.asarray(eigenvalues, np.float64), suggested_k=int(suggested),
                       messages=messages, embedding=embedding, knn_method=knn_method,
                       n_components=int(n_components), timings=timings)
