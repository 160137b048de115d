"""The explain job: explain a whole labelled dataset into a resumable, shardable cache.

Method (what is computed per batch) is `explain_batch`; machinery (sharding, resume, ranks, data loading,
commits) is the rest; the checks before any work are in analysis/pipeline/plan.py and the command line is
analysis/commands/explain.py (`python -m analysis explain`, which then runs the clustering and the
concepts). From Python: `explain_dataset(ExplainOptions(data=..., out=..., model=...))`.

Image id = index in the sorted dataset list (after --limit); shard k holds ids [k*S, (k+1)*S); with torchrun,
rank r takes the shards k with k % world_size == r. A shard is committed atomically (see analysis.cache), so a
rerun skips committed shards: no duplicates, no gaps.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.cache import (BOX_COLUMNS, SIZE_COLUMNS, CacheLocked, CacheWriter, ShardRecords, WriterLock, load,
                            now_iso, probability_arrays)
from analysis.pipeline.faithfulness import faithfulness_scores
from analysis.pipeline.channel_relevance import channel_relevance_arrays
from analysis.pipeline.label_check import label_mismatch
from analysis.pipeline.scores import all_scores, descriptors, resize_maps
from analysis.pipeline.datasets import Batch, ExplainDataset, collate_items
from analysis.pipeline.plan import ExplainOptions, JobPlan, Ranks, SetupError, out_snapshot, prepare


SCORE_COLUMNS = ("background_share", "background_hotspot", "border_share", "concentration")
FAITHFULNESS_COLUMNS = ("deletion_auc", "insertion_auc")


@dataclass
class BatchOutput:
    """CPU results for the explained images of one batch (row order = batch.ids)."""

    ids: np.ndarray
    labels: np.ndarray
    pred: np.ndarray
    confidence: np.ndarray
    top_classes: np.ndarray
    top_probs: np.ndarray
    maps_pred: np.ndarray             # float32 [n, M, M]
    maps_true: np.ndarray             # float32 [n_wrong, M, M] (rows where pred != label, in order)
    scores: dict[str, np.ndarray]
    descriptors_positive: np.ndarray
    descriptors_absolute: np.ndarray
    foreground: np.ndarray | None
    has_foreground: np.ndarray
    sizes: np.ndarray                 # int [n, 2] original (width, height)
    boxes: np.ndarray                 # float [n, 4] crop boxes in original pixels (NaN: unknown)
    row_arrays: dict[str, np.ndarray] = field(default_factory=dict)   # analysis.cache.ROW_ARRAYS, [n, ...] each


def explain_batch(explainer: Any, batch: Batch, device: torch.device, target_layer: str, map_size: int,
                  descriptor_size: int, faithfulness_steps: int = 0) -> BatchOutput:
    """Explain the predicted class of every image, and the true class of the misclassified ones.

    Predictions come from the engine's logits (no second forward pass). Scores and descriptors are computed
    on the predicted-class map at map size, on the device; with ``faithfulness_steps``, the deletion and
    insertion AUCs of the full-resolution predicted-class map too. Every image's class probabilities are
    kept (float16; the top 20 for more than 100 classes) for the label-error ranking, and each CAM-layer
    channel's relevance for the predicted and the true class (``analysis.pipeline.channel_relevance``).
    """
    images = batch.images.to(device, non_blocking=True)
    labels = batch.labels.to(device)
    result = explainer(images, target_layer=target_layer)
    probs = torch.softmax(result.logits.float(), dim=1)
    pred = result.classes.to(device)
    top = probs.topk(min(5, probs.shape[1]), dim=1)
    maps_pred = resize_maps(result.maps.detach(), map_size)
    wrong = pred != labels
    true_result = None
    if wrong.any():
        true_result = explainer(images[wrong], target_layer=target_layer, classes=labels[wrong])
        maps_true = resize_maps(true_result.maps.detach(), map_size)
    else:
        maps_true = maps_pred.new_zeros((0, map_size, map_size))
    foreground = batch.foreground.to(device) if batch.foreground is not None else None
    scores = all_scores(maps_pred, foreground, batch.has_foreground)
    if faithfulness_steps:
        scores.update({name: torch.as_tensor(values) for name, values in faithfulness_scores(
            explainer.model, images, result.maps, pred, steps=faithfulness_steps).items()})
    return BatchOutput(
        ids=batch.ids.numpy(), labels=batch.labels.numpy(), pred=pred.cpu().numpy(),
        confidence=probs.gather(1, pred[:, None])[:, 0].cpu().numpy().astype(np.float32),
        top_classes=top.indices.cpu().numpy(), top_probs=top.values.cpu().numpy().astype(np.float32),
        maps_pred=maps_pred.cpu().numpy(), maps_true=maps_true.cpu().numpy(),
        scores={name: value.cpu().numpy().astype(np.float32) for name, value in scores.items()},
        descriptors_positive=descriptors(maps_pred, descriptor_size, "positive").cpu().numpy(),
        descriptors_absolute=descriptors(maps_pred, descriptor_size, "absolute").cpu().numpy(),
        foreground=None if batch.foreground is None else batch.foreground.numpy(),
        has_foreground=batch.has_foreground.numpy(),
        sizes=batch.sizes.numpy() if batch.sizes is not None else np.zeros((len(batch.ids), 2), np.int64),
        boxes=batch.boxes.numpy() if batch.boxes is not None else np.full((len(batch.ids), 4), np.nan),
        row_arrays={**probability_arrays(probs.cpu().numpy()), **channel_relevance_arrays(
            result.channel_relevance, None if true_result is None else true_result.channel_relevance, wrong)},
    )


def shard_records(outputs: list[BatchOutput], errors: list[tuple[int, str]], plan: JobPlan) -> ShardRecords:
    """Assemble one shard's rows from its batches (ids ascending)."""
    m = plan.map_size
    outputs = [o for o in outputs if len(o.ids)]
    cat = (lambda name, shape, dtype: np.concatenate([getattr(o, name) for o in outputs]) if outputs
           else np.zeros(shape, dtype))
    ids = cat("ids", (0,), np.int64)
    labels, pred = cat("labels", (0,), np.int64), cat("pred", (0,), np.int64)
    samples = plan.listing.samples
    names = plan.class_names
    rows = pd.DataFrame({
        "id": ids.astype(np.int64),
        "path": [samples[i].path for i in ids],
        "label": labels.astype(np.int64), "pred": pred.astype(np.int64),
        "label_name": [names[i] for i in labels], "pred_name": [names[i] for i in pred],
        "confidence": cat("confidence", (0,), np.float32),
        "top5_classes": [list(map(int, r)) for r in cat("top_classes", (0, 5), np.int64)],
        "top5_probs": [list(map(float, r)) for r in cat("top_probs", (0, 5), np.float32)],
        "correct": labels == pred,
        **{name: (np.concatenate([o.scores[name] for o in outputs]) if outputs else np.zeros(0, np.float32))
           for name in SCORE_COLUMNS + (FAITHFULNESS_COLUMNS if plan.faithfulness_steps else ())},
        "has_foreground": cat("has_foreground", (0,), bool).astype(bool),
        **{name: column for name, column in zip(SIZE_COLUMNS, cat("sizes", (0, 2), np.int64).astype(np.int32).T)},
        **{name: column for name, column in zip(BOX_COLUMNS, cat("boxes", (0, 4), np.float64).astype(np.float32).T)},
    })
    foreground = None
    if plan.listing.has_foreground:
        parts = [o.foreground if o.foreground is not None else np.zeros((len(o.ids), m, m), bool) for o in outputs]
        foreground = np.concatenate(parts) if parts else np.zeros((0, m, m), bool)
    d2 = plan.descriptor_size ** 2
    return ShardRecords(
        rows=rows, maps_pred=cat("maps_pred", (0, m, m), np.float32), maps_true=cat("maps_true", (0, m, m), np.float32),
        descriptors_positive=cat("descriptors_positive", (0, d2), np.float32),
        descriptors_absolute=cat("descriptors_absolute", (0, d2), np.float32), foreground=foreground,
        errors=pd.DataFrame({"id": [i for i, _ in errors], "path": [samples[i].path for i, _ in errors],
                             "reason": [r for _, r in errors]}),
        row_arrays={name: np.concatenate([o.row_arrays[name] for o in outputs])
                    for name in (outputs[0].row_arrays if outputs else ())},
    )


@dataclass
class _ShardProgress:
    index: int
    batches_left: int
    outputs: list[BatchOutput] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)


def _batches_for(shards: list[int], plan: JobPlan) -> tuple[list[list[int]], list[int]]:
    """Batches never straddle shards, so a shard is complete right after its last batch."""
    n = len(plan.listing.samples)
    batches, owner = [], []
    for shard in shards:
        ids = list(range(shard * plan.shard_size, min((shard + 1) * plan.shard_size, n)))
        for start in range(0, len(ids), plan.batch_size):
            batches.append(ids[start:start + plan.batch_size])
            owner.append(shard)
    return batches, owner


def _commit(writer: CacheWriter, shard: int, records: ShardRecords) -> None:
    try:
        writer.write_shard(shard, records)
    except FileExistsError:
        # Cannot happen while the job holds the cache's lock and the ranks take disjoint shards; should it
        # anyway, the shard was made with the same options (checked under the lock), so keeping the first copy
        # keeps the cache free of duplicates.
        print(f"shard {shard} was committed by another process; kept that copy", file=sys.stderr)


def explain_shards(plan: JobPlan, writer: CacheWriter, shards: list[int], show_progress: bool) -> int:
    """Explain and commit `shards`; returns the number of images processed. Commits run in a writer thread
    (at most two shards queued) so disk syncs overlap the model."""
    from tqdm import tqdm

    batches, owner = _batches_for(shards, plan)
    if not batches:
        return 0
    dataset = ExplainDataset(plan.listing, plan.labels, plan.loaded.transform, plan.loaded.in_channels,
                             plan.map_size, plan.loaded.geometry)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=plan.workers, collate_fn=collate_items,
        pin_memory=plan.device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if plan.workers > 0 else None)
    progress_by_shard: dict[int, _ShardProgress] = {}
    for shard in owner:
        progress_by_shard.setdefault(shard, _ShardProgress(shard, 0)).batches_left += 1
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, unit="img", disable=not show_progress, dynamic_ncols=True, smoothing=0.05,
               desc=f"explain ({len(shards)} shards)")
    pending: deque[Future] = deque()
    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as pool:
        for batch, shard in zip(loader, owner):
            state = progress_by_shard[shard]
            if len(batch.ids):
                state.outputs.append(explain_batch(plan.explainer, batch, plan.device, plan.target_layer,
                                                   plan.map_size, plan.descriptor_size, plan.faithfulness_steps))
            state.errors.extend(batch.errors)
            state.batches_left -= 1
            size = len(batch.ids) + len(batch.errors)
            done += size
            bar.update(size)
            if state.batches_left == 0:
                records = shard_records(state.outputs, sorted(state.errors), plan)
                del progress_by_shard[shard]
                while len(pending) >= 2:  # bounded memory: at most two finished shards wait for the disk
                    pending.popleft().result()
                pending.append(pool.submit(_commit, writer, shard, records))
        while pending:
            pending.popleft().result()
    bar.close()
    return done


def _finish(plan: JobPlan, writer: CacheWriter) -> dict[str, Any]:
    """Rank 0, after every rank is done: compact, count, stamp the manifest as finished, and warn (one line)
    when the labels and the model's outputs look permuted."""
    committed = writer.committed_shards()
    complete = committed >= set(range(plan.n_shards))
    if complete:
        writer.compact()
    cache = load(plan.out)
    table = cache.table
    manifest = writer.read_manifest() or plan.manifest
    manifest["updated"] = now_iso()
    manifest["counts"] = {"images": len(plan.listing.samples), "explained": int(len(table)),
                          "errors": int(len(cache.errors)), "correct": int(table["correct"].sum())}
    if complete and not manifest.get("finished"):
        manifest["finished"] = now_iso()
    writer.write_manifest(manifest)
    mismatch = label_mismatch(table["label"].to_numpy(), table["pred"].to_numpy(), plan.class_names,
                              table["confidence"].to_numpy())
    if mismatch is not None:
        print(f"warning: {mismatch.message}", file=sys.stderr)
    return manifest


def take_the_cache(plan: JobPlan) -> WriterLock:
    """Rank 0: the cache's writer lock, before anything is written; then --out must still hold what the plan
    was made from (another job may have written it while this one loaded its model)."""
    lock = WriterLock(plan.out)
    try:
        lock.acquire()
    except CacheLocked as error:
        raise SetupError(f"--out {error}") from None
    except OSError as error:
        raise SetupError(f"--out {plan.out}: cannot take the writer lock ({error.strerror or error})") from None
    if out_snapshot(plan.out) != plan.seen:
        lock.release()
        raise SetupError(f"--out {plan.out} was changed by another job while this one was starting; run the "
                         "command again")
    return lock


def claim_the_cache(options: ExplainOptions, ranks: Ranks) -> tuple[JobPlan, WriterLock | None]:
    """Every rank validates on its own, then all agree; rank 0 then takes the cache's lock for the whole job
    (the other ranks write their shards under it), and all agree again: no rank starts alone. Returns the
    plan and (rank 0) the held lock; a problem on any rank is a SetupError on every rank (ranks closed)."""
    plan, lock, problem = None, None, None
    try:
        plan = prepare(options, ranks)
    except SetupError as error:
        problem = str(error)
    problem = ranks.agree(problem)
    if problem is None and ranks.rank == 0:
        try:
            lock = take_the_cache(plan)
        except SetupError as error:
            problem = str(error)
    problem = ranks.agree(problem)
    if problem is not None:
        if lock is not None:
            lock.release()
        ranks.close()
        raise SetupError(problem)
    return plan, lock


def _rank0_start(plan: JobPlan, writer: CacheWriter, ranks: Ranks, replaced: Callable[[Path], None] | None) -> None:
    """Rank 0, under the lock: wipe or clean --out, set damaged parts aside, write the manifest."""
    writer.initialise(wipe=plan.wipe)
    writer.remove_stale_temporaries()
    if plan.existing:
        for part, problem, target in writer.set_aside_damaged_parts(plan.map_size, plan.descriptor_size,
                                                                    plan.shard_size):
            print(f"warning: {part} of the cache cannot be read ({problem}); moved to {target}, its images are "
                  "explained again", file=sys.stderr)
        manifest = writer.read_manifest() or plan.manifest
        manifest["updated"] = now_iso()
        manifest["options"] = plan.manifest["options"]
        manifest["geometry"] = plan.manifest["geometry"]
        manifest["world_size"] = ranks.world_size
        writer.write_manifest(manifest)
    else:
        writer.write_manifest(plan.manifest)
        if plan.wipe and replaced is not None:
            replaced(plan.out)


def run_claimed(plan: JobPlan, ranks: Ranks, replaced: Callable[[Path], None] | None = None) -> dict[str, Any] | None:
    """The job on a claimed cache (`claim_the_cache`): explain this rank's shards, then (rank 0) compact and
    stamp the manifest. Returns rank 0's final manifest (None on the other ranks); ranks closed. `replaced`
    is called on rank 0 with --out when --overwrite has just replaced a cache (the explain command keeps the
    old cache's tags aside there)."""
    writer = CacheWriter(plan.out)
    if ranks.rank == 0:
        _rank0_start(plan, writer, ranks, replaced)
    ranks.barrier()  # nobody lists committed shards before rank 0 wiped or cleaned the directory
    committed = writer.committed_shards()
    mine = [k for k in range(plan.n_shards) if k % ranks.world_size == ranks.rank and k not in committed]
    show = ranks.rank == 0 and not plan.quiet
    if show and committed:
        print(f"resuming: {len(committed)} of {plan.n_shards} shards already committed", file=sys.stderr)
    started = time.perf_counter()
    try:
        processed = explain_shards(plan, writer, mine, show)
    except BaseException:
        if ranks.rank == 0:
            print(f"the job stopped; committed shards are kept in {plan.out}: re-run the same command to resume",
                  file=sys.stderr)
        raise
    if ranks.world_size > 1 and not plan.quiet:
        print(f"rank {ranks.rank}: explained {processed} images in {len(mine)} shards", file=sys.stderr)
    ranks.barrier()  # the cache is complete only when every rank has committed its shards
    manifest = None
    if ranks.rank == 0:
        manifest = _finish(plan, writer)
        if not plan.quiet:
            seconds = time.perf_counter() - started
            counts = manifest["counts"]
            print(f"explained {counts['explained']} images ({counts['errors']} skipped, see the errors table) "
                  f"into {plan.out}; this run: {processed} images in {seconds:.1f} s", file=sys.stderr)
    ranks.close()
    return manifest


def explain_dataset(options: ExplainOptions, ranks: Ranks | None = None,
                    replaced: Callable[[Path], None] | None = None) -> dict[str, Any] | None:
    """The explain job from Python: check everything, take the cache, explain, release. Returns rank 0's
    final manifest (its `finished` is set when every image is in the cache; None on the other ranks); raises
    SetupError, with nothing written, on a problem found before the work. Without the clustering and the
    concepts, which `python -m analysis explain` runs afterwards (analysis.commands.explain)."""
    ranks = ranks or Ranks()
    plan, lock = claim_the_cache(options, ranks)
    try:
        return run_claimed(plan, ranks, replaced)
    finally:
        if lock is not None:
            lock.release()
