"""Benchmark of the offline job: images/s of the whole job against the engine alone on the same batches,
and cache bytes per image.

    .venv/bin/python bench/bench_job.py                       # CPU defaults: resnet18, 64 px, 192 images
    .venv/bin/python bench/bench_job.py --device cuda --image-size 224 --images 2048 --batch-size 64 --workers 8

"Engine alone" runs exactly the engine calls the job makes (the predicted-class maps for every image, and
a second call with classes=labels on the misclassified ones) on batches that are already decoded,
preprocessed and on the device. "Job loop" is the job's shard loop: reading and decoding files in worker
processes, the same engine calls, resizing, scores, descriptors, and the atomic shard commits.
"End to end" adds validation (model load, dry run) and the final compaction.
`--channel-relevance` adds the job loop without storing each image's channel relevance (issue 15; the job's
`channel_relevance_arrays` replaced by nothing for that run, alternated with the others): what storing it costs.
The model is a randomly initialised torchvision network saved as a checkpoint (no download needed).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import job  # noqa: E402
from analysis.__main__ import build_parser  # noqa: E402
from analysis.cache import CacheWriter, load  # noqa: E402
from data.datasets import collate_items, ExplainDataset  # noqa: E402
from tests.helpers import make_image_folder  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def engine_alone(plan: job.JobPlan) -> float:
    """images/s of the engine calls on preloaded device batches (same batches as the job)."""
    dataset = ExplainDataset(plan.listing, plan.labels, plan.loaded.transform, plan.loaded.in_channels,
                             plan.map_size, plan.loaded.geometry)
    ids = list(range(len(dataset)))
    batches = []
    for start in range(0, len(ids), plan.batch_size):
        batch = collate_items([dataset[i] for i in ids[start:start + plan.batch_size]])
        batches.append((batch.images.to(plan.device), batch.labels.to(plan.device)))

    def one_pass() -> None:
        for images, labels in batches:
            result = plan.explainer(images, target_layer=plan.target_layer)
            wrong = result.classes != labels
            if wrong.any():
                plan.explainer(images[wrong], target_layer=plan.target_layer, classes=labels[wrong])
        _sync(plan.device)

    plan.explainer(batches[0][0], target_layer=plan.target_layer)  # warm-up (allocator, kernels)
    _sync(plan.device)
    start = time.perf_counter()
    one_pass()
    return len(ids) / (time.perf_counter() - start)


def job_loop(args: argparse.Namespace, out: Path) -> tuple[float, float, int]:
    """(loop images/s, end-to-end images/s, images) of one fresh job run."""
    start = time.perf_counter()
    plan = job.prepare(args, job.Ranks())
    writer = CacheWriter(plan.out)
    writer.initialise(wipe=plan.wipe)
    writer.write_manifest(plan.manifest)
    # Warm-up outside the timing, as for the engine: one batch through the engine.
    dataset = ExplainDataset(plan.listing, plan.labels, plan.loaded.transform, plan.loaded.in_channels,
                             plan.map_size, plan.loaded.geometry)
    warm = collate_items([dataset[i] for i in range(min(plan.batch_size, len(dataset)))])
    plan.explainer(warm.images.to(plan.device), target_layer=plan.target_layer)
    _sync(plan.device)
    loop_start = time.perf_counter()
    processed = job.explain_shards(plan, writer, list(range(plan.n_shards)), show_progress=False)
    _sync(plan.device)
    loop_seconds = time.perf_counter() - loop_start
    job._finish(plan, writer)
    total_seconds = time.perf_counter() - start
    return processed / loop_seconds, processed / total_seconds, processed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="torchvision model name (random weights)")
    parser.add_argument("--images", type=int, default=192, help="number of generated images")
    parser.add_argument("--image-size", type=int, default=64, help="generated and model input size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--map-size", type=int, default=64)
    parser.add_argument("--base", default="gradcam")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating engine / job measurements; the best of each is kept (shared machines)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the data and cache in this folder")
    parser.add_argument("--channel-relevance", action="store_true",
                        help="also time the job loop without storing the channel relevance (its overhead)")
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_job_")) if options.keep is None else options.keep
    try:
        classes = ("a", "b", "c")
        make_image_folder(work / "images", classes=classes, per_class=max(1, options.images // len(classes)),
                          size=options.image_size)
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models, options.model)(num_classes=len(classes))
        torch.save(model.state_dict(), work / "model.pth")
        argv = ["explain", "--data", str(work / "images"), "--model", f"torchvision:{options.model}",
                "--checkpoint", str(work / "model.pth"), "--num-classes", str(len(classes)),
                "--image-size", str(options.image_size), "--out", str(work / "cache"), "--overwrite",
                "--batch-size", str(options.batch_size), "--workers", str(options.workers),
                "--device", options.device, "--map-size", str(options.map_size), "--base", options.base,
                "--quiet"]
        args = build_parser().parse_args(argv)
        engine_rate = loop_rate = end_rate = bare_rate = 0.0
        storing = job.channel_relevance_arrays
        for _ in range(options.repeats):  # alternate, so a burst of load from other processes hits both
            plan = job.prepare(args, job.Ranks())
            engine_rate = max(engine_rate, engine_alone(plan))
            del plan
            if options.channel_relevance:
                job.channel_relevance_arrays = lambda *_: {}
                try:
                    bare_rate = max(bare_rate, job_loop(args, work / "cache")[0])
                finally:
                    job.channel_relevance_arrays = storing
            loop, end, n = job_loop(args, work / "cache")   # last: the cache measured below is the job's own
            loop_rate, end_rate = max(loop_rate, loop), max(end_rate, end)
        cache = load(work / "cache")
        wrong = int((~cache.table["correct"]).sum())
        size = directory_bytes(work / "cache")
        device = torch.cuda.get_device_name() if options.device.startswith("cuda") else \
            f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"
        print(f"model torchvision:{options.model} (random weights), {n} images of {options.image_size} px, "
              f"batch {options.batch_size}, workers {options.workers}, map {options.map_size}, base {options.base}, "
              f"device {device}; {wrong} misclassified -> second engine call on them; "
              f"best of {options.repeats}")
        rows = [
            ("engine alone (preloaded batches)", f"{engine_rate:8.1f}", "100.0%"),
            ("job loop (files -> committed shards)", f"{loop_rate:8.1f}", f"{100 * loop_rate / engine_rate:5.1f}%"),
            ("job end to end (+ setup, compaction)", f"{end_rate:8.1f}", f"{100 * end_rate / engine_rate:5.1f}%"),
        ]
        if options.channel_relevance:
            rows.insert(2, ("job loop, channel relevance not stored", f"{bare_rate:8.1f}",
                            f"{100 * bare_rate / engine_rate:5.1f}%"))
        print(f"{'':40s} {'images/s':>8s} {'vs engine':>10s}")
        for name, rate, share in rows:
            print(f"{name:40s} {rate:>8s} {share:>10s}")
        print(f"{'cache bytes per image':40s} {size / n:8.0f}   ({size / 2**20:.1f} MiB for {n} images, "
              f"maps {options.map_size}x{options.map_size} float16)")
        if options.channel_relevance:
            print(f"storing the channel relevance costs {100 * (bare_rate / loop_rate - 1):.1f}% of the job loop's "
                  f"time ({cache.channel_relevance([0]).shape[1]} channels, "
                  f"{2 * 2 * cache.channel_relevance([0]).shape[1]} bytes per image)")
    finally:
        if options.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
