"""Screenshots of every dashboard page, in headless Chromium (Debian's /usr/bin/chromium through PyPI playwright).

    python scripts/screenshots.py --cache DIR --out docs/screenshots          # starts the app on DIR itself
    python scripts/screenshots.py --url http://127.0.0.1:8501 --out shots      # an app already running
    python scripts/screenshots.py --cache PHOTO_CACHE --photos                 # the photo cache's two pages
    python scripts/screenshots.py --cache DIR --compare DIR2 --only compare    # the Compare page (DIR vs DIR2)

Each page is opened by its URL, left to finish running, checked (no Streamlit exception box, no "Traceback" or
"Error" text) and saved as PNG: the README's small viewport shots (1400 x 900, palette PNG), or with --full-page
whole pages (the browser test, tests/test_browser.py, uses the same functions). --photos shoots the Image page
and a gallery of the coffee photo instead (and the Image page of the cat), on the cache of real photos that
tests/helpers.py: make_photo_cache builds (docs/screenshots/photo_image.png, photo_image_cat.png,
photo_gallery.png). Exit status 1 when a page shows a problem.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # run as `python scripts/screenshots.py`: the repository's packages

from dashboard.serve import serve_command   # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 900}
FULL_PAGE_HEIGHT = 2800
SHELL_TITLES = ("Background attention", "Per-class maps")  # navigation entries that only the app shell names


@dataclass(frozen=True)
class PageShot:
    name: str          # file name of the screenshot (without .png)
    path: str          # URL path and query
    page_file: str     # dashboard/views/<file>: pages not written yet are skipped
    title: str | None  # the page's title text, waited for (None: any title)
    scroll_to: str | None = None  # text to scroll into view before the screenshot (None: the page's top)


def pages_for(cache_dir: Path | None) -> list[PageShot]:
    """Every page, with a view that shows what it is for (the Mistakes page opens its largest confusion)."""
    mistakes = "/mistakes"
    if cache_dir is not None:
        with contextlib.suppress(Exception):  # no cell when the cache cannot be read: the page says why itself
            from analysis.cache import load
            from analysis.explore.statistics import confusion_matrix, top_confusions

            cache = load(cache_dir)
            names = list(cache.manifest["class_names"])
            top = top_confusions(confusion_matrix(cache.table["label"], cache.table["pred"], len(names)), names, k=1)
            if len(top):
                mistakes = f"/mistakes?true={int(top['true'][0])}&pred={int(top['pred'][0])}"
    return [
        PageShot("findings", "/", "findings.py", "Findings"),
        PageShot("overview", "/overview", "overview.py", "Overview"),
        PageShot("clusters", "/clusters", "clusters.py", None),
        PageShot("background", "/background", "background.py", "Background attention"),
        PageShot("per_class", "/per-class", "per_class.py", "Per-class maps"),
        PageShot("mistakes", mistakes, "mistakes.py", "Mistakes"),
        PageShot("image", "/image?id=0", "image.py", None),
        PageShot("trust", "/trust", "trust.py", "Trust"),
        PageShot("mistakes_label_errors", "/mistakes?mk_view=label_errors", "mistakes.py", "Mistakes"),
        PageShot("review", "/review", "review.py", "Find more like these"),
    ]


def photo_pages(cache_dir: Path) -> list[PageShot]:
    """The Image page of the coffee photo and of the cat (chelsea), and a gallery holding them (Background
    attention with every image flagged), on the photo cache (tests/helpers.py: make_photo_cache)."""
    from analysis.cache import load

    table = load(cache_dir).table

    def photo_id(name: str) -> int:
        found = table.loc[table["path"].str.endswith(name), "id"]
        return int(found.iloc[0]) if len(found) else int(table["id"].iloc[0])

    return [PageShot("photo_image", f"/image?id={photo_id('coffee.png')}", "image.py", "Image"),
            PageShot("photo_image_cat", f"/image?id={photo_id('chelsea.png')}", "image.py", "Image"),
            PageShot("photo_gallery", "/background?threshold=0.00", "background.py", "Background attention",
                     scroll_to="Flagged images, highest")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_app(cache_dir: Path, log_path: Path, timeout: float = 90.0, app_options: Sequence[str] = (),
                address: str | None = "127.0.0.1", script: Path = REPO / "dashboard" / "app.py") -> Iterator[str]:
    """`streamlit run dashboard/app.py -- --cache DIR APP_OPTIONS` on a free local port; yields its base URL and
    stops it. `address` None: the one .streamlit/config.toml sets; `script`: another app (a test's blank page)."""
    port = free_port()
    command = serve_command(port, address, ["--cache", str(cache_dir), *app_options], script=script)
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"streamlit exited with {server.returncode}: {log_path.read_text()[-2000:]}")
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as answer:
                        if answer.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit did not answer within {timeout:.0f} s")
                time.sleep(0.5)
            yield base
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


# Streamlit marks its app root with the script's state ("initial", "running", "notRunning", ...), as its own
# end-to-end tests wait on; the status widget shows only on runs longer than a moment, so it cannot say "done".
APP_STOPPED = """() => document.querySelector('[data-testid="stApp"]')?.getAttribute('data-test-script-state')
    === 'notRunning'"""
# every chart has drawn its canvas and every image has loaded
DRAWN = """() => [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')]
        .every(c => c.querySelector('canvas, svg'))
    && [...document.querySelectorAll('[data-testid="stImage"] img')].every(i => i.complete)"""
QUIET_S = 0.5   # a page that reruns itself (st.rerun) starts its next run at once: stopped this long is done


def wait_until_done(page, title: str | None, timeout: float = 90.0) -> None:
    """Until the page's title is shown, its script has stopped for QUIET_S (reruns that a page triggers itself
    count) and every chart and image is drawn. TimeoutError after `timeout` seconds."""
    heading = page.locator("h1").filter(has_text=title) if title else page.locator("h1")
    heading.first.wait_for(state="visible", timeout=timeout * 1000)
    deadline = time.monotonic() + timeout
    stopped_since = None
    while True:
        now = time.monotonic()
        if not page.evaluate(APP_STOPPED):
            stopped_since = None
        elif stopped_since is None:
            stopped_since = now
        elif now - stopped_since >= QUIET_S:
            break
        if now > deadline:
            raise TimeoutError(f"the page {title or ''!r} was still running after {timeout:.0f} s")
        time.sleep(0.1)
    page.wait_for_function(DRAWN, timeout=max(1.0, deadline - time.monotonic()) * 1000)
    page.wait_for_timeout(200)  # Vega paints its canvas a frame after creating it


def page_problems(page) -> list[str]:
    problems = []
    if page.locator('[data-testid="stException"]').count():
        problems.append("a Streamlit exception box: " + page.locator('[data-testid="stException"]').first.inner_text()[:500])
    navigation = page.locator('[data-testid="stSidebarNav"]')
    if navigation.count() and not all(title in navigation.first.inner_text() for title in SHELL_TITLES):
        problems.append("the page ran without the app shell: the sidebar lists files, not the shell's pages "
                        "(a folder named dashboard/pages/ is taken for an old-style pages folder)")
    body = page.locator("body").inner_text()
    if "Page not found" in body:
        problems.append("Streamlit says 'Page not found' for this URL (the default page of st.navigation lives "
                        "at '/', not at its url_path)")
    for word in ("Traceback", "Error"):
        if word in body:
            at = body.index(word)
            problems.append(f"{word!r} on the page: ...{body[max(0, at - 200): at + 200]}...")
    return problems


def shrink_png(path: Path, colours: int = 256) -> None:
    """A palette PNG (screenshots have few colours; a fraction of the size of the RGB one)."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def take_screenshots(base_url: str, out_dir: Path, shots: list[PageShot], full_page: bool = False,
                     small: bool = True, open_root_first: bool = False,
                     after: Callable[[Any, PageShot], None] | None = None) -> dict[str, list[str]]:
    """Screenshot each page to out_dir/<name>.png -> {name: problems found on the page}.

    open_root_first: load "/" once before the pages (as a person does). The browser test opens deep links
    first on purpose: a shared link must open the page inside the app shell on a fresh server.
    after: called with each page that finished (the playwright page, its shot) once it is saved, so that a
    test reads what it checks on the same visit.
    """
    from playwright.sync_api import sync_playwright

    out_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, list[str]] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # Streamlit scrolls inside its own container, so a "full page" screenshot is a tall viewport.
            viewport = {**VIEWPORT, "height": FULL_PAGE_HEIGHT} if full_page else VIEWPORT
            context = browser.new_context(viewport=viewport, device_scale_factor=1)
            if open_root_first:
                page = context.new_page()
                page.goto(base_url + "/", wait_until="domcontentloaded", timeout=60_000)
                wait_until_done(page, None)
                page.close()
            for shot in shots:
                page = context.new_page()
                page.goto(base_url + shot.path, wait_until="domcontentloaded", timeout=60_000)
                try:
                    wait_until_done(page, shot.title)
                    if shot.scroll_to:
                        page.get_by_text(shot.scroll_to).first.evaluate("e => e.scrollIntoView({block: 'start'})")
                        page.wait_for_function(DRAWN, timeout=30_000)  # images below the fold load when scrolled to
                        page.wait_for_timeout(200)
                    found[shot.name] = page_problems(page)
                except Exception as error:  # a page that never finished is a problem, with its screenshot
                    found[shot.name] = [f"did not finish: {type(error).__name__}: {str(error)[:300]}"]
                target = out_dir / f"{shot.name}.png"
                page.screenshot(path=str(target))
                if small:
                    shrink_png(target)
                if after is not None and not found[shot.name]:
                    after(page, shot)
                page.close()
        finally:
            browser.close()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cache", type=Path, help="start the dashboard on this cache")
    where.add_argument("--url", help="base URL of a dashboard already running")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--photos", action="store_true",
                        help="the Image pages of the coffee and cat photos and a gallery (needs a photo cache, see "
                             "above)")
    parser.add_argument("--compare", type=Path, default=None,
                        help="start the app with --compare DIR2 and add the Compare page (docs/screenshots/compare.png)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="only these screenshots")
    parser.add_argument("--full-page", action="store_true",
                        help=f"1400 x {FULL_PAGE_HEIGHT} (most of a page), not the 1400 x 900 viewport")
    args = parser.parse_args(argv)
    if args.photos and args.cache is None:
        parser.error("--photos needs --cache PHOTO_CACHE")
    pages = photo_pages(args.cache) if args.photos else pages_for(args.cache)
    if args.compare is not None:
        pages.append(PageShot("compare", "/compare", "compare.py", "Compare"))
    shots = [s for s in pages if (REPO / "dashboard" / "views" / s.page_file).exists()
             and (args.only is None or s.name in args.only)]
    options = ["--compare", str(args.compare.resolve())] if args.compare is not None else []
    with contextlib.ExitStack() as stack:
        log = Path(tempfile.gettempdir()) / f"screenshots-streamlit-{os.getpid()}.log"
        base = args.url or stack.enter_context(running_app(args.cache.resolve(), log, app_options=options))
        found = take_screenshots(base, args.out, shots, full_page=args.full_page, open_root_first=True)
    bad = 0
    for name, problems in found.items():
        size = (args.out / f"{name}.png").stat().st_size
        print(f"{name:12} {size / 1024:7.0f} KiB  {'ok' if not problems else 'PROBLEM: ' + ' | '.join(problems)}")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
