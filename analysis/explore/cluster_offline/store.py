"""The stored results: each scope written atomically under CACHE/analysis/clustering/<run>/<scope>/, and the
reading side (StoredClustering, read_clustering), which ignores results of an older state of the cache."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.explore.clustering import ClusteringSettings
from analysis.explore.cluster_offline.settings import (CLUSTERING_DIR, DEFAULT_SCOPES, DENSITY_BINS, FORMAT_VERSION,
                                                       RESULTS_DIR, SCOPE_PREFIX, TMP_PREFIX,
                                                       cache_fingerprint, expand_scopes, scope_folder)
from analysis.explore.cluster_offline.scope import ScopeResult


def results_root(cache_root: Path | str) -> Path:
    return Path(cache_root) / RESULTS_DIR


def run_dir(cache_root: Path | str, settings: ClusteringSettings) -> Path:
    return results_root(cache_root) / CLUSTERING_DIR / settings.key()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _density(coords: np.ndarray, bins: int = DENSITY_BINS) -> tuple[np.ndarray, list[float], list[float]]:
    """Point counts on a bins x bins grid over the layout's extent (the page draws it instead of a million
    marks), with the x and y ranges."""
    if len(coords) == 0:
        return np.zeros((bins, bins), np.int32), [0.0, 1.0], [0.0, 1.0]
    lo, hi = coords.min(axis=0).astype(np.float64), coords.max(axis=0).astype(np.float64)
    pad = np.where(hi > lo, (hi - lo) * 1e-6, 0.5)
    lo, hi = lo - pad, hi + pad
    counts, _, _ = np.histogram2d(coords[:, 0], coords[:, 1], bins=bins, range=[[lo[0], hi[0]], [lo[1], hi[1]]])
    return counts.astype(np.int32), [float(lo[0]), float(hi[0])], [float(lo[1]), float(hi[1])]


def write_scope_result(target_dir: Path, result: ScopeResult, settings: ClusteringSettings, fingerprint: str) -> Path:
    """Write a scope's result as one folder, atomically (temporary folder, fsync, rename); an older result of
    the same scope (a stale one) is replaced."""
    from analysis.cache.files import _save_npy, _save_parquet, folder_replaced_atomically

    final = target_dir / scope_folder(result.scope)
    with folder_replaced_atomically(final) as tmp:
        n = len(result.ids)
        # A seeded random order of the points: the page draws the first ones (plus every small cluster whole).
        sample_rank = np.empty(n, np.int32)
        sample_rank[np.random.default_rng(settings.seed).permutation(n)] = np.arange(n, dtype=np.int32)
        order = np.argsort(result.ids, kind="stable")
        columns = {"id": pa.array(result.ids[order], pa.int64()),
                   "x": pa.array(result.coords[order, 0], pa.float32()),
                   "y": pa.array(result.coords[order, 1], pa.float32()),
                   "sample_rank": pa.array(sample_rank[order], pa.int32())}
        for name, labels in result.labels.items():
            columns[name] = pa.array(np.asarray(labels, np.int32)[order], pa.int32())
        _save_parquet(tmp / "assignments.parquet", pa.table(columns))
        _save_parquet(tmp / "summary.parquet", pa.Table.from_pandas(result.summary, preserve_index=False))
        _save_npy(tmp / "prototypes.npy", result.prototypes.astype(np.float32))
        counts, x_range, y_range = _density(result.coords)
        _save_npy(tmp / "density.npy", counts)
        meta = {
            "format_version": FORMAT_VERSION, "scope": result.scope, "run": settings.key(),
            "settings": settings.as_dict(), "cache_fingerprint": fingerprint, "created": _now(), "n": int(n),
            "eigenvalues": [float(v) for v in result.eigenvalues], "suggested_k": int(result.suggested_k),
            "clusterings": result.clusterings, "messages": result.messages,
            "embedding": asdict(result.embedding), "knn": result.knn_method, "components": result.n_components,
            "density": {"bins": int(counts.shape[0]), "x_range": x_range, "y_range": y_range},
            "timings": result.timings,
        }
        with open(tmp / "meta.json", "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=1, default=_json_default)
            handle.flush()
            os.fsync(handle.fileno())
    return final


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        with open(folder / "meta.json", encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or "scope" not in meta:
        return None
    return meta


@dataclass
class StoredScope:
    """One stored scope result (a folder), without its tables."""

    path: Path
    meta: dict[str, Any]
    fresh: bool                  # computed on the cache as it is now

    @property
    def scope(self) -> str:
        return str(self.meta["scope"])

    @property
    def settings(self) -> ClusteringSettings:
        return ClusteringSettings.from_dict(self.meta.get("settings", {}))


def stored_scopes(cache_root: Path | str, fingerprint: str | None) -> list[StoredScope]:
    """Every readable stored scope result under CACHE/analysis/clustering/, newest first; `fresh` tells whether
    it was computed on `fingerprint` (None: treat none as fresh)."""
    base = results_root(cache_root) / CLUSTERING_DIR
    found = []
    if not base.is_dir():
        return found
    for run in sorted(base.iterdir()):
        if not run.is_dir() or run.name.startswith(TMP_PREFIX):
            continue
        for folder in sorted(run.iterdir()):
            if not folder.name.startswith(SCOPE_PREFIX) or not folder.is_dir():
                continue
            meta = _read_meta(folder)
            if meta is not None:
                found.append(StoredScope(folder, meta, meta.get("cache_fingerprint") == fingerprint))
    found.sort(key=lambda s: s.meta.get("created", ""), reverse=True)
    return found


class ClusteringNotFound(LookupError):
    """No stored clustering matches the request (the message says what there is)."""


class StoredClustering:
    """One stored clustering of one scope, read lazily (the page opens it in well under a second at a million
    images: the tables are read column by column when first used).

    Attributes: scope, name ("spectral_k7"), algorithm, k, k_from ("eigengap" or "given"), settings (the run's
    ClusteringSettings), eigenvalues, suggested_k, calibration (how unusual the top cluster is: suspicion,
    null_max_mean, null_max_sd, z, p, partitions), messages, n (images), created.
    """

    def __init__(self, stored: StoredScope, record: dict[str, Any], choices: pd.DataFrame):
        meta = stored.meta
        self.path = stored.path
        self.meta = meta
        self.scope = str(meta["scope"])
        self.settings = stored.settings
        self.name = str(record["name"])
        self.algorithm = str(record["algorithm"])
        self.k = int(record["k"])
        self.k_from = str(record.get("k_from", "given"))
        self.calibration = dict(record.get("calibration") or {})
        self.eigenvalues = np.asarray(meta.get("eigenvalues", []), np.float64)
        self.suggested_k = int(meta.get("suggested_k", 1))
        self.messages = list(meta.get("messages", []))
        self.n = int(meta.get("n", 0))
        self.created = str(meta.get("created", ""))
        self.choices = choices     # every fresh clustering of this scope (to switch settings); see `choices_of`
        self._summary: pd.DataFrame | None = None
        self._prototypes: np.ndarray | None = None
        self._assignments: pd.DataFrame | None = None

    def __repr__(self) -> str:
        return f"StoredClustering({self.scope!r}, {self.name!r}, run={self.settings.key()!r}, n={self.n})"

    def _summary_rows(self) -> tuple[pd.DataFrame, np.ndarray]:
        frame = pq.read_table(self.path / "summary.parquet").to_pandas()
        rows = np.nonzero(frame["clustering"].to_numpy() == self.name)[0]
        return frame.iloc[rows].drop(columns="clustering").reset_index(drop=True), rows

    @property
    def summary(self) -> pd.DataFrame:
        """One row per cluster, most suspicious first: rank, cluster, size, accuracy, majority_class,
        majority_name, class_mix, background_share, background_hotspot, border_share, unlike_class, suspicion,
        suspicion_null, suspicion_null_sd, suspicion_z, suspicion_p."""
        if self._summary is None:
            self._summary, rows = self._summary_rows()
            self._prototypes = np.load(self.path / "prototypes.npy", mmap_mode="r")[rows].astype(np.float32)
        return self._summary

    @property
    def prototypes(self) -> np.ndarray:
        """float32 [clusters, D*D]: row i is the mean descriptor of the cluster in summary row i."""
        if self._prototypes is None:
            _ = self.summary
        return self._prototypes

    def _read_assignments(self, columns: list[str]) -> pd.DataFrame:
        return pq.read_table(self.path / "assignments.parquet", columns=columns).to_pandas()

    @property
    def assignments(self) -> pd.DataFrame:
        """One row per image of the scope, by id: id, cluster, x, y, sample_rank (a seeded random order for
        drawing a subsample)."""
        if self._assignments is None:
            frame = self._read_assignments(["id", self.name, "x", "y", "sample_rank"])
            self._assignments = frame.rename(columns={self.name: "cluster"})
        return self._assignments

    @property
    def verification(self) -> pd.DataFrame | None:
        """The causal test's results of the top clusters (see `verify_scope`), or None when not run."""
        path = self.path / "verification.parquet"
        if not path.is_file():
            return None
        try:
            frame = pq.read_table(path).to_pandas()
        except (OSError, pa.ArrowException):
            return None
        return frame[frame["clustering"] == self.name].drop(columns="clustering").reset_index(drop=True)

    def density(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(counts [bins, bins] over (x, y), x bin edges, y bin edges): every point, stored at write time."""
        counts = np.load(self.path / "density.npy")
        info = self.meta["density"]
        bins = counts.shape[0]
        return counts, np.linspace(*info["x_range"], bins + 1), np.linspace(*info["y_range"], bins + 1)

    def display_points(self, budget: int = 20_000, keep_whole: int | None = None) -> pd.DataFrame:
        """Rows of `assignments` to draw as marks: every cluster of at most `keep_whole` images (default: the
        budget / 20) whole, then the other images in the stored random order up to `budget` in all."""
        frame = self.assignments
        keep_whole = max(1, budget // 20) if keep_whole is None else keep_whole
        labels = frame["cluster"].to_numpy()
        values, counts = np.unique(labels, return_counts=True)
        small = np.isin(labels, values[counts <= keep_whole])
        rest = np.nonzero(~small)[0]
        room = max(0, budget - int(small.sum()))
        chosen = rest[np.argsort(frame["sample_rank"].to_numpy()[rest], kind="stable")[:room]]
        return frame.iloc[np.sort(np.concatenate([np.nonzero(small)[0], chosen]))].reset_index(drop=True)

    def ids_in_box(self, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
        """Ids of every image whose point lies in the box (not only the drawn ones), ascending."""
        frame = self.assignments
        (x0, x1), (y0, y1) = sorted((x0, x1)), sorted((y0, y1))
        x, y = frame["x"].to_numpy(), frame["y"].to_numpy()
        return frame["id"].to_numpy(np.int64)[(x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)]

    def members(self, cluster: int) -> np.ndarray:
        """Ids of every image of a cluster, ascending (a gallery pages through them)."""
        frame = self.assignments
        return frame["id"].to_numpy(np.int64)[frame["cluster"].to_numpy() == int(cluster)]


def choices_of(stored: Sequence[StoredScope]) -> pd.DataFrame:
    """Every clustering of the given stored scopes, one row each: run, descriptor, metric, n_neighbors,
    embedding, seed, algorithm, k, k_from, name, created (what a settings menu offers)."""
    records = []
    for item in stored:
        settings = item.settings
        for record in item.meta.get("clusterings", []):
            records.append({"run": settings.key(), "descriptor": settings.descriptor, "metric": settings.metric,
                            "n_neighbors": settings.n_neighbors, "embedding": settings.embedding,
                            "seed": settings.seed, "algorithm": record["algorithm"], "k": int(record["k"]),
                            "k_from": record.get("k_from", "given"), "name": record["name"],
                            "created": item.meta.get("created", "")})
    return pd.DataFrame.from_records(records, columns=["run", "descriptor", "metric", "n_neighbors", "embedding", "seed",
                                                       "algorithm", "k", "k_from", "name", "created"])


def fresh_scopes(cache: Any) -> list[str]:
    """Scopes with at least one clustering computed on the cache as it is now: all, mistakes, then true:<c>
    and pred:<c> in class order (the order of a scope menu)."""
    names = {s.scope for s in stored_scopes(cache.root, cache_fingerprint(cache)) if s.fresh}
    # The manifest's class order (not the table's: building it costs seconds at a million images).
    order = expand_scopes(DEFAULT_SCOPES, list(cache.manifest.get("class_names") or []))
    return [s for s in order if s in names] + sorted(names - set(order))


def read_clustering(cache: Any, scope: str, descriptor: str | None = None, metric: str | None = None,
                    n_neighbors: int | None = None, embedding: str | None = None, seed: int | None = None,
                    algorithm: str | None = None, k: int | None = None, run: str | None = None) -> StoredClustering:
    """The stored clustering of `scope` that matches the given settings (None: any), computed on the cache as
    it is now. Among several matching runs the newest wins; within a run, algorithm None = the run's first
    algorithm and k None = the eigengap's k. ClusteringNotFound (one line) when nothing matches."""
    fresh = [s for s in stored_scopes(cache.root, cache_fingerprint(cache)) if s.fresh and s.scope == scope]
    if not fresh:
        raise ClusteringNotFound(f"no offline clustering of scope {scope!r} for this cache (as it is now): run "
                                 f"`python -m analysis cluster --cache {cache.root}`")
    wanted = {"descriptor": descriptor, "metric": metric, "n_neighbors": n_neighbors, "embedding": embedding,
              "seed": seed}
    matching = [s for s in fresh if (run is None or s.settings.key() == run)
                and all(v is None or getattr(s.settings, f) == v for f, v in wanted.items())]
    choices = choices_of(fresh)
    for item in matching:
        records = item.meta.get("clusterings", [])
        if algorithm is not None:
            records = [r for r in records if r["algorithm"] == algorithm]
        elif records:
            first = item.settings.algorithms[0] if item.settings.algorithms else records[0]["algorithm"]
            records = [r for r in records if r["algorithm"] == first] or records
        if k is not None:
            records = [r for r in records if int(r["k"]) == int(k)]
        else:
            records = sorted(records, key=lambda r: r.get("k_from") != "eigengap")
        if records:
            return StoredClustering(item, records[0], choices)
    asked = ", ".join(f"{f}={v}" for f, v in {**wanted, "algorithm": algorithm, "k": k, "run": run}.items()
                      if v is not None)
    available = "; ".join(sorted(set(choices["name"] + " (" + choices["descriptor"] + ", " + choices["metric"]
                                      + ", " + choices["n_neighbors"].astype(str) + " neighbours, "
                                      + choices["embedding"] + ")"))) or "none"
    raise ClusteringNotFound(f"no stored clustering of {scope!r} with {asked or 'these settings'}; available: "
                             f"{available}")


def default_clustering(cache: Any) -> StoredClustering | None:
    """What the Clusters page opens with and the HTML report shows: the first scope of `fresh_scopes` (all images
    when stored), its newest run, the run's first algorithm and the eigengap's k; None when nothing is stored for
    the cache as it is now."""
    scopes = fresh_scopes(cache)
    return read_clustering(cache, scopes[0]) if scopes else None

def stored_all_layout(folder: Path, fingerprint: str) -> pd.DataFrame | None:
    """The stored all-images layout (x, y indexed by id) of a run, when fresh."""
    meta = _read_meta(folder)
    if meta is None or meta.get("cache_fingerprint") != fingerprint or \
            not str(meta.get("embedding", {}).get("method", "")).startswith("tsne"):
        return None
    return pq.read_table(folder / "assignments.parquet", columns=["id", "x", "y"]).to_pandas().set_index("id")
