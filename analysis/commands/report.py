"""`python -m analysis report`: the findings, the stored clusters and the rest as one self-contained HTML file
(analysis/report.py), or a PDF printed from it by headless Chromium."""
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


def run(args: argparse.Namespace) -> int:
    """The `report` subcommand: 0, or 2 with one line on stderr before any work."""
    from analysis.cache import CacheError, load
    from analysis.report import build_report
    from analysis.findings import current_findings

    problem = _problem(args)
    if problem is None:
        try:
            cache = load(args.cache)
        except CacheError as error:
            problem = str(error).splitlines()[0]
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    findings, _ = current_findings(cache)
    text = build_report(cache, findings=findings)
    if args.out.suffix.lower() == ".pdf":
        html_to_pdf(text, args.out, args.chromium)
    else:
        from analysis.cache.files import file_replaced_atomically

        with file_replaced_atomically(args.out) as tmp:
            tmp.write_text(text, encoding="utf-8")
    print(f"report with {len(findings)} findings in {args.out}")
    return 0
