"""Clustering of explanations (the SpRAy idea): kNN graph, eigengap, four algorithms, 2-D embeddings,
per-cluster summaries and a suspicion ranking that puts shortcut-like clusters first.

Pure numpy / scikit-learn; never imports streamlit. Inputs are descriptors (unit-mass downsampled maps, one
row per image) and the matching rows of the cache table.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import sparse
from scipy.sparse.csgraph import connected_components, laplacian
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

ALGORITHMS = ("kmeans", "spectral", "agglomerative", "hdbscan")
ALGORITHM_LABELS = {
    "kmeans": "k-means",
    "spectral": "spectral (kNN graph)",
    "agglomerative": "agglomerative (Ward)",
    "hdbscan": "HDBSCAN (finds k itself)",
}
EMBEDDINGS = ("tsne", "spectral")
EMBEDDING_LABELS = {"tsne": "t-SNE", "spectral": "spectral axes (kNN graph)"}
SCOPES = ("class", "all", "mistakes")
SCOPE_LABELS = {"class": "one class", "all": "all classes", "mistakes": "only mistakes"}
DESCRIPTOR_KINDS = ("positive", "absolute")

# Components of the suspicion score: each is a mean over the cluster's images in [0, 1] where high is bad.
SUSPICION_COMPONENTS = {
    "off_object": "mean share of positive relevance outside the object (background_share)",
    "on_border": "mean share of positive relevance in the border strip (border_share)",
    "error_rate": "1 - accuracy",
    "unlike_class": "1 - cosine similarity of the prototype to the consensus map of its members' classes",
}


# ----------------------------------------------------------------------------------------------------------
# Scope
# ----------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------
# Graph, eigengap, clustering, embedding
# ----------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------
# Summaries and suspicion
# ----------------------------------------------------------------------------------------------------------

def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if not (na > 0 and nb > 0) or not np.isfinite(na * nb):
        return float("nan")
    return float(np.dot(a, b) / (na * nb))


def suspicion_score(off_object: float, on_border: float, error_rate: float, unlike_class: float) -> float:
    """Mean of the available components (NaN ones, e.g. off_object without a foreground, are left out)."""
    values = np.array([off_object, on_border, error_rate, unlike_class], dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


SUMMARY_SCORES = ("background_share", "background_hotspot", "border_share")


class SuspicionInputs:
    """The per-image inputs of the suspicion score, prepared once, so that many partitions of the same images can
    be scored quickly (`statistics`): the summary scores them once, the null calibration a hundred times.

    rows: table rows (columns label, pred, correct and SUMMARY_SCORES), aligned with `descriptors` [n, P].
    consensus: [C, P] consensus map of each class (NaN rows for classes never predicted).
    """

    CHUNK = 65536   # rows summed at a time in float32; the chunks' sums are added in float64

    def __init__(self, rows: pd.DataFrame, descriptors: np.ndarray, consensus: np.ndarray):
        self.n = len(rows)
        self.descriptors = np.asarray(descriptors, dtype=np.float32)
        if self.descriptors.shape[0] != self.n:
            raise ValueError(f"{self.descriptors.shape[0]} descriptors for {self.n} rows")
        self.correct = rows["correct"].to_numpy(bool)
        self.labels = rows["label"].to_numpy(np.int64)
        self.preds = rows["pred"].to_numpy(np.int64)
        self.scores = {name: rows[name].to_numpy(np.float64) for name in SUMMARY_SCORES}
        consensus = np.asarray(consensus, dtype=np.float64)
        known = np.isfinite(consensus).all(axis=1)
        self.consensus = np.where(known[:, None], consensus, 0.0)
        self.consensus_known = known.astype(np.float64)

    def _indicator(self, index: np.ndarray, n_clusters: int, start: int = 0, stop: int | None = None,
                   columns: np.ndarray | None = None, width: int | None = None) -> sparse.csr_matrix:
        stop = self.n if stop is None else stop
        columns = np.arange(stop - start) if columns is None else columns
        width = stop - start if width is None else width
        return sparse.csr_matrix((np.ones(stop - start, np.float32), (index[start:stop], columns)),
                                 shape=(n_clusters, width))

    def statistics(self, index: np.ndarray, n_clusters: int) -> dict[str, np.ndarray]:
        """Per-cluster numbers for a partition: index [n] = cluster position 0..n_clusters-1 of each image.

        Means skip NaN scores (NaN when a cluster has none); unlike_class = 1 - cosine similarity of the
        prototype (mean descriptor) to the mean consensus map of the members' predicted classes.
        """
        index = np.asarray(index, dtype=np.int64)
        size = np.bincount(index, minlength=n_clusters).astype(np.float64)

        def mean_of(values: np.ndarray) -> np.ndarray:
            finite = np.isfinite(values)
            total = np.bincount(index, weights=np.where(finite, values, 0.0), minlength=n_clusters)
            count = np.bincount(index, weights=finite.astype(np.float64), minlength=n_clusters)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(count > 0, total / np.maximum(count, 1), np.nan)

        sums = np.zeros((n_clusters, self.descriptors.shape[1]), np.float64)
        for start in range(0, self.n, self.CHUNK):
            stop = min(start + self.CHUNK, self.n)
            sums += self._indicator(index, n_clusters, start, stop) @ self.descriptors[start:stop]
        with np.errstate(invalid="ignore", divide="ignore"):
            prototypes = sums / size[:, None]
            counts = self._indicator(index, n_clusters, columns=self.preds,
                                     width=self.consensus.shape[0]).toarray().astype(np.float64)
            known = counts @ self.consensus_known
            reference = (counts @ self.consensus) / known[:, None]
            norms = np.linalg.norm(prototypes, axis=1) * np.linalg.norm(reference, axis=1)
            similarity = (prototypes * reference).sum(axis=1) / norms
        similarity[~(np.isfinite(norms) & (norms > 0))] = np.nan
        accuracy = mean_of(self.correct.astype(np.float64))
        out = {"size": size, "accuracy": accuracy, "unlike_class": 1.0 - similarity, "prototypes": prototypes}
        out.update({name: mean_of(values) for name, values in self.scores.items()})
        parts = np.stack([out["background_share"], out["border_share"], 1.0 - accuracy, out["unlike_class"]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # a cluster with no component: NaN suspicion
            out["suspicion"] = np.nanmean(parts, axis=0)
        return out


def _cluster_positions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(clusters in summary order -- 0, 1, ... then noise -1 --, each image's position in that list)."""
    clusters = np.array(sorted(set(np.asarray(labels).tolist()), key=lambda c: (c < 0, c)), dtype=np.int64)
    lookup = {int(c): i for i, c in enumerate(clusters)}
    return clusters, np.array([lookup[int(c)] for c in labels], dtype=np.int64) if len(labels) else \
        np.zeros(0, np.int64)


def summarize_clusters(labels: np.ndarray, rows: pd.DataFrame, descriptors: np.ndarray,
                       consensus: np.ndarray, class_names: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per cluster, most suspicious first, and the prototypes (mean descriptors) [n_clusters, P].

    rows: the table rows of the clustered images (same order as `labels` and `descriptors`).
    consensus: [C, P] consensus map of each class (analysis.explore.class_consensus); a cluster's prototype is
    compared with the mean consensus of its members' predicted classes, so a cluster that looks elsewhere than
    its class usually does scores high.
    Noise (-1, HDBSCAN) is summarised too, as cluster -1, but always ranked last.
    """
    labels = np.asarray(labels, dtype=np.int64)
    descriptors = np.asarray(descriptors, dtype=np.float32)
    rows = rows.reset_index(drop=True)
    names = np.asarray(class_names, dtype=object)
    clusters, index = _cluster_positions(labels)
    inputs = SuspicionInputs(rows, descriptors, consensus)
    stats = inputs.statistics(index, len(clusters))
    # Class mix: label counts per cluster, ties in order of first appearance (as pandas' value_counts).
    n_labels = int(inputs.labels.max()) + 1 if len(inputs.labels) else 0
    label_counts = np.zeros((len(clusters), n_labels), np.int64)
    np.add.at(label_counts, (index, inputs.labels), 1)
    first_seen = np.full((len(clusters), n_labels), len(labels), np.int64)
    np.minimum.at(first_seen, (index, inputs.labels), np.arange(len(labels)))
    records = []
    for position, cluster in enumerate(clusters):
        present = np.nonzero(label_counts[position])[0]
        present = present[np.lexsort((first_seen[position, present], -label_counts[position, present]))]
        size = int(stats["size"][position])
        majority = int(present[0])
        mix = ", ".join(f"{names[int(c)]} {label_counts[position, c] / size:.0%}" for c in present[:3])
        if len(present) > 3:
            mix += f", +{len(present) - 3} more"
        records.append({
            "cluster": int(cluster),
            "size": size,
            "accuracy": float(stats["accuracy"][position]),
            "majority_class": majority,
            "majority_name": str(names[majority]),
            "class_mix": mix,
            "background_share": float(stats["background_share"][position]),
            "background_hotspot": float(stats["background_hotspot"][position]),
            "border_share": float(stats["border_share"][position]),
            "unlike_class": float(stats["unlike_class"][position]),
            "suspicion": float(stats["suspicion"][position]),
        })
    summary = pd.DataFrame.from_records(records, columns=[
        "cluster", "size", "accuracy", "majority_class", "majority_name", "class_mix", "background_share",
        "background_hotspot", "border_share", "unlike_class", "suspicion"])
    protos = stats["prototypes"] if len(clusters) else np.zeros((0, descriptors.shape[1]), np.float64)
    if len(summary):
        order = np.lexsort((summary["cluster"].to_numpy(), -summary["suspicion"].fillna(-1).to_numpy(),
                            (summary["cluster"] < 0).to_numpy()))
        summary = summary.iloc[order].reset_index(drop=True)
        protos = protos[order]
    summary.insert(0, "rank", np.arange(1, len(summary) + 1))
    return summary, protos.astype(np.float32)


@dataclass
class SuspicionCalibration:
    """How unusual each cluster's suspicion is against random partitions of the same images into clusters of
    the same sizes (see `calibrate_suspicion`). Frames and numbers are aligned with `clusters`."""

    clusters: np.ndarray        # cluster labels
    suspicion: np.ndarray       # observed suspicion
    null_mean: np.ndarray       # mean suspicion of a random group of the same size
    null_sd: np.ndarray
    z: np.ndarray               # (suspicion - null_mean) / null_sd
    p: np.ndarray               # share of random partitions whose most suspicious group scores at least this much
    null_max: np.ndarray        # [partitions] the highest suspicion of each random partition
    partitions: int

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"cluster": self.clusters, "suspicion_null": self.null_mean,
                             "suspicion_null_sd": self.null_sd, "suspicion_z": self.z, "suspicion_p": self.p})

    def top(self) -> dict[str, float]:
        """The most suspicious (non-noise) cluster against the most suspicious group of random partitions:
        its suspicion, the null's mean and sd, the z-score and the empirical p-value."""
        real = np.nonzero((self.clusters >= 0) & np.isfinite(self.suspicion))[0]
        if not len(real):
            return {"suspicion": float("nan"), "null_max_mean": float("nan"), "null_max_sd": float("nan"),
                    "z": float("nan"), "p": float("nan"), "partitions": int(self.partitions)}
        best = real[np.argmax(self.suspicion[real])]
        finite = self.null_max[np.isfinite(self.null_max)]
        mean = float(finite.mean()) if len(finite) else float("nan")
        sd = float(finite.std(ddof=1)) if len(finite) > 1 else float("nan")
        z = (float(self.suspicion[best]) - mean) / sd if sd > 0 else float("nan")
        return {"suspicion": float(self.suspicion[best]), "null_max_mean": mean, "null_max_sd": sd, "z": z,
                "p": float(self.p[best]), "partitions": int(self.partitions)}


def calibrate_suspicion(labels: np.ndarray, rows: pd.DataFrame, descriptors: np.ndarray, consensus: np.ndarray,
                        partitions: int = 100, seed: int = 0) -> SuspicionCalibration:
    """Calibrate the suspicion of a clustering against chance (ours; motivated by Adebayo et al. 2022,
    arXiv 2212.04629: explanations single out groups for clean models too).

    The null: the same images split at random into groups of the same sizes (a permutation of the labels),
    `partitions` times. A cluster's z-score compares its suspicion with random groups of its own size; its
    p-value is family-wise -- the share (with the +1 of an empirical p-value) of random partitions whose most
    suspicious group scores at least as high (the max-statistic, so that picking the top cluster is accounted
    for). Both depend on the scope only through its images, so they are comparable across scopes and caches
    where the raw suspicion is not (its components' baselines differ between datasets and models).
    """
    labels = np.asarray(labels, dtype=np.int64)
    rows = rows.reset_index(drop=True)
    clusters, index = _cluster_positions(labels)
    inputs = SuspicionInputs(rows, descriptors, consensus)
    observed = inputs.statistics(index, len(clusters))["suspicion"]
    rng = np.random.default_rng(seed)
    null = np.empty((partitions, len(clusters)), np.float64)
    for b in range(partitions):
        null[b] = inputs.statistics(index[rng.permutation(len(index))], len(clusters))["suspicion"]
    real = clusters >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        null_max = np.nanmax(null[:, real], axis=1) if real.any() and partitions else np.full(partitions, np.nan)
        null_mean = np.nanmean(null, axis=0) if partitions else np.full(len(clusters), np.nan)
        null_sd = np.nanstd(null, axis=0, ddof=1) if partitions > 1 else np.full(len(clusters), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(null_sd > 1e-12, (observed - null_mean) / null_sd, np.nan)
    # A tolerance below float noise, so that a cluster equal to the null (one cluster: the whole scope) is "as
    # extreme as chance" and not beyond it.
    exceed = (null_max[None, :] >= observed[:, None] - 1e-9).sum(axis=1)
    p = np.where(real & np.isfinite(observed) & (partitions > 0), (1.0 + exceed) / (1.0 + partitions), np.nan)
    return SuspicionCalibration(clusters=clusters, suspicion=observed, null_mean=null_mean, null_sd=null_sd, z=z,
                                p=p, null_max=null_max, partitions=int(partitions))


# ----------------------------------------------------------------------------------------------------------
# Settings, results, persistence next to the cache
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusteringSettings:
    scope: str = "all"
    class_index: int | None = None
    descriptor: str = "positive"
    algorithm: str = "kmeans"
    n_clusters: int = 0          # 0: use the eigengap suggestion
    n_neighbors: int = 10
    embedding: str = "tsne"
    max_points: int = 3000
    seed: int = 0

    def validate(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}")
        if self.descriptor not in DESCRIPTOR_KINDS:
            raise ValueError(f"descriptor must be one of {DESCRIPTOR_KINDS}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}")
        if self.n_clusters < 0 or self.n_neighbors < 1 or self.max_points < 2:
            raise ValueError("n_clusters >= 0, n_neighbors >= 1 and max_points >= 2 are required")

    def digest(self, cache_state: str) -> str:
        """Short hash naming the saved result: settings plus the state of the cache they were computed on."""
        payload = json.dumps({"settings": asdict(self), "cache": cache_state}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class ClusteringResult:
    ids: np.ndarray              # int64 [n] clustered image ids (a sample of the scope when it was larger)
    labels: np.ndarray           # int64 [n]
    embedding: np.ndarray        # float32 [n, 2]
    eigenvalues: np.ndarray      # float64 [m]
    suggested_k: int
    n_clusters: int              # the k used (for HDBSCAN: the number it found)
    scope_size: int              # images in the scope before sampling
    settings: ClusteringSettings = field(default_factory=ClusteringSettings)
    note: str = ""               # what the page should say about the input (identical maps, rows left out)
    identical: bool = False      # every map alike: one cluster, no embedding (all points at the origin)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"id": self.ids, "cluster": self.labels,
                             "x": self.embedding[:, 0], "y": self.embedding[:, 1]})


def run_clustering(ids: np.ndarray, descriptors: np.ndarray, settings: ClusteringSettings,
                   scope_size: int | None = None) -> ClusteringResult:
    """Eigengap, clustering and embedding of already-sampled descriptors (rows aligned with ids)."""
    settings.validate()
    ids = np.asarray(ids, dtype=np.int64)
    x = np.asarray(descriptors, dtype=np.float32)
    scope_size = int(scope_size if scope_size is not None else len(ids))
    notes = []
    finite = np.isfinite(x).all(axis=1) if x.ndim == 2 else np.zeros(len(ids), bool)
    if not finite.all():  # a damaged row: its descriptor says nothing, the others still cluster
        notes.append(f"{int((~finite).sum()):,} image(s) left out: their maps hold NaN or inf.")
        ids, x = ids[finite], x[finite]
    if len(ids) >= 2 and all_identical(x):
        notes.append(f"All {len(ids):,} maps of this scope give the same descriptor (no positive relevance "
                     "anywhere, e.g. a weak model or --denoise on a CAM layer with fewer than 10 channels): one "
                     "cluster, nothing to embed.")
        return ClusteringResult(ids=ids, labels=np.zeros(len(ids), np.int64), embedding=np.zeros((len(ids), 2),
                                np.float32), eigenvalues=np.zeros(0), suggested_k=1, n_clusters=1,
                                scope_size=scope_size, settings=settings, note=" ".join(notes), identical=True)
    gap = eigengap(x, settings.n_neighbors)
    k = settings.n_clusters or gap.suggested_k
    distinct = distinct_rows(x)
    if 0 < distinct < k:
        notes.append(f"Only {distinct} different maps: {distinct} clusters instead of {k}.")
        k = distinct
    labels = cluster_labels(x, settings.algorithm, k, settings.n_neighbors, settings.seed)
    found = int(len(set(labels[labels >= 0].tolist())))
    coords = embed_2d(x, settings.embedding, settings.n_neighbors, settings.seed)
    return ClusteringResult(ids=ids, labels=labels, embedding=coords, eigenvalues=gap.eigenvalues,
                            suggested_k=gap.suggested_k, n_clusters=found if settings.algorithm == "hdbscan" else k,
                            scope_size=scope_size, settings=settings, note=" ".join(notes))


def save_result(path: Path, result: ClusteringResult) -> None:
    """Write a result as parquet (id, cluster, x, y) with the rest in the schema metadata; atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "eigenvalues": [float(v) for v in result.eigenvalues],
        "suggested_k": int(result.suggested_k),
        "n_clusters": int(result.n_clusters),
        "scope_size": int(result.scope_size),
        "settings": asdict(result.settings),
        "note": result.note,
        "identical": bool(result.identical),
    }
    table = pa.Table.from_pandas(result.frame(), preserve_index=False)
    table = table.replace_schema_metadata({b"fgcam_clustering": json.dumps(meta).encode()})
    tmp = path.with_name(f".tmp-{path.name}")
    pq.write_table(table, tmp)
    tmp.replace(path)


def load_result(path: Path) -> ClusteringResult | None:
    """Read a saved result; None when absent or unreadable (then it is simply recomputed)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"fgcam_clustering"])
        frame = table.to_pandas()
        return ClusteringResult(
            ids=frame["id"].to_numpy(np.int64), labels=frame["cluster"].to_numpy(np.int64),
            embedding=frame[["x", "y"]].to_numpy(np.float32),
            eigenvalues=np.asarray(meta["eigenvalues"], np.float64), suggested_k=int(meta["suggested_k"]),
            n_clusters=int(meta["n_clusters"]), scope_size=int(meta["scope_size"]),
            settings=ClusteringSettings(**meta["settings"]), note=str(meta.get("note", "")),
            identical=bool(meta.get("identical", False)))
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
        return None
