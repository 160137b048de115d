"""`python -m analysis label-errors`: the likely label errors of a cache as a ranked list, with the shortcut
victims set apart and marked (analysis.review: label_issues, shortcut_victims), on the model's stored
probabilities or on out-of-sample ones from a CSV (--probabilities, analysis.review.probability_file)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.commands.cli_types import check_new_file, non_negative_int
from analysis.review import DEFAULT_LABEL_QUALITY_METHOD, LABEL_QUALITY_METHODS

COMMAND = "label-errors"
HELP = ("rank the images by how likely their label is wrong (Cleanlab), with the wrong predictions a verified "
        "shortcut explains set apart; stored or out-of-sample probabilities")
OUTPUT_COLUMNS = ("rank", "id", "path", "label", "prediction", "label_quality", "shortcut_victim")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `label-errors` options."""
    parser.add_argument("--cache", required=True, type=Path, help="a cache made by `explain`")
    parser.add_argument("--probabilities", type=Path, default=None, metavar="CSV",
                        help="out-of-sample class probabilities (e.g. from cross-validation): a header "
                             "path,<class>,<class>,... with every class name of the cache, one row per image "
                             "(path as the cache lists it, relative to the dataset root), rows summing to 1 "
                             "(default: the model's stored probabilities)")
    parser.add_argument("--method", choices=LABEL_QUALITY_METHODS, default=DEFAULT_LABEL_QUALITY_METHOD,
                        help="Cleanlab's label quality score (the default was chosen by measurement: "
                             "bench/bench_label_errors.py)")
    parser.add_argument("--top", type=non_negative_int, default=20, help="rows of the ranking printed")
    parser.add_argument("--out", type=Path, default=None,
                        help="write every image to this CSV (never overwritten): the ranking (rank 1 = most "
                             "likely mislabelled), then the shortcut victims with rank empty and the finding that "
                             "explains them in `shortcut_victim`")


def ranking_table(cache: object, method: str, probabilities: np.ndarray | None) -> pd.DataFrame:
    """Every image as OUTPUT_COLUMNS: the label-error ranking, then the shortcut victims (rank <NA>)."""
    from analysis.review import label_issues, shortcut_victims

    scores = label_issues(cache, method=method, probabilities=probabilities, set_apart=False)
    victims = shortcut_victims(cache).set_index("id")["finding"]
    scores["shortcut_victim"] = scores["id"].map(victims).fillna("")
    scores = pd.concat([scores[scores["shortcut_victim"] == ""], scores[scores["shortcut_victim"] != ""]])
    rows = cache.table.set_index("id").loc[scores["id"].to_numpy(np.int64)]
    ranked = int((scores["shortcut_victim"] == "").sum())
    return pd.DataFrame({
        "rank": pd.array(list(range(1, ranked + 1)) + [None] * (len(scores) - ranked), dtype="Int64"),
        "id": scores["id"].to_numpy(np.int64), "path": rows["path"].to_numpy(),
        "label": rows["label_name"].to_numpy(), "prediction": rows["pred_name"].to_numpy(),
        "label_quality": scores["label_quality"].to_numpy(np.float64),
        "shortcut_victim": scores["shortcut_victim"].to_numpy()})


def summary_lines(frame: pd.DataFrame, top: int, source: str) -> list[str]:
    """The printed report: the top of the ranking and the victims per finding."""
    ranked = frame[frame["rank"].notna()]
    lines = [f"{len(ranked):,} images ranked on {source} probabilities; most likely mislabelled first:",
             f"{'rank':>6}  {'quality':>8}  {'label -> prediction':34}  path"]
    for row in ranked.head(top).itertuples(index=False):
        lines.append(f"{row.rank:>6}  {row.label_quality:>8.3g}  {(row.label + ' -> ' + row.prediction)[:34]:34}  "
                     f"{row.path}")
    victims = frame[frame["rank"].isna()]
    lines.append(f"{len(victims):,} shortcut victims set apart (wrong predictions a verified shortcut explains)"
                 + (":" if len(victims) else ""))
    for finding, count in victims["shortcut_victim"].value_counts(sort=False).items():
        lines.append(f"  {count:,} by {finding}")
    return lines


def run(args: argparse.Namespace) -> int:
    """The `label-errors` subcommand: 0 on success, 2 for a problem found before any work (one line)."""
    from analysis.cache import CacheError, load
    from analysis.review import read_probability_file

    try:
        if args.out is not None:
            check_new_file(args.out)
        cache = load(args.cache)
        probabilities = None if args.probabilities is None else read_probability_file(cache, args.probabilities)
        frame = ranking_table(cache, args.method, probabilities)
    except (CacheError, ValueError) as error:   # ProbabilityFileError is a ValueError
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    source = "the given out-of-sample" if probabilities is not None else "the model's stored"
    print("\n".join(summary_lines(frame, args.top, source)))
    if args.out is not None:
        try:
            with open(args.out, "x", encoding="utf-8", newline="") as handle:   # "x": never overwrite
                frame.to_csv(handle, index=False)
        except OSError as error:
            print(f"error: cannot write {args.out}: {error}", file=sys.stderr)
            return 1
        print(f"wrote {len(frame):,} rows to {args.out}", file=sys.stderr)
    return 0
