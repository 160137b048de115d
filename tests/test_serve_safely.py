"""Serve safely (issue 24, item 8): the dashboard listens on localhost unless told otherwise, has no "Deploy" button,
and a `--read-only` dashboard shows the tags without any tag form and writes nothing in the cache (its tags
database is opened read-only: a write that got through is refused). Real servers, real Chromium, real files."""
from __future__ import annotations

import contextlib
import hashlib
import shutil
import tomllib
from pathlib import Path

import pytest

from analysis.review import DB_NAME, Review, ReviewError
from tests.helpers import REPO_ROOT, open_page, page_texts
from tests.test_browser import CHROMIUM, screenshots_module

PAGES_WITH_TAGS = [("", "Findings"), ("image", "Image"), ("background?threshold=0.00", "Background attention"),
                   ("review", "Find more like these"), ("clusters", "Clusters")]


def disk_state(root: Path) -> dict[str, str]:
    """Every file under `root` and the sha256 of its bytes, but SQLite's -wal and -shm files: a reader of a WAL
    database (a read-only one too) keeps its shared index there; the data is in review.sqlite."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def tagged_copy(small_cache: Path, target: Path) -> tuple[Path, int]:
    """A copy of the small cache with one tagged image (tagged by the library, as a read-write dashboard does)."""
    from analysis.cache import load

    cache = Path(shutil.copytree(small_cache, target))
    image_id = int(load(cache).table["id"].iloc[3])
    Review(cache).tag([image_id], "odd corner", note="a mark in the corner", who="Ada")
    return cache, image_id


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port` in this network namespace (Linux /proc/net)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                address, hex_port = fields[1].split(":")
                if int(hex_port, 16) == port and fields[3] == "0A":   # 0A: LISTEN
                    found.add(address)
    return found


def is_loopback(address: str) -> bool:
    """An address of /proc/net/tcp{,6} (hex, 32-bit words in host order): 127.x.x.x, ::1 or ::ffff:127.x.x.x."""
    if len(address) == 8:
        return address[-2:] == "7F"
    return address == "00000000000000000000000001000000" or \
        (address.startswith("0000000000000000FFFF0000") and address[-2:] == "7F")


# ------------------------------------------------------------------------------------------------ localhost
def test_the_demo_and_the_repository_config_serve_on_localhost_with_a_minimal_toolbar(tmp_path: Path) -> None:
    """... and without Streamlit's source watcher, which walked every loaded module's path after a page's run:
    1.2 of an Image page visit's 2-3 CPU seconds on the 1,000-class cache (tests/test_browser_classes.py)."""
    from data import demo, demo_dashboard

    command = demo_dashboard.dashboard_command(demo.DemoPaths(tmp_path), 8501)
    assert command[command.index("--server.address") + 1] == "localhost"
    assert command[command.index("--client.toolbarMode") + 1] == "minimal"
    assert command[command.index("--server.fileWatcherType") + 1] == "none"
    assert "--read-only" not in command
    assert demo.build_parser().parse_args([]).address == "localhost"
    shared = demo_dashboard.dashboard_command(demo.DemoPaths(tmp_path), 8501, address="0.0.0.0", read_only=True)
    assert shared[shared.index("--server.address") + 1] == "0.0.0.0" and shared[-1] == "--read-only"
    # `streamlit run dashboard/app.py` typed in the repository reads this file.
    config = tomllib.loads((REPO_ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "localhost"
    # One list of settings for every server the repository starts (the demo's, the screenshots'), equal to the
    # file's: the toolbar and the watcher above among them.
    from dashboard.serve import SETTINGS

    assert {name: str(config[name.split(".")[0]][name.split(".")[1]]).lower() for name in SETTINGS} == SETTINGS


def test_a_dashboard_started_without_an_address_listens_on_loopback_only(small_cache: Path, tmp_path: Path) -> None:
    """`streamlit run dashboard/app.py -- --cache DIR` in the repository, no address given: its listening
    sockets are all loopback ones (before, Streamlit listened on every interface and printed a Network URL)."""
    log = tmp_path / "streamlit.log"
    with screenshots_module().running_app(small_cache, log, address=None) as base:
        addresses = listening_addresses(int(base.rsplit(":", 1)[1]))
        assert addresses and all(is_loopback(a) for a in addresses), addresses
        assert "Network URL" not in log.read_text()


# ------------------------------------------------------------------------------------------------ read-only
def test_a_read_only_review_refuses_every_write_and_creates_nothing(small_cache: Path, tmp_path: Path) -> None:
    cache, image_id = tagged_copy(small_cache, tmp_path / "cache")
    before = disk_state(cache)
    review = Review(cache, read_only=True)
    assert review.tags()[["id", "tag", "note", "who"]].values.tolist() == \
        [[image_id, "odd corner", "a mark in the corner", "Ada"]]
    for write in (lambda: review.tag([0], "shortcut"), lambda: review.untag([image_id], "odd corner"),
                  lambda: review.reject([1], "odd corner"), lambda: review.unreject([1], "odd corner")):
        with pytest.raises(ReviewError, match="read-only"):
            write()
    assert disk_state(cache) == before
    assert Review(cache).tags()[["id", "tag"]].values.tolist() == [[image_id, "odd corner"]]

    untagged = Path(shutil.copytree(small_cache, tmp_path / "untagged"))
    with pytest.raises(ReviewError, match="no tags of this cache"):
        Review(untagged, read_only=True)
    assert not (untagged / DB_NAME).exists() and not list(untagged.glob(f"{DB_NAME}*"))


def test_a_read_only_image_page_shows_the_tags_and_no_form(small_cache: Path, tmp_path: Path, monkeypatch) -> None:
    cache, image_id = tagged_copy(small_cache, tmp_path / "cache")
    writable = open_page(monkeypatch, cache, "image", {"id": image_id})   # the control: the form is there
    assert {"Tag", "Untag", "Remove"} <= {b.label for b in writable.button}, [b.label for b in writable.button]
    monkeypatch.setenv("FGCAM_READ_ONLY", "1")
    at = open_page(monkeypatch, cache, "image", {"id": image_id})
    assert not at.exception, [e.value for e in at.exception]
    assert not {"Tag", "Untag", "Remove"} & {b.label for b in at.button}, [b.label for b in at.button]
    assert not [t for t in at.text_input if "Your name" in str(t.label)]
    text = page_texts(at)
    assert "odd corner" in text and "Read-only dashboard: tags are shown, not changed." in text, text


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_a_read_only_server_in_a_browser_has_no_tag_form_and_writes_nothing(small_cache: Path, tmp_path: Path) -> None:
    pytest.importorskip("playwright.sync_api", reason="playwright is in requirements.txt")
    from playwright.sync_api import expect, sync_playwright

    shots = screenshots_module()
    cache, image_id = tagged_copy(small_cache, tmp_path / "cache")
    before = disk_state(cache)
    rows_before = Review(cache).tags().values.tolist()
    log = tmp_path / "streamlit.log"
    with shots.running_app(cache, log, app_options=["--read-only"]) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=shots.CHROMIUM_ARGS)
        page = browser.new_context(viewport=shots.VIEWPORT, accept_downloads=True).new_page()
        try:
            for path, title in PAGES_WITH_TAGS:
                page.goto(f"{base}/{path}" + (f"?id={image_id}" if path == "image" else ""))
                shots.wait_until_done(page, title)
                assert not shots.page_problems(page), shots.page_problems(page)
                for name in ("Tag", "Untag", "Remove", "Accept all", "✓"):
                    assert page.get_by_role("button", name=name, exact=True).count() == 0, (path, name)
                assert page.get_by_label("or a new tag").count() == 0, path
                assert page.get_by_text("Tag these", exact=False).count() == 0, path   # the Findings' expanders
                assert page.get_by_label("Your name (signs your tags)").count() == 0, path
                assert page.get_by_text("Deploy", exact=True).count() == 0, path     # a minimal toolbar
                expect(page.get_by_text("read-only", exact=False).first).to_be_visible()
            page.goto(f"{base}/image?id={image_id}")
            shots.wait_until_done(page, "Image")
            expect(page.get_by_text("odd corner", exact=False).first).to_be_visible()   # the tags are shown
            # The report download reads the stored clustering: it writes nothing in the cache either.
            page.goto(f"{base}/overview")
            shots.wait_until_done(page, "Overview")
            with page.expect_download(timeout=180_000) as info:
                page.get_by_role("button", name="Download HTML report").click()
            report = tmp_path / "report.html"
            info.value.save_as(report)
            assert "odd corner" in report.read_text()
        finally:
            browser.close()
    assert "Traceback" not in log.read_text()
    assert disk_state(cache) == before       # no tag, no database change, no saved clustering
    assert Review(cache).tags().values.tolist() == rows_before
