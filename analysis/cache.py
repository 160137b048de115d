"""On-disk cache of a dataset explanation: the shard writer and the reading API.

Layout of a cache directory::

    DIR/manifest.json                 job identity, options, counts (written atomically)
    DIR/shards/shard-00000012/        one committed shard (ids [12*S, 13*S) of the sorted dataset)
        table.parquet                 one row per explained image (public columns + internal `_` columns)
        maps_pred.npy                 float16 [n, M, M]  map of the predicted class / its per-row max |value|
        maps_true.npy                 float16 [n_wrong, M, M] map of the true class, wrong rows only
        desc_positive.npy             float32 [n, D*D] unit-mass pooled positive relevance
        desc_absolute.npy             float32 [n, D*D] unit-mass pooled |relevance|
        foreground.npy                uint8 [n, ceil(M*M/8)] packed bits (only when a foreground is known)
        probabilities.npy             float16 [n, K] class probabilities (K > 100: the top 20, descending, with
        probability_classes.npy       int32 [n, 20] their classes); see ROW_ARRAYS (absent in older caches)
        errors.parquet                id, path, reason of every image of the shard's range that was skipped
    DIR/compact-000001/               the same files for many shards at once, plus shards.json (covered shards)
    DIR/shards/.tmp-*                 a shard being written (ignored by readers, removed on the next run)
    DIR/damaged/                      committed parts a resumed job could not read back (kept; their ids redone)
    DIR/.lock                         the writer lock (WriterLock): one job writes a cache at a time

Every shard and compaction is written under a temporary name, fsync'ed and renamed, so a reader (or a
resumed job) only ever sees complete parts.  Maps are stored divided by their max |value| because input-level
relevance can be far below float16's smallest normal number; the float32 scale lives in the table.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
SHARD_PREFIX = "shard-"
COMPACT_PREFIX = "compact-"
TMP_PREFIX = ".tmp-"
COVERED_NAME = "shards.json"
DAMAGED_DIR = "damaged"   # committed parts a resumed job found unreadable, moved here (kept) and redone
LOCK_NAME = ".lock"       # the writer's lock (WriterLock); never deleted, see there
# Results derived from a cache and kept in its directory (compare-methods, the dashboard's saved clusterings):
# --overwrite removes them with the cache, and each records the cache_identity it was made from.
TRUST_DIR = "trust"
DASHBOARD_DIR = "dashboard"
ANALYSIS_DIR = "analysis"   # the offline clustering's results (python -m analysis cluster)
DERIVED_DIRS = (TRUST_DIR, DASHBOARD_DIR, ANALYSIS_DIR)
# The tags database (analysis/review.py) and the tags of replaced caches: kept by --overwrite (set aside instead).
REVIEW_PREFIX = "review"

# Public per-image columns, in order, with their dtypes (docs/contracts.md).
TABLE_SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("path", pa.string()),
    ("label", pa.int64()),
    ("pred", pa.int64()),
    ("label_name", pa.string()),
    ("pred_name", pa.string()),
    ("confidence", pa.float32()),
    ("top5_classes", pa.list_(pa.int64())),
    ("top5_probs", pa.list_(pa.float32())),
    ("correct", pa.bool_()),
    ("background_share", pa.float32()),
    ("background_hotspot", pa.float32()),
    ("border_share", pa.float32()),
    ("concentration", pa.float32()),
    ("has_foreground", pa.bool_()),
    ("deletion_auc", pa.float32()),    # NaN unless the job ran with --faithfulness
    ("insertion_auc", pa.float32()),
    ("image_width", pa.int32()),       # the original image's size (0: not recorded, a cache of an older job)
    ("image_height", pa.int32()),
    ("crop_x0", pa.float32()),         # the crop box: the region of the original the model saw, in original
    ("crop_y0", pa.float32()),         # pixels (analysis.geometry); NaN where it is unknown
    ("crop_x1", pa.float32()),
    ("crop_y1", pa.float32()),
])
OPTIONAL_SCORES = ("deletion_auc", "insertion_auc")
SIZE_COLUMNS = ("image_width", "image_height")
BOX_COLUMNS = ("crop_x0", "crop_y0", "crop_x1", "crop_y1")
# Internal columns: how to find and rescale the stored maps of a row.
INTERNAL_SCHEMA = pa.schema([
    ("_scale_pred", pa.float32()),
    ("_scale_true", pa.float32()),   # NaN for correct rows
    ("_true_row", pa.int64()),       # row in maps_true.npy of the same part, -1 for correct rows
])
STORED_SCHEMA = pa.schema(list(TABLE_SCHEMA) + list(INTERNAL_SCHEMA))
ERRORS_SCHEMA = pa.schema([("id", pa.int64()), ("path", pa.string()), ("reason", pa.string())])

DESCRIPTOR_FILES = {"positive": "desc_positive.npy", "absolute": "desc_absolute.npy"}
# Optional per-row arrays: name -> file in every part, row i = table row i of the part, any dtype and trailing
# shape. To store a new one, add it here and put it in ShardRecords.row_arrays (the job: BatchOutput.row_arrays);
# writing, compaction and `Cache.row_array` need nothing else. Caches written before an array existed lack its
# file: the reader then gives None.
ROW_ARRAYS = {"probabilities": "probabilities.npy", "probability_classes": "probability_classes.npy",
              "channel_relevance": "channel_relevance.npy",             # float16 [n, K], analysis.channel_relevance
              "channel_relevance_true": "channel_relevance_true.npy"}
PROBABILITY_TOP_K = 20            # with more than FULL_PROBABILITIES_MAX classes, only the top 20 are stored
FULL_PROBABILITIES_MAX = 100


class CacheError(Exception):
    """A cache directory that is missing, corrupt or not a cache (the message is one line)."""


class UnknownGeometry(CacheError):
    """Where an image's map lies in the original image is not known (a cache of an older job, or a transform
    whose geometry could not be measured)."""


# ----------------------------------------------------------------------------------------------------------
# Small durable-write helpers
# ----------------------------------------------------------------------------------------------------------

def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())


def _save_parquet(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)
    _fsync_path(path)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that readers see either the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:08d}"


def _parse_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    digits = name[len(prefix):]
    return int(digits) if digits.isdigit() else None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def new_cache_id() -> str:
    """A fresh cache's identity, stored in its manifest as `cache_id` (kept on resume, new on --overwrite)."""
    return uuid.uuid4().hex


def cache_identity(manifest: dict[str, Any]) -> str:
    """Which cache a manifest describes: its `cache_id`, or for a cache made before cache ids, its `created`
    stamp. A derived result stores this and is stale when the cache's differs."""
    return str(manifest.get("cache_id") or f"created {manifest.get('created')}")


# ----------------------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------------------

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


def normalise_maps(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split float32 maps [n, M, M] into float16 maps with max |value| 1 and a float32 scale per map.

    A map of zeros keeps scale 0 (multiplying back gives zeros); non-finite values are left as they are.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape[0] == 0:
        return maps.astype(np.float16), np.zeros(0, np.float32)
    flat = maps.reshape(maps.shape[0], -1)
    scale = np.where(np.isfinite(flat), np.abs(flat), 0.0).max(axis=1).astype(np.float32)
    divisor = np.where(scale > 0, scale, 1.0).astype(np.float32)
    stored = (maps / divisor[:, None, None]).astype(np.float16)
    return stored, scale


def probability_arrays(probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """The row arrays that store softmax outputs [n, K]: all K as float16 for up to FULL_PROBABILITIES_MAX
    classes, else the top PROBABILITY_TOP_K as float16 with their classes (int32), descending."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must be [n, classes], got shape {probabilities.shape}")
    if probabilities.shape[1] <= FULL_PROBABILITIES_MAX:
        return {"probabilities": probabilities.astype(np.float16)}
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :PROBABILITY_TOP_K]
    return {"probabilities": np.take_along_axis(probabilities, top, axis=1).astype(np.float16),
            "probability_classes": top.astype(np.int32)}


def full_probabilities(stored: np.ndarray, classes: np.ndarray | None, num_classes: int) -> np.ndarray:
    """float32 [n, num_classes] from `probability_arrays`' output: the stored top-k in their columns, the
    rest of each row's mass (1 - their sum, at least 0) spread evenly over the other classes."""
    stored = np.asarray(stored, dtype=np.float32)
    if classes is None:
        return stored
    out = np.zeros((len(stored), num_classes), np.float32)
    others = num_classes - stored.shape[1]
    if others > 0:
        out += (np.clip(1.0 - stored.sum(axis=1), 0.0, None) / others)[:, None]
    np.put_along_axis(out, np.asarray(classes, dtype=np.int64), stored, axis=1)
    return out


def pack_foreground(masks: np.ndarray) -> np.ndarray:
    """bool [n, M, M] -> uint8 [n, ceil(M*M/8)] (np.packbits along the flattened map)."""
    masks = np.asarray(masks, dtype=bool)
    return np.packbits(masks.reshape(masks.shape[0], int(np.prod(masks.shape[1:]))), axis=1)  # 0 rows too


def unpack_foreground(packed: np.ndarray, map_size: int) -> np.ndarray:
    bits = np.unpackbits(np.asarray(packed), axis=1, count=map_size * map_size)
    return bits.reshape(packed.shape[0], map_size, map_size).astype(bool)


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


class CacheLocked(CacheError):
    """Another process holds the cache's writer lock (the message names it)."""


class WriterLock:
    """The right to write one cache directory, held by one process at a time: an flock(2) on DIR/.lock.

    The kernel drops an flock when its process ends, however it ends (kill -9 included), so a dead job never
    blocks the next one and there is no stale lock to clean up. The file records who holds it (pid, host, start
    time) for the message a second job gets. It is never deleted: deleting a lock file while another process
    waits on it would let two processes hold "the" lock on two different files. (flock works across the hosts
    of an NFS v4 mount on Linux, where it is emulated with POSIX locks.)
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise CacheLocked at once (never waits); creates the directory if needed."""
        if self._fd is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise CacheLocked(f"{self.root} is being written by another job ({self.holder()}); wait for it to "
                              "finish (then run this command again to resume), or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso()}).encode())
        os.fsync(fd)
        self._fd = fd

    def holder(self) -> str:
        """Who holds the lock, as the lock file says (it is written right after the lock is taken)."""
        for _ in range(20):
            try:
                info = json.loads(self.path.read_text(encoding="utf-8") or "null")
            except (OSError, ValueError):
                info = None
            if isinstance(info, dict):
                return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
            time.sleep(0.05)  # taken a moment ago, its holder not written yet
        return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


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
        return _read_manifest(path)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.root / MANIFEST_NAME, manifest)

    # -- shards ----------------------------------------------------------------------------------------
    def committed_shards(self) -> set[int]:
        """Shard indices already durable on disk (in a shard directory or in the current compaction)."""
        done: set[int] = set()
        compaction = _latest_compaction(self.root)
        if compaction is not None:
            done.update(_read_covered(compaction))
        if self.shards_dir.is_dir():
            for entry in os.scandir(self.shards_dir):
                index = _parse_index(entry.name, SHARD_PREFIX)
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
            _save_parquet(tmp / "table.parquet", _stored_table(records, scale_pred, scale_true))
            _save_npy(tmp / "maps_pred.npy", maps_pred)
            _save_npy(tmp / "maps_true.npy", maps_true)
            _save_npy(tmp / DESCRIPTOR_FILES["positive"], np.asarray(records.descriptors_positive, np.float32))
            _save_npy(tmp / DESCRIPTOR_FILES["absolute"], np.asarray(records.descriptors_absolute, np.float32))
            if records.foreground is not None:
                _save_npy(tmp / "foreground.npy", pack_foreground(records.foreground))
            for name, array in records.row_arrays.items():
                _save_npy(tmp / ROW_ARRAYS[name], np.asarray(array))
            _save_parquet(tmp / "errors.parquet", _errors_table(records.errors))
            _fsync_path(tmp)
            try:
                os.rename(tmp, final)  # atomic: readers see the whole shard or nothing
            except OSError as error:
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY):  # committed meanwhile by another process
                    raise FileExistsError(f"shard {index} is already committed in {self.shards_dir}") from None
                raise
            _fsync_path(self.shards_dir)
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
        compaction = _latest_compaction(self.root)
        if compaction is not None:
            parts.append((compaction, None))
        parts += [(path, range(index * shard_size, (index + 1) * shard_size))
                  for index, path in sorted(_list_shards(self.shards_dir).items())]
        moved = []
        for path, ids in parts:
            problem = part_problem(path, map_size, descriptor_size, ids)
            if problem is None:
                continue
            target = self.root / DAMAGED_DIR / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.{uuid.uuid4().hex[:6]}"
            target.parent.mkdir(exist_ok=True)
            os.rename(path, target)
            _fsync_path(path.parent)
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
        previous = _latest_compaction(self.root)
        shard_dirs = _list_shards(self.shards_dir)
        covered = set(_read_covered(previous)) if previous is not None else set()
        new_shards = {i: p for i, p in shard_dirs.items() if i not in covered}
        if not new_shards:
            for path in shard_dirs.values():  # leftovers of a compaction killed before its cleanup
                _remove_atomically(path)
            return None
        view = _PartsView.open(self.root)
        sequence = (_parse_index(previous.name, COMPACT_PREFIX) if previous is not None else 0) + 1
        final = self.root / f"{COMPACT_PREFIX}{sequence:06d}"
        tmp = self.root / f"{TMP_PREFIX}{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            view.write_consolidated(tmp, chunk_rows)
            with open(tmp / COVERED_NAME, "w", encoding="utf-8") as handle:
                json.dump(sorted(covered | set(new_shards)), handle)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_path(tmp)
            os.rename(tmp, final)
            _fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if previous is not None:
            _remove_atomically(previous)
        for path in shard_dirs.values():
            _remove_atomically(path)
        return final


def part_problem(path: Path, map_size: int, descriptor_size: int, ids: range | None = None) -> str | None:
    """What keeps a committed shard or compaction from being read back whole (None: nothing): a missing or
    unreadable file, arrays whose rows or sizes disagree with the table and the cache's options, ids outside
    the shard's range."""
    try:
        table = pq.read_table(path / "table.parquet", schema=STORED_SCHEMA)
        pq.read_table(path / "errors.parquet", schema=ERRORS_SCHEMA)
        part = _Part.open(path)
        if path.name.startswith(COMPACT_PREFIX):
            _read_covered(path)
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


def _remove_atomically(path: Path) -> None:
    """Rename to a temporary name, then delete: a reader sees the whole part or none of it, never half."""
    doomed = path.with_name(f"{TMP_PREFIX}del-{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def is_cache_entry(name: str) -> bool:
    """Whether a name in a cache directory is one this project writes there (the rest is the user's)."""
    return name in (MANIFEST_NAME, SHARDS_DIR, DAMAGED_DIR, LOCK_NAME, *DERIVED_DIRS) or \
        name.startswith((COMPACT_PREFIX, TMP_PREFIX, REVIEW_PREFIX))


def wipe_cache_dir(root: Path) -> None:
    """Remove the cache files of `root` and the results derived from them (only names this project writes;
    other files are left alone)."""
    root = Path(root)
    for entry in os.scandir(root):
        name = entry.name
        if name in (MANIFEST_NAME, SHARDS_DIR, DAMAGED_DIR, *DERIVED_DIRS) or \
                name.startswith((COMPACT_PREFIX, TMP_PREFIX)):
            path = Path(entry.path)
            shutil.rmtree(path) if entry.is_dir() and not entry.is_symlink() else path.unlink()


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------

def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CacheError(f"corrupt cache manifest {path}: {exc}") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise CacheError(f"{path} is not an explanation cache manifest (no format_version)")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CacheError(f"cache {path.parent} has format version {manifest['format_version']}, "
                         f"this code reads version {FORMAT_VERSION}: re-run the job with --overwrite")
    return manifest


def _latest_compaction(root: Path) -> Path | None:
    best: tuple[int, Path] | None = None
    if not root.is_dir():
        return None
    for entry in os.scandir(root):
        index = _parse_index(entry.name, COMPACT_PREFIX)
        if index is not None and (best is None or index > best[0]):
            best = (index, Path(entry.path))
    return None if best is None else best[1]


def _read_covered(compaction: Path) -> list[int]:
    try:
        with open(compaction / COVERED_NAME, encoding="utf-8") as handle:
            return [int(i) for i in json.load(handle)]
    except (OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError) and not compaction.exists():
            raise
        raise CacheError(f"corrupt compaction {compaction}: {exc}") from None


def _list_shards(shards_dir: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    if shards_dir.is_dir():
        for entry in os.scandir(shards_dir):
            index = _parse_index(entry.name, SHARD_PREFIX)
            if index is not None:
                found[index] = Path(entry.path)
    return found


@dataclass
class _Part:
    """One committed shard or compaction, with its arrays memory-mapped (nothing read until indexed)."""

    path: Path
    maps_pred: np.ndarray
    maps_true: np.ndarray
    descriptors: dict[str, np.ndarray]
    foreground: np.ndarray | None
    row_arrays: dict[str, np.ndarray]      # the ROW_ARRAYS this part has

    @classmethod
    def open(cls, path: Path) -> "_Part":
        def load(name: str) -> np.ndarray:
            return np.load(path / name, mmap_mode="r", allow_pickle=False)

        fg_path = path / "foreground.npy"
        return cls(
            path=path,
            maps_pred=load("maps_pred.npy"),
            maps_true=load("maps_true.npy"),
            descriptors={kind: load(name) for kind, name in DESCRIPTOR_FILES.items()},
            foreground=load("foreground.npy") if fg_path.exists() else None,
            row_arrays={name: load(file) for name, file in ROW_ARRAYS.items() if (path / file).exists()},
        )


class _PartsView:
    """The union of the committed parts of a cache, indexed by position in id order."""

    def __init__(self, parts: list[_Part], stored: pa.Table, part_of_row: np.ndarray, row_in_part: np.ndarray,
                 errors: pa.Table):
        order = np.argsort(stored.column("id").to_numpy(), kind="stable")
        if len(order) and np.any(order != np.arange(len(order))):
            stored = stored.take(pa.array(order))
            part_of_row = part_of_row[order]
            row_in_part = row_in_part[order]
        self.parts = parts
        self.stored = stored
        self.ids = stored.column("id").to_numpy().astype(np.int64, copy=False)
        if len(self.ids) > 1 and np.any(np.diff(self.ids) == 0):
            dup = self.ids[1:][np.diff(self.ids) == 0][0]
            raise CacheError(f"corrupt cache: image id {dup} is stored twice")
        self.part_of_row = part_of_row
        self.row_in_part = row_in_part
        self.scale_pred = stored.column("_scale_pred").to_numpy(zero_copy_only=False).astype(np.float32)
        self.scale_true = stored.column("_scale_true").to_numpy(zero_copy_only=False).astype(np.float32)
        self.true_row = stored.column("_true_row").to_numpy().astype(np.int64, copy=False)
        self.errors = errors

    @classmethod
    def open(cls, root: Path, attempts: int = 5) -> "_PartsView":
        # A compaction running concurrently may delete shards between our listing and our reads; the new
        # compaction then holds them, so listing again gives a consistent view.
        for attempt in range(attempts):
            try:
                return cls._open_once(root)
            except FileNotFoundError:
                if attempt == attempts - 1:
                    raise CacheError(f"cache {root} keeps changing under the reader; try again") from None
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    @classmethod
    def _open_once(cls, root: Path) -> "_PartsView":
        compaction = _latest_compaction(root)
        covered = set(_read_covered(compaction)) if compaction is not None else set()
        part_paths = [] if compaction is None else [compaction]
        part_paths += [p for i, p in sorted(_list_shards(root / SHARDS_DIR).items()) if i not in covered]
        parts, tables, errors, part_of_row, row_in_part = [], [], [], [], []
        for number, path in enumerate(part_paths):
            try:
                table = _with_defaults(pq.read_table(path / "table.parquet", schema=STORED_SCHEMA))
                errors.append(pq.read_table(path / "errors.parquet", schema=ERRORS_SCHEMA))
                part = _Part.open(path)
            except FileNotFoundError:
                if not path.exists():
                    raise  # removed by a concurrent compaction: retried by `open`
                raise CacheError(f"corrupt cache part {path}: a file is missing") from None
            except (OSError, ValueError, pa.ArrowException) as exc:
                raise CacheError(f"corrupt cache part {path}: {str(exc).splitlines()[0]}") from None
            if part.maps_pred.shape[0] != table.num_rows:
                raise CacheError(f"corrupt cache part {path}: {part.maps_pred.shape[0]} maps for "
                                 f"{table.num_rows} rows")
            parts.append(part)
            tables.append(table)
            part_of_row.append(np.full(table.num_rows, number, np.int32))
            row_in_part.append(np.arange(table.num_rows, dtype=np.int64))
        stored = pa.concat_tables(tables) if tables else STORED_SCHEMA.empty_table()
        all_errors = pa.concat_tables(errors) if errors else ERRORS_SCHEMA.empty_table()
        return cls(parts, stored,
                   np.concatenate(part_of_row) if part_of_row else np.zeros(0, np.int32),
                   np.concatenate(row_in_part) if row_in_part else np.zeros(0, np.int64),
                   all_errors)

    # -- gathering ---------------------------------------------------------------------------------------
    def positions(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self.ids, ids)
        pos = np.minimum(pos, max(len(self.ids) - 1, 0))
        if len(self.ids) == 0 or np.any(self.ids[pos] != ids):
            missing = ids if len(self.ids) == 0 else ids[self.ids[pos] != ids]
            raise KeyError(f"image ids not in the cache: {missing[:10].tolist()}")
        return pos

    def _gather(self, positions: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, _Part]]:
        """Group positions by part: (indices into `positions`, rows inside the part, the part)."""
        out = []
        part_numbers = self.part_of_row[positions]
        for number in np.unique(part_numbers):
            where = np.nonzero(part_numbers == number)[0]
            rows = self.row_in_part[positions[where]]
            out.append((where, rows, self.parts[int(number)]))
        return out

    def raw_maps(self, positions: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
        """float16 stored maps and float32 scales for `positions` (which: 'pred' or 'true')."""
        if len(self.parts) == 0 or len(positions) == 0:
            size = self.parts[0].maps_pred.shape[1:] if self.parts else (0, 0)
            return np.zeros((len(positions), *size), np.float16), np.zeros(len(positions), np.float32)
        size = self.parts[0].maps_pred.shape[1:]
        out = np.empty((len(positions), *size), np.float16)
        scale = self.scale_pred[positions].copy()
        use_true = np.zeros(len(positions), bool)
        if which == "true":
            use_true = self.true_row[positions] >= 0
            scale[use_true] = self.scale_true[positions[use_true]]
        for where, rows, part in self._gather(positions):
            true_mask = use_true[where]
            if (~true_mask).any():
                sel = where[~true_mask]
                out[sel] = _take_rows(part.maps_pred, rows[~true_mask])
            if true_mask.any():
                sel = where[true_mask]
                out[sel] = _take_rows(part.maps_true, self.true_row[positions[sel]])
        return out, scale

    def descriptors(self, positions: np.ndarray, kind: str) -> np.ndarray:
        dim = self.parts[0].descriptors[kind].shape[1] if self.parts else 0
        out = np.empty((len(positions), dim), np.float32)
        for where, rows, part in self._gather(positions):
            out[where] = _take_rows(part.descriptors[kind], rows)
        return out

    def has_row_array(self, name: str) -> bool:
        """Every part with rows has the array (a shard whose images were all skipped has no rows to store)."""
        with_rows = [part for part in self.parts if part.maps_pred.shape[0] > 0]
        return bool(with_rows) and all(name in part.row_arrays for part in with_rows)

    def row_array(self, positions: np.ndarray, name: str) -> np.ndarray:
        example = next(part.row_arrays[name] for part in self.parts if name in part.row_arrays)
        out = np.empty((len(positions), *example.shape[1:]), example.dtype)
        for where, rows, part in self._gather(positions):
            out[where] = _take_rows(part.row_arrays[name], rows)
        return out

    def has_foreground_arrays(self) -> bool:
        return bool(self.parts) and all(part.foreground is not None for part in self.parts)

    def packed_foreground(self, positions: np.ndarray) -> np.ndarray:
        width = self.parts[0].foreground.shape[1]
        out = np.empty((len(positions), width), np.uint8)
        for where, rows, part in self._gather(positions):
            out[where] = _take_rows(part.foreground, rows)
        return out

    # -- compaction --------------------------------------------------------------------------------------
    def write_consolidated(self, target: Path, chunk_rows: int) -> None:
        """Write all rows, in id order, as one part into the (empty) directory `target`."""
        n = len(self.ids)
        size = self.parts[0].maps_pred.shape[1:]
        wrong = np.nonzero(self.true_row >= 0)[0]
        true_row = np.full(n, -1, np.int64)
        true_row[wrong] = np.arange(len(wrong), dtype=np.int64)
        stored = self.stored.set_column(self.stored.schema.get_field_index("_true_row"), "_true_row",
                                        pa.array(true_row, type=pa.int64()))
        _save_parquet(target / "table.parquet", stored)
        err_order = np.argsort(self.errors.column("id").to_numpy(), kind="stable")
        _save_parquet(target / "errors.parquet", self.errors.take(pa.array(err_order)))

        def stream(name: str, shape: tuple[int, ...], dtype: Any, fill: "callable", count: int) -> None:
            out = np.lib.format.open_memmap(target / name, mode="w+", dtype=dtype, shape=(count, *shape))
            for start in range(0, count, chunk_rows):
                stop = min(start + chunk_rows, count)
                out[start:stop] = fill(start, stop)
            out.flush()
            del out
            _fsync_path(target / name)

        all_pos = np.arange(n)
        stream("maps_pred.npy", size, np.float16, lambda a, b: self.raw_maps(all_pos[a:b], "pred")[0], n)
        stream("maps_true.npy", size, np.float16, lambda a, b: self.raw_maps(wrong[a:b], "true")[0], len(wrong))
        for kind, name in DESCRIPTOR_FILES.items():
            dim = self.parts[0].descriptors[kind].shape[1]
            stream(name, (dim,), np.float32, lambda a, b, k=kind: self.descriptors(all_pos[a:b], k), n)
        if self.has_foreground_arrays():
            width = self.parts[0].foreground.shape[1]
            stream("foreground.npy", (width,), np.uint8, lambda a, b: self.packed_foreground(all_pos[a:b]), n)
        for name, file in ROW_ARRAYS.items():
            if self.has_row_array(name):
                example = next(part.row_arrays[name] for part in self.parts if name in part.row_arrays)
                stream(file, example.shape[1:], example.dtype,
                       lambda a, b, k=name: self.row_array(all_pos[a:b], k), n)


def _with_defaults(table: pa.Table) -> pa.Table:
    """Columns a part written by an older job lacks are read as nulls: geometry unknown (size 0, box NaN)."""
    for names, value in ((SIZE_COLUMNS, 0), (BOX_COLUMNS, float("nan"))):
        for name in names:
            column = table.column(name)
            if column.null_count:
                index = table.schema.get_field_index(name)
                table = table.set_column(index, table.schema.field(index), column.fill_null(value))
    return table


def _take_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Fancy-index a memory map in ascending row order (sequential reads), returning rows in request order."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > 1 and np.any(np.diff(rows) < 0):
        order = np.argsort(rows, kind="stable")
        taken = np.asarray(array[rows[order]])
        out = np.empty_like(taken)
        out[order] = taken
        return out
    return np.asarray(array[rows])


class Cache:
    """Read-only view of the committed part of an explanation cache (see `load`)."""

    def __init__(self, root: Path, manifest: dict[str, Any], view: _PartsView):
        self.root = root
        self.manifest = manifest
        self._view = view
        self._table: pd.DataFrame | None = None
        self._errors: pd.DataFrame | None = None

    # -- metadata ----------------------------------------------------------------------------------------
    @property
    def table(self) -> pd.DataFrame:
        """One row per explained image, sorted by id (public columns only); built on first access."""
        if self._table is None:
            public = self._view.stored.select([f.name for f in TABLE_SCHEMA])
            self._table = public.to_pandas()
        return self._table

    def columns(self, names: Sequence[str]) -> pd.DataFrame:
        """Some public columns of `table`, in id order (cheaper than `table` at millions of rows: the list
        columns are not built)."""
        unknown = [name for name in names if name not in TABLE_SCHEMA.names]
        if unknown:
            raise ValueError(f"not table columns: {unknown}")
        if self._table is not None:
            return self._table[list(names)]
        return self._view.stored.select(list(names)).to_pandas()

    @property
    def errors(self) -> pd.DataFrame:
        """Every skipped image: columns path, reason (and id)."""
        if self._errors is None:
            errors = self._view.errors
            order = np.argsort(errors.column("id").to_numpy(), kind="stable")
            frame = errors.take(pa.array(order)).to_pandas()
            self._errors = frame[["path", "reason", "id"]].reset_index(drop=True)
        return self._errors

    @property
    def ids(self) -> np.ndarray:
        """Ids of the explained images, ascending (same order as `table`)."""
        return self._view.ids

    def __len__(self) -> int:
        return len(self._view.ids)

    @property
    def identity(self) -> str:
        """See `cache_identity`: results derived from this cache record it."""
        return cache_identity(self.manifest)

    @property
    def map_size(self) -> int:
        return int(self.manifest.get("options", {}).get("map_size", 0))

    @property
    def complete(self) -> bool:
        """True once the job finished on every rank (the manifest's `finished` stamp is set)."""
        return bool(self.manifest.get("finished"))

    # -- arrays ------------------------------------------------------------------------------------------
    def maps(self, ids: Sequence[int] | np.ndarray, which: str = "pred") -> np.ndarray:
        """float32 [len(ids), S, S] relevance maps; which='true' gives the true-class map (pred map if correct)."""
        if which not in ("pred", "true"):
            raise ValueError(f"which must be 'pred' or 'true', not {which!r}")
        positions = self._view.positions(ids)
        stored, scale = self._view.raw_maps(positions, which)
        return stored.astype(np.float32) * scale[:, None, None]

    def descriptors(self, ids: Sequence[int] | np.ndarray | None = None, kind: str = "positive") -> np.ndarray:
        """float32 [n, D*D] unit-mass pooled maps, for `ids` or for every row in table order."""
        if kind not in DESCRIPTOR_FILES:
            raise ValueError(f"kind must be one of {sorted(DESCRIPTOR_FILES)}, not {kind!r}")
        positions = np.arange(len(self)) if ids is None else self._view.positions(ids)
        return self._view.descriptors(positions, kind)

    def foreground(self, ids: Sequence[int] | np.ndarray) -> np.ndarray | None:
        """bool [len(ids), S, S] foreground at map size, or None when the cache has no foreground source.

        Rows whose image had no mask/box (has_foreground False) are all False.
        """
        positions = self._view.positions(ids)
        if not self._view.has_foreground_arrays():
            return None
        size = self._view.parts[0].maps_pred.shape[1]
        return unpack_foreground(self._view.packed_foreground(positions), size)

    def geometry(self, id: int) -> dict[str, Any]:
        """How image `id` relates to the model's input: {"width", "height": the original size (None when not
        recorded), "crop_box": (x0, y0, x1, y1), the region of the original the model saw, in original pixels
        (None: unknown), "known": bool, "input_size": the model input's (width, height), "scale": model pixels
        per original pixel (x, y), "aspect_change": scale x / scale y (1.0: none), "method": how the box was
        found ("derived", "measured", or "unknown" for a cache of an older job)}."""
        position = int(self._view.positions([id])[0])
        stored = self._view.stored
        width, height = (int(stored.column(name)[position].as_py() or 0) for name in SIZE_COLUMNS)
        box = tuple(float(stored.column(name)[position].as_py()) for name in BOX_COLUMNS)
        known = width > 0 and height > 0 and all(np.isfinite(box)) and box[2] > box[0] and box[3] > box[1]
        recorded = self.manifest.get("geometry") or {}
        input_size = recorded.get("input_size")
        scale = aspect = None
        if known and input_size:
            scale = (input_size[0] / (box[2] - box[0]), input_size[1] / (box[3] - box[1]))
            aspect = scale[0] / scale[1]
        return {"width": width or None, "height": height or None, "crop_box": box if known else None,
                "known": bool(known), "input_size": tuple(input_size) if input_size else None, "scale": scale,
                "aspect_change": aspect, "method": recorded.get("method", "unknown")}

    def map_in_image(self, id: int, which: str = "pred") -> np.ndarray:
        """float32 [H, W] at the original image's size: the map laid on the region the model saw (bilinear
        between map cells), NaN where the model never looked. UnknownGeometry when the cache does not know
        where the map lies (see `geometry`)."""
        from analysis.geometry import place_map

        geometry = self.geometry(id)
        if not geometry["known"]:
            raise UnknownGeometry(f"image {id}: where the model's input lies in the original image is unknown "
                                  f"({geometry['method']} geometry); re-run the job to record it")
        return place_map(self.maps([id], which)[0], geometry["crop_box"], geometry["width"], geometry["height"])

    def row_array(self, name: str, ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray | None:
        """The per-row array `name` (see ROW_ARRAYS) for `ids` or every row in table order, as stored; None
        when the cache has none (made before the array existed, or by a job that did not store it)."""
        if name not in ROW_ARRAYS:
            raise ValueError(f"name must be one of {sorted(ROW_ARRAYS)}, not {name!r}")
        positions = np.arange(len(self)) if ids is None else self._view.positions(ids)
        if not self._view.has_row_array(name):
            return None
        return self._view.row_array(positions, name)

    def probabilities(self, ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray | None:
        """float32 [n, K] softmax outputs of the model (stored as float16: about 3 significant digits), for
        `ids` or every row in table order; None for a cache made before they were stored. With more than
        100 classes only the top 20 are stored: the rest of each row's mass is spread evenly over the others."""
        stored = self.row_array("probabilities", ids)
        if stored is None:
            return None
        num_classes = len(self.manifest.get("class_names") or []) or stored.shape[1]
        return full_probabilities(stored, self.row_array("probability_classes", ids), num_classes)

    def channel_relevance(self, ids: Sequence[int] | np.ndarray | None = None, which: str = "pred"
                          ) -> np.ndarray | None:
        """float32 [len(ids), K]: each CAM-layer channel's relevance (the spatial sum of its component) for the
        predicted or the true class; None for a cache made before it was stored (analysis.channel_relevance)."""
        from analysis.channel_relevance import read_channel_relevance

        return read_channel_relevance(self, ids, which)

    def image_path(self, id: int) -> Path:
        """Absolute path of an explained image inside the manifest's dataset root."""
        position = self._view.positions([id])[0]
        relative = self._view.stored.column("path")[int(position)].as_py()
        root = Path(self.manifest["dataset"]["root"]).resolve()
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            raise CacheError(f"image path {relative!r} escapes the dataset root {root}")
        return path

    # -- offline analysis results (written by `python -m analysis cluster`: analysis/cluster_offline.py) ---
    def clustering_scopes(self) -> list[str]:
        """Scopes with an offline clustering computed on the cache as it is now: all, mistakes, true:<class>,
        pred:<class> (results of an older state of the cache are not listed)."""
        from analysis import cluster_offline

        return cluster_offline.fresh_scopes(self)

    def clustering(self, scope: str, **settings: Any) -> Any:
        """The stored clustering of a scope (analysis.cluster_offline.StoredClustering); `settings` choose among
        the stored ones: descriptor, metric, n_neighbors, embedding, seed, algorithm, k, run. Raises
        cluster_offline.ClusteringNotFound (a LookupError) when none matches."""
        from analysis import cluster_offline

        return cluster_offline.read_clustering(self, scope, **settings)

    def class_maps(self) -> Any:
        """Per-class mean maps and consensus maps over the whole cache (analysis.cluster_offline.ClassAggregates),
        or None when the cluster command has not stored them for the cache as it is now."""
        from analysis import cluster_offline

        return cluster_offline.read_class_aggregates(self)


def load(root: Path | str) -> Cache:
    """Open a cache directory (fast: parquet tables are read, arrays are memory-mapped)."""
    root = Path(root)
    if not root.exists():
        raise CacheError(f"cache directory not found: {root}")
    if not root.is_dir():
        raise CacheError(f"not a directory: {root}")
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.exists():
        raise CacheError(f"not an explanation cache (no {MANIFEST_NAME}): {root}")
    manifest = _read_manifest(manifest_path)
    view = _PartsView.open(root)
    return Cache(root, manifest, view)
