"""`python -m analysis findings`: what the analysis found, in words (analysis/findings/), stored as
CACHE/analysis/findings.json and printed ranked. `explain` and `cluster` run it at their end."""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

COMMAND = "findings"
HELP = ("what was found, in words computed from the measured numbers (shortcut clusters, confused classes, "
        "background attention, tags), ranked; CACHE/analysis/findings.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", required=True, type=Path, help="a cache directory made by `explain`")
    parser.add_argument("--quiet", action="store_true", help="write the file, print nothing")


def store_findings(cache_root: Path, quiet: bool = False) -> int:
    """Compute, store and (unless quiet) print the findings of the cache at `cache_root`: 0, or 2 with one
    line on stderr when the cache cannot be read."""
    from analysis.cache import CacheError, load
    from analysis.findings import write_findings
    from analysis.findings.kinds import plural

    try:
        cache = load(cache_root)
        path, findings = write_findings(cache)
    except (CacheError, OSError) as error:
        print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return 2
    if not quiet:
        print(f"{len(findings)} {plural(len(findings), 'finding', 'findings')} in {path}")
        for number, finding in enumerate(findings, 1):
            print(f"{number}. [{finding.verdict}] {finding.title}")
            print(textwrap.fill(finding.text(), width=110, initial_indent="   ", subsequent_indent="   "))
    return 0


def run(args: argparse.Namespace) -> int:
    return store_findings(args.cache, args.quiet)
