"""The clusterings read from the kNN graph's spectrum or from the points: spectral clustering (cluster_qr on the
graph's eigenvectors) and k-means, each relabelled 0, 1, ... from the largest cluster."""
from __future__ import annotations

import warnings

import numpy as np


def clustering_name(algorithm: str, k: int) -> str:
    """The stored name of one clustering, e.g. "spectral_k7"."""
    return f"{algorithm}_k{k}"


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0, 1, ... from largest to smallest (ties by old label); -1 (noise) stays -1."""
    labels = np.asarray(labels, dtype=np.int64)
    kept = labels[labels >= 0]
    if kept.size == 0:
        return labels.copy()
    values, counts = np.unique(kept, return_counts=True)
    order = np.lexsort((values, -counts))
    mapping = np.full(int(values.max()) + 1, -1, np.int64)
    mapping[values[order]] = np.arange(len(values))
    return np.where(labels >= 0, mapping[np.maximum(labels, 0)], -1)


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
    return relabel_by_size(cluster_qr(embedding))


def kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means (one run from k-means++ seeding, scikit-learn's default), relabelled by size."""
    from sklearn.cluster import KMeans

    k = int(min(k, len(x)))
    if k <= 1:
        return np.zeros(len(x), np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # ConvergenceWarning for duplicate points: fewer distinct points than k
        labels = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(x)
    return relabel_by_size(labels)
