"""`python -m analysis explain`: the command line of the explain job (analysis/pipeline/job.py), then, unless
--no-cluster, the offline analysis of the finished cache: the clustering, then the concepts (with the job's
model)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from analysis.commands.cli_types import (add_low_rule_argument, add_model_arguments,
                                         non_negative_int as _non_negative_int, positive_int as _positive_int)
from analysis.pipeline.faithfulness import cost_note
from analysis.pipeline.job import claim_the_cache, run_claimed
from analysis.pipeline.models import LoadedModel
from analysis.pipeline.plan import ExplainOptions, Ranks, SetupError


COMMAND = "explain"
HELP = "explain a labelled dataset into a resumable cache (the dashboard's input)"
BASES = ("gradcam", "scorecam", "gradcam++", "xgradcam", "layercam")
DEFAULTS = ExplainOptions(data=Path(), out=Path(), model="")   # the job's defaults, which the options show


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `explain` options on a (sub)parser."""
    io = parser.add_argument_group("data and output")
    io.add_argument("--data", required=True, type=Path,
                    help="an ImageFolder tree root/<class>/<image>, or a CSV manifest with columns path,label "
                         "[,mask][,x0,y0,x1,y1] (paths relative to the CSV)")
    io.add_argument("--out", required=True, type=Path,
                    help="cache directory; re-running the same command on it resumes where it stopped")
    io.add_argument("--overwrite", action="store_true",
                    help="wipe an existing cache in --out (needed when the options differ); its tags "
                         "(review.sqlite) are kept aside in review-<old cache's date>.sqlite, not carried over")
    io.add_argument("--limit", type=_positive_int, default=None,
                    help="explain only N images, evenly spaced over the sorted list (all classes appear)")
    io.add_argument("--classes", type=Path, default=None,
                    help="class names, one per line, line i = model output i (default: the sorted class "
                         "folder / label names, or the torchvision weights' categories when the labels are "
                         "among them)")
    add_model_arguments(parser)
    method = parser.add_argument_group("explanation")
    method.add_argument("--base", default=DEFAULTS.base, choices=BASES, help="the CAM whose components FG-CAM refines")
    method.add_argument("--target-layer", default=DEFAULTS.target_layer,
                        help="module name whose output the maps explain, or 'input' for pixel-level maps")
    method.add_argument("--cam-layer", default=None,
                        help="module name of the CAM layer (default: the last spatial layer before the head)")
    method.add_argument("--denoise", action="store_true", help="FG-CAM's low-rank denoising of the components")
    add_low_rule_argument(method)
    method.add_argument("--faithfulness", type=_positive_int, nargs="?", const=20, default=DEFAULTS.faithfulness,
                        metavar="STEPS",
                        help="also store each map's deletion and insertion AUC (RISE, blurred baseline) with "
                             f"STEPS steps (20 when given alone): {cost_note(20).split(': ', 1)[1]} "
                             "(default: off)")
    method.add_argument("--map-size", type=_positive_int, default=DEFAULTS.map_size,
                        help="stored map resolution (maps are area-resized to SIZE x SIZE)")
    method.add_argument("--descriptor-size", type=_positive_int, default=DEFAULTS.descriptor_size,
                        help="descriptor resolution D (D x D unit-mass pooled map, for clustering)")
    fg = method.add_mutually_exclusive_group()
    fg.add_argument("--masks", type=Path, default=None,
                    help="folder of foreground mask PNGs mirroring the image tree (a/b.jpg -> MASKS/a/b.png)")
    fg.add_argument("--boxes", type=Path, default=None,
                    help="CSV path,x0,y0,x1,y1 of foreground boxes in pixels (x1, y1 exclusive; several rows "
                         "per image: union)")
    run_group = parser.add_argument_group("execution")
    run_group.add_argument("--batch-size", type=_positive_int, default=DEFAULTS.batch_size,
                           help="images per forward pass")
    run_group.add_argument("--shard-size", type=_positive_int, default=None,
                           help="images per committed shard (default: the batch size, or the existing cache's "
                                "shard size when resuming); a crash loses at most one shard per rank")
    run_group.add_argument("--device", default=None,
                           help="torch device (default: cuda when available, else cpu; with torchrun, "
                                "cuda:LOCAL_RANK)")
    run_group.add_argument("--workers", type=_non_negative_int, default=DEFAULTS.workers,
                           help="data loading worker processes (0: load in the main process)")
    run_group.add_argument("--quiet", action="store_true", help="no progress bar")
    run_group.add_argument("--no-cluster", action="store_true",
                           help="do not run the offline analysis on the finished cache: `python -m analysis "
                                "cluster` and then `python -m analysis concepts`, with their default settings")


def options_from(args: argparse.Namespace) -> ExplainOptions:
    """The job's options from the parsed command line (every field of ExplainOptions is an option here)."""
    return ExplainOptions(**{option.name: getattr(args, option.name) for option in dataclasses.fields(ExplainOptions)})


def _keep_tags_aside(out: Path) -> None:
    """Tags name images by id, which a new cache may give to other images: they stay with the old cache."""
    from analysis.review import ReviewError, keep_tags_aside

    try:
        moved = keep_tags_aside(out)
    except ReviewError as error:  # the job's own work does not depend on the tags
        print(f"warning: the tags of the replaced cache were not set aside: {error}", file=sys.stderr)
        return
    if moved is not None:
        print(f"the replaced cache's tags were kept aside in {moved}; the new cache starts without tags",
              file=sys.stderr)


def _analyse(out: Path, loaded: LoadedModel, finished: bool, quiet: bool) -> int:
    """The offline analysis after the job: clustering, then concepts (with the job's model, on a complete
    cache)."""
    from analysis.commands.cluster import cluster_after_explain
    from analysis.commands.concepts import concepts_after_explain

    code = cluster_after_explain(out, quiet=quiet)
    if code == 0 and finished:
        code = concepts_after_explain(out, loaded, quiet=quiet)
    return code


def run(args: argparse.Namespace) -> int:
    """The `explain` subcommand: 0 on success, 2 for a setup problem (one line on stderr)."""
    try:
        ranks = Ranks.from_environment()
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        plan, lock = claim_the_cache(options_from(args), ranks)
    except SetupError as error:
        if ranks.rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        manifest = run_claimed(plan, ranks, replaced=_keep_tags_aside)
        if ranks.rank == 0 and not args.no_cluster:   # still under the job's lock, as the job's last step
            return _analyse(plan.out, plan.loaded, bool(manifest.get("finished")), plan.quiet)
        return 0
    finally:
        if lock is not None:
            lock.release()
