"""How long the Clusters page's "Re-cluster these images" takes (analysis.explore.cluster_data.recluster_selection:
the clustering engine on a selection, then the summaries), by selection size and algorithm, on a synthetic cache
(random maps: the timing, not the clusters, is the point). Prints one table.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_recluster.py [--sizes 500 2000 5000] [--cache DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.cache import load  # noqa: E402
from analysis.explore.cluster_data import recluster_selection  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[500, 2000, 5000])
    parser.add_argument("--cache", type=Path, default=None, help="a cache to read (default: a synthetic one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = args.cache
        if root is None:
            from tests.helpers import write_synthetic_cache

            root = Path(folder) / "cache"
            write_synthetic_cache(root, n_images=max(args.sizes), shard_size=1000, map_size=16)
        cache = load(root)
        ids = cache.table["id"].to_numpy(np.int64)
        print(f"{'images':>7} {'algorithm':>9} {'k':>3} {'seconds':>8}")
        for size in args.sizes:
            for algorithm in ("kmeans", "spectral"):
                started = time.perf_counter()
                result, _, _ = recluster_selection(cache, ids[:size], 0, algorithm)
                print(f"{size:>7,} {algorithm:>9} {result.n_clusters:>3} {time.perf_counter() - started:>8.1f}")


if __name__ == "__main__":
    main()
