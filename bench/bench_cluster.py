"""Benchmark of `python -m analysis cluster`: wall time and peak memory on a real 70,000-image cache and on a
million synthetic descriptors, plus what the shortcut hunt finds on the real one.

    .venv/bin/python bench/bench_cluster.py --work /tmp/bench-cluster                 # both parts
    .venv/bin/python bench/bench_cluster.py --work /tmp/bench-cluster --only fmnist   # the 70k cache only
    .venv/bin/python bench/bench_cluster.py --work /tmp/bench-cluster --only synthetic --images 1000000
    .venv/bin/python bench/bench_cluster.py --work /tmp/bench-cluster --only fmnist --fidelity

The 70k cache (built once into WORK/fmnist70k, reused afterwards): all of Fashion-MNIST (60,000 training and
10,000 test images) as PNGs with foreground masks, the demo's corner tag (data/shortcut.py) on 97% of the
bags and on 0.3% of the other images, explained by the demo's CNN trained as `python -m data.demo` trains it
(tag on 97% of the training bags, 3 epochs), FG-CAM at the input layer (the demo's job options). The synthetic
cache (WORK/synthetic-N): N unit-mass 16 x 16 descriptors from a few smooth templates plus noise, with three
planted small groups (0.1%, 0.5% and 2% of the points) that look at a corner, are mostly misclassified and
have a high border share. Each run is `python -m analysis cluster` in a fresh process (peak memory = its
maximum resident set size); the load average of the machine before and after is printed (other work
shares the CPU). "first read" is what the Clusters page would read for its first render of scope `all`
(opening the cache, the summary, a display subsample and the density), in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.explore import cluster_offline as offline, clustering  # noqa: E402
from analysis.cache import CacheWriter, ShardRecords, load  # noqa: E402

OTHER_FRACTION = 0.003       # the tag on 0.3% of the images of other classes (as in issue 13's measurement)


def load_average() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


# ----------------------------------------------------------------------------------------------------------
# The real 70k cache
# ----------------------------------------------------------------------------------------------------------

def build_fmnist_cache(work: Path, threads: int) -> Path:
    """WORK/fmnist70k (see the module docstring); returns the cache directory. Skips what exists."""
    import torch

    from data import demo, demo_model, fashion_mnist, shortcut

    paths = demo.DemoPaths(work / "fmnist70k")
    if demo.cache_is_complete(paths.cache):
        return paths.cache
    paths.out.mkdir(parents=True, exist_ok=True)
    train = fashion_mnist.read_split(fashion_mnist.DEBIAN_DIR, "train")
    test = fashion_mnist.read_split(fashion_mnist.DEBIAN_DIR, "test")
    if not paths.model.is_file():
        torch.set_num_threads(threads)
        marked_train = shortcut.choose_marked(train.images, train.labels, "train")
        print(f"training the demo CNN on 60,000 images ({int(marked_train.sum())} tagged bags), 3 epochs ...",
              flush=True)
        result = demo_model.train(shortcut.plant(train.images, marked_train), train.labels, epochs=3, seed=0)
        demo_model.save_weights(result.model, paths.model, {"train_seconds": round(result.seconds, 1)})
    if not paths.shortcut_csv.is_file():
        images = np.concatenate([train.images, test.images])
        labels = np.concatenate([train.labels, test.labels])
        marked = np.concatenate([
            shortcut.choose_marked(train.images, train.labels, "test", seed=shortcut.SEED + 1,
                                   other_fraction=OTHER_FRACTION),
            shortcut.choose_marked(test.images, test.labels, "test", other_fraction=OTHER_FRACTION)])
        print(f"writing 70,000 PNGs with masks ({int(marked.sum())} tagged) ...", flush=True)
        demo.write_test_split(paths, fashion_mnist.Split(images, labels, train.source), marked)
    command = [sys.executable, "-m", "analysis",
               *demo.explain_command(paths, overwrite=paths.cache.exists(), batch_size=256, workers=1),
               "--no-cluster", "--device", "cpu"]
    print("explaining 70,000 images ...", flush=True)
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "DEMO_MODEL_WEIGHTS": str(paths.model)})
    if done.returncode != 0:
        raise SystemExit(f"the explain job failed (exit code {done.returncode})")
    return paths.cache


# ----------------------------------------------------------------------------------------------------------
# The synthetic cache
# ----------------------------------------------------------------------------------------------------------

SIDE = 16
PLANTED = (0.001, 0.005, 0.02)     # shares of the points in each planted group


def synthetic_descriptors(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(descriptors [n, SIDE*SIDE] float32, group [n]: -1 ordinary, 0.. planted): 8 smooth templates (objects at
    different places and sizes) mixed with noise, and the planted groups looking at a corner."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]

    def bump(cy: float, cx: float, width: float) -> np.ndarray:
        t = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2)).ravel()
        return t / t.sum()

    templates = np.stack([bump(*rng.uniform(4, 12, 2), rng.uniform(2, 4)) for _ in range(8)]).astype(np.float32)
    corners = [bump(0.5, 0.5, 0.8), bump(0.5, SIDE - 1.5, 0.8), bump(SIDE - 1.5, 0.5, 0.8)]
    group = np.full(n, -1, np.int64)
    start = 0
    order = rng.permutation(n)
    for g, share in enumerate(PLANTED):
        count = int(round(share * n))
        group[order[start:start + count]] = g
        start += count
    x = np.empty((n, SIDE * SIDE), np.float32)
    for lo in range(0, n, 100_000):
        hi = min(lo + 100_000, n)
        noise = rng.gamma(2.0, 1.0, (hi - lo, SIDE * SIDE)).astype(np.float32)
        noise /= noise.sum(axis=1, keepdims=True)
        base = templates[rng.integers(0, 8, hi - lo)]
        planted = group[lo:hi] >= 0
        corner = np.stack(corners)[np.maximum(group[lo:hi], 0)].astype(np.float32)
        mix = np.where(planted[:, None], 0.45 * corner + 0.35 * base, 0.8 * base)
        x[lo:hi] = mix + 0.2 * noise
    return x, group


def build_synthetic_cache(work: Path, n: int, seed: int = 0, shard: int = 50_000) -> Path:
    """WORK/synthetic-N/cache: a complete cache of n synthetic images (map size 8, descriptors 16 x 16)."""
    root = work / f"synthetic-{n}"
    cache_dir = root / "cache"
    try:
        if load(cache_dir).complete:
            return cache_dir
    except Exception:
        pass
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    rng = np.random.default_rng(seed)
    print(f"writing a synthetic cache of {n:,} images ...", flush=True)
    x, group = synthetic_descriptors(n, rng)
    names = [f"class{c}" for c in range(10)]
    label = rng.integers(0, 10, n)
    correct = np.where(group >= 0, rng.random(n) < 0.2, rng.random(n) < 0.9)
    pred = np.where(correct, label, (label + 1 + rng.integers(0, 9, n)) % 10)
    border = np.clip(np.where(group >= 0, 0.6, 0.25) + 0.1 * rng.standard_normal(n), 0, 1).astype(np.float32)
    writer = CacheWriter(cache_dir)
    writer.initialise()
    manifest = {
        "format_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "updated": None, "finished": None,
        "model": {"spec": "synthetic", "weights_sha256": "0" * 64, "checkpoint": None, "num_classes": 10},
        "dataset": {"root": str(root / "images"), "kind": "synthetic", "fingerprint": f"synthetic-{n}-{seed}",
                    "n_images": n},
        "options": {"map_size": 8, "descriptor_size": SIDE, "masks": None, "boxes": None},
        "class_names": names, "counts": {"images": n}, "software": {},
    }
    writer.write_manifest(manifest)
    for index, lo in enumerate(range(0, n, shard)):
        hi = min(lo + shard, n)
        ids = np.arange(lo, hi)
        maps = x[lo:hi].reshape(-1, 8, 2, 8, 2).sum(axis=(2, 4))   # 8 x 8 "maps": the descriptors pooled
        rows = pd.DataFrame({
            "id": ids, "path": [f"class{label[i]}/img_{i:07d}.png" for i in ids], "label": label[lo:hi],
            "pred": pred[lo:hi], "label_name": [names[c] for c in label[lo:hi]],
            "pred_name": [names[c] for c in pred[lo:hi]], "confidence": np.full(hi - lo, 0.9, np.float32),
            "top5_classes": [[int(p)] for p in pred[lo:hi]], "top5_probs": [[0.9]] * (hi - lo),
            "correct": correct[lo:hi], "background_share": np.full(hi - lo, np.nan, np.float32),
            "background_hotspot": np.full(hi - lo, np.nan, np.float32), "border_share": border[lo:hi],
            "concentration": np.full(hi - lo, 0.3, np.float32), "has_foreground": np.zeros(hi - lo, bool)})
        wrong = ~correct[lo:hi]
        writer.write_shard(index, ShardRecords(
            rows=rows, maps_pred=maps, maps_true=maps[wrong], descriptors_positive=x[lo:hi],
            descriptors_absolute=x[lo:hi], foreground=None,
            errors=pd.DataFrame({"id": [], "path": [], "reason": []})))
    writer.compact()
    manifest["finished"] = manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    writer.write_manifest(manifest)
    np.save(root / "planted_group.npy", group)
    return cache_dir


# ----------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------

def run_measured(command: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak resident memory in GiB, exit code) of a command in a fresh process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - started, usage.ru_maxrss / 2 ** 20, process.returncode


FIRST_READ = """
import sys, time
started = time.perf_counter()
from analysis.cache import load
cache = load(sys.argv[1])
stored = offline.read_clustering(cache, "all")
summary = stored.summary
points = stored.display_points(20000)
density = stored.density()
box = stored.ids_in_box(*density[1][[0, -1]], *density[2][[0, -1]])
print(f"{time.perf_counter() - started:.3f} {len(points)} {len(box)}")
"""


def first_read_seconds(cache_dir: Path) -> str:
    done = subprocess.run([sys.executable, "-c", FIRST_READ, str(cache_dir)], cwd=REPO, capture_output=True,
                          text=True)
    return done.stdout.split()[0] if done.returncode == 0 else f"failed: {done.stderr.strip()[-200:]}"


def stage_seconds(cache_dir: Path, settings: clustering.ClusteringSettings) -> dict[str, float]:
    """Seconds per step, summed over the run's scopes (from each scope's stored timings)."""
    totals: dict[str, float] = {}
    for stored in offline.stored_scopes(cache_dir, None):
        if stored.path.parent.name != settings.key():
            continue
        for name, seconds in stored.meta.get("timings", {}).items():
            totals[name] = totals.get(name, 0.0) + float(seconds)
    return totals


def shortcut_report(cache_dir: Path, csv: Path, group_file: Path | None = None) -> list[str]:
    """What the default clusterings find: for `all` and `pred:bag`, the top-3 clusters' size, share of tagged
    members and share of the tagged images of other classes they hold."""
    cache = load(cache_dir)
    table = cache.table
    if group_file is None:
        from data.demo import read_shortcut_csv

        marks = pd.DataFrame(read_shortcut_csv(csv))[["path", "marked"]]
        table = table.merge(marks, on="path", how="left")
        tagged = table["marked"].fillna(False).to_numpy(bool)
        target = tagged & (table["label_name"] != "bag").to_numpy()
        scopes = ["all", "pred:bag"]
    else:
        group = np.load(group_file)
        tagged = target = group[table["id"].to_numpy()] >= 0
        scopes = ["all"]
    by_id = pd.Series(np.arange(len(table)), index=table["id"].to_numpy())
    lines = []
    for scope in scopes:
        for algorithm in clustering.ALGORITHMS:
            stored = offline.read_clustering(cache, scope, algorithm=algorithm)
            frame = stored.assignments
            rows = by_id.loc[frame["id"].to_numpy()].to_numpy()
            in_scope = target[rows]
            parts = []
            for record in stored.summary.head(3).itertuples():
                members = frame["cluster"].to_numpy() == record.cluster
                parts.append(f"#{record.rank}: {record.size:,} images, {tagged[rows][members].mean():.0%} tagged, "
                             f"holds {in_scope[members].sum() / max(in_scope.sum(), 1):.0%}")
            lines.append(f"{scope:9} {stored.name:12} ({in_scope.sum()} targets; top z {stored.calibration['z']:.1f}, "
                         f"p {stored.calibration['p']:.3f}): " + "; ".join(parts))
    return lines


def measure(name: str, cache_dir: Path, scopes: list[str], threads: int, extra: list[str]) -> dict:
    settings = clustering.ClusteringSettings()
    shutil.rmtree(cache_dir / offline.RESULTS_DIR, ignore_errors=True)
    command = [sys.executable, "-m", "analysis", "cluster", "--cache", str(cache_dir), "--scopes", *scopes,
               "--threads", str(threads), "--quiet", *extra]
    before = load_average()
    seconds, peak, code = run_measured(command)
    after = load_average()
    cache = load(cache_dir)
    n_scopes = len(offline.fresh_scopes(cache))
    return {"name": name, "images": len(cache), "scopes": n_scopes, "seconds": seconds, "peak_gib": peak,
            "exit": code, "load": f"{before} -> {after}", "stages": stage_seconds(cache_dir, settings),
            "first_read": first_read_seconds(cache_dir)}


def fidelity(cache_dir: Path, threads: int, share: float = 0.25, sample: int = 5000) -> list[str]:
    """What the subsample path (t-SNE of a share of the points, the rest placed from their neighbours, then
    refined together) costs in fidelity, on the `all` scope of a real cache: the share of each point's 15
    nearest neighbours (cosine kNN graph) that are among its 15 nearest in the plane, for the full t-SNE, the
    placement alone and placement + refinement, with their times."""
    from sklearn.neighbors import NearestNeighbors

    cache = load(cache_dir)
    points = clustering.geometry(cache.descriptors(None, "positive"), "cosine")
    graph = clustering.knn_graph(points, 15, threads=threads)
    rng = np.random.default_rng(0)
    probe = rng.choice(len(points), min(sample, len(points)), replace=False)

    def kept(coords: np.ndarray) -> float:
        _, nearest = NearestNeighbors(n_neighbors=16).fit(coords).kneighbors(coords[probe])
        return float(np.mean([len(set(a[1:]) & set(b)) / 15 for a, b in zip(nearest, graph.indices[probe])]))

    # pynndescent's recall: its neighbours of the probe points against the exact ones (cosine geometry).
    squared = np.einsum("ij,ij->i", points, points)
    exact = []
    for start in range(0, len(probe), 500):
        rows = probe[start:start + 500]
        d = squared[rows, None] + squared[None, :] - 2 * points[rows] @ points.T
        d[np.arange(len(rows)), rows] = np.inf
        exact.append(np.argsort(d, axis=1)[:, :15])
    exact = np.concatenate(exact)
    recall = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(graph.indices[probe], exact)])
    embed_max = int(share * len(points))
    lines = [f"kNN graph of `all` ({graph.method}): recall {recall:.1%} of the exact 15 nearest neighbours "
             f"({len(probe):,} points)",
             f"fidelity on `all` of {cache_dir} ({len(points):,} points; subsample {embed_max:,}):"]
    for label, kwargs in (("full t-SNE", {}), ("subsample + placement only", {"embed_max": embed_max,
                                                                           "polish_iterations": 0}),
                          ("subsample + placement + 100 iterations", {"embed_max": embed_max})):
        started = time.perf_counter()
        coords, _ = clustering.tsne_layout(points, graph, threads=threads, **kwargs)
        lines.append(f"  {label}: {kept(coords):.1%} of the 15 nearest neighbours kept, "
                     f"{time.perf_counter() - started:.0f} s")
    return lines


def print_table(rows: list[dict], threads: int) -> None:
    print(f"\nthreads: {threads}; cores: {os.cpu_count()}")
    print("| cache | images | scopes | wall time | peak memory | kNN | spectrum | clusters | t-SNE | summaries + null "
          "| first read (all) | load average (1, 5, 15 min) before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["stages"]
        print(f"| {r['name']} | {r['images']:,} | {r['scopes']} | {r['seconds']:.0f} s | {r['peak_gib']:.2f} GiB "
              f"| {s.get('knn', 0):.0f} s | {s.get('spectrum', 0):.0f} s | {s.get('clusters', 0):.0f} s "
              f"| {s.get('embedding', 0):.0f} s | {s.get('summaries', 0):.0f} s | {r['first_read']} s | {r['load']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the benchmark caches (reused)")
    parser.add_argument("--only", choices=("fmnist", "synthetic"), default=None)
    parser.add_argument("--images", type=int, default=1_000_000, help="synthetic images")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fidelity", action="store_true",
                        help="also measure the subsample path's fidelity on the 70k cache (about 10 minutes)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows, reports = [], []
    if args.only in (None, "fmnist"):
        cache_dir = build_fmnist_cache(args.work, args.threads)
        rows.append(measure("Fashion-MNIST 70k, every scope", cache_dir, list(offline.DEFAULT_SCOPES),
                            args.threads, []))
        reports += shortcut_report(cache_dir, cache_dir.parent / "shortcut.csv")
    if args.only in (None, "synthetic"):
        cache_dir = build_synthetic_cache(args.work, args.images)
        rows.append(measure(f"synthetic {args.images:,}, scope all", cache_dir, ["all"], args.threads, []))
        reports += shortcut_report(cache_dir, Path(), cache_dir.parent / "planted_group.npy")
    if args.fidelity:
        reports += fidelity(build_fmnist_cache(args.work, args.threads), args.threads)
    print_table(rows, args.threads)
    print()
    for line in reports:
        print(line)
    print(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
