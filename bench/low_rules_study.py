"""Issue 16's study: another rule for the lowest convolutions (gamma or epsilon up to a depth, ``LowRule``)
against z+ everywhere, on the two sanity criteria together: cascading model randomisation (does the map
depend on the model?) and deletion / insertion (do the pixels it ranks first matter?).

    .venv/bin/python -m data.demo --small --no-dashboard --out /tmp/demo     # once: the small demo
    .venv/bin/python bench/low_rules_study.py --demo /tmp/demo                # both models (~30 min, 2 cores)
    .venv/bin/python bench/low_rules_study.py --demo /tmp/demo --skip-lite0 --demo-sample 50

For each model and each rule configuration, FG-CAM (Grad-CAM, from the model's default CAM layer) at the
input, for the class the original model predicts:

* randomisation: the head, then 1, 2, 4, ... blocks below it re-initialised, cumulatively
  (``analysis.trust.sanity.randomised_copy``: the blocks, seeds and re-initialisation of ``compare-methods``); per
  step the mean Spearman rank correlation of |map| (the input's resolution) with the original model's map;
  "mean" averages the steps (lower: the map depends more on the model);
* class: the same against the map of another class, drawn per image (``analysis.trust.sanity.other_classes``);
* deletion / insertion AUC (``analysis.pipeline.faithfulness``, blurred baseline, 20 steps), mean and 95% half-width;
* kept: the median share of the components' sum that reaches the pixels (epsilon absorbs some).

Models: the small demo's CNN on `--demo-sample` test images of its cache; the pretrained EfficientNet-Lite0
on scikit-image's four photos, each as its five 224 crops of Resize(256) (20 correlated inputs,
``bench/sanity_tables.py``'s ``--crops five``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.pipeline import faithfulness  # noqa: E402
from analysis.trust import sanity  # noqa: E402
from analysis.fgcam import FGCAM, LowRule  # noqa: E402


@dataclass(frozen=True)
class Config:
    label: str
    low_rule: LowRule | None


def configs(depths: dict[str, str], gammas: list[float], epsilons: list[float]) -> list[Config]:
    """z+ everywhere, then each rule and value up to each depth (``depths``: label -> module name)."""
    out = [Config("z+ everywhere (default)", None)]
    for value in gammas:
        out += [Config(f"gamma {value:g} up to {name} ({where})", LowRule("gamma", name, gamma=value))
                for where, name in depths.items()]
    for value in epsilons:
        out += [Config(f"epsilon {value:g} up to {name} ({where})", LowRule("epsilon", name, epsilon=value))
                for where, name in depths.items()]
    return out


DEMO_DEPTHS = {"the 14x14 block": "features.6", "every conv below the CAM": "features.10"}
LITE0_DEPTHS = {"first block": "_blocks.0", "first stage, 112-56 px": "_blocks.2", "half: 8 of 16 blocks": "_blocks.7"}


def maps_for(model: torch.nn.Module, config: Config, images: torch.Tensor, classes: torch.Tensor,
             batch: int) -> torch.Tensor:
    explainer = FGCAM(model, low_rule=config.low_rule)
    return torch.cat([explainer(images[i:i + batch], classes=classes[i:i + batch]).maps.float()
                      for i in range(0, len(images), batch)])


def study(model: torch.nn.Module, images: torch.Tensor, grid: list[Config], steps: int, batch: int,
          seed: int = 0) -> tuple[list[str], list[dict]]:
    """Per configuration: the Spearman of |map| per cascade step, their mean, the class check, deletion and
    insertion AUC, and the share of relevance kept."""
    with torch.no_grad():
        logits = torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])
    classes = logits.argmax(dim=1)
    other = sanity.other_classes(classes, logits.shape[1], range(len(images)), seed)
    explainer = FGCAM(model)
    blocks = sanity.model_blocks(explainer.graph, explainer.cam_layer)
    depths = sanity.default_depths(blocks)
    count = sanity.blocks_below_head(blocks)
    labels = [sanity.short_step_label({"depth": d}, count) for d in depths]
    components = torch.cat([explainer(images[i:i + batch], target_layer=explainer.cam_layer, classes=classes[i:i + batch])
                            .maps.double().sum(dim=(1, 2)) for i in range(0, len(images), batch)])
    rows = []
    originals, ranks = {}, {}
    for config in grid:
        started = time.perf_counter()
        maps = maps_for(model, config, images, classes, batch)
        originals[config] = sanity.map_variants(maps, 8)["abs"]
        ranks[config] = sanity.rank_rows(originals[config])
        other_maps = sanity.map_variants(maps_for(model, config, images, other, batch), 8)["abs"]
        scores = faithfulness.faithfulness_scores(model, images, maps, classes, steps=steps)
        kept = (maps.double().sum(dim=(1, 2)) / components).numpy()
        rows.append({"config": config.label, "class": sanity.spearman_rows(originals[config], other_maps, ranks[config]),
                     "deletion": scores["deletion_auc"], "insertion": scores["insertion_auc"], "kept": kept,
                     "steps": [], "seconds": time.perf_counter() - started})
    for depth in depths:
        twin, _ = sanity.randomised_copy(model, depth, seed)
        for config, row in zip(grid, rows):
            started = time.perf_counter()
            maps = sanity.map_variants(maps_for(twin, config, images, classes, batch), 8)["abs"]
            row["steps"].append(sanity.spearman_rows(originals[config], maps, ranks[config]))
            row["seconds"] += time.perf_counter() - started
        print(f"  step {sanity.short_step_label({'depth': depth}, count)} done", file=sys.stderr, flush=True)
    return labels, rows


def table(labels: list[str], rows: list[dict]) -> str:
    def mean(values: np.ndarray) -> float:
        return float(np.nanmean(values))

    def interval(values: np.ndarray) -> str:
        n, m, _, ci = sanity.mean_and_ci(np.asarray(values, np.float64))
        return f"{m:.3f} ± {ci:.3f}"

    header = ["rule in the low layers", *labels, "mean", "other class", "deletion AUC ↓", "insertion AUC ↑", "kept"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["config"], *[f"{mean(s):.2f}" for s in row["steps"]],
                 f"{np.mean([mean(s) for s in row['steps']]):.2f}", f"{mean(row['class']):.2f}",
                 interval(row["deletion"]), interval(row["insertion"]), f"{np.median(row['kept']):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=REPO / "demo_out" / "small",
                        help="the small demo's folder (python -m data.demo --small --no-dashboard --out DIR)")
    parser.add_argument("--demo-sample", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20, help="deletion / insertion steps")
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.25, 1.0])
    parser.add_argument("--crops", choices=("center", "five"), default="five")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-lite0", action="store_true")
    parser.add_argument("--lite0-depths", nargs="+", default=None, metavar="MODULE",
                        help=f"Lite0's depths, module names (default: {', '.join(LITE0_DEPTHS.values())})")
    args = parser.parse_args()
    torch.manual_seed(0)
    from bench import sanity_tables
    if not args.skip_demo:
        cache = args.demo / "cache"
        if not (cache / "manifest.json").is_file():
            raise SystemExit(f"no demo cache at {cache}: run `python -m data.demo --small --no-dashboard --out "
                             f"{args.demo}` first")
        os.environ.setdefault("DEMO_MODEL_WEIGHTS", str(args.demo / "model.pt"))
        model, images = sanity_tables.demo_inputs(cache, args.demo_sample)
        started = time.perf_counter()
        labels, rows = study(model, images, configs(DEMO_DEPTHS, args.gammas, args.epsilons), args.steps, 50)
        print(f"## Demo CNN, {len(images)} test images ({time.perf_counter() - started:.0f} s): Spearman of |map| at "
              "the input with the original model's map after each randomisation step\n")
        print(table(labels, rows), flush=True)
        print()
    if not args.skip_lite0:
        with tempfile.TemporaryDirectory() as scratch:
            photos = sanity_tables.write_photos(Path(scratch) / "photos")
            model, images = sanity_tables.lite0_inputs(photos, args.crops)
        started = time.perf_counter()
        depths = LITE0_DEPTHS if args.lite0_depths is None else \
            {next((k for k, v in LITE0_DEPTHS.items() if v == name), name): name for name in args.lite0_depths}
        labels, rows = study(model, images, configs(depths, args.gammas, args.epsilons), args.steps, 10)
        print(f"## EfficientNet-Lite0 (ImageNet weights), {len(images)} inputs from scikit-image's four photos "
              f"({time.perf_counter() - started:.0f} s)\n")
        print(table(labels, rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
