"""One scope clustered by the engine (graph, spectrum, clusterings, layout), then summarised: per-cluster
summaries, prototypes and the suspicion calibrated against random partitions."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from analysis.explore import clustering
from analysis.explore.clustering import ClusteringSettings, EmbeddingInfo, Progress


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


def summarize_points(found: clustering.PointsClustering, rows: pd.DataFrame, consensus: np.ndarray,
                     class_names: Sequence[str], settings: ClusteringSettings,
                     summary_descriptors: np.ndarray | None = None
                     ) -> tuple[pd.DataFrame, np.ndarray, list[dict[str, Any]]]:
    """(summary of every clustering, one row per (clustering, cluster), most suspicious first within each;
    their prototypes; one record per clustering: name, algorithm, k, k_from, n_clusters, calibration of its top
    cluster). A clustering on concepts is summarised with `summary_descriptors` (the positive maps), and each
    cluster names its strongest channels."""
    maps, shares = (found.descriptors, None) if summary_descriptors is None else \
        (summary_descriptors, found.descriptors)
    summaries, prototype_blocks, records = [], [], []
    for algorithm, k, source in found.chosen:
        name = clustering.clustering_name(algorithm, k)
        labels = found.labels[name]
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
    return (pd.concat(summaries, ignore_index=True), np.concatenate(prototype_blocks).astype(np.float32),
            records)


def cluster_scope(scope: str, ids: np.ndarray, descriptors: np.ndarray, rows: pd.DataFrame,
                  consensus: np.ndarray, class_names: Sequence[str], settings: ClusteringSettings,
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
    ids = np.asarray(ids, dtype=np.int64)
    found = clustering.cluster_points(descriptors, settings, threads, progress, init, overwrite_descriptors)
    (progress or (lambda message: None))("summaries")
    started = time.perf_counter()
    summary, prototypes, records = summarize_points(found, rows.reset_index(drop=True), consensus, class_names,
                                                    settings, summary_descriptors)
    timings = {**found.timings, "summaries": round(time.perf_counter() - started, 3)}
    return ScopeResult(scope=scope, ids=ids, coords=found.coords, labels=found.labels, clusterings=records,
                       summary=summary, prototypes=prototypes, eigenvalues=found.eigenvalues,
                       suggested_k=found.suggested_k, messages=found.messages, embedding=found.embedding,
                       knn_method=found.knn_method, n_components=found.n_components, timings=timings)
