"""The 2-D layout of every point of a scope: openTSNE on the shared kNN graph, with a subsample embedded
first and the rest placed from their neighbours above embed_max points (see the package docstring, step 4)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from analysis.explore import clustering
from analysis.explore.cluster_offline.settings import BH_MAX, OPENTSNE_MIN, Progress, REFINE_ITERATIONS, THREADED_MIN
from analysis.explore.cluster_offline.graph import KnnGraph, knn_graph


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
