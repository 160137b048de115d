"""`python -m analysis shortcut-test`: the command line of the blur region test (analysis/trust/region_removal.py):
which images (--ids, --class, --pred), the report as text, and the per-image CSV."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.commands.cli_types import (percentage as _percentage, positive_float as _positive_float, skipped_lines,
                                         positive_int as _positive_int)
from analysis.pipeline.devices import pick_device
from analysis.pipeline.faithfulness import DEFAULT_BLUR_SIGMA
from analysis.trust.region_removal import CacheShortcutReport, DEFAULT_Q, shortcut_test_on_cache


COMMAND = "shortcut-test"
HELP = ("causal shortcut test on a cache: blur the top-q percent region of a selection's mean map, and a random "
        "control region, and report how predictions change; object-only / background-only with masks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `shortcut-test` options."""
    parser.add_argument("--cache", required=True, type=Path, help="a cache directory made by `explain`")
    selection = parser.add_mutually_exclusive_group(required=True)
    selection.add_argument("--ids", type=Path, help="a file of image ids: one per line, or a CSV with an 'id' column")
    selection.add_argument("--class", dest="class_name", metavar="NAME", help="all images whose true class is NAME")
    selection.add_argument("--pred", metavar="NAME", help="all images the model predicts as NAME")
    parser.add_argument("--q", type=_percentage, default=DEFAULT_Q,
                        help="the region: the top q%% of pixels of the selection's mean map")
    parser.add_argument("--prototype-base", default=None,
                        choices=("gradcam", "scorecam", "gradcam++", "xgradcam", "layercam"),
                        help="compute the mean map from fresh input-level FG-CAM maps with this base instead of "
                             "the cache's maps (when compare-methods shows the cache's base is not faithful for "
                             "this model)")
    parser.add_argument("--blur-sigma", type=_positive_float, default=DEFAULT_BLUR_SIGMA,
                        help="std (input pixels) of the Gaussian blur that erases a region")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random control regions")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the per-image results to this CSV (and OUT stem + _per_class.csv with masks)")


def read_ids(path: Path) -> np.ndarray:
    """Ids from a text file (one per line; blank lines and # comments skipped) or a CSV with an 'id' column."""
    if not path.is_file():
        raise ValueError(f"--ids {path}: no such file")
    text = path.read_text(encoding="utf-8-sig")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if lines and not lines[0].lstrip("-").isdigit():
        frame = pd.read_csv(path)
        if "id" not in frame.columns:
            raise ValueError(f"--ids {path}: a CSV needs an 'id' column (or give one id per line)")
        lines = [str(v) for v in frame["id"].tolist()]
    try:
        return np.array([int(float(v)) for v in lines], dtype=np.int64)
    except ValueError:
        raise ValueError(f"--ids {path}: expected integer ids, one per line") from None


def select(cache: Any, args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """The selected ids and a description of the selection."""
    table = cache.table
    names = list(cache.manifest.get("class_names", []))
    if args.ids is not None:
        ids = read_ids(args.ids)
        return ids, f"{len(ids)} ids from {args.ids}"
    name = args.class_name if args.class_name is not None else args.pred
    column, what = ("label_name", "class") if args.class_name is not None else ("pred_name", "predicted as")
    if name not in names:
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        raise ValueError(f"--{'class' if column == 'label_name' else 'pred'} {name!r}: not a class of the cache "
                         f"(classes: {shown})")
    ids = table.loc[table[column] == name, "id"].to_numpy(np.int64)
    if len(ids) == 0:
        raise ValueError(f"no image of the cache is {what} {name!r}")
    return ids, f"{what} {name}"


def format_report(report: CacheShortcutReport, description: str, blur_sigma: float) -> str:
    s = report.result.summary
    rows, columns = np.nonzero(report.result.region)
    lines = [f"shortcut test: {int(s['n'])} images ({description}); region = top {s['q']:g}% of their mean map "
             f"({int(s['region_pixels'])} pixels within rows {rows.min()}-{rows.max()}, columns "
             f"{columns.min()}-{columns.max()}), blurred with sigma {blur_sigma:g} px; control = the same region "
             "moved to a random place on each image",
             f"{'':28}{'accuracy':>10}{'changed predictions':>22}{'mean p(original prediction)':>30}",
             f"{'before':28}{s['accuracy_before']:>10.3f}{'-':>22}{s['probability_before']:>30.3f}",
             f"{'prototype region blurred':28}{s['accuracy_prototype']:>10.3f}{s['changed_prototype']:>22.3f}"
             f"{s['probability_prototype']:>30.3f}",
             f"{'random region blurred':28}{s['accuracy_random']:>10.3f}{s['changed_random']:>22.3f}"
             f"{s['probability_random']:>30.3f}"]
    if report.per_class is not None and len(report.per_class):
        lines.append("object only (background blurred) / background only (object blurred), after Xiao et al. 2021:")
        lines.append(f"{'class':20}{'n':>6}{'acc. full':>11}{'acc. object only':>18}{'acc. background only':>22}")
        for row in report.per_class.itertuples():
            lines.append(f"{str(row[1])[:20]:20}{row.n:>6}{row.accuracy_full:>11.3f}{row.accuracy_object_only:>18.3f}"
                         f"{row.accuracy_background_only:>22.3f}")
    elif report.foreground is not None:
        lines.append("object only / background only: no image of the selection has a usable mask or box")
    lines += skipped_lines(report.skipped)
    if report.stored_pred_mismatches:
        lines.append(f"note: {report.stored_pred_mismatches} prediction(s) differ from the cache's (another "
                     "device or library version); 'before' uses the predictions made now")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The `shortcut-test` subcommand: 0 on success, 2 for a setup problem (one line on stderr)."""
    from analysis.cache import CacheError, load
    from analysis.pipeline.models import ModelSpecError

    try:
        device = pick_device(args.device)
        cache = load(args.cache)
        ids, description = select(cache, args)
        report = shortcut_test_on_cache(cache, ids, q=args.q, device=device, blur_sigma=args.blur_sigma,
                                        seed=args.seed, forward_batch=args.batch_size,
                                        prototype_base=args.prototype_base)
    except (CacheError, ModelSpecError, ValueError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.prototype_base:
        description += f"; mean map from fresh FG-CAM ({args.prototype_base}) maps"
    print(format_report(report, description, args.blur_sigma))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        frame = report.result.per_image
        if report.foreground is not None:
            frame = frame.merge(report.foreground.drop(columns=["label"]), on="id", how="left")
        frame.to_csv(args.out, index=False)
        if report.per_class is not None:
            report.per_class.to_csv(args.out.with_name(f"{args.out.stem}_per_class.csv"), index=False)
    return 0
