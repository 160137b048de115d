"""Reading a cache: the committed parts (shards and compactions) seen as one table (PartsView), the Cache
object the dashboard and the commands use, and load()."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.cache.layout import (BOX_COLUMNS, COMPACT_PREFIX, CONCEPT_DESCRIPTOR, COVERED_NAME, CacheError,
                                   DESCRIPTOR_FILES, ERRORS_SCHEMA, FORMAT_VERSION, MANIFEST_NAME, ROW_ARRAYS, SHARDS_DIR, SHARD_PREFIX,
                                   SIZE_COLUMNS, STORED_SCHEMA, TABLE_SCHEMA, UnknownGeometry, parse_index)
from analysis.cache.files import fsync_path, save_parquet
from analysis.cache.identity import cache_identity
from analysis.cache.arrays import full_probabilities, unpack_foreground
from analysis.cache.channels import read_channel_relevance, read_concept_descriptors
from analysis.cache.placement import place_map


def read_manifest_file(path: Path) -> dict[str, Any]:
    """The manifest at `path`; CacheError when it is unreadable or of another format version."""
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


def latest_compaction(root: Path) -> Path | None:
    """The newest compaction folder of the cache at `root` (highest sequence number), None when there is none."""
    best: tuple[int, Path] | None = None
    if not root.is_dir():
        return None
    for entry in os.scandir(root):
        index = parse_index(entry.name, COMPACT_PREFIX)
        if index is not None and (best is None or index > best[0]):
            best = (index, Path(entry.path))
    return None if best is None else best[1]


def read_covered(compaction: Path) -> list[int]:
    """The shard indices a compaction replaced (its covered list)."""
    try:
        with open(compaction / COVERED_NAME, encoding="utf-8") as handle:
            return [int(i) for i in json.load(handle)]
    except (OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError) and not compaction.exists():
            raise
        raise CacheError(f"corrupt compaction {compaction}: {exc}") from None


def list_shards(shards_dir: Path) -> dict[int, Path]:
    """Shard index -> folder, for every committed shard (temporary names are skipped)."""
    found: dict[int, Path] = {}
    if shards_dir.is_dir():
        for entry in os.scandir(shards_dir):
            index = parse_index(entry.name, SHARD_PREFIX)
            if index is not None:
                found[index] = Path(entry.path)
    return found


@dataclass
class StoredPart:
    """One committed shard or compaction, with its arrays memory-mapped (nothing read until indexed)."""

    path: Path
    maps_pred: np.ndarray
    maps_true: np.ndarray
    descriptors: dict[str, np.ndarray]
    foreground: np.ndarray | None
    row_arrays: dict[str, np.ndarray]      # the ROW_ARRAYS this part has

    @classmethod
    def open(cls, path: Path) -> "StoredPart":
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


class PartsView:
    """The union of the committed parts of a cache, indexed by position in id order."""

    def __init__(self, parts: list[StoredPart], stored: pa.Table, part_of_row: np.ndarray, row_in_part: np.ndarray,
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
    def open(cls, root: Path, attempts: int = 5) -> "PartsView":
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
    def _open_once(cls, root: Path) -> "PartsView":
        compaction = latest_compaction(root)
        covered = set(read_covered(compaction)) if compaction is not None else set()
        part_paths = [] if compaction is None else [compaction]
        part_paths += [p for i, p in sorted(list_shards(root / SHARDS_DIR).items()) if i not in covered]
        parts, tables, errors, part_of_row, row_in_part = [], [], [], [], []
        for number, path in enumerate(part_paths):
            try:
                table = _with_defaults(pq.read_table(path / "table.parquet", schema=STORED_SCHEMA))
                errors.append(pq.read_table(path / "errors.parquet", schema=ERRORS_SCHEMA))
                part = StoredPart.open(path)
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

    def _gather(self, positions: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, StoredPart]]:
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
        save_parquet(target / "table.parquet", stored)
        err_order = np.argsort(self.errors.column("id").to_numpy(), kind="stable")
        save_parquet(target / "errors.parquet", self.errors.take(pa.array(err_order)))

        def stream(name: str, shape: tuple[int, ...], dtype: Any, fill: "callable", count: int) -> None:
            out = np.lib.format.open_memmap(target / name, mode="w+", dtype=dtype, shape=(count, *shape))
            for start in range(0, count, chunk_rows):
                stop = min(start + chunk_rows, count)
                out[start:stop] = fill(start, stop)
            out.flush()
            del out
            fsync_path(target / name)

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

    def __init__(self, root: Path, manifest: dict[str, Any], view: PartsView):
        self.root = root
        self.manifest = manifest
        self._view = view
        self._table: pd.DataFrame | None = None
        self._errors: pd.DataFrame | None = None
        self._dataset_root: Path | None = None

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
        """float32 [n, D*D] unit-mass pooled maps ("positive", "absolute"), or [n, K] unit-mass channel relevance
        ("concepts": ``channels.read_concept_descriptors``), for `ids` or every row in table order."""
        if kind == CONCEPT_DESCRIPTOR:
            return read_concept_descriptors(self, ids)
        if kind not in DESCRIPTOR_FILES:
            raise ValueError(f"kind must be one of {sorted(DESCRIPTOR_FILES) + [CONCEPT_DESCRIPTOR]}, not {kind!r}")
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
        predicted or the true class; None for a cache made before it was stored (analysis.cache.channels)."""
        return read_channel_relevance(self, ids, which)

    def image_path(self, id: int) -> Path:
        """Absolute path of an explained image inside the manifest's dataset root."""
        return self.image_paths([id])[0]

    def image_paths(self, ids: Sequence[int] | np.ndarray) -> list[Path]:
        """Absolute paths of explained images inside the manifest's dataset root, in the order of `ids`
        (CacheError for a stored path that leads out of it, through `..` or a link)."""
        if self._dataset_root is None:   # resolved once: its folders' lookups were a tenth of a cluster test
            self._dataset_root = Path(self.manifest["dataset"]["root"]).resolve()
        root = self._dataset_root
        if len(ids) == 0:
            return []
        relatives = self._view.stored.column("path").take(pa.array(self._view.positions(ids))).to_pylist()
        paths = [(root / relative).resolve() for relative in relatives]
        for relative, path in zip(relatives, paths):
            if not path.is_relative_to(root):
                raise CacheError(f"image path {relative!r} escapes the dataset root {root}")
        return paths


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
    manifest = read_manifest_file(manifest_path)
    view = PartsView.open(root)
    return Cache(root, manifest, view)
