"""`python -m analysis concepts`: per class the CAM-layer channels (concepts) that carry its evidence, their
reference images and where each looks; the method is in analysis/explore/concepts.py. `explain` calls
`concepts_after_explain` when it finishes, after the clustering."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from analysis.commands.cli_types import positive_int
from analysis.explore.concepts import ConceptSettings, ConceptsError, run_concepts

COMMAND = "concepts"
HELP = ("per class the CAM-layer channels that carry its evidence, per channel its reference images and "
        "where it looks (FG-CAM of that channel alone), channels strong in few images flagged; CACHE/analysis/concepts/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ConceptSettings()
    parser.add_argument("--cache", required=True, type=Path, help="a cache directory made by `explain`")
    parser.add_argument("--top", type=positive_int, default=defaults.top, help="concepts per class")
    parser.add_argument("--references", type=positive_int, default=defaults.references,
                        help="reference images per concept (per class, and over the whole cache)")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                        help="images per forward pass for the concept maps")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no closing table")


def run(args: argparse.Namespace, loaded: Any = None, plan: Any = None) -> int:
    """The `concepts` subcommand: 0 on success, 2 with one line on stderr for a setup problem. ``loaded``: the
    cache's model when it is in memory already, ``plan`` its ``plan_concepts`` (``concepts_after_explain``)."""
    from analysis.cache import CacheError
    from analysis.pipeline.models import ModelSpecError

    settings = ConceptSettings(top=args.top, references=args.references, batch_size=args.batch_size)
    try:
        folder, classes, meta = run_concepts(args.cache, settings, show_progress=not args.quiet, loaded=loaded,
                                             plan=plan)
    except (CacheError, ConceptsError, ModelSpecError, FileNotFoundError) as error:
        print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # nothing half-written: the folder is replaced only when complete
        print(f"\nstopped: the concepts stored before (if any) are unchanged; rerun `python -m analysis concepts "
              f"--cache {args.cache}` to compute them", file=sys.stderr)
        return 130
    if not args.quiet:
        names = meta["class_names"]
        print(f"concepts of {meta['n_images']} images ({meta['channels']} channels at {meta['cam_layer']}) in "
              f"{folder} ({meta['seconds']} s)")
        for c, rows in classes[classes["kind"] == "top"].groupby("class"):
            name = names[c] if c < len(names) else str(c)
            top = ", ".join(f"#{k} {s:.0%}" for k, s in zip(rows["channel"], rows["share"]))
            flagged = classes[(classes["class"] == c) & (classes["kind"] == "shortcut")]["channel"].tolist()
            print(f"  {name}: {top}" + (f"; strong in few images: {', '.join(f'#{k}' for k in flagged)}"
                                        if flagged else ""))
    return 0


AUTOMATIC_MIN_MAPS = 2_000   # explain computes the concepts itself up to max(this, images explained) channel maps


def concepts_after_explain(cache_dir: Path, loaded: Any, quiet: bool = False,
                           min_maps: int = AUTOMATIC_MIN_MAPS) -> int:
    """What `explain` runs after the clustering (unless --no-cluster): this command with its defaults, with the
    job's model (``loaded``), so it needs nothing the job did not have; unless the concept maps would outnumber
    the images the job explained (and `min_maps`): many classes call for more maps than the job made (each
    class's reference images x its concepts), so then it says how to run them instead of doubling the job."""
    from analysis.cache import CacheError, load
    from analysis.explore.concepts import plan_concepts

    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    args = parser.parse_args(["--cache", str(cache_dir)] + (["--quiet"] if quiet else []))
    try:
        cache = load(cache_dir)
        plan = plan_concepts(cache, ConceptSettings())     # the command's defaults, as `args`
    except (CacheError, ConceptsError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    if plan.n_maps > max(min_maps, len(cache)):
        print(f"note: concepts not computed: they need {plan.n_maps:,} channel maps, more than the {len(cache):,} images "
              f"explained; run `python -m analysis concepts --cache {cache_dir}` when that is worth it (--top and "
              "--references make it smaller)", file=sys.stderr)
        return 0
    if not quiet:
        print("finding each class's concepts (skip with --no-cluster; rerun alone with "
              f"`python -m analysis concepts --cache {cache_dir}`) ...", file=sys.stderr)
    code = run(args, loaded, plan)
    if code not in (0, 130):
        print(f"the cache itself is complete; run `python -m analysis concepts --cache {cache_dir}` to retry",
              file=sys.stderr)
    return code
