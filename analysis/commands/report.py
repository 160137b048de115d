"""`python -m analysis report`: the findings, the stored clusters and the rest as one self-contained HTML file
(analysis/report.py), or a PDF printed from it by headless Chromium. With `--compare B`, a section
comparing the cache with a second cache of the same images (analysis/findings/compare.py, drawn by
analysis/report_compare.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.commands.cli_types import check_new_file

COMMAND = "report"
HELP = "a self-contained report of what was found (HTML, or PDF printed by headless Chromium)"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", required=True, type=Path, help="a cache directory made by `explain`")
    parser.add_argument("--compare", type=Path, default=None,
                        help="a second cache of the same images (after a fix, or another model): adds the comparison")
    parser.add_argument("--out", required=True, type=Path, help="FILE.html or FILE.pdf (never overwritten)")
    parser.add_argument("--chromium", type=Path, default=CHROMIUM, help="the Chromium that prints a PDF")


def html_to_pdf(html_text: str, out: Path, chromium: Path = CHROMIUM) -> None:
    """Print an HTML document to `out` with headless Chromium (A4, backgrounds kept) through playwright."""
    from playwright.sync_api import sync_playwright

    from analysis.cache.files import file_replaced_atomically

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_content(html_text, wait_until="load")
            pdf = page.pdf(format="A4", print_background=True,
                           margin={"top": "12mm", "bottom": "12mm", "left": "10mm", "right": "10mm"})
        finally:
            browser.close()
    with file_replaced_atomically(out) as tmp:
        tmp.write_bytes(pdf)


def _problem(args: argparse.Namespace) -> str | None:
    """What stops the command before any work, in one line (None: nothing)."""
    suffix = args.out.suffix.lower()
    if suffix not in (".html", ".pdf"):
        return f"--out must end in .html or .pdf, not {args.out.name!r}"
    try:
        check_new_file(args.out, "--out")
    except ValueError as error:
        return str(error)
    if suffix == ".pdf":
        if not args.chromium.exists():
            return f"a PDF is printed by Chromium, not found at {args.chromium} (apt-get install chromium or --chromium)"
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            return "a PDF is printed through playwright (pip install playwright), which is not installed"
    return None


def _not_comparable(cache: object, other: object) -> str | None:
    from analysis.findings.compare import CachesNotComparable, check_comparable

    try:
        check_comparable(cache, other)
    except CachesNotComparable as error:
        return str(error)
    return None


def _with_comparison(text: str, cache: object, other: object, findings: list) -> str:
    """The report with the compare section of `cache` (A) against `other` (B) at its end."""
    from analysis.findings.compare import compare_caches
    from analysis.report_compare import compare_section, with_section

    comparison = compare_caches(cache, other, findings_a=findings)
    return with_section(text, compare_section(cache, other, comparison))


def run(args: argparse.Namespace) -> int:
    """The `report` subcommand: 0, or 2 with one line on stderr before any work."""
    from analysis.cache import CacheError, load
    from analysis.report import build_report
    from analysis.findings import current_findings
    from analysis.findings.kinds import plural

    problem = _problem(args)
    cache = other = None
    if problem is None:
        try:
            cache = load(args.cache)
            other = load(args.compare) if args.compare is not None else None
        except CacheError as error:
            problem = ("--compare: " if cache is not None else "") + str(error).splitlines()[0]
    if problem is None and other is not None:
        problem = _not_comparable(cache, other)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    findings, _ = current_findings(cache)
    text = build_report(cache, findings=findings)
    if other is not None:
        text = _with_comparison(text, cache, other, findings)
    if args.out.suffix.lower() == ".pdf":
        html_to_pdf(text, args.out, args.chromium)
    else:
        from analysis.cache.files import file_replaced_atomically

        with file_replaced_atomically(args.out) as tmp:
            tmp.write_text(text, encoding="utf-8")
    print(f"report with {len(findings)} {plural(len(findings), 'finding', 'findings')} in {args.out}")
    return 0
