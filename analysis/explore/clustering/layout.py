"""The 2-D layout of every point of a clustering: t-SNE on the shared kNN graph (openTSNE; scikit-learn's for
small sets; above embed_max points a subsample embedded first and the rest placed from their neighbours), or the
graph's spectral axes."""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import numpy as np

from analysis.explore.clustering.graph import KnnGraph, knn_graph
from analysis.explore.clustering.settings import (BH_MAX, OPENTSNE_MIN, Progress, REFINE_ITERATIONS, REFINE_MIN,
                                                  THREADED_MIN)


@dataclass
class EmbeddingInfo:
    method: str
    embedded: int            # points optimised by t-SNE from the start
    placed: int              # points placed from their neighbours, then optimised with the rest
    iterations: int
    seconds: float


def line_layout(n: int) -> np.ndarray:
    """Points on a line: the layout of fewer than 4 points (neither t-SNE nor spectral axes are defined)."""
    return np.column_stack([np.arange(n, dtype=np.float32), np.zeros(n, np.float32)])


def spectral_layout(vectors: np.ndarray, degree: np.ndarray) -> np.ndarray:
    """[n, 2]: the graph's two leading non-trivial Laplacian eigenvectors, scaled by D^-1/2 (no extra cost: the
    spectrum is solved for the eigengap anyway)."""
    scaled = vectors[:, 1:3] / np.sqrt(np.maximum(degree, 1e-12))[:, None]
    coords = np.zeros((len(vectors), 2), np.float32)
    coords[:, :scaled.shape[1]] = scaled
    return coords


def place_from_neighbours(coords: np.ndarray, placed: np.ndarray, indices: np.ndarray,
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


def _small_tsne(x: np.ndarray, seed: int) -> np.ndarray:
    """scikit-learn's t-SNE with the perplexity capped at (n - 1) / 3: openTSNE's early exaggeration collapses a
    few dozen points to 0 (measured). The caller never passes identical points (t-SNE's PCA start divides by
    their zero spread and crashes scikit-learn's native code, see graph.all_identical)."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        coords = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                      random_state=seed).fit_transform(np.asarray(x, np.float64))
    return np.asarray(coords, np.float32)


def _optimise(start: np.ndarray, graph: KnnGraph, phases: list[tuple[int, float, float]], seed: int, threads: int,
              label: str, progress: Progress | None) -> np.ndarray:
    """openTSNE from `start` with uniform affinities on the kNN graph, phase by phase (iterations, exaggeration,
    momentum), in steps of 50 iterations to report progress (the optimiser keeps its state between calls)."""
    from openTSNE import TSNEEmbedding, affinity
    from openTSNE.nearest_neighbors import PrecomputedNeighbors

    small = len(start) < BH_MAX
    jobs = 1 if len(start) < THREADED_MIN else threads
    affinities = affinity.Uniform(knn_index=PrecomputedNeighbors(graph.indices, graph.distances),
                                  symmetrize="max", n_jobs=jobs)
    embedding = TSNEEmbedding(np.ascontiguousarray(start, np.float64), affinities, n_jobs=jobs,
                              random_state=seed, negative_gradient_method="bh" if small else "fft")
    total, done = sum(p[0] for p in phases), 0
    for iterations, exaggeration, momentum in phases:
        left = iterations
        while left > 0:
            step = min(50, left)
            embedding = embedding.optimize(n_iter=step, exaggeration=exaggeration, momentum=momentum, inplace=True)
            left, done = left - step, done + step
            if progress:
                progress(f"{label} {done}/{total}")
    return np.asarray(embedding, dtype=np.float64)


def _shrunk_start(init: np.ndarray | None) -> np.ndarray | None:
    """An initial layout centred and shrunk to a standard deviation of 1e-4 (openTSNE's scale for
    initialisations); None when there is none or every point lies at one place."""
    if init is None:
        return None
    start = np.array(init, np.float64) - np.mean(init, axis=0)
    spread = float(start.std(axis=0).max())
    return start * (1e-4 / spread) if np.isfinite(spread) and spread > 0 else None


def tsne_layout(x: np.ndarray, graph: KnnGraph, seed: int = 0, threads: int | None = None,
                embed_max: int = 250_000, init: np.ndarray | None = None, polish_iterations: int = 100,
                progress: Progress | None = None) -> tuple[np.ndarray, EmbeddingInfo]:
    """2-D t-SNE coordinates [n, 2] of every point: openTSNE's FFT-accelerated t-SNE (Linderman et al. 2019)
    with uniform affinities on the kNN graph (Boehm, Berens, Kobak, JMLR 2022: a uniform kernel on the k = 15
    nearest neighbours gives nearly the embedding of perplexity 30), PCA initialisation (Kobak & Linderman 2021).
    Above `embed_max` points: t-SNE of a seeded uniform subsample, every other point placed at the mean position
    of its embedded nearest neighbours, then `polish_iterations` of t-SNE on all points from there. Below
    OPENTSNE_MIN points, scikit-learn's t-SNE (see `_small_tsne`), unless `init` is given for REFINE_MIN points
    or more.

    `init` [n, 2]: a layout to start from (a scope's points in the all-images layout): it is shrunk (at the
    all-images scale the FFT grid, and so each iteration, is several times larger) and refined for
    REFINE_ITERATIONS without exaggeration, so the scope keeps the orientation of the all-images map. Measured on
    the 5,121 mistakes of the 70k demo cache: 42.3% of each point's 15 nearest neighbours are also its nearest in
    the plane after this, 43.0% after a full 750-iteration t-SNE from PCA, at a fifth of the time. Below BH_MAX
    points the Barnes-Hut gradient runs, above it the FFT one (whose cost has a fixed part, about 15 ms an
    iteration, that dominates small scopes); below THREADED_MIN points one thread. A small scope with `init`
    is refined too: on the small demo's 21 scopes of 76-156 images, 63.1% of the 15 nearest neighbours kept in
    the plane against 61.7% for scikit-learn's full t-SNE, in 0.9 s against 7.3 s (one thread). Below REFINE_MIN
    points the refinement hardly moves the points from their shrunk start (a dozen points stay 1e-4 apart).
    """
    from openTSNE import initialization

    started = time.perf_counter()
    n = len(x)
    threads = threads or os.cpu_count() or 1
    if n < 4:
        return line_layout(n), EmbeddingInfo("line", n, 0, 0, 0.0)
    if n < OPENTSNE_MIN and (n < REFINE_MIN or _shrunk_start(init) is None):
        coords = _small_tsne(x, seed)
        return coords, EmbeddingInfo("tsne (scikit-learn)", n, 0, 1000, round(time.perf_counter() - started, 3))
    subsample = n > embed_max
    chosen = np.sort(np.random.default_rng(seed).choice(n, embed_max, replace=False)) if subsample else np.arange(n)
    start = None if subsample else _shrunk_start(init)
    refine_only = start is not None
    phases = [(REFINE_ITERATIONS, 1.0, 0.8)] if refine_only else [(250, 12.0, 0.5), (500, 1.0, 0.8)]
    if not refine_only:
        start = initialization.pca(x[chosen], random_state=seed)
    first_graph = knn_graph(x[chosen], graph.indices.shape[1], seed, threads) if subsample else graph
    coords = _optimise(start, first_graph, phases, seed, threads,
                       f"t-SNE of {len(chosen):,}" if subsample else "t-SNE", progress)
    iterations = sum(p[0] for p in phases)
    if subsample:
        full = np.zeros((n, 2), np.float64)
        full[chosen] = coords
        placed = np.zeros(n, bool)
        placed[chosen] = True
        coords = place_from_neighbours(full, placed, graph.indices)
        if polish_iterations:
            coords = _optimise(coords, graph, [(polish_iterations, 1.0, 0.8)], seed, threads, "t-SNE, all points",
                               progress)
            iterations += polish_iterations
    info = EmbeddingInfo("tsne" if not refine_only else "tsne (from the all-images layout)", len(chosen),
                         n - len(chosen), iterations, round(time.perf_counter() - started, 3))
    return coords.astype(np.float32), info
