"""The spectrum of a kNN graph's normalised Laplacian (solved per connected component), the eigengap's number of
clusters and the eigenvectors that spectral clustering and the spectral layout read (SpRAy's steps, Lapuschkin et
al. 2019)."""
from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components, laplacian
from scipy.sparse.linalg import ArpackNoConvergence, eigsh


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
