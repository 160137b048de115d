"""Offline clustering of every image of a cache, per scope (the SpRAy analysis at dataset scale).

SpRAy (Lapuschkin et al., "Unmasking Clever Hans predictors", Nature Communications 2019) clusters the
explanations of every image of a class offline and ranks the clusters; CoRelAy/ViRelAy keep several clusterings
side by side for a viewer that only reads. This module does that for every scope of a cache -- all images, the
mistakes, each true class (`true:<class>`) and each predicted class (`pred:<class>`: what did the model look at
when it said "bag"?) -- over every image, no sampling:

1. kNN graph of the descriptors (Euclidean): exact blocked search for small scopes, pynndescent's approximate
   search (Dong et al. 2011) above `EXACT_KNN_MAX` points. Its symmetrised 0/1 adjacency is shared by the steps
   below.
2. Spectrum of the graph's normalised Laplacian, solved per connected component (analysis.clustering's
   `graph_spectrum`): the eigengap suggests k; the eigenvectors are the spectral embedding.
3. Clusters for every requested algorithm and k together: `spectral` = cluster_qr (Damle et al. 2019, as
   scikit-learn's spectral clustering with assign_labels="cluster_qr") on the shared eigenvectors, `kmeans` on
   the descriptors.
4. A 2-D layout of every point: openTSNE's FFT-accelerated t-SNE (Linderman et al. 2019; Policar et al. 2024)
   with uniform affinities on the same kNN graph (Boehm, Berens, Kobak, JMLR 2022: a uniform kernel on the
   k = 15 nearest neighbours gives nearly the embedding of perplexity 30), PCA initialisation (Kobak &
   Linderman 2021). Above `embed_max` points (ours): t-SNE of a seeded uniform subsample, every other point
   placed at the mean position of its embedded nearest neighbours, then a few iterations of t-SNE on all
   points from there.
5. Per-cluster summaries and prototypes (analysis.clustering.summarize_clusters) and the suspicion calibrated
   against random partitions of the scope into groups of the same sizes (analysis.clustering's
   `calibrate_suspicion`, ours).
6. Optionally (`verify_scope`), the causal shortcut test (analysis.shortcut_test) on the top clusters, with the
   verdict rule documented at `verdict`.

Each scope is written atomically under CACHE/analysis/clustering/<run>/<scope>/ (Parquet tables, NumPy arrays,
JSON metadata holding the cache's content fingerprint), so a killed run keeps its finished scopes and a result
computed on an older state of the cache is detected and ignored. `class_aggregates` streams the cache once for
the per-class mean maps. The reading side is `StoredClustering` (through `Cache.clustering`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import sparse

from analysis import clustering, explore
from analysis.cache import ANALYSIS_DIR

RESULTS_DIR = ANALYSIS_DIR               # CACHE/analysis/
CLUSTERING_DIR = "clustering"            # CACHE/analysis/clustering/<run>/<scope>/
CLASS_MAPS_FILE = "class_maps.parquet"   # CACHE/analysis/class_maps.parquet
TMP_PREFIX = ".tmp-"
SCOPE_PREFIX = "scope-"
FORMAT_VERSION = 1

ALGORITHMS = ("kmeans", "spectral")
EMBEDDINGS = ("tsne", "spectral")
METRICS = ("cosine", "euclidean")
DESCRIPTOR_KINDS = clustering.DESCRIPTOR_KINDS
SCOPE_GROUPS = ("all", "mistakes", "true", "pred")   # "true" / "pred": one scope per class
DEFAULT_SCOPES = SCOPE_GROUPS
EXACT_KNN_MAX = 20_000       # scopes up to this size get an exact kNN graph (faster than pynndescent there)
DENSITY_BINS = 256
TOP_TO_VERIFY = 3
BH_MAX = 4_000               # t-SNE below this many points: Barnes-Hut gradient (measured faster than FFT here)
THREADED_MIN = 20_000        # t-SNE below this many points runs on one thread
OPENTSNE_MIN = 1_000         # t-SNE below this many points: the dashboard's live one (scikit-learn)
REFINE_ITERATIONS = 150      # t-SNE of a scope started from the all-images layout
MAX_K = 100                  # spectral clustering keeps n x k eigenvector entries in memory
# Options of the explain job that may change when it resumes (analysis.job.RUNTIME_OPTIONS; a test keeps the
# two equal): they change no stored number, so they are not part of the cache's content fingerprint.
RUNTIME_OPTIONS = ("batch_size", "device", "workers")

Progress = Callable[[str], None]


class ClusteringInputError(ValueError):
    """A request that cannot be served (unknown scope or class, bad setting); the message is one line."""


# ----------------------------------------------------------------------------------------------------------
# Settings and scopes
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OfflineSettings:
    """Everything that changes the numbers of an offline clustering run (its key names the run's folder)."""

    descriptor: str = "positive"
    metric: str = "cosine"              # geometry of the kNN graph, k-means and t-SNE (summaries use the maps)
    algorithms: tuple[str, ...] = ALGORITHMS
    ks: tuple[int, ...] = (0,)          # 0: the eigengap's suggestion
    n_neighbors: int = 15
    embedding: str = "tsne"
    seed: int = 0
    max_k: int = 12                     # the eigengap looks at k in [2, max_k]
    embed_max: int = 250_000            # t-SNE on at most this many points of a scope (the rest are placed)
    null_partitions: int = 100          # random partitions of the suspicion's null

    def validate(self) -> None:
        def fail(message: str) -> None:
            raise ClusteringInputError(message)

        if self.descriptor not in DESCRIPTOR_KINDS:
            fail(f"descriptor must be one of {', '.join(DESCRIPTOR_KINDS)}, not {self.descriptor!r}")
        if self.metric not in METRICS:
            fail(f"metric must be one of {', '.join(METRICS)}, not {self.metric!r}")
        if not self.algorithms or any(a not in ALGORITHMS for a in self.algorithms):
            fail(f"algorithms must be among {', '.join(ALGORITHMS)} (agglomerative and HDBSCAN need all pairwise "
                 f"distances and stay in the dashboard's live clustering of a selection), got {self.algorithms}")
        if not self.ks or any(k < 0 or k == 1 for k in self.ks):
            fail(f"k must be 0 (the eigengap's suggestion) or at least 2, got {self.ks}")
        if self.embedding not in EMBEDDINGS:
            fail(f"embedding must be one of {', '.join(EMBEDDINGS)}, not {self.embedding!r}")
        if self.n_neighbors < 2:
            fail(f"neighbours must be at least 2, got {self.n_neighbors}")
        if self.max_k < 2:
            fail(f"max k must be at least 2, got {self.max_k}")
        if max(self.ks) > MAX_K:
            fail(f"k must be at most {MAX_K}, got {max(self.ks)}")
        if self.embed_max < 1000:
            fail(f"embed max must be at least 1000, got {self.embed_max}")
        if self.null_partitions < 0:
            fail(f"null partitions must be >= 0, got {self.null_partitions}")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["algorithms"], out["ks"] = list(self.algorithms), list(self.ks)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OfflineSettings":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["algorithms"] = tuple(values.get("algorithms", ALGORITHMS))
        values["ks"] = tuple(int(k) for k in values.get("ks", (0,)))
        return cls(**values)

    def key(self) -> str:
        """Folder name of the run: readable settings plus a hash of all of them."""
        digest = hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.descriptor}-{self.metric}-nn{self.n_neighbors}-{self.embedding}-seed{self.seed}-{digest}"


def class_names_of(cache: Any) -> list[str]:
    """Class names by model output index (the manifest's, extended with numbers for any index beyond it)."""
    names = list(cache.manifest.get("class_names") or [])
    table = cache.columns(["label", "pred"])
    largest = int(max(table["label"].max(), table["pred"].max())) + 1 if len(table) else 0
    return names + [str(i) for i in range(len(names), largest)]


def expand_scopes(requested: Sequence[str], class_names: Sequence[str]) -> list[str]:
    """Scope names for a request: 'all', 'mistakes', 'true' (every 'true:<class>'), 'pred' (every
    'pred:<class>'), or single 'true:<class>' / 'pred:<class>'. ClusteringInputError for an unknown one."""
    out: list[str] = []
    for item in requested:
        if item in ("all", "mistakes"):
            names = [item]
        elif item in ("true", "pred"):
            names = [f"{item}:{name}" for name in class_names]
        else:
            kind, sep, name = item.partition(":")
            if not sep or kind not in ("true", "pred"):
                raise ClusteringInputError(f"unknown scope {item!r}: use all, mistakes, true, pred, true:CLASS or "
                                           "pred:CLASS")
            if name not in class_names:
                shown = ", ".join(list(class_names)[:20]) + (" ..." if len(class_names) > 20 else "")
                raise ClusteringInputError(f"scope {item!r}: {name!r} is not a class of the cache ({shown})")
            names = [item]
        out.extend(n for n in names if n not in out)
    return out


def scope_mask(table: pd.DataFrame, scope: str, class_names: Sequence[str]) -> np.ndarray:
    """bool [len(table)]: the rows of a scope."""
    if scope == "all":
        return np.ones(len(table), bool)
    if scope == "mistakes":
        return ~table["correct"].to_numpy(bool)
    kind, _, name = scope.partition(":")
    if kind not in ("true", "pred") or name not in class_names:
        raise ClusteringInputError(f"unknown scope {scope!r}")
    column = "label" if kind == "true" else "pred"
    return table[column].to_numpy(np.int64) == list(class_names).index(name)


def scope_folder(scope: str) -> str:
    """A file-system-safe, unique folder name for a scope (class names may hold any character)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", scope.replace(":", "-"))[:40]
    return f"{SCOPE_PREFIX}{slug}-{hashlib.sha1(scope.encode()).hexdigest()[:8]}"


def cache_fingerprint(cache: Any) -> str:
    """Identifies what a cache holds: its generation (the manifest's creation, model weights, dataset files,
    options) and the ids of its committed images. Results computed on another fingerprint are stale: an
    `--overwrite` or a resume that added shards changes it; a resume that added nothing does not."""
    manifest = cache.manifest
    identity = {
        "created": manifest.get("created"),
        "weights": (manifest.get("model") or {}).get("weights_sha256"),
        "spec": (manifest.get("model") or {}).get("spec"),
        "dataset": (manifest.get("dataset") or {}).get("fingerprint"),
        "options": {k: v for k, v in (manifest.get("options") or {}).items() if k not in RUNTIME_OPTIONS},
        "class_names": manifest.get("class_names"),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    digest.update(np.ascontiguousarray(cache.ids, dtype=np.int64).tobytes())
    return digest.hexdigest()[:24]


# ----------------------------------------------------------------------------------------------------------
# Method: input check, kNN graph, spectrum, clusters, embedding
# ----------------------------------------------------------------------------------------------------------

def geometry(x: np.ndarray, metric: str, in_place: bool = False) -> np.ndarray:
    """The points the kNN graph, k-means and t-SNE see: for "cosine", each descriptor scaled to unit length (a
    map without positive relevance stays zero), so that Euclidean distances are 2 - 2 cos. Cosine similarity
    compares where the relevance concentrates, whatever its spread -- the similarity the dashboard already uses
    between maps (explore.nearest_neighbours, the suspicion's unlike_class). `in_place` scales x itself (no
    second copy at a million images); `restore_geometry` undoes it."""
    if metric == "euclidean":
        return x
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    scale = np.where(norms > 0, norms, 1.0).astype(np.float32)
    if in_place:
        x /= scale
        return x
    return (x / scale).astype(np.float32)


def check_descriptors(x: np.ndarray) -> tuple[np.ndarray, list[str], bool]:
    """(descriptors with non-finite rows zeroed, messages, degenerate): degenerate when every row is the same
    (e.g. all maps empty) -- then there is nothing to cluster and the scope is one cluster."""
    x = np.asarray(x, dtype=np.float32)
    messages = []
    bad = ~np.isfinite(x).all(axis=1) if x.size else np.zeros(len(x), bool)
    if bad.any():
        x = x.copy()
        x[bad] = 0.0
        messages.append(f"{int(bad.sum())} descriptor(s) held NaN or infinite values and were set to zero")
    degenerate = len(x) > 0 and float(np.ptp(x, axis=0).max(initial=0.0)) == 0.0
    if degenerate and len(x) > 1:
        what = "zero (no positive relevance)" if not x[0].any() else "identical"
        messages.append(f"all {len(x)} descriptors are {what}: nothing to tell apart, one cluster")
    return x, messages, degenerate


@dataclass
class KnnGraph:
    """The k nearest neighbours of every point (self excluded), nearest first."""

    indices: np.ndarray      # int64 [n, k]
    distances: np.ndarray    # float32 [n, k]
    method: str              # "exact" or "pynndescent"

    def adjacency(self) -> sparse.csr_matrix:
        """Symmetric 0/1 graph: i ~ j when either is among the other's k nearest (no self loops)."""
        n, k = self.indices.shape
        rows = np.repeat(np.arange(n), k)
        graph = sparse.csr_matrix((np.ones(n * k), (rows, self.indices.ravel())), shape=(n, n))
        graph = graph.maximum(graph.T).tocsr()
        graph.setdiag(0)
        graph.eliminate_zeros()
        graph.data[:] = 1.0
        return graph


def _exact_knn(x: np.ndarray, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean kNN by blocks of squared distances (|a|^2 + |b|^2 - 2 a.b in float32, the k candidates'
    distances recomputed in float64 so near-ties are ordered by the true distance)."""
    n = len(x)
    squared = np.einsum("ij,ij->i", x, x, dtype=np.float64).astype(np.float32)
    indices = np.empty((n, k), np.int64)
    distances = np.empty((n, k), np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        d = squared[start:stop, None] + squared[None, :] - 2.0 * (x[start:stop] @ x.T)
        d[np.arange(stop - start), np.arange(start, stop)] = np.inf
        candidates = np.argpartition(d, k - 1, axis=1)[:, :k] if k < n - 1 else \
            np.argsort(d, axis=1)[:, :k]
        exact = np.linalg.norm(x[start:stop, None, :].astype(np.float64) - x[candidates].astype(np.float64), axis=2)
        order = np.argsort(exact, axis=1, kind="stable")
        indices[start:stop] = np.take_along_axis(candidates, order, axis=1)
        distances[start:stop] = np.take_along_axis(exact, order, axis=1)
    return indices, distances


def _approximate_knn(x: np.ndarray, k: int, seed: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    import pynndescent

    index = pynndescent.NNDescent(x, n_neighbors=k + 1, metric="euclidean", random_state=seed, n_jobs=threads,
                                  low_memory=True, compressed=True, verbose=False)
    found, distances = index.neighbor_graph
    del index
    return _without_self(found, distances)


def _without_self(found: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """k+1 neighbours per point as an approximate search returns them -> k, nearest first: each point itself
    dropped (not always in column 0 when it has exact duplicates; else the farthest one is), and missing entries
    (-1: too few found) replaced by the nearest one found."""
    n, k = found.shape[0], found.shape[1] - 1
    is_self = found == np.arange(n)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(found, dtype=bool)
    keep[np.arange(n), drop] = False
    found = found[keep].reshape(n, k).astype(np.int64)
    distances = distances[keep].reshape(n, k).astype(np.float32)
    missing = found < 0      # a point pynndescent found too few neighbours for: repeat its nearest one
    if missing.any():
        first = np.where(missing[:, :1], np.arange(n)[:, None], found[:, :1])
        found = np.where(missing, first, found)
        distances = np.where(missing, distances[:, :1], distances)
    return found, distances


def knn_graph(x: np.ndarray, n_neighbors: int, seed: int = 0, threads: int | None = None,
              exact_max: int = EXACT_KNN_MAX) -> KnnGraph:
    """k nearest neighbours of every row of x (k = min(n_neighbors, n - 1)): exact up to `exact_max` rows,
    pynndescent above (pays a one-off just-in-time compilation of about a minute per process)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    k = clustering.effective_neighbours(n, n_neighbors)
    if n <= exact_max:
        indices, distances = _exact_knn(x, k)
        return KnnGraph(indices, distances, "exact")
    indices, distances = _approximate_knn(x, k, seed, threads or os.cpu_count() or 1)
    return KnnGraph(indices, distances, "pynndescent")


def cluster_qr(vectors: np.ndarray) -> np.ndarray:
    """Labels from spectral vectors [n, k] by the column-pivoted QR of Damle, Minden, Ying (2019), as
    scikit-learn's SpectralClustering(assign_labels="cluster_qr"): deterministic, no k-means restarts."""
    from scipy.linalg import qr, svd

    k = vectors.shape[1]
    _, _, pivots = qr(vectors.T, pivoting=True, mode="economic")
    left, _, right = svd(vectors[pivots[:k], :].T)
    return np.abs(vectors @ (left @ right.conj())).argmax(axis=1)


def spectral_labels(vectors: np.ndarray, degree: np.ndarray, k: int) -> np.ndarray:
    """Spectral clustering into k groups from the graph's first k Laplacian eigenvectors (scaled by
    D^-1/2 as scikit-learn's spectral embedding does), relabelled by size."""
    k = int(min(k, vectors.shape[1]))
    if k <= 1:
        return np.zeros(len(vectors), np.int64)
    embedding = vectors[:, :k] / np.sqrt(np.maximum(degree, 1e-12))[:, None]
    return clustering.relabel_by_size(cluster_qr(embedding))


def kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means (one run from k-means++ seeding, scikit-learn's default), relabelled by size."""
    from sklearn.cluster import KMeans

    k = int(min(k, len(x)))
    if k <= 1:
        return np.zeros(len(x), np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # ConvergenceWarning for duplicate points: fewer distinct points than k
        labels = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(x)
    return clustering.relabel_by_size(labels)


@dataclass
class EmbeddingInfo:
    method: str
    embedded: int            # points optimised by t-SNE from the start
    placed: int              # points placed from their neighbours, then optimised with the rest
    iterations: int
    seconds: float


def _line_layout(n: int) -> np.ndarray:
    return np.column_stack([np.arange(n, dtype=np.float32), np.zeros(n, np.float32)])


def _place_from_neighbours(coords: np.ndarray, placed: np.ndarray, indices: np.ndarray,
                           rounds: int = 10) -> np.ndarray:
    """Positions of unplaced points: the mean position of their placed nearest neighbours, repeated so points
    whose neighbours are all unplaced get placed through them; any left over go to the centroid."""
    coords, placed = coords.copy(), placed.copy()
    for _ in range(rounds):
        todo = np.nonzero(~placed)[0]
        if not len(todo):
            break
        neighbours = indices[todo]
        known = placed[neighbours]
        count = known.sum(axis=1)
        ready = count > 0
        if not ready.any():
            break
        total = (coords[neighbours] * known[..., None]).sum(axis=1)
        coords[todo[ready]] = total[ready] / count[ready, None]
        placed[todo[ready]] = True
    if (~placed).any():
        coords[~placed] = coords[placed].mean(axis=0) if placed.any() else 0.0
    return coords


def tsne_layout(x: np.ndarray, graph: KnnGraph, seed: int = 0, threads: int | None = None,
                embed_max: int = 250_000, init: np.ndarray | None = None, polish_iterations: int = 100,
                progress: Progress | None = None) -> tuple[np.ndarray, EmbeddingInfo]:
    """2-D t-SNE coordinates [n, 2] of every point (see the module docstring for the method and its sources).

    `init` [n, 2]: a layout to start from (a scope's points in the all-images layout): it is shrunk to a
    standard deviation of 1e-4 (openTSNE's scale for initialisations; at the all-images scale the FFT grid, and
    so each iteration, is several times larger) and refined for REFINE_ITERATIONS without exaggeration, so the
    scope keeps the orientation of the all-images map. Measured on the 5,121 mistakes of the 70k demo cache: 42.3%
    of each point's 15 nearest neighbours are also its nearest in the plane after this, 43.0% after a full
    750-iteration t-SNE from PCA, at a fifth of the time. Below BH_MAX points the Barnes-Hut gradient runs, above
    it the FFT one (whose cost has a fixed part, about 15 ms an iteration, that dominates small scopes); below
    THREADED_MIN points one thread (thread start-up and contention cost more than they give there).
    """
    from openTSNE import TSNEEmbedding, affinity, initialization
    from openTSNE.nearest_neighbors import PrecomputedNeighbors

    started = time.perf_counter()
    n = len(x)
    threads = threads or os.cpu_count() or 1
    if n < 4:
        return _line_layout(n), EmbeddingInfo("line", n, 0, 0, 0.0)
    if n < OPENTSNE_MIN:
        # openTSNE's early exaggeration collapses a few dozen points to 0 (measured); the dashboard's live
        # t-SNE (scikit-learn, perplexity capped at (n - 1) / 3) is made for this size.
        coords = clustering.embed_2d(x, "tsne", seed=seed)
        return coords, EmbeddingInfo("tsne (scikit-learn)", n, 0, 1000, round(time.perf_counter() - started, 3))
    rng = np.random.default_rng(seed)
    subsample = n > embed_max
    chosen = np.sort(rng.choice(n, embed_max, replace=False)) if subsample else np.arange(n)
    if subsample:
        sub_graph = knn_graph(x[chosen], graph.indices.shape[1], seed, threads)
        indices, distances = sub_graph.indices, sub_graph.distances
    else:
        indices, distances = graph.indices, graph.distances

    def run(start: np.ndarray, neighbours: np.ndarray, neighbour_distances: np.ndarray,
            phases: list[tuple[int, float, float]], label: str) -> np.ndarray:
        small = len(start) < BH_MAX
        jobs = 1 if len(start) < THREADED_MIN else threads
        affinities = affinity.Uniform(knn_index=PrecomputedNeighbors(neighbours, neighbour_distances),
                                      symmetrize="max", n_jobs=jobs)
        embedding = TSNEEmbedding(np.ascontiguousarray(start, np.float64), affinities, n_jobs=jobs,
                                  random_state=seed, negative_gradient_method="bh" if small else "fft")
        total, done = sum(p[0] for p in phases), 0
        for iterations, exaggeration, momentum in phases:
            left = iterations
            while left > 0:   # in steps, to report progress (the optimiser keeps its state between calls)
                step = min(50, left)
                embedding = embedding.optimize(n_iter=step, exaggeration=exaggeration, momentum=momentum,
                                               inplace=True)
                left, done = left - step, done + step
                if progress:
                    progress(f"{label} {done}/{total}")
        return np.asarray(embedding, dtype=np.float64)

    start = None
    if init is not None and not subsample:
        start = np.array(init, np.float64) - np.mean(init, axis=0)
        spread = float(start.std(axis=0).max())
        start = start * (1e-4 / spread) if np.isfinite(spread) and spread > 0 else None   # else: all at one point
    refine_only = start is not None
    phases = [(REFINE_ITERATIONS, 1.0, 0.8)] if refine_only else [(250, 12.0, 0.5), (500, 1.0, 0.8)]
    if not refine_only:
        start = initialization.pca(x[chosen], random_state=seed)
    coords = run(start, indices, distances, phases, f"t-SNE of {len(chosen):,}" if subsample else "t-SNE")
    iterations = sum(p[0] for p in phases)
    if subsample:
        full = np.zeros((n, 2), np.float64)
        full[chosen] = coords
        placed = np.zeros(n, bool)
        placed[chosen] = True
        full = _place_from_neighbours(full, placed, graph.indices)
        if polish_iterations:
            full = run(full, graph.indices, graph.distances, [(polish_iterations, 1.0, 0.8)], "t-SNE, all points")
            iterations += polish_iterations
        coords = full
    info = EmbeddingInfo("tsne" if not refine_only else "tsne (from the all-images layout)", len(chosen),
                         n - len(chosen), iterations, round(time.perf_counter() - started, 3))
    return coords.astype(np.float32), info


# ----------------------------------------------------------------------------------------------------------
# Method: one scope
# ----------------------------------------------------------------------------------------------------------

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
                  init: np.ndarray | None = None, overwrite_descriptors: bool = False) -> ScopeResult:
    """Cluster one scope: `ids` [n] with their `descriptors` [n, P] and table `rows` (same order); `init`
    [n, 2]: the scope's points in the all-images layout, to start t-SNE from (see `tsne_layout`).
    `overwrite_descriptors`: the descriptors (float32) may be used as working memory (a million images' worth
    is a GiB)."""
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
    summaries, prototype_blocks, records = [], [], []
    for algorithm, k, source in wanted:
        name = clustering_name(algorithm, k)
        labels = labels_by[name]
        summary, prototypes = clustering.summarize_clusters(labels, rows, x, consensus, list(class_names))
        calibration = clustering.calibrate_suspicion(labels, rows, x, consensus, settings.null_partitions,
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


# ----------------------------------------------------------------------------------------------------------
# Machinery: storing a scope's result (atomic), finding and reading results
# ----------------------------------------------------------------------------------------------------------

def results_root(cache_root: Path | str) -> Path:
    return Path(cache_root) / RESULTS_DIR


def run_dir(cache_root: Path | str, settings: OfflineSettings) -> Path:
    return results_root(cache_root) / CLUSTERING_DIR / settings.key()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _remove_atomically(path: Path) -> None:
    """Rename away, then delete: a reader sees the whole folder or none of it."""
    doomed = path.with_name(f"{TMP_PREFIX}del-{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _density(coords: np.ndarray, bins: int = DENSITY_BINS) -> tuple[np.ndarray, list[float], list[float]]:
    """Point counts on a bins x bins grid over the layout's extent (the page draws it instead of a million
    marks), with the x and y ranges."""
    if len(coords) == 0:
        return np.zeros((bins, bins), np.int32), [0.0, 1.0], [0.0, 1.0]
    lo, hi = coords.min(axis=0).astype(np.float64), coords.max(axis=0).astype(np.float64)
    pad = np.where(hi > lo, (hi - lo) * 1e-6, 0.5)
    lo, hi = lo - pad, hi + pad
    counts, _, _ = np.histogram2d(coords[:, 0], coords[:, 1], bins=bins, range=[[lo[0], hi[0]], [lo[1], hi[1]]])
    return counts.astype(np.int32), [float(lo[0]), float(hi[0])], [float(lo[1]), float(hi[1])]


def write_scope_result(target_dir: Path, result: ScopeResult, settings: OfflineSettings, fingerprint: str) -> Path:
    """Write a scope's result as one folder, atomically (temporary folder, fsync, rename); an older result of
    the same scope (a stale one) is replaced."""
    from analysis.cache import _fsync_path, _save_npy, _save_parquet

    target_dir.mkdir(parents=True, exist_ok=True)
    final = target_dir / scope_folder(result.scope)
    tmp = target_dir / f"{TMP_PREFIX}{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        n = len(result.ids)
        # A seeded random order of the points: the page draws the first ones (plus every small cluster whole).
        sample_rank = np.empty(n, np.int32)
        sample_rank[np.random.default_rng(settings.seed).permutation(n)] = np.arange(n, dtype=np.int32)
        order = np.argsort(result.ids, kind="stable")
        columns = {"id": pa.array(result.ids[order], pa.int64()),
                   "x": pa.array(result.coords[order, 0], pa.float32()),
                   "y": pa.array(result.coords[order, 1], pa.float32()),
                   "sample_rank": pa.array(sample_rank[order], pa.int32())}
        for name, labels in result.labels.items():
            columns[name] = pa.array(np.asarray(labels, np.int32)[order], pa.int32())
        _save_parquet(tmp / "assignments.parquet", pa.table(columns))
        _save_parquet(tmp / "summary.parquet", pa.Table.from_pandas(result.summary, preserve_index=False))
        _save_npy(tmp / "prototypes.npy", result.prototypes.astype(np.float32))
        counts, x_range, y_range = _density(result.coords)
        _save_npy(tmp / "density.npy", counts)
        meta = {
            "format_version": FORMAT_VERSION, "scope": result.scope, "run": settings.key(),
            "settings": settings.as_dict(), "cache_fingerprint": fingerprint, "created": _now(), "n": int(n),
            "eigenvalues": [float(v) for v in result.eigenvalues], "suggested_k": int(result.suggested_k),
            "clusterings": result.clusterings, "messages": result.messages,
            "embedding": asdict(result.embedding), "knn": result.knn_method, "components": result.n_components,
            "density": {"bins": int(counts.shape[0]), "x_range": x_range, "y_range": y_range},
            "timings": result.timings,
        }
        with open(tmp / "meta.json", "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=1, default=_json_default)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_path(tmp)
        if final.exists():
            _remove_atomically(final)
        os.rename(tmp, final)
        _fsync_path(target_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        with open(folder / "meta.json", encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or "scope" not in meta:
        return None
    return meta


@dataclass
class StoredScope:
    """One stored scope result (a folder), without its tables."""

    path: Path
    meta: dict[str, Any]
    fresh: bool                  # computed on the cache as it is now

    @property
    def scope(self) -> str:
        return str(self.meta["scope"])

    @property
    def settings(self) -> OfflineSettings:
        return OfflineSettings.from_dict(self.meta.get("settings", {}))


def stored_scopes(cache_root: Path | str, fingerprint: str | None) -> list[StoredScope]:
    """Every readable stored scope result under CACHE/analysis/clustering/, newest first; `fresh` tells whether
    it was computed on `fingerprint` (None: treat none as fresh)."""
    base = results_root(cache_root) / CLUSTERING_DIR
    found = []
    if not base.is_dir():
        return found
    for run in sorted(base.iterdir()):
        if not run.is_dir() or run.name.startswith(TMP_PREFIX):
            continue
        for folder in sorted(run.iterdir()):
            if not folder.name.startswith(SCOPE_PREFIX) or not folder.is_dir():
                continue
            meta = _read_meta(folder)
            if meta is not None:
                found.append(StoredScope(folder, meta, meta.get("cache_fingerprint") == fingerprint))
    found.sort(key=lambda s: s.meta.get("created", ""), reverse=True)
    return found


class ClusteringNotFound(LookupError):
    """No stored clustering matches the request (the message says what there is)."""


class StoredClustering:
    """One stored clustering of one scope, read lazily (the page opens it in well under a second at a million
    images: the tables are read column by column when first used).

    Attributes: scope, name ("spectral_k7"), algorithm, k, k_from ("eigengap" or "given"), settings (the run's
    OfflineSettings), eigenvalues, suggested_k, calibration (how unusual the top cluster is: suspicion,
    null_max_mean, null_max_sd, z, p, partitions), messages, n (images), created.
    """

    def __init__(self, stored: StoredScope, record: dict[str, Any], choices: pd.DataFrame):
        meta = stored.meta
        self.path = stored.path
        self.meta = meta
        self.scope = str(meta["scope"])
        self.settings = stored.settings
        self.name = str(record["name"])
        self.algorithm = str(record["algorithm"])
        self.k = int(record["k"])
        self.k_from = str(record.get("k_from", "given"))
        self.calibration = dict(record.get("calibration") or {})
        self.eigenvalues = np.asarray(meta.get("eigenvalues", []), np.float64)
        self.suggested_k = int(meta.get("suggested_k", 1))
        self.messages = list(meta.get("messages", []))
        self.n = int(meta.get("n", 0))
        self.created = str(meta.get("created", ""))
        self.choices = choices     # every fresh clustering of this scope (to switch settings); see `choices_of`
        self._summary: pd.DataFrame | None = None
        self._prototypes: np.ndarray | None = None
        self._assignments: pd.DataFrame | None = None

    def __repr__(self) -> str:
        return f"StoredClustering({self.scope!r}, {self.name!r}, run={self.settings.key()!r}, n={self.n})"

    def _summary_rows(self) -> tuple[pd.DataFrame, np.ndarray]:
        frame = pq.read_table(self.path / "summary.parquet").to_pandas()
        rows = np.nonzero(frame["clustering"].to_numpy() == self.name)[0]
        return frame.iloc[rows].drop(columns="clustering").reset_index(drop=True), rows

    @property
    def summary(self) -> pd.DataFrame:
        """One row per cluster, most suspicious first: rank, cluster, size, accuracy, majority_class,
        majority_name, class_mix, background_share, background_hotspot, border_share, unlike_class, suspicion,
        suspicion_null, suspicion_null_sd, suspicion_z, suspicion_p."""
        if self._summary is None:
            self._summary, rows = self._summary_rows()
            self._prototypes = np.load(self.path / "prototypes.npy", mmap_mode="r")[rows].astype(np.float32)
        return self._summary

    @property
    def prototypes(self) -> np.ndarray:
        """float32 [clusters, D*D]: row i is the mean descriptor of the cluster in summary row i."""
        if self._prototypes is None:
            _ = self.summary
        return self._prototypes

    def _read_assignments(self, columns: list[str]) -> pd.DataFrame:
        return pq.read_table(self.path / "assignments.parquet", columns=columns).to_pandas()

    @property
    def assignments(self) -> pd.DataFrame:
        """One row per image of the scope, by id: id, cluster, x, y, sample_rank (a seeded random order for
        drawing a subsample)."""
        if self._assignments is None:
            frame = self._read_assignments(["id", self.name, "x", "y", "sample_rank"])
            self._assignments = frame.rename(columns={self.name: "cluster"})
        return self._assignments

    @property
    def verification(self) -> pd.DataFrame | None:
        """The causal test's results of the top clusters (see `verify_scope`), or None when not run."""
        path = self.path / "verification.parquet"
        if not path.is_file():
            return None
        try:
            frame = pq.read_table(path).to_pandas()
        except (OSError, pa.ArrowException):
            return None
        return frame[frame["clustering"] == self.name].drop(columns="clustering").reset_index(drop=True)

    def density(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(counts [bins, bins] over (x, y), x bin edges, y bin edges): every point, stored at write time."""
        counts = np.load(self.path / "density.npy")
        info = self.meta["density"]
        bins = counts.shape[0]
        return counts, np.linspace(*info["x_range"], bins + 1), np.linspace(*info["y_range"], bins + 1)

    def display_points(self, budget: int = 20_000, keep_whole: int | None = None) -> pd.DataFrame:
        """Rows of `assignments` to draw as marks: every cluster of at most `keep_whole` images (default: the
        budget / 20) whole, then the other images in the stored random order up to `budget` in all."""
        frame = self.assignments
        keep_whole = max(1, budget // 20) if keep_whole is None else keep_whole
        labels = frame["cluster"].to_numpy()
        values, counts = np.unique(labels, return_counts=True)
        small = np.isin(labels, values[counts <= keep_whole])
        rest = np.nonzero(~small)[0]
        room = max(0, budget - int(small.sum()))
        chosen = rest[np.argsort(frame["sample_rank"].to_numpy()[rest], kind="stable")[:room]]
        return frame.iloc[np.sort(np.concatenate([np.nonzero(small)[0], chosen]))].reset_index(drop=True)

    def ids_in_box(self, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
        """Ids of every image whose point lies in the box (not only the drawn ones), ascending."""
        frame = self.assignments
        (x0, x1), (y0, y1) = sorted((x0, x1)), sorted((y0, y1))
        x, y = frame["x"].to_numpy(), frame["y"].to_numpy()
        return frame["id"].to_numpy(np.int64)[(x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)]

    def members(self, cluster: int) -> np.ndarray:
        """Ids of every image of a cluster, ascending (a gallery pages through them)."""
        frame = self.assignments
        return frame["id"].to_numpy(np.int64)[frame["cluster"].to_numpy() == int(cluster)]


def choices_of(stored: Sequence[StoredScope]) -> pd.DataFrame:
    """Every clustering of the given stored scopes, one row each: run, descriptor, metric, n_neighbors,
    embedding, seed, algorithm, k, k_from, name, created (what a settings menu offers)."""
    records = []
    for item in stored:
        settings = item.settings
        for record in item.meta.get("clusterings", []):
            records.append({"run": settings.key(), "descriptor": settings.descriptor, "metric": settings.metric,
                            "n_neighbors": settings.n_neighbors, "embedding": settings.embedding,
                            "seed": settings.seed, "algorithm": record["algorithm"], "k": int(record["k"]),
                            "k_from": record.get("k_from", "given"), "name": record["name"],
                            "created": item.meta.get("created", "")})
    return pd.DataFrame.from_records(records, columns=["run", "descriptor", "metric", "n_neighbors", "embedding", "seed",
                                                       "algorithm", "k", "k_from", "name", "created"])


def fresh_scopes(cache: Any) -> list[str]:
    """Scopes with at least one clustering computed on the cache as it is now: all, mistakes, then true:<c>
    and pred:<c> in class order (the order of a scope menu)."""
    names = {s.scope for s in stored_scopes(cache.root, cache_fingerprint(cache)) if s.fresh}
    # The manifest's class order (not the table's: building it costs seconds at a million images).
    order = expand_scopes(DEFAULT_SCOPES, list(cache.manifest.get("class_names") or []))
    return [s for s in order if s in names] + sorted(names - set(order))


def read_clustering(cache: Any, scope: str, descriptor: str | None = None, metric: str | None = None,
                    n_neighbors: int | None = None, embedding: str | None = None, seed: int | None = None,
                    algorithm: str | None = None, k: int | None = None, run: str | None = None) -> StoredClustering:
    """The stored clustering of `scope` that matches the given settings (None: any), computed on the cache as
    it is now. Among several matching runs the newest wins; within a run, algorithm None = the run's first
    algorithm and k None = the eigengap's k. ClusteringNotFound (one line) when nothing matches."""
    fresh = [s for s in stored_scopes(cache.root, cache_fingerprint(cache)) if s.fresh and s.scope == scope]
    if not fresh:
        raise ClusteringNotFound(f"no offline clustering of scope {scope!r} for this cache (as it is now): run "
                                 f"`python -m analysis cluster --cache {cache.root}`")
    wanted = {"descriptor": descriptor, "metric": metric, "n_neighbors": n_neighbors, "embedding": embedding,
              "seed": seed}
    matching = [s for s in fresh if (run is None or s.settings.key() == run)
                and all(v is None or getattr(s.settings, f) == v for f, v in wanted.items())]
    choices = choices_of(fresh)
    for item in matching:
        records = item.meta.get("clusterings", [])
        if algorithm is not None:
            records = [r for r in records if r["algorithm"] == algorithm]
        elif records:
            first = item.settings.algorithms[0] if item.settings.algorithms else records[0]["algorithm"]
            records = [r for r in records if r["algorithm"] == first] or records
        if k is not None:
            records = [r for r in records if int(r["k"]) == int(k)]
        else:
            records = sorted(records, key=lambda r: r.get("k_from") != "eigengap")
        if records:
            return StoredClustering(item, records[0], choices)
    asked = ", ".join(f"{f}={v}" for f, v in {**wanted, "algorithm": algorithm, "k": k, "run": run}.items()
                      if v is not None)
    available = "; ".join(sorted(set(choices["name"] + " (" + choices["descriptor"] + ", " + choices["metric"]
                                      + ", " + choices["n_neighbors"].astype(str) + " neighbours, "
                                      + choices["embedding"] + ")"))) or "none"
    raise ClusteringNotFound(f"no stored clustering of {scope!r} with {asked or 'these settings'}; available: "
                             f"{available}")


# ----------------------------------------------------------------------------------------------------------
# Per-class aggregates, streamed through the cache once
# ----------------------------------------------------------------------------------------------------------

@dataclass
class ClassAggregates:
    """Per-class means over the whole cache, so that no page reads every map.

    maps: mean unit-mass positive map (at the cache's map size) of each true class, of the correct and of the
    wrong predictions (their predicted-class map), and the wrong ones' true-class map (`wrong_true`).
    consensus: descriptor kind -> [C, D*D] consensus of each predicted class (analysis.explore.class_consensus:
    the mean descriptor of the correct predictions of the class, or of all its predictions when none is
    correct), the suspicion's reference.
    """

    maps: explore.ClassMeanMaps
    consensus: dict[str, np.ndarray]


def _group_sums(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    indicator = sparse.csr_matrix((np.ones(len(groups), np.float64), (groups, np.arange(len(groups)))),
                                  shape=(n_groups, len(groups)))
    flat = values.reshape(values.shape[0], int(np.prod(values.shape[1:], dtype=np.int64)))
    return np.asarray(indicator @ flat.astype(np.float64))


def compute_class_aggregates(cache: Any, chunk_rows: int = 4096,
                             progress: Callable[[int, int], None] | None = None) -> ClassAggregates:
    """Stream the cache in chunks of `chunk_rows` images (maps and descriptors read per chunk, never all at
    once) and return the per-class aggregates."""
    table = cache.columns(["label", "pred", "correct"])
    n_classes = len(class_names_of(cache))
    ids = cache.ids
    size = cache.map_size or cache.maps(ids[:1]).shape[-1] if len(ids) else 1
    pixels = size * size
    sums = {name: np.zeros((n_classes, pixels)) for name in ("correct", "wrong", "wrong_true")}
    counts = {"correct": np.zeros(n_classes, np.int64), "wrong": np.zeros(n_classes, np.int64)}
    consensus_sums: dict[str, dict[str, np.ndarray]] = {}
    prediction_counts = {"correct": np.zeros(n_classes, np.int64), "all": np.zeros(n_classes, np.int64)}
    labels_all = table["label"].to_numpy(np.int64)
    preds_all = table["pred"].to_numpy(np.int64)
    correct_all = table["correct"].to_numpy(bool)
    for start in range(0, len(ids), chunk_rows):
        stop = min(start + chunk_rows, len(ids))
        chunk, labels, preds, correct = ids[start:stop], labels_all[start:stop], preds_all[start:stop], \
            correct_all[start:stop]
        unit = explore.unit_mass(cache.maps(chunk, "pred"), "positive")
        sums["correct"] += _group_sums(unit[correct], labels[correct], n_classes)
        sums["wrong"] += _group_sums(unit[~correct], labels[~correct], n_classes)
        counts["correct"] += np.bincount(labels[correct], minlength=n_classes)
        counts["wrong"] += np.bincount(labels[~correct], minlength=n_classes)
        if (~correct).any():
            sums["wrong_true"] += _group_sums(explore.unit_mass(cache.maps(chunk[~correct], "true"), "positive"),
                                              labels[~correct], n_classes)
        for kind in DESCRIPTOR_KINDS:
            descriptors = cache.descriptors(chunk, kind)
            entry = consensus_sums.setdefault(kind, {"correct": 0.0, "all": 0.0})
            entry["correct"] = entry["correct"] + _group_sums(descriptors[correct], preds[correct], n_classes)
            entry["all"] = entry["all"] + _group_sums(descriptors, preds, n_classes)
        prediction_counts["correct"] += np.bincount(preds[correct], minlength=n_classes)
        prediction_counts["all"] += np.bincount(preds, minlength=n_classes)
        if progress:
            progress(stop, len(ids))

    def mean(total: np.ndarray, count: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            out = total / count[:, None]
        out[count == 0] = np.nan
        return out.astype(np.float32)

    maps = explore.ClassMeanMaps(
        correct=mean(sums["correct"], counts["correct"]).reshape(n_classes, size, size),
        wrong=mean(sums["wrong"], counts["wrong"]).reshape(n_classes, size, size),
        n_correct=counts["correct"], n_wrong=counts["wrong"],
        wrong_true=mean(sums["wrong_true"], counts["wrong"]).reshape(n_classes, size, size))
    consensus = {}
    for kind, entry in consensus_sums.items():
        own = mean(np.asarray(entry["correct"]), prediction_counts["correct"])
        fallback = mean(np.asarray(entry["all"]), prediction_counts["all"])
        own[prediction_counts["correct"] == 0] = fallback[prediction_counts["correct"] == 0]
        consensus[kind] = own
    return ClassAggregates(maps=maps, consensus=consensus)


def write_class_aggregates(cache_root: Path | str, aggregates: ClassAggregates, fingerprint: str) -> Path:
    """CACHE/analysis/class_maps.parquet: one row per (group, class) with its count and flattened mean."""
    from analysis.cache import _save_parquet

    maps = aggregates.maps
    records = {"group": [], "class": [], "n": [], "values": []}

    def add(group: str, means: np.ndarray, counts: np.ndarray) -> None:
        for c in range(len(means)):
            records["group"].append(group)
            records["class"].append(c)
            records["n"].append(int(counts[c]))
            records["values"].append(np.asarray(means[c], np.float32).ravel())

    add("correct", maps.correct, maps.n_correct)
    add("wrong", maps.wrong, maps.n_wrong)
    add("wrong_true", maps.wrong_true, maps.n_wrong)
    for kind, values in aggregates.consensus.items():
        add(f"consensus:{kind}", values, np.isfinite(values).all(axis=1).astype(np.int64))
    table = pa.table({"group": pa.array(records["group"], pa.string()), "class": pa.array(records["class"], pa.int32()),
                      "n": pa.array(records["n"], pa.int64()),
                      "values": pa.array(records["values"], pa.list_(pa.float32()))})
    table = table.replace_schema_metadata({b"fgcam_class_maps": json.dumps(
        {"format_version": FORMAT_VERSION, "cache_fingerprint": fingerprint, "map_size": int(maps.correct.shape[-1]),
         "created": _now()}).encode()})
    root = results_root(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / CLASS_MAPS_FILE
    tmp = root / f"{TMP_PREFIX}{CLASS_MAPS_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        _save_parquet(tmp, table)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def read_class_aggregates(cache: Any) -> ClassAggregates | None:
    """The stored per-class aggregates of the cache as it is now; None when absent, unreadable or stale."""
    path = results_root(cache.root) / CLASS_MAPS_FILE
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"fgcam_class_maps"])
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
        return None
    if meta.get("cache_fingerprint") != cache_fingerprint(cache):
        return None
    frame = table.to_pandas()
    size = int(meta["map_size"])

    def block(group: str, side: int | None) -> tuple[np.ndarray, np.ndarray]:
        part = frame[frame["group"] == group].sort_values("class")
        values = np.stack([np.asarray(v, np.float32) for v in part["values"]]) if len(part) else np.zeros((0, 0))
        if side is not None:
            values = values.reshape(len(part), side, side)
        return values, part["n"].to_numpy(np.int64)

    correct, n_correct = block("correct", size)
    wrong, n_wrong = block("wrong", size)
    wrong_true, _ = block("wrong_true", size)
    consensus = {group.split(":", 1)[1]: block(group, None)[0]
                 for group in frame["group"].unique() if group.startswith("consensus:")}
    return ClassAggregates(explore.ClassMeanMaps(correct, wrong, n_correct, n_wrong, wrong_true), consensus)


# ----------------------------------------------------------------------------------------------------------
# Method: verifying the top clusters with the causal shortcut test
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VerifyOptions:
    """The causal test of the top clusters (analysis.shortcut_test) and the verdict rule's thresholds."""

    top: int = TOP_TO_VERIFY          # clusters of each clustering, by suspicion rank
    q: float = 5.0                    # the region: top q% of the prototype
    images: int = 500                 # members tested per cluster (a seeded sample of larger clusters)
    seed: int = 0
    alpha: float = 0.01               # family-wise level: divided by the number of clusters tested in the run
    min_difference: float = 0.10      # flip rate of the region minus that of the control, at least
    off_object: float = 0.5           # share of the region off the object (or in the border) to call it "off"
    batch_size: int = 64

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


VERDICTS = {
    "shortcut": "the region lies off the object and blurring it changes far more predictions than a random "
                "region: the model depends on something that is not the object",
    "uses the object": "blurring the region changes far more predictions than a random region, but the region "
                       "is on the object: the model working, not a shortcut",
    "off the object, not used": "the region lies off the object, but blurring it changes predictions no more "
                                "than a random region",
    "not used": "blurring the region changes predictions no more than a random region",
}


def mcnemar_greater(changed_region: np.ndarray, changed_control: np.ndarray) -> float:
    """One-sided exact McNemar test (the two blurs are paired per image): p-value of "the region changes more
    predictions than the control" = P(Binomial(b + c, 1/2) >= b), b (c) = images changed by the region only (by
    the control only). 1 when no image is discordant."""
    from scipy.stats import binomtest

    region, control = np.asarray(changed_region, bool), np.asarray(changed_control, bool)
    b, c = int((region & ~control).sum()), int((~region & control).sum())
    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="greater").pvalue)


def verdict(off_object_share: float, changed_region: float, changed_control: float, p_value: float,
            alpha: float, options: VerifyOptions = VerifyOptions()) -> str:
    """Our rule: "shortcut" needs both the location (most of the region off the object by mask or box -- in the
    border strip without them) and the causal effect (region flips exceed the control's by the exact McNemar
    test at `alpha` and by at least `min_difference`, so that a negligible but significant difference at a
    million images is not called a shortcut). The effect on the object is the model working."""
    off = bool(np.isfinite(off_object_share) and off_object_share >= options.off_object)
    causal = bool(p_value < alpha and changed_region - changed_control >= options.min_difference)
    if causal:
        return "shortcut" if off else "uses the object"
    return "off the object, not used" if off else "not used"


def region_off_object(region: np.ndarray, foreground: np.ndarray | None) -> tuple[float, str]:
    """(share of the region's pixels off the object, how it was judged): the mean over images whose
    foreground is known of the share outside their foreground dilated by one map pixel (as
    background_hotspot); without any foreground, the share in the border strip (as border_share)."""
    import torch

    from analysis.scores import dilate, frame_mask
    from analysis.shortcut_test import foreground_to_input

    region_t = torch.as_tensor(np.asarray(region, bool))
    total = float(region_t.sum())
    if foreground is not None:
        known = foreground.reshape(len(foreground), -1).any(axis=1)
        if known.any():
            grown = foreground_to_input(dilate(foreground[known], 1), *region_t.shape)
            outside = (region_t[None] & ~grown).flatten(1).sum(1).float() / max(total, 1.0)
            return float(outside.mean()), "off the object's mask or box"
    frame = frame_mask(*region_t.shape)
    return float((region_t & frame).sum()) / max(total, 1.0), "in the border strip (no mask or box)"


def verify_clusters(cache: Any, stored: StoredScope, loaded: Any, options: VerifyOptions, alpha: float,
                    device: Any = "cpu", progress: Progress | None = None) -> pd.DataFrame:
    """Run the causal test on the top `options.top` clusters of every clustering of a stored scope; returns one
    row per tested cluster (see docs/contracts.md) and writes it next to the scope's result."""
    import torch

    from analysis.cache import _save_parquet
    from analysis.shortcut_test import load_inputs, shortcut_test

    summary_all = pq.read_table(stored.path / "summary.parquet").to_pandas()
    prototypes_all = np.load(stored.path / "prototypes.npy")
    names = [r["name"] for r in stored.meta.get("clusterings", [])]
    assignments = pq.read_table(stored.path / "assignments.parquet", columns=["id", *names]).to_pandas()
    table = cache.columns(["id", "label"]).set_index("id")
    model = loaded.model.to(device)
    records = []
    for name in names:
        rows = np.nonzero(summary_all["clustering"].to_numpy() == name)[0]
        summary = summary_all.iloc[rows]
        for position, (row_index, record) in enumerate(zip(rows, summary.itertuples())):
            if record.rank > options.top or record.cluster < 0:
                continue
            members = assignments["id"].to_numpy(np.int64)[assignments[name].to_numpy() == record.cluster]
            rng = np.random.default_rng([options.seed, int(record.cluster)])
            sample = np.sort(rng.choice(members, options.images, replace=False)) if len(members) > options.images \
                else members
            if progress:
                progress(f"verifying {name} #{record.rank} ({len(sample)} images)")
            images, positions, errors = load_inputs([cache.image_path(int(i)) for i in sample], loaded.transform,
                                                    loaded.in_channels)
            base = {"clustering": name, "rank": int(record.rank), "cluster": int(record.cluster),
                    "size": int(record.size), "q": float(options.q), "alpha": float(alpha),
                    "skipped": len(errors)}
            if not positions:
                records.append({**base, "tested": 0, "verdict": "not tested",
                                "reason": f"no image could be loaded ({errors[0][1] if errors else 'none'})"})
                continue
            tested = sample[positions]
            side = int(round(np.sqrt(prototypes_all.shape[1])))
            prototype = prototypes_all[row_index].reshape(side, side)
            if not np.isfinite(prototype).all() or prototype.max() <= 0:
                records.append({**base, "tested": 0, "verdict": "not tested",
                                "reason": "the prototype has no positive relevance: no region to test"})
                continue
            labels = torch.from_numpy(table.loc[tested, "label"].to_numpy(np.int64).copy())
            try:
                result = shortcut_test(model, images, labels, prototype, q=options.q, seed=options.seed,
                                       forward_batch=options.batch_size)
            except ValueError as error:   # e.g. a prototype without positive relevance
                records.append({**base, "tested": 0, "verdict": "not tested", "reason": str(error).splitlines()[0]})
                continue
            frame = result.per_image
            p_value = mcnemar_greater(frame["changed_prototype"].to_numpy(), frame["changed_random"].to_numpy())
            off_share, judged = region_off_object(result.region, cache.foreground(tested))
            changed_region, changed_control = float(frame["changed_prototype"].mean()), \
                float(frame["changed_random"].mean())
            records.append({**base, "tested": int(len(tested)), "changed_region": changed_region,
                            "changed_control": changed_control, "p_value": p_value,
                            "off_object_share": off_share, "location_rule": judged,
                            "accuracy_before": float(result.summary["accuracy_before"]),
                            "accuracy_region": float(result.summary["accuracy_prototype"]),
                            "verdict": verdict(off_share, changed_region, changed_control, p_value, alpha, options),
                            "reason": ""})
    columns = ["clustering", "rank", "cluster", "size", "tested", "skipped", "q", "changed_region",
               "changed_control", "p_value", "alpha", "off_object_share", "location_rule", "accuracy_before",
               "accuracy_region", "verdict", "reason"]
    frame = pd.DataFrame.from_records(records, columns=columns)
    meta = {"options": options.as_dict(), "alpha": alpha, "created": _now(),
            "model_sha256": (cache.manifest.get("model") or {}).get("weights_sha256"),
            "cache_fingerprint": stored.meta.get("cache_fingerprint")}
    table_out = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(
        {b"fgcam_verification": json.dumps(meta).encode()})
    tmp = stored.path / f"{TMP_PREFIX}verification.{os.getpid()}.{uuid.uuid4().hex[:8]}.parquet"
    try:
        _save_parquet(tmp, table_out)
        os.replace(tmp, stored.path / "verification.parquet")
    finally:
        tmp.unlink(missing_ok=True)
    return frame


def stored_verification_options(stored: StoredScope) -> dict[str, Any] | None:
    """The options a stored verification was made with (None when there is none)."""
    try:
        metadata = pq.read_schema(stored.path / "verification.parquet").metadata or {}
        return json.loads(metadata[b"fgcam_verification"]).get("options")
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


# ----------------------------------------------------------------------------------------------------------
# Machinery: a whole run
# ----------------------------------------------------------------------------------------------------------

def load_cache(root: Path) -> Any:
    from analysis.cache import load

    return load(root)


def read_descriptors(cache_root: Path, ids: np.ndarray, kind: str, chunk_rows: int = 65536) -> np.ndarray:
    """float32 [len(ids), D*D] descriptors, read in chunks through a cache opened for this only: one copy in
    memory (reading them at once holds two), and the mapped file pages leave the process with the reader."""
    reader = load_cache(cache_root)
    first = reader.descriptors(ids[:1], kind)
    out = np.empty((len(ids), first.shape[1]), np.float32)
    for start in range(0, len(ids), chunk_rows):
        out[start:start + chunk_rows] = reader.descriptors(ids[start:start + chunk_rows], kind)
    del reader
    return out


def _all_layout(folder: Path, fingerprint: str) -> pd.DataFrame | None:
    """The stored all-images layout (x, y indexed by id) of a run, when fresh."""
    meta = _read_meta(folder)
    if meta is None or meta.get("cache_fingerprint") != fingerprint or \
            not str(meta.get("embedding", {}).get("method", "")).startswith("tsne"):
        return None
    return pq.read_table(folder / "assignments.parquet", columns=["id", "x", "y"]).to_pandas().set_index("id")


class RunProgress:
    """What a run reports while it works (the command line draws a progress bar from it); no-ops here."""

    def start(self, scopes: list[tuple[str, int]]) -> None: ...
    def scope(self, scope: str, n: int, status: str) -> None: ...
    def stage(self, text: str) -> None: ...
    def scope_done(self, scope: str, n: int) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass
class ScopeOutcome:
    scope: str
    n: int
    status: str                        # "computed", "kept" (already fresh), "empty"
    path: Path | None = None
    seconds: float = 0.0


def cluster_cache(cache: Any, settings: OfflineSettings, scopes: Sequence[str] = DEFAULT_SCOPES,
                  threads: int | None = None, verify: VerifyOptions | None = None, loaded: Any = None,
                  device: Any = "cpu", progress: RunProgress | None = None) -> list[ScopeOutcome]:
    """Cluster every requested scope of a cache (skipping scopes already stored for these settings and this
    state of the cache), store the per-class aggregates, and with `verify` (and `loaded`, the cache's model)
    run the causal test on the top clusters of every scope. Returns one outcome per scope, in order."""
    settings.validate()
    progress = progress or RunProgress()
    names = class_names_of(cache)
    scope_list = expand_scopes(scopes, names)
    scope_list.sort(key=lambda scope: scope != "all")   # first: the other scopes' t-SNE starts from its layout
    fingerprint = cache_fingerprint(cache)
    table = cache.columns(SUMMARY_ROW_COLUMNS)
    if read_class_aggregates(cache) is None:
        progress.stage("per-class mean maps")
        # Through a cache opened for this pass only: the file pages it maps leave the process with it.
        write_class_aggregates(cache.root, compute_class_aggregates(load_cache(cache.root)), fingerprint)
    consensus = read_class_aggregates(cache).consensus[settings.descriptor]
    target = run_dir(cache.root, settings)
    target.mkdir(parents=True, exist_ok=True)
    for leftover in target.glob(f"{TMP_PREFIX}*"):   # of a killed run (one run of a setting at a time)
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    from analysis.cache import write_json_atomic

    write_json_atomic(target / "settings.json", {"settings": settings.as_dict(), "key": settings.key()})
    existing = {s.scope: s for s in stored_scopes(cache.root, fingerprint)
                if s.fresh and s.path.parent == target}
    masks = {scope: scope_mask(table, scope, names) for scope in scope_list}
    progress.start([(scope, int(masks[scope].sum())) for scope in scope_list])
    outcomes = []
    layout = None    # the all-images layout (id -> x, y), read when a scope needs it
    for scope in scope_list:
        mask = masks[scope]
        n = int(mask.sum())
        if n == 0:
            progress.scope(scope, 0, "empty")
            outcomes.append(ScopeOutcome(scope, 0, "empty"))
            progress.scope_done(scope, 0)
            continue
        if scope in existing:
            progress.scope(scope, n, "kept")
            outcomes.append(ScopeOutcome(scope, n, "kept", existing[scope].path))
            progress.scope_done(scope, n)
            continue
        progress.scope(scope, n, "computing")
        started = time.perf_counter()
        ids = table["id"].to_numpy(np.int64)[mask]
        init = None
        if scope != "all" and settings.embedding == "tsne":
            if layout is None:
                layout = _all_layout(target / scope_folder("all"), fingerprint)
            init = None if layout is None else layout.reindex(ids).to_numpy(np.float64)
            init = None if init is None or not np.isfinite(init).all() else init
        result = cluster_scope(scope, ids, read_descriptors(cache.root, ids, settings.descriptor), table[mask],
                               consensus, names, settings, threads, progress.stage, init=init,
                               overwrite_descriptors=True)
        for message in result.messages:
            progress.message(f"{scope}: {message}")
        path = write_scope_result(target, result, settings, fingerprint)
        outcomes.append(ScopeOutcome(scope, n, "computed", path, time.perf_counter() - started))
        progress.scope_done(scope, n)
    if verify is not None and verify.top > 0:
        if loaded is None:
            raise ValueError("verifying needs the cache's model (loaded)")
        stored = {s.scope: s for s in stored_scopes(cache.root, fingerprint) if s.fresh and s.path.parent == target}
        # Bonferroni over every cluster the run may test: top x clusterings x scopes.
        tested = sum(verify.top * len(s.meta.get("clusterings", [])) for s in stored.values()
                     if s.scope in scope_list)
        alpha = verify.alpha / max(tested, 1)
        for scope in scope_list:
            if scope not in stored:
                continue
            done = stored_verification_options(stored[scope])
            if done == verify.as_dict():
                continue
            progress.stage(f"{scope}: causal test of the top {verify.top} clusters")
            verify_clusters(cache, stored[scope], loaded, verify, alpha, device, progress.stage)
    return outcomes
