"""The Clever-Hans benchmark (issue 21): does the shortcut finder find artefacts it was never shown, and does it
never reassure falsely?

    python bench/clever_hans.py                       # every kind at 95% and 50%, the clean control, the photo row
    python bench/clever_hans.py --kinds random_place background --strengths 0.95 --no-photos
    python bench/clever_hans.py --kinds fixed_place --strengths 0.95 --no-clean --photo-crops 54   # 432 crops

Each Fashion-MNIST row plants one kind of data/artefacts.py on a share of the sneakers (train and test) and on
1% of every other class's test images, trains the demo CNN on it, and runs the product as a user would
(`explain`, `cluster --verify-top 8`); data/clever_hans.py scores the stored verdicts against the ground truth
(see its docstring). The photo row pastes imagenet-w's real watermark (Li et al., CVPR 2023; test and benchmark
only) on 30% of scikit-image photo crops run through the pretrained EfficientNet-Lite0; each crop's label is
Lite0's own prediction without the watermark, so every mistake is the watermark's doing.

Columns: victims (other-class carriers called the target), driven (carriers whose prediction the artefact
changes), flagged (clusters called "shortcut"), victims in flagged (share), purity (carriers among the flagged
clusters' members), undecided (clusters, and the share of victims in them), wrong (clusters the artefact drives
called "uses the object" or "not used"), concepts (the findings "a concept strong in few images": how many, the
share of victims among their images, and those images' purity), seconds. On the clean rows every "shortcut" is
a false alarm.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import artefacts, clever_hans as ch   # noqa: E402

PHOTO_CROPS = 6               # per photo (8 photos of tests/imagenet_crops.py): 48 crops, about a minute
WATERMARKED = 0.3
MAX_JOBS = 4


def photo_row(out: Path, crops_per_photo: int = PHOTO_CROPS, watermarked: float = WATERMARKED,
              seed: int = 0) -> dict:
    """The real watermark on real photos in a real pretrained model (see the module docstring)."""
    import torch
    from imagenet_w import AddWatermark
    from PIL import Image

    from tests.helpers import IMAGENET_MODEL_FILE, imagenet_class_names
    from tests.imagenet_crops import write_crops
    from tests.pretrained_models import efficientnet_lite0

    started = time.perf_counter()
    raw = out / "raw"
    write_crops(raw, crops_per_photo, seed)
    model, transform = efficientnet_lite0()
    names = imagenet_class_names()
    mark = AddWatermark(image_size=224)
    rng = np.random.default_rng(seed)
    rows = []
    for path in sorted(raw.rglob("*.png")):
        clean = Image.open(path).convert("RGB").resize((224, 224))
        carrier = bool(rng.random() < watermarked)
        shown = mark(clean) if carrier else clean
        with torch.no_grad():
            pred_clean, pred_shown = (int(model(transform(image)[None]).argmax()) for image in (clean, shown))
        relative = f"{names[pred_clean].replace('/', '_')}/{path.stem}.png"   # the label: Lite0's clean prediction
        (out / "test" / relative).parent.mkdir(parents=True, exist_ok=True)
        shown.save(out / "test" / relative)
        rows.append({"path": relative, "label": names[pred_clean], "carrier": carrier,
                     "pred_clean": names[pred_clean], "pred_planted": names[pred_shown], "target": ""})
    truth = pd.DataFrame(rows)
    (out / "classes.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    cache = out / "cache"
    ch.run_analysis(["explain", "--data", str(out / "test"), "--model", f"{IMAGENET_MODEL_FILE}:efficientnet_lite0",
                     "--classes", str(out / "classes.txt"), "--out", str(cache), "--device", "cpu", "--workers", "0",
                     "--batch-size", "8", "--map-size", "28", "--descriptor-size", "14", "--quiet", "--no-cluster"])
    ch.run_analysis(["cluster", "--cache", str(cache), "--scopes", "all", "mistakes", "--verify-top", "8",
                     "--quiet"])
    # Victims here: the crops the watermark makes wrong (their label is the clean prediction).
    truth["target"] = np.where(truth["carrier"] & (truth["pred_planted"] != truth["label"]), truth["pred_planted"],
                               "")
    return {"row": "watermark (Lite0)", "kind": "watermark", "strength": watermarked,
            **ch.score(cache, truth), "seconds": time.perf_counter() - started}


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _run_task(folder: Path, spec: ch.RowSpec | None, settings: ch.BenchSettings,
              photo_crops: int = PHOTO_CROPS) -> dict:
    """One row in a pool process: a Fashion-MNIST row, or the photo row when `spec` is None."""
    shutil.rmtree(folder, ignore_errors=True)
    if spec is None:
        return photo_row(folder, crops_per_photo=photo_crops)
    return ch.run_row(folder, spec, settings, ch.load_splits(folder.parent / "downloads"))


def format_table(rows: list[dict]) -> str:
    lines = ["| row | victims | driven | flagged | victims in flagged | purity | undecided (victims) | wrong "
             "| verdicts | concepts (victims, purity) | s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = (lambda v: "-" if v != v else f"{v:.0%}")   # noqa: E731 (NaN: no victims or no flagged cluster)
        verdicts = ", ".join(f"{k} {v}" for k, v in sorted(r["verdicts"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {r['row']} | {r['victims']} | {r['driven']} | {r['flagged_clusters']} | "
                     f"{pct(r['victims_flagged'])} | {pct(r['purity_flagged'])} | {r['undecided_clusters']} "
                     f"({pct(r['victims_undecided'])}) | {r['wrong_verdicts']} | {verdicts} | "
                     f"{r['concept_findings']} ({pct(r['victims_concepts'])}, {pct(r['purity_concepts'])}) | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(artefacts.KINDS), choices=list(artefacts.KINDS))
    parser.add_argument("--strengths", nargs="+", type=float, default=[0.95, 0.5])
    parser.add_argument("--no-clean", action="store_true", help="leave out the two clean control rows")
    parser.add_argument("--no-photos", action="store_true", help="leave out the watermark row (Lite0, photos)")
    parser.add_argument("--photo-crops", type=int, default=PHOTO_CROPS,
                        help=f"crops per photo in the watermark row (8 photos; default {PHOTO_CROPS}: 48 crops; 54 "
                             "gives the issue's 432 crops: 12 minutes here, beside another job)")
    parser.add_argument("--test-images", type=int, default=ch.BenchSettings.test_images)
    parser.add_argument("--out", type=Path, default=None, help="keep every row's data and cache here")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, MAX_JOBS),
                        help="rows run side by side, one torch thread each (default: one per core, at most "
                             f"{MAX_JOBS})")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, not {args.jobs}")
    if not 1 <= args.photo_crops <= 99:    # the crops' file names hold two digits
        parser.error(f"--photo-crops must be 1 to 99, not {args.photo_crops}")
    settings = ch.BenchSettings(test_images=args.test_images)
    specs = [ch.RowSpec(kind, strength) for kind in args.kinds for strength in args.strengths]
    specs += [] if args.no_clean else [ch.RowSpec(control, 0.0) for control in ch.CONTROLS]
    root = args.out or Path(tempfile.mkdtemp(prefix="clever-hans-"))
    tasks = [(root / re.sub(r"[^a-z0-9]+", "_", spec.name.replace("%", "")).strip("_"), spec, settings)
             for spec in specs]
    tasks += [] if args.no_photos else [(root / "watermark", None, settings, args.photo_crops)]
    started = time.perf_counter()
    rows: list[dict | None] = [None] * len(tasks)
    # Rows are independent: side by side in processes of one torch thread each (each runs the product's
    # commands in itself), which on 2 cores beats one row at a time on 2 threads.
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        running = {pool.submit(_run_task, *task): i for i, task in enumerate(tasks)}
        for done in as_completed(running):
            rows[running[done]] = row = done.result()
            print(format_table([row]).splitlines()[-1], flush=True)
    print(format_table(rows))
    print(f"{len(rows)} rows in {time.perf_counter() - started:.0f} s, {args.jobs} side by side")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
