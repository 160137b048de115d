"""The checked descriptors and their k-nearest-neighbour graph (exact blocked search, or pynndescent's
approximate one above EXACT_KNN_MAX points): the one kNN graph every clustering step reads (the eigengap, spectral
clustering, t-SNE), for a whole scope offline as for a selection re-clustered on the Clusters page."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from analysis.explore.clustering.settings import EXACT_KNN_MAX


def checked_descriptors(x: np.ndarray) -> np.ndarray:
    """float32 [n, P] descriptors, or ValueError when they hold NaN or inf: the graph functions check their input
    with this before any native code (pynndescent, ARPACK, scikit-learn) sees it."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be a 2-D array [n, P], not of shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("descriptors hold NaN or inf")
    return x


def all_identical(x: np.ndarray) -> bool:
    """True when no two rows differ by more than float32 rounding (1e-6 of the largest value), e.g. every map
    of a scope without positive relevance (the uniform descriptor). Such a set has one cluster and no
    embedding; t-SNE's PCA start divides by its zero spread and crashes scikit-learn's native code."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[0] < 2:
        return True
    scale = float(np.abs(x).max())
    return scale == 0.0 or float(np.ptp(x, axis=0).max()) <= 1e-6 * scale


def distinct_rows(x: np.ndarray) -> int:
    """The number of different rows (exact duplicates counted once)."""
    x = np.ascontiguousarray(x)
    if not len(x):
        return 0
    as_bytes = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()   # one sortable item per row
    return int(len(np.unique(as_bytes)))


def check_descriptors(x: np.ndarray) -> tuple[np.ndarray, list[str], bool]:
    """(float32 descriptors with non-finite rows zeroed, messages, degenerate): degenerate when every row is the
    same up to float32 rounding (e.g. all maps empty) -- then there is nothing to cluster, one cluster."""
    x = np.asarray(x, dtype=np.float32)
    messages = []
    bad = ~np.isfinite(x).all(axis=1) if x.size else np.zeros(len(x), bool)
    if bad.any():
        x = x.copy()
        x[bad] = 0.0
        messages.append(f"{int(bad.sum())} descriptor(s) held NaN or infinite values and were set to zero")
    degenerate = len(x) > 0 and all_identical(x)
    if degenerate and len(x) > 1:
        what = "zero (no positive relevance)" if not x[0].any() else "identical"
        messages.append(f"all {len(x)} descriptors are {what}: nothing to tell apart, one cluster")
    return x, messages, degenerate


def geometry(x: np.ndarray, metric: str, in_place: bool = False) -> np.ndarray:
    """The points the kNN graph, k-means and t-SNE see: for "cosine", each descriptor scaled to unit length (a
    map without positive relevance stays zero), so that Euclidean distances are 2 - 2 cos. Cosine similarity
    compares where the relevance concentrates, whatever its spread -- the similarity the dashboard already uses
    between maps (explore.nearest_neighbours, the suspicion's unlike_class). `in_place` scales x itself (no
    second copy at a million images; `cluster_points` scales it back)."""
    if metric == "euclidean":
        return x
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    scale = np.where(norms > 0, norms, 1.0).astype(np.float32)
    if in_place:
        x /= scale
        return x
    return (x / scale).astype(np.float32)


def effective_neighbours(n_points: int, n_neighbors: int) -> int:
    return int(max(1, min(n_neighbors, n_points - 1)))


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
    return without_self(found, distances)


def without_self(found: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    """k nearest neighbours of every row of x (k = min(n_neighbors, n - 1), at least 2 rows): exact up to
    `exact_max` rows, pynndescent above (pays a one-off just-in-time compilation of about a minute per
    process). ValueError for NaN or inf."""
    x = np.ascontiguousarray(checked_descriptors(x))
    n = len(x)
    if n < 2:
        raise ValueError(f"a kNN graph needs at least 2 points, not {n}")
    k = effective_neighbours(n, n_neighbors)
    if n <= exact_max:
        indices, distances = _exact_knn(x, k)
        return KnnGraph(indices, distances, "exact")
    indices, distances = _approximate_knn(x, k, seed, threads or os.cpu_count() or 1)
    return KnnGraph(indices, distances, "pynndescent")
