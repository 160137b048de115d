"""A whole offline clustering run over a cache: every scope, its progress, and what each scope came to."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.explore import clustering
from analysis.explore.clustering import ClusteringSettings
from analysis.explore.cluster_offline.settings import (DEFAULT_SCOPES, TMP_PREFIX, cache_fingerprint,
                                                       class_names_of, expand_scopes, scope_folder, scope_mask)
from analysis.explore.cluster_offline.scope import SUMMARY_ROW_COLUMNS, cluster_scope
from analysis.explore.cluster_offline.store import stored_all_layout, run_dir, stored_scopes, write_scope_result
from analysis.explore.cluster_offline.aggregates import (compute_class_aggregates, read_class_aggregates,
                                                         write_class_aggregates)
from analysis.explore.cluster_offline.verdicts import VerifyOptions, with_verdicts
from analysis.explore.cluster_offline.verify import stored_verification_options, test_clusters, write_verification


def load_cache(root: Path) -> Any:
    from analysis.cache import load

    return load(root)


def read_descriptors(cache_root: Path, ids: np.ndarray, kind: str, chunk_rows: int = 65536) -> np.ndarray:
    """float32 [len(ids), P] descriptors, read in chunks through a cache opened for this only: one copy in
    memory (reading them at once holds two), and the mapped file pages leave the process with the reader."""
    reader = load_cache(cache_root)
    first = reader.descriptors(ids[:1], kind)
    out = np.empty((len(ids), first.shape[1]), np.float32)
    for start in range(0, len(ids), chunk_rows):
        out[start:start + chunk_rows] = reader.descriptors(ids[start:start + chunk_rows], kind)
    del reader
    return out


class RunProgress:
    """What a run reports while it works (the command line draws a progress bar from it); no-ops here."""

    def start(self, scopes: list[tuple[str, int]]) -> None: ...
    def scope(self, scope: str, n: int, status: str) -> None: ...
    def stage(self, text: str) -> None: ...
    def scope_done(self, scope: str, n: int) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass
class ScopeOutcome:
    scope: str
    n: int
    status: str                        # "computed", "kept" (already fresh), "empty"
    path: Path | None = None
    seconds: float = 0.0


def _prepare_target(cache: Any, settings: ClusteringSettings, fingerprint: str, progress: RunProgress) -> Path:
    """The run's folder, emptied of a killed run's leftovers, with its settings written; the per-class
    aggregates stored first when they are missing."""
    from analysis.cache import write_json_atomic

    if read_class_aggregates(cache) is None:
        progress.stage("per-class mean maps")
        # Through a cache opened for this pass only: the file pages it maps leave the process with it.
        write_class_aggregates(cache.root, compute_class_aggregates(load_cache(cache.root)), fingerprint)
    target = run_dir(cache.root, settings)
    target.mkdir(parents=True, exist_ok=True)
    for leftover in target.glob(f"{TMP_PREFIX}*"):   # of a killed run (one run of a setting at a time)
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    write_json_atomic(target / "settings.json", {"settings": settings.as_dict(), "key": settings.key()})
    return target


def _start_layout(target: Path, fingerprint: str, ids: np.ndarray) -> np.ndarray | None:
    """A scope's points in the run's stored all-images t-SNE layout (its t-SNE starts there), or None."""
    layout = stored_all_layout(target / scope_folder("all"), fingerprint)
    init = None if layout is None else layout.reindex(ids).to_numpy(np.float64)
    return None if init is None or not np.isfinite(init).all() else init


def _verify_scopes(cache: Any, target: Path, fingerprint: str, scope_list: list[str], verify: VerifyOptions,
                   loaded: Any, device: Any, progress: RunProgress) -> None:
    """The causal tests of the top clusters of every stored scope of the run not yet tested with these options;
    their p-values adjusted together (one family: the run), then each scope's verdicts written."""
    from analysis.trust.region_removal import RunInputs

    if loaded is None:
        raise ValueError("verifying needs the cache's model (loaded)")
    stored = {s.scope: s for s in stored_scopes(cache.root, fingerprint) if s.fresh and s.path.parent == target}
    todo = [stored[scope] for scope in scope_list
            if scope in stored and stored_verification_options(stored[scope]) != verify.as_dict()]
    frames, inputs = [], RunInputs()
    for scope in todo:
        progress.stage(f"{scope.scope}: causal test of the top {verify.top} clusters")
        frames.append(test_clusters(cache, scope, loaded, verify, device, progress.stage, inputs))
    for scope, frame in zip(todo, with_verdicts(frames, verify)):
        write_verification(cache, scope, frame, verify)


def cluster_cache(cache: Any, settings: ClusteringSettings, scopes: Sequence[str] = DEFAULT_SCOPES,
                  threads: int | None = None, verify: VerifyOptions | None = None, loaded: Any = None,
                  device: Any = "cpu", progress: RunProgress | None = None) -> list[ScopeOutcome]:
    """Cluster every requested scope of a cache (skipping scopes already stored for these settings and this
    state of the cache), store the per-class aggregates, and with `verify` (and `loaded`, the cache's model)
    run the causal test on the top clusters of every scope. Returns one outcome per scope, in order."""
    settings.validate()
    progress = progress or RunProgress()
    names = class_names_of(cache)
    scope_list = expand_scopes(scopes, names)
    scope_list.sort(key=lambda scope: scope != "all")   # first: the other scopes' t-SNE starts from its layout
    fingerprint = cache_fingerprint(cache)
    table = cache.columns(SUMMARY_ROW_COLUMNS)
    target = _prepare_target(cache, settings, fingerprint, progress)
    summary_kind = clustering.summary_descriptor_kind(settings.descriptor)
    consensus = read_class_aggregates(cache).consensus[summary_kind]
    existing = {s.scope: s for s in stored_scopes(cache.root, fingerprint) if s.fresh and s.path.parent == target}
    masks = {scope: scope_mask(table, scope, names) for scope in scope_list}
    progress.start([(scope, int(masks[scope].sum())) for scope in scope_list])
    outcomes = []
    for scope in scope_list:
        mask = masks[scope]
        n = int(mask.sum())
        status = "empty" if n == 0 else "kept" if scope in existing else "computing"
        progress.scope(scope, n, status)
        if status != "computing":
            outcomes.append(ScopeOutcome(scope, n, status, existing[scope].path if n else None))
            progress.scope_done(scope, n)
            continue
        started = time.perf_counter()
        ids = table["id"].to_numpy(np.int64)[mask]
        init = _start_layout(target, fingerprint, ids) if scope != "all" and settings.embedding == "tsne" else None
        # A clustering on concepts: the graph on channel shares, the summaries on the positive maps.
        maps = None if summary_kind == settings.descriptor else read_descriptors(cache.root, ids, summary_kind)
        result = cluster_scope(scope, ids, read_descriptors(cache.root, ids, settings.descriptor), table[mask],
                               consensus, names, settings, threads, progress.stage, init=init,
                               overwrite_descriptors=True, summary_descriptors=maps)
        for message in result.messages:
            progress.message(f"{scope}: {message}")
        path = write_scope_result(target, result, settings, fingerprint)
        outcomes.append(ScopeOutcome(scope, n, "computed", path, time.perf_counter() - started))
        progress.scope_done(scope, n)
    if verify is not None and verify.top > 0:
        _verify_scopes(cache, target, fingerprint, scope_list, verify, loaded, device, progress)
    return outcomes
