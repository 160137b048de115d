"""The Clusters page's live driver of the clustering engine and its helpers: a selection (a box or a cluster of
the stored offline results) re-clustered on a click, through the engine and the summaries the offline run uses;
the members of a cluster, most telling first; prototype tiles and cluster names. The stored clusterings
themselves are read with analysis.explore.cluster_offline (read_clustering, default_clustering). No streamlit."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from analysis.cache import Cache
from analysis.cache.classes import class_names, num_classes
from analysis.explore import clustering, statistics as explore
from analysis.explore.cluster_offline import SUMMARY_ROW_COLUMNS, read_class_aggregates, summarize_points

LIVE_MAX = 5000     # a selection re-clustered on the page: the exact kNN graph and t-SNE take seconds up to this
LIVE_MIN = 20       # fewer images than this: nothing worth clustering


@dataclass
class Reclustering:
    """A selection clustered again on its own (one algorithm, one k)."""

    ids: np.ndarray              # int64 [n], ascending
    labels: np.ndarray           # int64 [n], 0 = the largest cluster
    embedding: np.ndarray        # float32 [n, 2]
    eigenvalues: np.ndarray
    suggested_k: int
    n_clusters: int
    settings: clustering.ClusteringSettings
    note: str = ""               # what the page should say about the input (identical maps, damaged rows)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"id": self.ids, "cluster": self.labels,
                             "x": self.embedding[:, 0], "y": self.embedding[:, 1]})


def class_consensus_of(cache: Cache, kind: str = "positive") -> np.ndarray:
    """[C, P] consensus map of each class over the whole cache: the stored one (`python -m analysis cluster`
    writes it), else computed from every descriptor (see explore.class_consensus)."""
    stored = read_class_aggregates(cache)
    if stored is not None and kind in stored.consensus:
        return stored.consensus[kind]
    table = cache.table
    return explore.class_consensus(cache.descriptors(None, kind), table["pred"].to_numpy(np.int64),
                                   table["correct"].to_numpy(bool), num_classes(cache))


def cluster_label(cluster: int) -> str:
    return "noise" if cluster < 0 else f"C{cluster}"


def members_by_suspicion(cache: Cache, ids: np.ndarray, limit: int | None = None) -> np.ndarray:
    """The ids of a cluster's images, mistakes first and then by background share (the most telling first)."""
    rows = cache.table.set_index("id").loc[np.asarray(ids, np.int64)]
    order = rows.assign(_wrong=~rows["correct"], _bg=rows["background_share"].fillna(rows["border_share"]))
    order = order.sort_values(["_wrong", "_bg"], ascending=[False, False], kind="stable")
    out = order.index.to_numpy(np.int64)
    return out if limit is None else out[:limit]


def recluster_selection(cache: Cache, ids: np.ndarray, n_clusters: int = 0, algorithm: str = "kmeans",
                        seed: int = 0, descriptor: str = "positive"
                        ) -> tuple[Reclustering, pd.DataFrame, np.ndarray]:
    """Live re-clustering of a selection (LIVE_MIN..LIVE_MAX images) through the engine the offline run uses
    (its default settings, on `descriptor`, the offline clustering's): every image of it clustered again on its
    own, with its own eigengap (n_clusters 0) and t-SNE layout, and summarised as the offline clusters are
    (summary most suspicious first, prototypes). ValueError outside the size range or for a bad setting."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if not LIVE_MIN <= len(ids) <= LIVE_MAX:
        raise ValueError(f"a selection of {LIVE_MIN:,} to {LIVE_MAX:,} images can be re-clustered here, not "
                         f"{len(ids):,}: drag a smaller box, or run `python -m analysis cluster` for a scope")
    settings = clustering.ClusteringSettings(descriptor=descriptor, algorithms=(algorithm,),
                                             ks=(max(int(n_clusters), 0),), seed=seed, null_partitions=0)
    replace(settings, ks=(0,)).validate()     # k = 1 (one cluster) is fine here: the page's menu offers it
    found = clustering.cluster_points(cache.descriptors(ids, descriptor), settings, threads=1)
    kind = clustering.summary_descriptor_kind(descriptor)
    maps = None if kind == descriptor else cache.descriptors(ids, kind)
    rows = cache.columns(SUMMARY_ROW_COLUMNS).set_index("id").loc[ids].reset_index()
    summary, prototypes, records = summarize_points(found, rows, class_consensus_of(cache, kind), class_names(cache),
                                                    settings, maps)
    name, note = records[0]["name"], "; ".join(found.messages)
    result = Reclustering(ids=ids, labels=found.labels[name], embedding=found.coords, eigenvalues=found.eigenvalues,
                          suggested_k=found.suggested_k, n_clusters=records[0]["n_clusters"], settings=settings,
                          note=f"{note[:1].upper()}{note[1:]}." if note else "")
    return result, summary.drop(columns="clustering"), prototypes
