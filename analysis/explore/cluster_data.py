"""The Clusters page's data layer: the live clustering of a cache (computed once per settings and state, saved
in CACHE/dashboard/), its per-cluster summaries and prototypes, and the members of a cluster, most telling
first. The report (analysis/explore/report.py) uses it too. No streamlit here."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.cache import DASHBOARD_DIR, Cache
from analysis.cache.classes import class_names, num_classes
from analysis.cache.identity import cache_state
from analysis.explore import clustering, overlay, statistics as explore

RESULTS_DIR_NAME = DASHBOARD_DIR      # clustering results are saved in CACHE/dashboard/


def result_path(cache: Cache, settings: clustering.ClusteringSettings) -> Path:
    return Path(cache.root) / RESULTS_DIR_NAME / f"clustering-{settings.digest(cache_state(cache))}.parquet"


def scope_sample(cache: Cache, settings: clustering.ClusteringSettings) -> tuple[np.ndarray, int]:
    """(ids to cluster, scope size): the scope's ids, a seeded uniform sample of max_points when larger."""
    ids = clustering.scope_ids(cache.table, settings.scope, settings.class_index)
    rows = explore.sample_rows(len(ids), settings.max_points, settings.seed)
    return ids[rows], int(len(ids))


def cluster_cache(cache: Cache, settings: clustering.ClusteringSettings,
                  save: bool = True) -> clustering.ClusteringResult:
    """The clustering of a cache for `settings`: read from CACHE/dashboard/ when saved before, else computed and
    saved there (a read-only cache directory only costs the saving)."""
    settings.validate()
    path = result_path(cache, settings)
    saved = clustering.load_result(path)
    if saved is not None and saved.settings == settings:
        return saved
    ids, scope_size = scope_sample(cache, settings)
    result = clustering.run_clustering(ids, cache.descriptors(ids, settings.descriptor), settings, scope_size)
    if save:
        try:
            clustering.save_result(path, result)
        except OSError:
            pass  # e.g. a cache on a read-only mount: the result is still returned, just not kept
    return result


def class_consensus_of(cache: Cache, kind: str = "positive") -> np.ndarray:
    """[C, P] consensus map of each class over the whole cache (see explore.class_consensus)."""
    table = cache.table
    return explore.class_consensus(cache.descriptors(None, kind), table["pred"].to_numpy(np.int64),
                                   table["correct"].to_numpy(bool), num_classes(cache))


def summarize(cache: Cache, result: clustering.ClusteringResult,
              consensus: np.ndarray | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-cluster summary (most suspicious first) and prototypes [n_clusters, D*D] of a clustering (a clustering
    on concepts is summarised with the positive maps, and its summary names each cluster's concepts)."""
    kind = clustering.summary_descriptor_kind(result.settings.descriptor)
    if consensus is None:
        consensus = class_consensus_of(cache, kind)
    rows = cache.table.set_index("id").loc[result.ids].reset_index()
    shares = cache.descriptors(result.ids, "concepts") if result.settings.descriptor == "concepts" else None
    return clustering.summarize_clusters(result.labels, rows, cache.descriptors(result.ids, kind), consensus,
                                         class_names(cache), concept_shares=shares)


def prototype_tile(prototype: np.ndarray, size: int) -> np.ndarray:
    side = int(round(np.sqrt(prototype.size)))
    return overlay.heat(np.asarray(prototype).reshape(side, side), size)


def cluster_label(cluster: int) -> str:
    return "noise" if cluster < 0 else f"C{cluster}"


def members_by_suspicion(cache: Cache, result: clustering.ClusteringResult, cluster: int,
                         limit: int | None = None) -> np.ndarray:
    """Ids of a cluster's images, mistakes first and then by background share (the most telling first)."""
    ids = result.ids[result.labels == cluster]
    rows = cache.table.set_index("id").loc[ids]
    order = rows.assign(_wrong=~rows["correct"], _bg=rows["background_share"].fillna(rows["border_share"]))
    order = order.sort_values(["_wrong", "_bg"], ascending=[False, False], kind="stable")
    out = order.index.to_numpy(np.int64)
    return out if limit is None else out[:limit]


LIVE_MAX = 5000     # a selection re-clustered on the page: the exact kNN graph and t-SNE take seconds up to this
LIVE_MIN = 20       # fewer images than this: nothing worth clustering


def recluster_selection(cache: Cache, ids: np.ndarray, n_clusters: int = 0, algorithm: str = "kmeans",
                        seed: int = 0, descriptor: str = "positive"
                        ) -> tuple[clustering.ClusteringResult, pd.DataFrame, np.ndarray]:
    """Live re-clustering of a selection (a box or a cluster of the offline results, LIVE_MIN..LIVE_MAX images):
    every image of it clustered again on its own (on `descriptor`, the offline clustering's), with its own
    eigengap (n_clusters 0) and layout, and summarised as the offline clusters are (summary most suspicious
    first, prototypes). ValueError outside the size range."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if not LIVE_MIN <= len(ids) <= LIVE_MAX:
        raise ValueError(f"a selection of {LIVE_MIN:,} to {LIVE_MAX:,} images can be re-clustered here, not "
                         f"{len(ids):,}: drag a smaller box, or run `python -m analysis cluster` for a scope")
    settings = clustering.ClusteringSettings(scope="all", algorithm=algorithm, n_clusters=int(n_clusters),
                                             max_points=len(ids), seed=seed, descriptor=descriptor)
    result = clustering.run_clustering(ids, cache.descriptors(ids, settings.descriptor), settings, len(ids))
    summary, prototypes = summarize(cache, result)
    return result, summary, prototypes
