"""Writing a cache: a job's records of one shard (ShardRecords), committed as a shard, compacted, and
checked when a resumed job reads them back (part_problem)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.cache.layout import (BOX_COLUMNS, COMPACT_PREFIX, COVERED_NAME, CacheError, DAMAGED_DIR,
                                   DESCRIPTOR_FILES, ERRORS_SCHEMA, MANIFEST_NAME, OPTIONAL_SCORES, ROW_ARRAYS,
                                   SHARDS_DIR, SHARD_PREFIX, SIZE_COLUMNS, STORED_SCHEMA, TABLE_SCHEMA, TMP_PREFIX,
                                   parse_index, shard_name)
from analysis.cache.files import (fsync_path, remove_atomically, save_npy, save_parquet,
                                  folder_replaced_atomically, wipe_cache_dir, write_json_atomic)
from analysis.cache.arrays import normalise_maps, pack_foreground
from analysis.cache.reader import (PartsView, StoredPart, latest_compaction, list_shards, read_covered,
                                   read_manifest_file)


@dataclass
class ShardRecords:
    """Everything the job produced for one shard, in the order of `rows.id` (ascending).

    rows: DataFrame with the public columns of TABLE_SCHEMA (one row per explained image).
    maps_pred: float32 [n, M, M] map of the predicted class.
    maps_true: float32 [n_wrong, M, M] map of the true class, for the rows with correct == False, in row order.
    descriptors_positive / descriptors_absolute: float32 [n, D*D].
    foreground: bool [n, M, M], or None when the job has no foreground source.
    errors: DataFrame with columns id, path, reason (images of the shard's id range that were skipped).
    row_arrays: optional per-row arrays [n, ...] by ROW_ARRAYS name (e.g. `probability_arrays(probs)`).
    """

    rows: pd.DataFrame
    maps_pred: np.ndarray
    maps_true: np.ndarray
    descriptors_positive: np.ndarray
    descriptors_absolute: np.ndarray
    foreground: np.ndarray | None
    errors: pd.DataFrame
    row_arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def validate(self) -> None:
        n = len(self.rows)
        for name, array in self.row_arrays.items():
            if name not in ROW_ARRAYS:
                raise ValueError(f"unknown row array {name!r} (known: {sorted(ROW_ARRAYS)})")
            if np.shape(array)[:1] != (n,):
                raise ValueError(f"row array {name} has shape {np.shape(array)} for {n} table rows")
        if self.maps_pred.shape[0] != n:
            raise ValueError(f"maps_pred has {self.maps_pred.shape[0]} rows for {n} table rows")
        n_wrong = int((~self.rows["correct"].to_numpy(bool)).sum()) if n else 0
        if self.maps_true.shape[0] != n_wrong:
            raise ValueError(f"maps_true has {self.maps_true.shape[0]} rows for {n_wrong} wrong predictions")
        for name in ("descriptors_positive", "descriptors_absolute"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"{name} has {getattr(self, name).shape[0]} rows for {n} table rows")
        if self.foreground is not None and self.foreground.shape[0] != n:
            raise ValueError(f"foreground has {self.foreground.shape[0]} rows for {n} table rows")
        ids = self.rows["id"].to_numpy(np.int64)
        if n and np.any(np.diff(ids) <= 0):
            raise ValueError("rows must be sorted by id without duplicates")


def _stored_table(records: ShardRecords, scale_pred: np.ndarray, scale_true: np.ndarray) -> pa.Table:
    rows = records.rows
    n = len(rows)
    correct = rows["correct"].to_numpy(bool) if n else np.zeros(0, bool)
    true_row = np.full(n, -1, np.int64)
    true_row[~correct] = np.arange(int((~correct).sum()), dtype=np.int64)
    full_scale_true = np.full(n, np.nan, np.float32)
    full_scale_true[~correct] = scale_true
    columns = {}
    for field in TABLE_SCHEMA:
        if field.name in rows.columns:
            columns[field.name] = pa.array(rows[field.name].tolist(), type=field.type)
        elif field.name == "has_foreground":
            columns[field.name] = pa.array(np.zeros(n, bool), type=field.type)
        elif field.name in OPTIONAL_SCORES or field.name in BOX_COLUMNS:
            columns[field.name] = pa.array(np.full(n, np.nan, np.float32), type=field.type)
        elif field.name in SIZE_COLUMNS:
            columns[field.name] = pa.array(np.zeros(n, np.int32), type=field.type)
        else:
            raise ValueError(f"shard rows lack column {field.name!r}")
    columns["_scale_pred"] = pa.array(scale_pred.astype(np.float32), type=pa.float32())
    columns["_scale_true"] = pa.array(full_scale_true, type=pa.float32())
    columns["_true_row"] = pa.array(true_row, type=pa.int64())
    return pa.table(columns, schema=STORED_SCHEMA)


def _errors_table(errors: pd.DataFrame | None) -> pa.Table:
    if errors is None or len(errors) == 0:
        return ERRORS_SCHEMA.empty_table()
    return pa.table({
        "id": pa.array(errors["id"].astype(np.int64).tolist(), type=pa.int64()),
        "path": pa.array(errors["path"].astype(str).tolist(), type=pa.string()),
        "reason": pa.array(errors["reason"].astype(str).tolist(), type=pa.string()),
    }, schema=ERRORS_SCHEMA)


class CacheWriter:
    """Writes committed shards, the manifest and compactions into one cache directory.

    Several processes (torchrun ranks) may hold a writer on the same directory: each commits only its own
    shard indices, and only one of them (rank 0) should call `compact` and `write_manifest`.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.shards_dir = self.root / SHARDS_DIR

    # -- directory life cycle --------------------------------------------------------------------------
    def initialise(self, wipe: bool = False) -> None:
        """Create the directory tree; `wipe` removes an existing cache first (used by --overwrite)."""
        if wipe and self.root.exists():
            wipe_cache_dir(self.root)
        self.shards_dir.mkdir(parents=True, exist_ok=True)

    def remove_stale_temporaries(self) -> None:
        """Delete `.tmp-*` leftovers of killed runs. Call only when no writer of this cache is running."""
        for parent in (self.root, self.shards_dir):
            if not parent.is_dir():
                continue
            for entry in os.scandir(parent):
                if entry.name.startswith(TMP_PREFIX):
                    path = Path(entry.path)
                    shutil.rmtree(path) if entry.is_dir() else path.unlink(missing_ok=True)

    def read_manifest(self) -> dict[str, Any] | None:
        path = self.root / MANIFEST_NAME
        if not path.exists():
            return None
        return read_manifest_file(path)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.root / MANIFEST_NAME, manifest)

    # -- shards ----------------------------------------------------------------------------------------
    def committed_shards(self) -> set[int]:
        """Shard indices already durable on disk (in a shard directory or in the current compaction)."""
        done: set[int] = set()
        compaction = latest_compaction(self.root)
        if compaction is not None:
            done.update(read_covered(compaction))
        if self.shards_dir.is_dir():
            for entry in os.scandir(self.shards_dir):
                index = parse_index(entry.name, SHARD_PREFIX)
                if index is not None:
                    done.add(index)
        return done

    def write_shard(self, index: int, records: ShardRecords) -> Path:
        """Commit one shard atomically; raises FileExistsError if that shard is already committed."""
        records.validate()
        final = self.shards_dir / shard_name(index)
        if final.exists():
            raise FileExistsError(f"shard {index} is already committed in {self.shards_dir}")
        tmp = self.shards_dir / f"{TMP_PREFIX}{shard_name(index)}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            maps_pred, scale_pred = normalise_maps(records.maps_pred)
            maps_true, scale_true = normalise_maps(records.maps_true)
            save_parquet(tmp / "table.parquet", _stored_table(records, scale_pred, scale_true))
            save_npy(tmp / "maps_pred.npy", maps_pred)
            save_npy(tmp / "maps_true.npy", maps_true)
            save_npy(tmp / DESCRIPTOR_FILES["positive"], np.asarray(records.descriptors_positive, np.float32))
            save_npy(tmp / DESCRIPTOR_FILES["absolute"], np.asarray(records.descriptors_absolute, np.float32))
            if records.foreground is not None:
                save_npy(tmp / "foreground.npy", pack_foreground(records.foreground))
            for name, array in records.row_arrays.items():
                save_npy(tmp / ROW_ARRAYS[name], np.asarray(array))
            save_parquet(tmp / "errors.parquet", _errors_table(records.errors))
            fsync_path(tmp)
            try:
                os.rename(tmp, final)  # atomic: readers see the whole shard or nothing
            except OSError as error:
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY):  # committed meanwhile by another process
                    raise FileExistsError(f"shard {index} is already committed in {self.shards_dir}") from None
                raise
            fsync_path(self.shards_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def set_aside_damaged_parts(self, map_size: int, descriptor_size: int,
                                shard_size: int) -> list[tuple[str, str, Path]]:
        """Check that every committed part reads back whole; move each damaged one into DIR/damaged/ so that
        the job explains its images again. Returns (part, what is wrong, where it went) per moved part.

        The commit protocol never leaves a half-written part, so damage comes from outside (a disk error, an
        interrupted copy, a hand edit). Moving it aside costs one shard of work and no decision from the user,
        keeps the bytes for a look, and lets the resume finish; the alternative, stopping and asking the user
        to delete it, would stop an unattended resume for something the job can mend itself. Call only while
        no other process writes the cache (the job holds the cache's lock).
        """
        parts = []
        compaction = latest_compaction(self.root)
        if compaction is not None:
            parts.append((compaction, None))
        parts += [(path, range(index * shard_size, (index + 1) * shard_size))
                  for index, path in sorted(list_shards(self.shards_dir).items())]
        moved = []
        for path, ids in parts:
            problem = part_problem(path, map_size, descriptor_size, ids)
            if problem is None:
                continue
            target = self.root / DAMAGED_DIR / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.{uuid.uuid4().hex[:6]}"
            target.parent.mkdir(exist_ok=True)
            os.rename(path, target)
            fsync_path(path.parent)
            moved.append((path.name, problem, target))
        return moved

    # -- compaction ------------------------------------------------------------------------------------
    def compact(self, chunk_rows: int = 4096) -> Path | None:
        """Merge the current compaction and all committed shards into one new compaction, then delete them.

        Streams `chunk_rows` rows at a time, so memory stays bounded for any cache size. Returns the new
        compaction directory, or None when there was nothing to merge. Safe against kill -9 at any point:
        until the rename the old parts are untouched; after it, readers prefer the new compaction and ignore
        the shards it lists, which are deleted last.
        """
        previous = latest_compaction(self.root)
        shard_dirs = list_shards(self.shards_dir)
        covered = set(read_covered(previous)) if previous is not None else set()
        new_shards = {i: p for i, p in shard_dirs.items() if i not in covered}
        if not new_shards:
            for path in shard_dirs.values():  # leftovers of a compaction killed before its cleanup
                remove_atomically(path)
            return None
        view = PartsView.open(self.root)
        sequence = (parse_index(previous.name, COMPACT_PREFIX) if previous is not None else 0) + 1
        final = self.root / f"{COMPACT_PREFIX}{sequence:06d}"
        with folder_replaced_atomically(final) as tmp:
            view.write_consolidated(tmp, chunk_rows)
            with open(tmp / COVERED_NAME, "w", encoding="utf-8") as handle:
                json.dump(sorted(covered | set(new_shards)), handle)
                handle.flush()
                os.fsync(handle.fileno())
        if previous is not None:
            remove_atomically(previous)
        for path in shard_dirs.values():
            remove_atomically(path)
        return final


def part_problem(path: Path, map_size: int, descriptor_size: int, ids: range | None = None) -> str | None:
    """What keeps a committed shard or compaction from being read back whole (None: nothing): a missing or
    unreadable file, arrays whose rows or sizes disagree with the table and the cache's options, ids outside
    the shard's range."""
    try:
        table = pq.read_table(path / "table.parquet", schema=STORED_SCHEMA)
        pq.read_table(path / "errors.parquet", schema=ERRORS_SCHEMA)
        part = StoredPart.open(path)
        if path.name.startswith(COMPACT_PREFIX):
            read_covered(path)
    except FileNotFoundError as error:
        return f"{Path(error.filename or '?').name} is missing"
    except (OSError, ValueError, pa.ArrowException, CacheError) as error:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    n = table.num_rows
    true_rows = table.column("_true_row").to_numpy()
    expected = {"maps_pred.npy": (part.maps_pred, (n, map_size, map_size)),
                "maps_true.npy": (part.maps_true, (int((true_rows >= 0).sum()), map_size, map_size))}
    for kind, name in DESCRIPTOR_FILES.items():
        expected[name] = (part.descriptors[kind], (n, descriptor_size ** 2))
    if part.foreground is not None:
        expected["foreground.npy"] = (part.foreground, (n, (map_size * map_size + 7) // 8))
    for name, (array, shape) in expected.items():
        if tuple(array.shape) != shape:
            return f"{name} has shape {tuple(array.shape)}, the table and options need {shape}"
    if ids is not None and n:
        id_values = table.column("id").to_numpy()
        if id_values.min() < ids.start or id_values.max() >= ids.stop:
            return f"it holds image ids outside its range {ids.start}..{ids.stop - 1}"
    return None
