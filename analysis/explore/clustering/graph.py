"""Which images a scope holds, the kNN graph of their descriptors, its spectrum and eigengap, the clusterings
and the 2-D embeddings (SpRAy's steps, Lapuschkin et al. 2019)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.csgraph import connected_components, laplacian
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

from analysis.explore.clustering.options import ALGORITHMS, EMBEDDINGS, SCOPES


def scope_ids(table: pd.DataFrame, scope: str, class_index: int | None = None) -> np.ndarray:
    """Ids of the images a clustering covers: one true class, all images, or only the mistakes."""
    if scope == "class":
        if class_index is None:
            raise ValueError("scope 'class' needs a class index")
        rows = table["label"].to_numpy() == class_index
    elif scope == "all":
        rows = np.ones(len(table), bool)
    elif scope == "mistakes":
        rows = ~table["correct"].to_numpy(bool)
    else:
        raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
    return table["id"].to_numpy(np.int64)[rows]


def checked_descriptors(x: np.ndarray) -> np.ndarray:
    """float64 [n, P] descriptors, or ValueError when they hold NaN or inf: every path below checks its input
    with this before any native code (scikit-learn, ARPACK) sees it."""
    x = np.asarray(x, dtype=np.float64)
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


def effective_neighbours(n_points: int, n_neighbors: int) -> int:
    return int(max(1, min(n_neighbors, n_points - 1)))


def knn_affinity(x: np.ndarray, n_neighbors: int = 10) -> sparse.csr_matrix:
    """Symmetric 0/1 k-nearest-neighbour graph (Euclidean; i~j if either is among the other's k nearest)."""
    from sklearn.neighbors import NearestNeighbors

    x = checked_descriptors(x)
    n = x.shape[0]
    if n < 2:
        return sparse.csr_matrix((n, n))
    k = effective_neighbours(n, n_neighbors)
    graph = NearestNeighbors(n_neighbors=k).fit(x).kneighbors_graph(mode="connectivity")
    graph = graph.maximum(graph.T).tocsr()
    graph.setdiag(0)
    graph.eliminate_zeros()
    return graph


def connect_components(x: np.ndarray, graph: sparse.csr_matrix, weight: float = 0.01) -> sparse.csr_matrix:
    """The graph plus one weak edge from every connected component (but the first) to its nearest point
    outside it, so spectral axes are defined; the weak edges keep well-separated groups far apart."""
    from sklearn.neighbors import NearestNeighbors

    n_parts, part_of = connected_components(graph, directed=False)
    if n_parts <= 1:
        return graph
    x = np.asarray(x, dtype=np.float64)
    graph = graph.tolil()
    for part in range(1, n_parts):
        inside = np.nonzero(part_of == part)[0]
        outside = np.nonzero(part_of != part)[0]
        distance, nearest = NearestNeighbors(n_neighbors=1).fit(x[outside]).kneighbors(x[inside])
        best = int(np.argmin(distance[:, 0]))
        i, j = int(inside[best]), int(outside[nearest[best, 0]])
        graph[i, j] = graph[j, i] = weight
    return graph.tocsr()


@dataclass
class Eigengap:
    suggested_k: int
    eigenvalues: np.ndarray   # smallest eigenvalues of the normalised graph Laplacian, ascending


def laplacian_eigenpairs(affinity: sparse.csr_matrix, count: int,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to `count` smallest eigenvalues (ascending) of the normalised Laplacian L = I - D^-1/2 A D^-1/2 of one
    connected graph, and their eigenvectors [n, count] (each with its largest entry positive, so the result does
    not depend on the solver's sign)."""
    n = affinity.shape[0]
    if n == 1:
        return np.zeros(1), np.ones((1, 1))
    lap = laplacian(affinity, normed=True)
    count = min(count, n)
    if n <= 600 or count >= n - 1:
        values, vectors = np.linalg.eigh(lap.toarray())
        values, vectors = values[:count], vectors[:, :count]
    else:
        # The smallest eigenvalues of L = I - N are 1 - the largest of N = D^-1/2 A D^-1/2: Lanczos finds the
        # largest ones quickly, no factorisation needed. A seeded start vector makes the result reproducible.
        normalised = sparse.identity(n, format="csr") - lap
        start = np.random.default_rng(seed).uniform(0.5, 1.5, n)
        try:
            top, vectors = eigsh(normalised, k=count, which="LA", tol=1e-6, maxiter=n * 20, v0=start)
        except ArpackNoConvergence as exc:
            top, vectors = exc.eigenvalues, exc.eigenvectors
        order = np.argsort(-np.asarray(top).real)
        values, vectors = 1.0 - np.asarray(top).real[order], np.asarray(vectors).real[:, order]
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])])
    return np.asarray(values, np.float64), vectors * np.where(signs == 0, 1.0, signs)


def _smallest_laplacian_eigenvalues(affinity: sparse.csr_matrix, count: int) -> np.ndarray:
    """Up to `count` smallest eigenvalues of the normalised Laplacian of one connected graph."""
    return laplacian_eigenpairs(affinity, count)[0]


def graph_spectrum(affinity: sparse.csr_matrix, count: int,
                   with_vectors: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The `count` smallest eigenvalues of a graph's normalised Laplacian (ascending, clipped at 0) and, with
    `with_vectors`, their eigenvectors [n, count] (each zero outside its connected component).

    The spectrum of a graph is the union of the spectra of its connected components. Solving per component
    keeps exact multiplicities (k separate groups = k zero eigenvalues), which single-vector Lanczos would miss
    on the whole graph.
    """
    n = affinity.shape[0]
    count = min(count, n)
    n_parts, part_of = connected_components(affinity, directed=False)
    order = np.argsort(part_of, kind="stable")
    bounds = np.searchsorted(part_of[order], np.arange(n_parts + 1))
    # Every component contributes one zero eigenvalue, so one component can hold at most count - n_parts of the
    # others: with many components, few (or no) eigenpairs need solving.
    per_part = max(1, count - n_parts + 1)
    values, owners = [], []   # owners: (component members, its eigenvectors, column) of each value
    for part in range(n_parts):
        members = order[bounds[part]:bounds[part + 1]]
        sub = affinity[members][:, members]
        if per_part == 1 or len(members) == 1:
            # The zero eigenvalue's eigenvector is known: D^1/2 1, normalised.
            root = np.sqrt(np.asarray(sub.sum(axis=1)).ravel()) if len(members) > 1 else np.ones(1)
            part_values, part_vectors = np.zeros(1), (root / np.linalg.norm(root))[:, None]
        else:
            part_values, part_vectors = laplacian_eigenpairs(sub, per_part)
        values.extend(part_values.tolist())
        owners.extend((members, part_vectors if with_vectors else None, column) for column in range(len(part_values)))
    chosen = np.argsort(np.asarray(values, np.float64), kind="stable")[:count]
    spectrum = np.clip(np.asarray(values, np.float64)[chosen], 0.0, None)
    if not with_vectors:
        return spectrum, None
    vectors = np.zeros((n, len(chosen)), np.float64)
    for out_column, index in enumerate(chosen):
        members, part_vectors, column = owners[index]
        vectors[members, out_column] = part_vectors[:, column]
    return spectrum, vectors


def suggest_k(eigenvalues: np.ndarray, max_k: int, n_points: int) -> int:
    """The eigengap rule: k in [2, max_k] after which the gap between consecutive eigenvalues (ascending) is
    largest; 1 for fewer than 3 points."""
    if n_points < 3:
        return max(n_points, 1)
    values = np.asarray(eigenvalues, np.float64)
    gaps = np.diff(values)  # gaps[i] = lambda_{i+2} - lambda_{i+1}, i.e. the gap after i+1 eigenvalues
    candidates = np.arange(2, min(max_k, len(values) - 1) + 1)
    if len(candidates) == 0:
        return min(2, n_points)
    if values[candidates[-1]] <= 1e-10:
        # More than max_k separate components: every gap in range is 0, and the most clusters allowed is the
        # closest to the truth (argmax would return the first candidate, 2).
        return int(candidates[-1])
    return int(candidates[np.argmax(gaps[candidates - 1])])


def eigengap(x: np.ndarray, n_neighbors: int = 10, max_k: int = 12) -> Eigengap:
    """Number of clusters suggested by the largest gap between consecutive small eigenvalues of the kNN graph's
    normalised Laplacian: k groups that are well separated give k eigenvalues near 0, then a jump.

    The suggestion lies in [2, max_k] (one cluster is no clustering); with fewer than 3 points it is 1.
    """
    x = checked_descriptors(x)
    n = x.shape[0]
    if n < 3:
        return Eigengap(suggested_k=max(n, 1) if n else 1, eigenvalues=np.zeros(min(n, 1), np.float64))
    if all_identical(x):
        return Eigengap(suggested_k=1, eigenvalues=np.zeros(1, np.float64))
    affinity = knn_affinity(x, n_neighbors).astype(np.float64)
    values, _ = graph_spectrum(affinity, min(max_k + 1, n))
    return Eigengap(suggested_k=suggest_k(values, max_k, n), eigenvalues=values)


def distinct_rows(x: np.ndarray) -> int:
    """The number of different rows (exact duplicates counted once)."""
    return int(np.unique(np.asarray(x), axis=0).shape[0]) if len(x) else 0


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0, 1, ... from largest to smallest (ties by old label); -1 (noise) stays -1."""
    labels = np.asarray(labels, dtype=np.int64)
    kept = labels[labels >= 0]
    if kept.size == 0:
        return labels.copy()
    values, counts = np.unique(kept, return_counts=True)
    order = np.lexsort((values, -counts))
    mapping = {int(values[i]): new for new, i in enumerate(order)}
    return np.array([mapping.get(int(v), -1) for v in labels], dtype=np.int64)


def cluster_labels(x: np.ndarray, algorithm: str, n_clusters: int, n_neighbors: int = 10,
                   seed: int = 0, min_cluster_size: int | None = None) -> np.ndarray:
    """Cluster descriptors -> labels (0 = largest cluster; -1 = noise, only HDBSCAN)."""
    from sklearn.cluster import HDBSCAN, AgglomerativeClustering, KMeans, SpectralClustering

    x = checked_descriptors(x)
    n = x.shape[0]
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, not {algorithm!r}")
    if n == 0:
        return np.zeros(0, np.int64)
    if all_identical(x):
        return np.zeros(n, np.int64)
    k = int(max(1, min(n_clusters, distinct_rows(x))))  # k-means cannot find more groups than distinct points
    if algorithm != "hdbscan" and (k == 1 or n < 3):
        return np.zeros(n, np.int64)
    with warnings.catch_warnings():
        # sklearn warns about disconnected kNN graphs; well-separated clusters are exactly that case.
        warnings.simplefilter("ignore", UserWarning)
        if algorithm == "kmeans":
            labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)
        elif algorithm == "spectral":
            affinity = knn_affinity(x, n_neighbors)
            labels = SpectralClustering(n_clusters=k, affinity="precomputed", assign_labels="cluster_qr",
                                        random_state=seed).fit_predict(affinity)
        elif algorithm == "agglomerative":
            labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)
        else:
            size = min_cluster_size or max(5, n // 50)
            if n < 2 * size:
                size = max(2, n // 2)
            labels = HDBSCAN(min_cluster_size=size, copy=True).fit_predict(x)
    return relabel_by_size(labels)


def embed_2d(x: np.ndarray, method: str = "tsne", n_neighbors: int = 10, seed: int = 0) -> np.ndarray:
    """2-D coordinates [n, 2] of the descriptors: t-SNE, or the first two non-trivial spectral axes of the kNN
    graph. Fewer than 4 points are laid out on a line (neither method is defined there)."""
    from sklearn.manifold import TSNE, SpectralEmbedding

    x = checked_descriptors(x)
    n = x.shape[0]
    if method not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, not {method!r}")
    if n < 4:
        return np.column_stack([np.arange(n, dtype=np.float32), np.zeros(n, np.float32)])
    if all_identical(x):  # nothing to lay out: every point at the origin (t-SNE would crash, see all_identical)
        return np.zeros((n, 2), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if method == "tsne":
            perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
            coords = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                          random_state=seed).fit_transform(x)
        else:
            affinity = connect_components(x, knn_affinity(x, n_neighbors))
            coords = SpectralEmbedding(n_components=2, affinity="precomputed",
                                       random_state=seed).fit_transform(affinity)
    return np.asarray(coords, dtype=np.float32)
