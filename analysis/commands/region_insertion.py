"""`python -m analysis insertion-test`: the artefact insertion test (`analysis.trust.region_insertion`) on a cache."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from analysis.commands.cli_types import percentage as _percentage, positive_int as _positive_int, skipped_lines
from analysis.trust.region_insertion import (DEFAULT_TARGETS, INSERTION_DIR, CacheInsertionReport, DEFAULT_Q,
                                     insertion_test_on_cache, report_name, save_insertion_report, verdict)

COMMAND = "insertion-test"
HELP = ("artefact insertion test on a cache: paste the top-q percent region of a selection's mean map, cut from "
        "its own images, into images of other classes (and a random region as control) and count the "
        "predictions that flip to the selection's class")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `insertion-test` options."""
    parser.add_argument("--cache", required=True, type=Path, help="a cache made by `explain`")
    selection = parser.add_mutually_exclusive_group(required=True)
    selection.add_argument("--tag", metavar="NAME", help="the images tagged NAME (e.g. a suspicious cluster "
                                                          "tagged 'shortcut' on the dashboard)")
    selection.add_argument("--ids", type=Path, help="a file of image ids: one per line, or a CSV with an 'id' column")
    selection.add_argument("--class", dest="class_name", metavar="NAME", help="all images whose true class is NAME")
    selection.add_argument("--pred", metavar="NAME", help="all images the model predicts as NAME")
    parser.add_argument("--into", metavar="NAME", default=None,
                        help="the class whose flips are counted (default: the selection's most common prediction)")
    parser.add_argument("--targets", type=_positive_int, default=DEFAULT_TARGETS,
                        help="images to paste into: a seeded sample of those whose label and prediction are "
                             "both another class")
    parser.add_argument("--q", type=_percentage, default=DEFAULT_Q,
                        help="the region: the top q%% of pixels of the selection's mean map")
    parser.add_argument("--seed", type=int, default=0, help="seed of the targets, the pairing and the controls")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"result folder (default: CACHE/{INSERTION_DIR.as_posix()}/<selection>, which the "
                             "dashboard's Trust page lists; the same selection, class and q replace an earlier run)")


def _selection(cache, args: argparse.Namespace) -> tuple[np.ndarray, str]:
    from analysis.review import Review
    from analysis.commands.region_removal import select

    if args.tag is None:
        return select(cache, args)
    ids = Review(cache.root, cache=cache).ids(args.tag)
    if len(ids) == 0:
        raise ValueError(f"--tag {args.tag!r}: no image of the cache has this tag")
    return ids, f"tagged {args.tag}"


def format_report(report: CacheInsertionReport) -> str:
    s = report.result.summary
    rows, columns = np.nonzero(report.result.region)
    eligible = int(s["n"] - s["already_into"])
    lines = [f"insertion test: the top {s['q']:g}% region of the mean map of {report.description} "
             f"({int(s['sources'])} images; {int(s['region_pixels'])} pixels within rows {rows.min()}-{rows.max()}, "
             f"columns {columns.min()}-{columns.max()}) pasted into {int(s['n'])} images of other classes; "
             "control = the same region moved to a random place",
             f"{'':26}{'flipped to ' + report.into_name:>28}{'mean p(' + report.into_name + ')':>24}",
             f"{'before':26}{'-':>28}{s['probability_before']:>24.3f}",
             f"{'region pasted':26}{s['flipped_prototype']:>28.1%}{s['probability_prototype']:>24.3f}",
             f"{'random region pasted':26}{s['flipped_random']:>28.1%}{s['probability_random']:>24.3f}",
             f"(flips among the {eligible} targets not already predicted {report.into_name})",
             verdict(s)]
    lines += skipped_lines(report.skipped)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The `insertion-test` subcommand: 0 on success, 2 for a setup problem (one line on stderr)."""
    from analysis.cache import CacheError, load
    from analysis.pipeline.models import ModelSpecError
    from analysis.review import ReviewError
    from analysis.pipeline.devices import pick_device

    try:
        device = pick_device(args.device)
        cache = load(args.cache)
        ids, description = _selection(cache, args)
        into = None
        if args.into is not None:
            names = list(cache.manifest.get("class_names") or [])
            if args.into not in names:
                raise ValueError(f"--into {args.into!r}: not a class of the cache (classes: "
                                 f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''})")
            into = names.index(args.into)
        report = insertion_test_on_cache(cache, ids, into=into, n_targets=args.targets, q=args.q, device=device,
                                         seed=args.seed, forward_batch=args.batch_size, description=description)
    except (CacheError, ModelSpecError, ReviewError, ValueError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_report(report))
    out = args.out or args.cache / INSERTION_DIR / report_name(description, report.into_name, args.q)
    try:
        save_insertion_report(report, out)
    except OSError as error:
        print(f"error: cannot write the results to {out}: {error}", file=sys.stderr)
        return 1
    print(f"results: {out}")
    return 0
