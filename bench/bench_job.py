"""Benchmark of the offline job: images/s of the whole job against the engine alone on the same batches,
and cache bytes per image.

    .venv/bin/python bench/bench_job.py                       # CPU defaults: resnet18, 64 px, 192 images
    .venv/bin/python bench/bench_job.py --device cuda --image-size 224 --images 2048 --batch-size 64 --workers 8

"Engine alone" runs exactly the engine calls the job makes (the predicted-class maps for every image, and
a second call with classes=labels on the misclassified ones) on batches that are already decoded,
preprocessed and on the device. "Job loop" is the job's shard loop: reading and decoding files in worker
processes, the same engine calls, resizing, scores, descriptors, and the atomic shard commits.
"End to end" adds validation (model load, dry run) and the final compaction.
`--channel-relevance` measures what storing each image's channel relevance costs (issue 15): the job's work per
batch (explain_batch, shard_records, an atomic shard commit) with and without it (the job's
`channel_relevance_arrays` replaced by nothing), interleaved batch by batch in alternating order, so that load from
other processes hits both alike; the ratio of the summed times and the median of the per-pair ratios.
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

from analysis.pipeline import job, plan as job_plan  # noqa: E402
from analysis.__main__ import build_parser  # noqa: E402
from analysis.cache import CacheWriter, load  # noqa: E402
from analysis.commands.explain import options_from  # noqa: E402
from analysis.pipeline.datasets import collate_items, ExplainDataset  # noqa: E402
from tests.helpers import make_image_folder  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def engine_alone(plan: job_plan.JobPlan) -> float:
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


def channel_relevance_overhead(plan: job_plan.JobPlan, scratch: Path, rounds: int) -> tuple[float, float, int]:
    """(summed seconds storing / not storing - 1, median of the per-pair ratios - 1, pairs) over `rounds` passes
    over the batches, each batch explained, assembled and committed once with and once without."""
    dataset = ExplainDataset(plan.listing, plan.labels, plan.loaded.transform, plan.loaded.in_channels,
                             plan.map_size, plan.loaded.geometry)
    batches = [collate_items([dataset[i] for i in range(start, min(start + plan.batch_size, len(dataset)))])
               for start in range(0, len(dataset), plan.batch_size)]
    writer = CacheWriter(scratch)
    writer.initialise(wipe=True)
    storing, shard = job.channel_relevance_arrays, 0
    totals, ratios = {True: 0.0, False: 0.0}, []

    def once(batch, store: bool) -> float:
        nonlocal shard
        job.channel_relevance_arrays = storing if store else (lambda *_: {})
        try:
            start = time.perf_counter()
            output = job.explain_batch(plan.explainer, batch, plan.device, plan.target_layer, plan.map_size,
                                       plan.descriptor_size)
            writer.write_shard(shard, job.shard_records([output], [], plan))
            _sync(plan.device)
            return time.perf_counter() - start
        finally:
            job.channel_relevance_arrays = storing
            shard += 1

    once(batches[0], True)  # warm-up
    for round_ in range(rounds):
        for index, batch in enumerate(batches):
            order = (True, False) if (round_ + index) % 2 == 0 else (False, True)
            seconds = {store: once(batch, store) for store in order}
            totals[True] += seconds[True]
            totals[False] += seconds[False]
            ratios.append(seconds[True] / seconds[False])
    return totals[True] / totals[False] - 1, float(sorted(ratios)[len(ratios) // 2]) - 1, len(ratios)


def job_loop(args: argparse.Namespace, out: Path) -> tuple[float, float, int]:
    """(loop images/s, end-to-end images/s, images) of one fresh job run."""
    start = time.perf_counter()
    plan = job_plan.prepare(options_from(args), job_plan.Ranks())
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
                        help="instead: what storing the channel relevance adds to the job's work per batch "
                             "(--repeats passes, interleaved)")
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
        if options.channel_relevance:
            plan = job_plan.prepare(options_from(args), job_plan.Ranks())
            total, median, pairs = channel_relevance_overhead(plan, work / "scratch", options.repeats)
            k = int(plan.explainer(collate_items([ExplainDataset(
                plan.listing, plan.labels, plan.loaded.transform, plan.loaded.in_channels, plan.map_size,
                plan.loaded.geometry)[0]]).images.to(plan.device)).channel_relevance.shape[1])
            print(f"model torchvision:{options.model} (random weights), {len(plan.listing.samples)} images of "
                  f"{options.image_size} px, batch {options.batch_size}, device {options.device}, {k} channels "
                  f"({4 * k} bytes per image): storing the channel relevance adds {100 * total:.1f}% to the job's "
                  f"work per batch (summed over {pairs} interleaved pairs; median pair {100 * median:+.1f}%)")
            return
        engine_rate = loop_rate = end_rate = 0.0
        for _ in range(options.repeats):  # alternate, so a burst of load from other processes hits both
            plan = job_plan.prepare(options_from(args), job_plan.Ranks())
            engine_rate = max(engine_rate, engine_alone(plan))
            del plan
            loop, end, n = job_loop(args, work / "cache")
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

        print(f"{'':40s} {'images/s':>8s} {'vs engine':>10s}")
        for name, rate, share in rows:
            print(f"{name:40s} {rate:>8s} {share:>10s}")
        print(f"{'cache bytes per image':40s} {size / n:8.0f}   ({size / 2**20:.1f} MiB for {n} images, "
              f"maps {options.map_size}x{options.map_size} float16)")
    finally:
        if options.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
