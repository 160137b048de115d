"""`python -m analysis compare-methods`: the command line of the method comparison and the sanity checks
(analysis/trust/compare.py, analysis/trust/sanity/): which images (a dataset or a cache), which model, which
steps, and where the results go."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.commands.cli_types import (add_low_rule_argument, add_model_arguments, positive_float as _positive_float,
                                         positive_int as _positive_int)
from analysis.fgcam import low_rule_text
from analysis.pipeline.faithfulness import (DEFAULT_BLUR_SIGMA, DEFAULT_FORWARD_BATCH, DEFAULT_STEPS,
                                            forward_passes_per_image)
from analysis.explore.statistics import sample_rows
from analysis.trust.compare import DEFAULT_SAMPLE, TRUST_DIR_NAME, compare_methods, format_table, write_comparison
from analysis.trust.methods import (BASE_LABELS, METHODS, Explainers, check_intermediate_layer,
                                    default_intermediate_layer)


COMMAND = "compare-methods"
HELP = ("faithfulness of FG-CAM vs. its denoised variant, the plain CAM, LRP, a random and an edge map: mean "
        "deletion / insertion AUC on sampled images at the input and an intermediate layer; and the sanity "
        "checks (cascading model randomisation, another class)")


def _depths(text: str) -> list[int | str] | None:
    from analysis.trust.sanity import parse_depths

    try:
        return parse_depths(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `compare-methods` options."""
    source = parser.add_argument_group("images and model: --data with --model, or --cache")
    where = source.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", type=Path, help="an ImageFolder tree or a CSV manifest (as for `explain`)")
    where.add_argument("--cache", type=Path,
                       help="a cache made by `explain`: its images and model; results go to CACHE/trust/ "
                            "(the dashboard's Trust page) unless --out is given")
    add_model_arguments(parser, required=False)  # --model: with --data (a cache names its model)
    method = parser.add_argument_group("comparison")
    method.add_argument("--sample", type=_positive_int, default=DEFAULT_SAMPLE,
                        help="number of images, drawn at random (seeded) without replacement")
    method.add_argument("--seed", type=int, default=0, help="seed of the sample and of the random maps")
    method.add_argument("--base", default="gradcam", choices=tuple(BASE_LABELS), help="the CAM FG-CAM refines")
    method.add_argument("--cam-layer", default=None, help="module name of the CAM layer (none: the last spatial "
                                                          "layer before the head)")
    add_low_rule_argument(method)
    method.add_argument("--layer", default=None,
                        help="the intermediate layer (module name); none: a middle layer between the input "
                             "and the CAM layer (see analysis/trust/compare.py)")
    method.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                        help="deletion / insertion steps; each image costs 2 x steps forward passes per method "
                             "and layer (12 curves: 24 x steps)")
    method.add_argument("--blur-sigma", type=_positive_float, default=DEFAULT_BLUR_SIGMA,
                        help="std in input pixels of the Gaussian blur of the baseline image")
    sanity = parser.add_argument_group("sanity checks (Adebayo et al. 2018; see analysis/trust/sanity/)")
    sanity.add_argument("--randomise", type=_depths, default="default", metavar="DEPTHS",
                        help="steps of the cascading model randomisation, in blocks below the classifier head, "
                             "comma-separated: head (the head alone), 1, 2, ..., all; 'default': head, powers of "
                             "two and all; 'none': skip. Each step costs one explanation per method and layer")
    sanity.add_argument("--no-class-check", action="store_true",
                        help="skip the class check (the predicted class against a random other class)")
    sanity.add_argument("--sanity-sample", type=_positive_int, default=None,
                        help="images for the sanity checks: a seeded subset of the sample (default: all of it)")
    sanity.add_argument("--pooled-size", type=_positive_int, default=None,
                        help="D of the positive_pooled variant (D x D; default: the cache's descriptor size, "
                             "else 16)")
    run_group = parser.add_argument_group("execution and output")
    run_group.add_argument("--out", type=Path, default=None,
                           help="write the table, mean curves and per-image AUCs here (parquet + JSON)")
    run_group.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    run_group.add_argument("--batch-size", type=_positive_int, default=16, help="images explained per batch")
    run_group.add_argument("--forward-batch", type=_positive_int, default=DEFAULT_FORWARD_BATCH,
                           help="perturbed images per forward pass")
    run_group.add_argument("--quiet", action="store_true", help="no progress bar")


@dataclass
class _Population:
    paths: list[Path]            # absolute image paths, in id order
    ids: np.ndarray              # cache ids, or indices in the sorted dataset listing
    relative: list[str]          # paths as the table shows them
    description: str
    model_spec: str | None
    cache_identity: str | None = None  # with --cache: which cache (analysis.cache.cache_identity)
    descriptor_size: int | None = None   # the cache's, for the sanity checks' pooled variant


def _population_and_model(args: argparse.Namespace) -> tuple[_Population, Any]:
    from analysis.pipeline.models import load_model

    if args.cache is not None:
        from analysis.cache import load
        from analysis.pipeline.models import model_from_manifest

        model_options = [name for name in ("model", "weights", "checkpoint", "num_classes", "image_size", "mean",
                                           "std") if getattr(args, name) is not None]
        if model_options:
            raise ValueError(f"--{model_options[0].replace('_', '-')} goes with --data: --cache uses the "
                             "cache's own model")
        cache = load(args.cache)
        ids = cache.ids
        table = cache.table
        population = _Population(cache.image_paths(ids), ids, table["path"].tolist(),
                                 f"cache {args.cache}", cache.manifest.get("model", {}).get("spec"), cache.identity,
                                 cache.manifest.get("options", {}).get("descriptor_size"))
        return population, model_from_manifest(cache.manifest)
    if args.model is None:
        raise ValueError("--data needs --model (or use --cache CACHE for a cache's images and model)")
    from analysis.pipeline.datasets import list_dataset

    listing = list_dataset(args.data)
    loaded = load_model(args.model, weights=args.weights, checkpoint=args.checkpoint, num_classes=args.num_classes,
                        image_size=args.image_size, mean=args.mean, std=args.std)
    population = _Population([listing.root / s.path for s in listing.samples], np.arange(len(listing.samples)),
                             [s.path for s in listing.samples], f"{args.data}", args.model)
    return population, loaded


@dataclass
class _SanityPlan:
    depths: list[int]          # randomisation steps (blocks below the head)
    class_check: bool
    positions: np.ndarray      # rows of the loaded sample checked
    pooled_size: int
    blocks: int                # blocks below the head
    passes_per_image: int      # progress units per image: one per step, one for the class check

    @property
    def explanations(self) -> int:
        # per image, unit and layer: 6 methods of which random and edge need no explanation, the CAM one
        # for both layers; plus the original maps once
        per_unit = 2 * 3 + 1
        return len(self.positions) * (self.passes_per_image + 1) * per_unit


def _sanity_plan(args: argparse.Namespace, explainers: Explainers, count: int,
                 descriptor_size: int | None) -> _SanityPlan | None:
    """The sanity checks the options ask for (None: neither check); ValueError for a depth the model lacks."""
    from analysis.trust import sanity

    class_check = not args.no_class_check
    if args.randomise is None and not class_check:
        return None
    blocks = sanity.model_blocks(explainers.fgcam.graph, explainers.fgcam.cam_layer)
    depths = [] if args.randomise is None else sanity.resolve_depths(args.randomise, blocks)
    positions = sample_rows(count, args.sanity_sample or count, args.seed + 1)
    pooled = args.pooled_size or descriptor_size or sanity.DEFAULT_POOLED_SIZE
    return _SanityPlan(depths, class_check, positions, pooled, sanity.blocks_below_head(blocks),
                       len(depths) + int(class_check))


@dataclass
class _Setup:
    """Everything `run` checked before the long loop: the sample loaded, the model on its device, the layers."""
    device: Any
    population: _Population
    model: Any
    images: Any                # the loaded sample, a tensor
    positions: np.ndarray      # sampled rows of the population
    chosen: np.ndarray         # the rows that loaded, in `images` order
    errors: list               # (position in `positions`, reason) of each unreadable image
    explainers: Explainers
    layers: tuple[str, str]
    sanity_plan: _SanityPlan | None


def _set_up(args: argparse.Namespace) -> _Setup:
    """Load the sample and the model and dry-run every step on one image, so that a bad layer or an op the engine
    cannot propagate fails here, in one line, before the long loop. Raises the errors `run` reports."""
    from analysis.trust import sanity
    from analysis.trust.region_removal import load_inputs
    from analysis.pipeline.devices import pick_device

    device = pick_device(args.device)
    population, loaded = _population_and_model(args)
    positions = sample_rows(len(population.paths), args.sample, args.seed)
    images, loaded_positions, errors = load_inputs([population.paths[p] for p in positions], loaded.transform,
                                                   loaded.in_channels)
    if not loaded_positions:
        raise ValueError(f"none of the {len(positions)} sampled images could be loaded (first: {errors[0][1]})")
    model = loaded.model.to(device)
    explainers = Explainers.build(model, base=args.base, cam_layer=args.cam_layer, low_rule=args.low_rule)
    layer = args.layer or default_intermediate_layer(explainers.fgcam, images[:1])
    check_intermediate_layer(explainers, layer)
    layers = ("input", layer)
    # Dry run on one image: every method at every layer.
    compare_methods(model, images[:1], layers=layers, steps=1, explainers=explainers, blur_sigma=args.blur_sigma)
    sanity_plan = _sanity_plan(args, explainers, len(images), population.descriptor_size)
    if sanity_plan is not None:  # the same for the sanity checks: every step of the cascade on one image
        sanity.sanity_checks(model, images[:1], layers=layers, base=args.base, cam_layer=explainers.fgcam.cam_layer,
                             depths=sanity_plan.depths, class_check=sanity_plan.class_check, seed=args.seed,
                             pooled_size=sanity_plan.pooled_size, low_rule=args.low_rule)
    return _Setup(device, population, model, images, positions, positions[loaded_positions], errors, explainers,
                  layers, sanity_plan)


def _announce(args: argparse.Namespace, setup: _Setup, passes: int) -> None:
    """The work ahead, on stderr (unless --quiet)."""
    if args.quiet:
        return
    print(f"compare-methods: {len(setup.images)} images of {setup.population.description} (sample seed "
          f"{args.seed}), layers input and {setup.layers[1]}, {len(METHODS)} methods: {passes} perturbed forward "
          f"passes on {setup.device}", file=sys.stderr)
    plan = setup.sanity_plan
    if plan is not None:
        print(f"sanity checks: {len(plan.positions)} images, randomisation steps "
              f"{', '.join(map(str, plan.depths)) or 'none'} of {plan.blocks} blocks below the head, "
              f"class check {'on' if plan.class_check else 'off'}: {plan.explanations} explanations",
              file=sys.stderr)


def _add_sanity_checks(args: argparse.Namespace, setup: _Setup, comparison: Any) -> None:
    """Run the planned sanity checks on their subset of the sample and attach them to `comparison`."""
    from tqdm import tqdm
    from analysis.trust import sanity

    plan = setup.sanity_plan
    checked = plan.positions   # rows of `images`
    bar = tqdm(total=len(checked) * plan.passes_per_image, unit="img", disable=args.quiet,
               dynamic_ncols=True, desc="sanity")
    checks = sanity.sanity_checks(setup.model, setup.images[checked], layers=setup.layers, base=args.base,
                                  cam_layer=setup.explainers.fgcam.cam_layer, depths=plan.depths,
                                  class_check=plan.class_check, seed=args.seed,
                                  batch_size=args.batch_size, pooled_size=plan.pooled_size,
                                  low_rule=args.low_rule,
                                  progress=bar.update)
    bar.close()
    rows = setup.chosen[checked][checks.per_image["image"].to_numpy()]
    checks.per_image.insert(1, "id", setup.population.ids[rows])
    checks.per_image.insert(2, "path", [setup.population.relative[i] for i in rows])
    comparison.sanity, comparison.sanity_per_image = checks.table, checks.per_image
    comparison.meta["sanity"] = checks.meta


def _print_tables(comparison: Any) -> None:
    """The comparison table, then the sanity checks' tables and sentence when they ran, on stdout."""
    from analysis.trust import sanity

    print(format_table(comparison))
    if comparison.sanity is None:
        return
    meta = comparison.meta["sanity"]
    print()
    if meta["steps"]:
        print(sanity.format_blocks(meta))
    for variant, metric in (("abs", "spearman"), ("abs", "ssim"), ("signed", "spearman"),
                            ("positive_pooled", "spearman")):
        print()
        print(sanity.format_sanity_table(comparison.sanity, meta, variant, metric))
    if meta.get("sentence"):
        print()
        print(meta["sentence"])


def run(args: argparse.Namespace) -> int:
    """The `compare-methods` subcommand: 0 on success, 2 for a setup problem (one line on stderr)."""
    from analysis.cache import CacheError
    from analysis.fgcam import UnsupportedOperation
    from analysis.pipeline.models import ModelSpecError
    from analysis.pipeline.datasets import DatasetError

    started = time.perf_counter()
    try:
        setup = _set_up(args)
    except (CacheError, ModelSpecError, DatasetError, ValueError, UnsupportedOperation) as error:
        message = str(error)
        print(f"error: {message.splitlines()[0] if message else 'failed'}", file=sys.stderr)
        return 2
    population, positions, chosen, errors = setup.population, setup.positions, setup.chosen, setup.errors
    passes = len(setup.images) * len(setup.layers) * len(METHODS) * forward_passes_per_image(args.steps)
    _announce(args, setup, passes)
    from tqdm import tqdm

    bar = tqdm(total=len(setup.images), unit="img", disable=args.quiet, dynamic_ncols=True, desc="compare")
    comparison = compare_methods(setup.model, setup.images, layers=setup.layers, steps=args.steps,
                                 blur_sigma=args.blur_sigma, seed=args.seed, batch_size=args.batch_size,
                                 forward_batch=args.forward_batch, explainers=setup.explainers, progress=bar.update)
    bar.close()
    comparison.per_image.insert(1, "id", population.ids[chosen][comparison.per_image["image"].to_numpy()])
    comparison.per_image.insert(2, "path", [population.relative[i] for i in
                                            chosen[comparison.per_image["image"].to_numpy()]])
    if setup.sanity_plan is not None:
        _add_sanity_checks(args, setup, comparison)
    comparison.meta.update({
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": population.description,
        "model": population.model_spec, "cache_identity": population.cache_identity, "sample": args.sample,
        "device": str(setup.device),
        "skipped": [{"path": population.relative[positions[p]], "reason": r} for p, r in errors],
        "forward_passes": passes, "seconds": round(time.perf_counter() - started, 1),
        "options": {key: (str(value) if isinstance(value, Path) else low_rule_text(value) if key == "low_rule" else value)
                    for key, value in vars(args).items()
                    if key not in ("handler", "command")},
    })
    _print_tables(comparison)
    if errors:
        print(f"skipped {len(errors)} unreadable image(s), e.g. {population.relative[positions[errors[0][0]]]}: "
              f"{errors[0][1]}", file=sys.stderr)
    out = args.out if args.out is not None else (args.cache / TRUST_DIR_NAME if args.cache is not None else None)
    if out is not None:
        write_comparison(comparison, out)
        if not args.quiet:
            print(f"wrote the comparison to {out}", file=sys.stderr)
    return 0
