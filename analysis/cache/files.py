"""Durable writes: every file of a cache is written under a temporary name, fsync'ed and renamed, so a
reader only ever sees complete files; removing a folder renames it away first."""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.cache.layout import COMPACT_PREFIX, DAMAGED_DIR, DERIVED_DIRS, MANIFEST_NAME, SHARDS_DIR, TMP_PREFIX


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its list of names) to disk, so a rename into it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_npy(path: Path, array: np.ndarray) -> None:
    """One array to `path`, fsync'ed (write it inside a temporary folder or file that is then renamed)."""
    with open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())


def save_parquet(path: Path, table: pa.Table) -> None:
    """One table to `path`, fsync'ed (write it inside a temporary folder or file that is then renamed)."""
    pq.write_table(table, path)
    fsync_path(path)


def _temporary_name(final: Path) -> Path:
    """A name beside `final` that readers skip and the next run removes (`.tmp-` prefix, unique per writer);
    the suffix is kept, so a writer that picks its format by suffix (pandas, PIL) still sees the right one."""
    return final.with_name(f"{TMP_PREFIX}{final.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{final.suffix}")


@contextmanager
def file_replaced_atomically(final: Path) -> Iterator[Path]:
    """A temporary path beside `final` to write one file to; when the block ends without an error the file
    is fsync'ed and renamed over `final` (a reader sees the old file or the new one, never half of one), and
    on an error it is removed. Every single-file write of the product goes through here."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(final)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that readers see either the old or the new file, never half of one."""
    with file_replaced_atomically(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


@contextmanager
def folder_replaced_atomically(final: Path, only_over_empty: bool = False) -> Iterator[Path]:
    """An empty temporary folder beside `final` to write into; when the block ends without an error it is
    fsync'ed and takes the place of `final` (a reader sees the old folder or the new one, never half of
    either), and on an error it is removed. The results written beside a cache (a clustering scope, the
    concepts, an insertion test) are replaced this way. `only_over_empty`: `final` is the user's folder,
    which may only be replaced while it is empty (OSError, and the new folder removed, if it is not)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(final)
    tmp.mkdir()
    try:
        yield tmp
        fsync_path(tmp)
        if final.exists():
            final.rmdir() if only_over_empty else remove_atomically(final)
        os.rename(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def remove_atomically(path: Path) -> None:
    """Rename to a temporary name, then delete: a reader sees the whole part or none of it, never half."""
    doomed = path.with_name(f"{TMP_PREFIX}del-{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


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
