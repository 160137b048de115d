"""`python -m analysis cluster`: cluster every image of a cache offline, per scope, for the dashboard.

The method is in analysis/explore/cluster_offline/; this module is the command line: options, checks before any
work, the progress bar and the closing table. `explain` calls `cluster_after_explain` when it finishes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from analysis.explore import cluster_offline as offline, clustering
from analysis.commands.findings import store_findings
from analysis.findings import findings_path
from analysis.commands.cli_types import non_negative_int, percentage, positive_int

COMMAND = "cluster"
HELP = ("cluster every image of a cache offline, per scope (all, mistakes, each true and each predicted class): "
        "kNN graph, eigengap, clusters, t-SNE, calibrated suspicion, optional causal test; stored in CACHE/analysis/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `cluster` options."""
    defaults = clustering.ClusteringSettings()
    parser.add_argument("--cache", required=True, type=Path, help="a cache directory made by `explain`")
    parser.add_argument("--scopes", nargs="+", default=list(offline.DEFAULT_SCOPES), metavar="SCOPE",
                        help="all, mistakes, true (one scope per true class), pred (one per predicted class), "
                             "true:CLASS or pred:CLASS (default: all mistakes true pred)")
    method = parser.add_argument_group("clustering")
    method.add_argument("--descriptor", choices=clustering.DESCRIPTOR_KINDS, default=defaults.descriptor,
                        help="what to cluster on: where the maps put positive relevance (positive), or |relevance| "
                             "(absolute), or which CAM-layer channels hold the evidence (concepts: each image's "
                             "channel relevance at unit mass; the clusters are still summarised with the positive "
                             "maps)")
    method.add_argument("--metric", choices=clustering.METRICS, default=defaults.metric,
                        help="geometry of the kNN graph, k-means and t-SNE: cosine (descriptors scaled to unit "
                             "length: where the relevance concentrates) or euclidean (the unit-mass descriptors)")
    method.add_argument("--algorithm", nargs="+", choices=clustering.ALGORITHMS, default=list(defaults.algorithms),
                        help="one or more; all are computed on the same kNN graph and kept side by side")
    method.add_argument("--k", nargs="+", type=non_negative_int, default=list(defaults.ks), metavar="K",
                        help="numbers of clusters, one or more; 0 = the eigengap's suggestion (default: 0)")
    method.add_argument("--max-k", type=positive_int, default=defaults.max_k,
                        help="the eigengap looks for k in 2..MAX_K")
    method.add_argument("--neighbours", type=positive_int, default=defaults.n_neighbors,
                        help="k of the kNN graph (shared by the eigengap, spectral clustering and t-SNE)")
    method.add_argument("--embedding", choices=clustering.EMBEDDINGS, default=defaults.embedding,
                        help="2-D layout: tsne (openTSNE, FFT-accelerated) or spectral (the graph's two leading "
                             "non-trivial Laplacian eigenvectors; no extra cost)")
    method.add_argument("--embed-max", type=positive_int, default=defaults.embed_max,
                        help="t-SNE runs on at most this many points of a scope; the others are placed at the mean "
                             "position of their nearest neighbours, then all points are refined together")
    method.add_argument("--null-partitions", type=non_negative_int, default=defaults.null_partitions,
                        help="random partitions that calibrate the suspicion (0: none)")
    method.add_argument("--seed", type=int, default=defaults.seed, help="seed of every random choice")
    method.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads (default: all cores)")
    check = parser.add_argument_group("causal test of the top clusters (needs the cache's model)")
    check.add_argument("--verify-top", type=non_negative_int, default=0, metavar="N",
                       help="run the shortcut test on the N most suspicious clusters of every clustering of every "
                            "scope and store flip rates and verdicts (default: 0, off)")
    check.add_argument("--verify-q", type=percentage, default=offline.VerifyOptions.q,
                       help="the region: the top q%% of the cluster's prototype")
    check.add_argument("--verify-images", type=positive_int, default=offline.VerifyOptions.images,
                       help="members tested per cluster (a seeded sample of larger clusters)")
    check.add_argument("--device", default=None, help="torch device for the test (default: cuda when available)")
    check.add_argument("--batch-size", type=positive_int, default=offline.VerifyOptions.batch_size,
                       help="images per forward pass of the test")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no closing table")


class _Bar(offline.RunProgress):
    """A tqdm bar over the images of all scopes, with the current scope and step after it."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.current = ""
        self.shown = 0.0

    def start(self, scopes: list[tuple[str, int]]) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=sum(n for _, n in scopes), unit="img", disable=not self.enabled, dynamic_ncols=True,
                        desc=f"cluster ({len(scopes)} scopes)", smoothing=0.0)

    def scope(self, scope: str, n: int, status: str) -> None:
        self.current = f"{scope} ({n:,} images)" + ("" if status == "computing" else f": {status}")
        self._show("")

    def stage(self, text: str) -> None:
        self._show(text)

    def scope_done(self, scope: str, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def message(self, text: str) -> None:
        if self.bar is not None and self.enabled:
            self.bar.write(f"note: {text}", file=sys.stderr)

    def _show(self, text: str) -> None:
        import time

        if self.bar is None:
            return
        now = time.monotonic()
        # Steps change many times a second on small scopes: redraw at most twice a second (a new scope always).
        refresh = not text or now - self.shown >= 0.5
        self.bar.set_postfix_str(f"{self.current}{': ' + text if text else ''}", refresh=refresh)
        if refresh:
            self.shown = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def settings_from(args: argparse.Namespace) -> clustering.ClusteringSettings:
    return clustering.ClusteringSettings(descriptor=args.descriptor, metric=args.metric,
                                   algorithms=tuple(dict.fromkeys(args.algorithm)),
                                   ks=tuple(dict.fromkeys(args.k)), n_neighbors=args.neighbours,
                                   embedding=args.embedding, seed=args.seed, max_k=args.max_k,
                                   embed_max=args.embed_max, null_partitions=args.null_partitions)


def _number(value: Any, spec: str) -> str:
    try:
        return "-" if value is None or value != value else format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def format_table(cache: Any, outcomes: list[offline.ScopeOutcome],
                 settings: clustering.ClusteringSettings) -> str:
    """One line per scope: its size, what happened, the eigengap's k, and the top cluster of the run's first
    clustering (size, accuracy, suspicion, how unusual against chance, the causal test's verdict)."""
    lines = [f"{'scope':28}{'images':>9}  {'status':9}{'k':>4}  {'top cluster':>11}{'acc.':>6}{'susp.':>7}"
             f"{'z':>7}{'p':>7}  verdict"]
    for outcome in outcomes:
        head = f"{outcome.scope[:28]:28}{outcome.n:>9,}  {outcome.status:9}"
        if outcome.status == "empty":
            lines.append(head + "   -  no image")
            continue
        try:
            stored = offline.read_clustering(cache, outcome.scope, run=settings.key())
        except offline.ClusteringNotFound:
            lines.append(head)
            continue
        top = stored.summary.iloc[0]
        verdict = "-"
        checked = stored.verification
        if checked is not None and len(checked):
            first = checked[checked["rank"] == 1]
            verdict = str(first["verdict"].iloc[0]) if len(first) else "-"
        calibration = stored.calibration
        lines.append(f"{head}{stored.k:>4}  {int(top['size']):>11,}{_number(top['accuracy'], '.0%'):>6}"
                     f"{_number(top['suspicion'], '.2f'):>7}{_number(calibration.get('z'), '.1f'):>7}"
                     f"{_number(calibration.get('p'), '.3f'):>7}  {verdict}")
    return "\n".join(lines)


def _prepare(args: argparse.Namespace) -> tuple[Any, clustering.ClusteringSettings, list[str], Any, Any]:
    """Everything checked before any work: (cache, settings, scopes, loaded model or None, device)."""
    from analysis.cache import load

    cache = load(args.cache)
    if len(cache) == 0:
        raise ValueError(f"the cache {args.cache} holds no explained image yet")
    settings = settings_from(args)
    settings.validate()
    if settings.descriptor == "concepts":
        cache.descriptors(cache.ids[:1], "concepts")   # CacheError now, not after the first scopes
    scopes = offline.expand_scopes(args.scopes, offline.class_names_of(cache))
    loaded = device = None
    if args.verify_top:
        from analysis.trust.region_test import model_from_manifest
        from analysis.pipeline.devices import pick_device

        device = pick_device(args.device)
        loaded = model_from_manifest(cache.manifest)
    return cache, settings, scopes, loaded, device


def run(args: argparse.Namespace) -> int:
    """The `cluster` subcommand: 0 on success, 2 for a setup problem (one line on stderr), 130 when stopped."""
    from analysis.cache import CacheError
    from analysis.pipeline.models import ModelSpecError

    try:
        cache, settings, scopes, loaded, device = _prepare(args)
    except (CacheError, ModelSpecError, ValueError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    if not cache.complete and not args.quiet:
        print("note: the explain job has not finished on this cache; results will be recomputed once it has",
              file=sys.stderr)
    verify = None
    if args.verify_top:
        verify = offline.VerifyOptions(top=args.verify_top, q=args.verify_q, images=args.verify_images,
                                       seed=args.seed, batch_size=args.batch_size)
    bar = _Bar(not args.quiet)
    try:
        outcomes = offline.cluster_cache(cache, settings, scopes, threads=args.threads, verify=verify,
                                         loaded=loaded, device=device, progress=bar)
    except KeyboardInterrupt:
        bar.close()
        print(f"\nstopped: finished scopes are kept in {offline.run_dir(cache.root, settings)}; rerun the same "
              "command to continue", file=sys.stderr)
        return 130
    except (MemoryError, OSError, ValueError, RuntimeError, ArithmeticError, LookupError) as error:
        # Finished scopes are stored; say what failed in one line instead of a traceback.
        bar.close()
        print(f"error: clustering stopped ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
              f"); finished scopes are kept in {offline.run_dir(cache.root, settings)}", file=sys.stderr)
        return 1
    bar.close()
    if not args.quiet:
        print(format_table(cache, outcomes, settings))
        print(f"results in {offline.run_dir(cache.root, settings)}")
    # The findings read the clusterings (and their causal tests): brought up to date with them.
    code = store_findings(cache.root, quiet=True)
    if code == 0 and not args.quiet:
        print(f"findings in {findings_path(cache.root)} (`python -m analysis findings --cache {args.cache}` prints "
              "them)")
    return code


def cluster_after_explain(cache_dir: Path, quiet: bool = False) -> int:
    """What `explain` runs when it finishes (unless --no-cluster): this command with its defaults."""
    from analysis.cache import CacheError, load

    try:
        if not load(cache_dir).complete:
            print("note: the cache is not complete yet: not clustered", file=sys.stderr)
            return 0
    except CacheError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    args = parser.parse_args(["--cache", str(cache_dir)] + (["--quiet"] if quiet else []))
    if not quiet:
        print("clustering every scope of the cache (skip with --no-cluster; rerun alone with "
              f"`python -m analysis cluster --cache {cache_dir}`) ...", file=sys.stderr)
    code = run(args)
    if code not in (0, 130):
        print(f"the cache itself is complete; run `python -m analysis cluster --cache {cache_dir}` to retry the "
              "clustering", file=sys.stderr)
    return code
