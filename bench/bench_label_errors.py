"""Which Cleanlab score ranks planted label flips best, with a verified shortcut's victims present, and what
setting the victims apart does (issue 24, item 6). Prints a table; the winner is
analysis.review.DEFAULT_LABEL_QUALITY_METHOD.

    .venv/bin/python bench/bench_label_errors.py [--out DIR] [--train-images N] [--audit-images N] [--flips N]

The planted set is data/label_audit.py's (real Fashion-MNIST; a DemoCNN trained with the demo's corner-tag
shortcut; held-out test images with trousers filed as dresses and tagged non-bags; the real `explain` and
`cluster --verify-top`). Acceptance: AP >= 0.8 for the flips and at most 5 of the top 100 are shortcut
victims (victims set apart, default method).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    from analysis.review import DEFAULT_LABEL_QUALITY_METHOD
    from data.label_audit import AuditRecipe, build, measure

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--train-images", type=int, default=12000)
    parser.add_argument("--audit-images", type=int, default=8000)
    parser.add_argument("--flips", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = AuditRecipe(train_images=args.train_images, audit_images=args.audit_images, flips=args.flips,
                         seed=args.seed)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_label_errors-"))
    started = time.perf_counter()
    cache, truth = build(out, recipe, threads=args.threads)
    built = time.perf_counter() - started
    frame = measure(cache, truth)
    info = frame.attrs
    print(f"planted set: {len(truth):,} held-out images, {info['flips']} trousers filed as dresses, "
          f"{info['victims_true']} shortcut victims (tagged non-bags called bag); model trained on "
          f"{recipe.train_images:,} images x {recipe.epochs} epochs; built in {built:.0f} s ({out})")
    print(f"victims set apart: {info['victims_found']} (precision {info['victims_precision']:.2f}, "
          f"recall {info['victims_recall']:.2f})")
    print(f"{'method':30}{'AP mixed':>10}{'AP apart':>10}{'victims@100 mixed':>19}{'victims@100 apart':>19}")
    for row in frame.itertuples(index=False):
        mark = "  <- default" if row.method == DEFAULT_LABEL_QUALITY_METHOD else ""
        print(f"{row.method:30}{row.ap_mixed:>10.3f}{row.ap_apart:>10.3f}{row.victims_top100_mixed:>19}"
              f"{row.victims_top100_apart:>19}{mark}")
    best = frame.loc[frame["ap_apart"].idxmax(), "method"]
    print(f"highest AP with the victims apart: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
