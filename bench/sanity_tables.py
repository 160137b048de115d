"""The sanity-check tables of the README ("Trust"): the demo model and the pretrained EfficientNet-Lite0.

Each model goes through the real `python -m analysis compare-methods` command (in this process); the script
then prints, per model, one compact table: for every method and layer the mean Spearman rank correlation of
|map| with the original map after each step of the cascading randomisation and for another class, next to
the deletion and insertion AUCs; for Lite0 also the issue's three columns (FG-CAM at the input as |map| and
as its positive part pooled to 14 x 14, and the CAM itself).

    .venv/bin/python -m data.demo --small --no-dashboard      # once: the small demo (demo_out/small)
    .venv/bin/python bench/sanity_tables.py                    # both tables
    .venv/bin/python bench/sanity_tables.py --experiments      # + what lowers FG-CAM's correlation (Lite0)

Lite0 runs on scikit-image's four photos (chelsea, coffee, astronaut, rocket), Resize(256) + CenterCrop(224) +
ImageNet normalisation (tests/pretrained_models.py). --experiments compares, on the same photos, FG-CAM
started at other CAM layers (with and without denoising) on the randomisation cascade of the model's own
head and blocks, and on deletion / insertion.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
LITE0 = f"{REPO / 'tests' / 'pretrained_models.py'}:efficientnet_lite0"
LITE0_LAYER = "_blocks.4"           # the last 28 x 28 block: a middle stage, like the default on other models
LITE0_CAM_LAYERS = ("_swish", "_blocks.15", "_blocks.13", "_blocks.10", "_blocks.7")
DEMO_CAM_LAYERS = ("features.10", "features.6", "features.2")   # the blocks at 7 x 7, 14 x 14, 28 x 28


def write_photos(root: Path) -> Path:
    """scikit-image's four photos as an ImageFolder (one folder per photo)."""
    import skimage.data
    from PIL import Image

    for name in PHOTOS:
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(skimage.data, name)()).save(root / name / f"{name}.png")
    return root


def run_compare(arguments: list[str], out: Path) -> float:
    """`python -m analysis compare-methods ARGUMENTS --out OUT` in this process (its printed tables go to
    OUT/printed.txt); seconds taken."""
    from analysis.__main__ import main

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "printed.txt", "w", encoding="utf-8") as printed, contextlib.redirect_stdout(printed):
        code = main(["compare-methods", *arguments, "--out", str(out), "--quiet"])
    if code != 0:
        raise SystemExit(f"compare-methods failed ({code}): {' '.join(arguments)}")
    return time.perf_counter() - started


def compact_table(directory: Path, variant: str = "abs", metric: str = "spearman") -> str:
    """Rows: layer and method; columns: the cascade's steps, the class check, deletion and insertion AUC."""
    from analysis.trust.compare import read_comparison
    from analysis.trust.sanity import short_step_label

    comparison = read_comparison(directory)
    sanity, meta = comparison.sanity, comparison.meta["sanity"]
    blocks = sum(1 for b in meta["blocks"] if b["name"] != "head")
    steps = {s["step"]: short_step_label(s, blocks) for s in meta["steps"]}
    faithfulness = comparison.table.set_index(["layer", "method"])
    sizes = meta["layer_sizes"]
    data = sanity[sanity["variant"] == variant]
    header = (["layer", "method"] + [steps[s] for s in sorted(steps)] + ["other class", "deletion AUC ↓",
                                                                           "insertion AUC ↑"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (layer, method), group in data.groupby(["layer", "method"], sort=False):
        values = {(r.check, r.step): getattr(r, f"{metric}_mean") for r in group.itertuples(index=False)}
        cells = [f"{layer} ({sizes[layer][0]}x{sizes[layer][1]})", meta["labels"][method]]
        cells += [f"{values[('randomise', s)]:.2f}" for s in sorted(steps)]
        cells.append(f"{values[('class', 0)]:.2f}" if ("class", 0) in values else "")
        row = faithfulness.loc[(layer, method)]
        cells += [f"{row['deletion_auc_mean']:.3f}", f"{row['insertion_auc_mean']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def issue_table(directory: Path) -> str:
    """The issue's layout: steps as rows; FG-CAM |map| at the input, its positive part pooled (14 x 14), the
    CAM itself; mean Spearman ± 95% half-width."""
    from analysis.trust.compare import read_comparison

    comparison = read_comparison(directory)
    table = comparison.sanity.set_index(["check", "step", "layer", "method", "variant"])
    meta = comparison.meta["sanity"]
    d = meta["pooled_size"]
    lines = [f"| test | FG-CAM at the input, abs(map) | FG-CAM, positive part pooled to {d}x{d} | the CAM itself |",
             "|---|---|---|---|"]
    rows = [("randomise", s["step"], s["label"]) for s in meta["steps"]] + [("class", 0, "another class explained")]
    for check, step, label in rows:
        cells = []
        for method, variant in (("fgcam", "abs"), ("fgcam", "positive_pooled"), ("cam", "abs")):
            row = table.loc[(check, step, "input", method, variant)]
            cells.append(f"{row['spearman_mean']:.2f} ± {row['spearman_ci95']:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lite0_inputs(photos: Path, crops: str) -> tuple[object, "torch.Tensor"]:
    """(Lite0, its inputs): the four photos centre-cropped, or each photo's five 224 crops of Resize(256)
    (torchvision's FiveCrop: four corners and the centre) for a larger, if correlated, sample."""
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from analysis.pipeline.models import load_model
    from tests.pretrained_models import IMAGENET_MEAN, IMAGENET_STD

    loaded = load_model(LITE0)
    if crops == "center":
        inputs = [loaded.transform(Image.open(photos / n / f"{n}.png").convert("RGB")) for n in PHOTOS]
    else:
        finish = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        inputs = [finish(crop) for n in PHOTOS
                  for crop in T.FiveCrop(224)(T.Resize(256)(Image.open(photos / n / f"{n}.png").convert("RGB")))]
    return loaded.model.eval(), torch.stack(inputs)


def demo_inputs(cache_dir: Path, sample: int) -> tuple[object, "torch.Tensor"]:
    """(the demo model, `sample` of its cache's images drawn as compare-methods draws them)."""
    from analysis.cache import load
    from analysis.explore.statistics import sample_rows as sample_positions
    from analysis.pipeline.models import model_from_manifest
    from analysis.trust.region_removal import load_inputs

    cache = load(cache_dir)
    loaded = model_from_manifest(cache.manifest)
    positions = sample_positions(len(cache.ids), sample, 0)
    images, _, errors = load_inputs(cache.image_paths(cache.ids[positions]), loaded.transform,
                                    loaded.in_channels)
    assert not errors, errors
    return loaded.model.eval(), images


def experiments(model: object, images: "torch.Tensor", cam_layers: tuple[str, ...], steps: int) -> str:
    """FG-CAM at the input from other CAM layers, plain and denoised: mean Spearman of |map| after each
    randomisation step (the same cascade of the model's own head and blocks for every CAM layer), the class
    check, and deletion / insertion AUC (mean ± 95% half-width)."""
    from analysis.trust import sanity
    from analysis.trust.compare import compare_methods
    from analysis.fgcam import FGCAM

    rows = []
    for cam_layer in cam_layers:
        started = time.perf_counter()
        checks = sanity.sanity_checks(model, images, layers=("input",), methods=("fgcam", "fgcam_denoised"),
                                      cam_layer=cam_layer)
        faithful = compare_methods(model, images, layers=("input",), methods=("fgcam", "fgcam_denoised"),
                                   cam_layer=cam_layer, steps=steps).table.set_index("method")
        table = checks.table[checks.table["variant"] == "abs"]
        blocks = sum(1 for b in checks.meta["blocks"] if b["name"] != "head")
        labels = {s["step"]: sanity.short_step_label(s, blocks) for s in checks.meta["steps"]}
        graph = FGCAM(model, cam_layer=cam_layer).graph
        _, values = graph.run(images[:1], shapes={graph.node_for(cam_layer)})
        size = "x".join(map(str, values[graph.node_for(cam_layer)].shape[-3:]))
        for method in ("fgcam", "fgcam_denoised"):
            group = table[table["method"] == method].set_index(["check", "step"])
            row = {"CAM layer": f"{cam_layer} ({size})",
                   "method": "FG-CAM" + (", denoised" if method == "fgcam_denoised" else "")}
            row.update({labels[s]: f"{group.loc[('randomise', s), 'spearman_mean']:.2f}" for s in sorted(labels)})
            row["mean of steps"] = f"{group.xs('randomise')['spearman_mean'].mean():.2f}"
            row["other class"] = f"{group.loc[('class', 0), 'spearman_mean']:.2f}"
            for metric in ("deletion", "insertion"):
                mean, ci = faithful.loc[method, f"{metric}_auc_mean"], faithful.loc[method, f"{metric}_auc_ci95"]
                row[f"{metric} AUC {'↓' if metric == 'deletion' else '↑'}"] = f"{mean:.3f} ± {ci:.3f}"
            rows.append(row)
        print(f"  {cam_layer}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    frame = pd.DataFrame(rows)
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-cache", type=Path, default=REPO / "demo_out" / "small" / "cache",
                        help="the demo's cache (python -m data.demo --small --no-dashboard makes demo_out/small)")
    parser.add_argument("--demo-sample", type=int, default=100, help="images of the demo compared")
    parser.add_argument("--steps", type=int, default=20, help="deletion / insertion steps")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-lite0", action="store_true")
    parser.add_argument("--experiments", action="store_true",
                        help="also FG-CAM from other CAM layers, plain and denoised, on both models")
    parser.add_argument("--crops", choices=("center", "five"), default="center",
                        help="Lite0's inputs for --experiments: the centre crops (4) or five crops a photo (20)")
    parser.add_argument("--only-experiments", action="store_true", help="skip the two tables")
    parser.add_argument("--keep", type=Path, default=None, help="keep the trust folders here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        if not args.skip_demo:
            if not (args.demo_cache / "manifest.json").is_file():
                raise SystemExit(f"no demo cache at {args.demo_cache}: run `python -m data.demo --small "
                                 "--no-dashboard` first (or pass --demo-cache)")
            # The small demo's model lives beside its cache (the manifest names the default path).
            model_file = args.demo_cache.parent / "model.pt"
            if model_file.is_file():
                os.environ.setdefault("DEMO_MODEL_WEIGHTS", str(model_file))
        if not args.skip_demo and not args.only_experiments:
            command = ["--cache", str(args.demo_cache), "--sample", str(args.demo_sample), "--steps", str(args.steps)]
            seconds = run_compare(command, work / "demo_trust")
            print(f"## Demo model: `python -m analysis compare-methods {' '.join(command)}` ({seconds:.0f} s)\n")
            print(compact_table(work / "demo_trust"))
            print()
        photos = write_photos(work / "photos")
        if not args.skip_lite0 and not args.only_experiments:
            command = ["--data", str(photos), "--model", LITE0, "--sample", "4", "--steps", str(args.steps),
                       "--layer", LITE0_LAYER, "--pooled-size", "14"]
            seconds = run_compare(command, work / "lite0_trust")
            print(f"## EfficientNet-Lite0 on scikit-image's four photos ({seconds:.0f} s)\n")
            print(compact_table(work / "lite0_trust"))
            print()
            print(issue_table(work / "lite0_trust"))
            print()
        if args.experiments and not args.skip_demo:
            print("## Demo: FG-CAM at the input from other CAM layers (|map|, mean Spearman; deletion / insertion)\n")
            print(experiments(*demo_inputs(args.demo_cache, args.demo_sample), DEMO_CAM_LAYERS, args.steps))
            print()
        if args.experiments and not args.skip_lite0:
            model, images = lite0_inputs(photos, args.crops)
            print(f"## Lite0 ({len(images)} inputs): FG-CAM at the input from other CAM layers (|map|, mean "
                  "Spearman; deletion / insertion)\n")
            print(experiments(model, images, LITE0_CAM_LAYERS, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
