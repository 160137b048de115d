"""What every page shares: finding and opening the cache, URL state, image tiles and galleries.

Streamlit lives here and in the pages only; the computations are in `analysis`.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from analysis.present import overlay
from analysis.present.tiles import UNKNOWN_PLACEMENT_NOTE, image_tiles, unknown_placements
from analysis.explore.statistics import table_csv
from analysis.cache import Cache, CacheError, load
from analysis.cache.derived import MissingResult, analysis_command as derived_command
from analysis.cache.identity import cache_state, files_state

ENV_VAR = "FGCAM_CACHE"
COMPARE_ENV_VAR = "FGCAM_COMPARE"       # as --compare DIR: a second cache for the Compare page
READ_ONLY_ENV_VAR = "FGCAM_READ_ONLY"   # "1": as --read-only
TILE = 160          # pixels of one gallery tile
PAGE_SIZE = 24      # tiles per gallery page


# ------------------------------------------------------------------------------------------------ the cache
def _app_arguments() -> argparse.Namespace:
    """The app's own options: after `--` on the streamlit command line."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--compare", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    return args


def cache_dir() -> Path | None:
    """--cache DIR after `--` on the streamlit command line, else $FGCAM_CACHE, else None."""
    value = _app_arguments().cache or os.environ.get(ENV_VAR)
    return Path(value).expanduser().resolve() if value else None


def compare_dir() -> Path | None:
    """--compare DIR after `--` (or $FGCAM_COMPARE): a second cache of the same images, for the Compare page
    (shown only when one is given); None without."""
    value = _app_arguments().compare or os.environ.get(COMPARE_ENV_VAR)
    return Path(value).expanduser().resolve() if value else None


def open_compare_or_problem() -> tuple[Cache | None, str | None]:
    """(the --compare cache, None), or (None, why it cannot be opened, in one line)."""
    root = compare_dir()
    if root is None:
        return None, "No second cache was given (--compare DIR)."
    if not root.is_dir():
        return None, f"The --compare cache directory {root.name} does not exist."
    try:
        cache = _open(str(root), files_state(root))
    except CacheError as error:
        return None, f"The --compare directory {root.name} cannot be read as a cache: {error}"
    return cache, None


def read_only() -> bool:
    """--read-only after `--` (or FGCAM_READ_ONLY=1): a dashboard to share, which shows the tags but has no tag
    form and writes nothing (the tags database is opened read-only; the report's clustering is not saved)."""
    return _app_arguments().read_only or os.environ.get(READ_ONLY_ENV_VAR, "").strip() == "1"


def analysis_command(cache: Cache, command: str, *options: str) -> str:
    """`python -m analysis COMMAND --cache <this cache> OPTIONS` (analysis.cache.derived.analysis_command)."""
    return derived_command(cache.root, command, *options)


@st.cache_resource(show_spinner="Opening the cache ...", max_entries=4)
def _open(root: str, state: tuple) -> Cache:
    return load(root)


def cache_key(cache: Cache) -> str:
    """The key of st.cache_data / st.cache_resource results computed from a cache: which cache (its directory:
    a copy shares the identity) in which state (analysis.cache.identity.cache_state)."""
    return f"{cache.root}|{cache_state(cache)}"


def open_cache_or_problem() -> tuple[Cache | None, str | None]:
    root = cache_dir()
    if root is None:
        return None, "No cache was given."
    if not root.is_dir():
        return None, f"The cache directory {root} does not exist."
    try:
        cache = _open(str(root), files_state(root))
    except CacheError as error:
        return None, f"{root} cannot be read as a cache: {error}"
    if len(cache) == 0:
        return None, f"The cache {root} holds no explained image yet (is the job still starting?)."
    return cache, None


def image_caption(image_id: int, label: str, pred: str) -> str:
    """A tile's caption, "#12 shirt → bag": spaced around the arrow, so that a narrow tile wraps between the
    names, not inside one ("ankle_boot→ba" / "g")."""
    return f"#{image_id} {label} → {pred}"


def show_missing(record: MissingResult) -> None:
    """A derived result the page cannot show (missing, stale or unreadable), said the same way on every page:
    one info box naming the command that makes it, and the command to copy."""
    st.info(record.sentence(), icon=":material/info:")
    st.code(record.command, language="bash")


def get_cache() -> Cache:
    """The open cache, for pages (the app shows the no-cache page instead when there is none)."""
    cache, problem = open_cache_or_problem()
    if cache is None:
        st.error(problem)
        st.stop()
    return cache


def no_cache_page() -> None:
    _, problem = open_cache_or_problem()
    st.title("FG-CAM explanation dashboard")
    st.warning(problem)
    st.markdown(
        "This dashboard reads a cache made by the offline job. Make one, then start the dashboard on it:\n\n"
        "```bash\n"
        "python -m analysis explain --data PATH/TO/IMAGEFOLDER --model torchvision:resnet50 --weights DEFAULT "
        "--out my_cache\n"
        "streamlit run dashboard/app.py -- --cache my_cache     # or: FGCAM_CACHE=my_cache streamlit run ...\n"
        "```\n\n"
        "`make demo` builds a complete example (Fashion-MNIST with a planted shortcut) and starts the "
        "dashboard on it. `python -m analysis explain --help` lists every option.")


def sidebar_summary(cache: Cache) -> None:
    manifest = cache.manifest
    with st.sidebar:
        st.caption(f"**Cache** `{cache_dir()}`" + (" · **read-only**: tags are shown, not changed" if read_only()
                                                   else ""))
        counts = manifest.get("counts", {})
        st.caption(f"{len(cache):,} images explained, {counts.get('errors', 0):,} skipped · "
                   f"model `{manifest.get('model', {}).get('spec', '?')}`")
        if not cache.complete:
            st.warning("The job has not finished: this view shows the shards committed so far. Reload to update.")


# ------------------------------------------------------------------------------------------------ errors
_QUOTED_PATH = re.compile(r"""(['"])(?:[A-Za-z]:)?[\\/][^'"]*\1""")
_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[\\/][^\\/\s'\"]+)+[\\/]?")


def without_paths(text: str) -> str:
    """`text` with absolute file paths replaced by "<path>" (a page must never show the server's file layout)."""
    return _PATH.sub("<path>", _QUOTED_PATH.sub(r"\1<path>\1", text))


def run_guarded(run: Callable[[], Any]) -> None:
    """Run a page; an error nobody expected shows one message instead of a stack trace (and no server path), and
    its traceback goes to the server's log. The last resort: pages check their inputs themselves."""
    try:
        run()
    except Exception as error:  # st.stop() and reruns are BaseExceptions: they pass through
        traceback.print_exc()
        detail = without_paths(str(error).strip().splitlines()[0]) if str(error).strip() else ""
        st.error(f"This page hit an unexpected problem ({type(error).__name__}{': ' + detail if detail else ''}). "
                 "Change the settings or reload the page; the server's log has the details.",
                 icon=":material/error:")


# ------------------------------------------------------------------------------------------------ URL state
def query_value(name: str, default: Any, cast: Callable[[str], Any] = str, choices: Sequence | None = None,
                low: float | None = None, high: float | None = None) -> Any:
    """A view setting from the URL (?name=value): ``cast``, checked and clamped to [low, high]; ``default`` when
    absent or unusable (does not cast, NaN or infinite, not one of ``choices``).

    The one place pages read the URL, so that whatever a link holds, a widget gets a value it accepts (a
    number_input or slider given a value outside its range raises, and the page would show a traceback).
    """
    raw = st.query_params.get(name)
    if raw is None:
        return default
    try:
        value = cast(raw.strip())
    except (TypeError, ValueError, OverflowError):
        return default
    if isinstance(value, float) and not math.isfinite(value):
        return default
    if choices is not None:
        try:
            if value not in choices:
                return default
        except TypeError:
            return default
    if low is not None and value < low:
        value = type(value)(low)
    if high is not None and value > high:
        value = type(value)(high)
    return value


def set_query(**values: Any) -> None:
    """Write view settings to the URL (None removes one), so that a copied link reopens this view."""
    for name, value in values.items():
        if value is None:
            st.query_params.pop(name, None)
        elif st.query_params.get(name) != str(value):
            st.query_params[name] = str(value)


def url_selectbox(label: str, options: list, key: str, default: Any, format_func: Callable[[Any], str] = str,
                  param: str | None = None, where: Any = st, **kwargs: Any) -> Any:
    """A selectbox whose value starts from the URL (?param=..., `param` defaulting to `key`; `default` when
    absent or not an option) and is written back to it (removed while it is the default). `where`: the
    container to draw it in (a column)."""
    return _url_choice(where.selectbox, label, options, key, default, format_func, param, **kwargs)


def url_radio(label: str, options: list, key: str, default: Any, format_func: Callable[[Any], str] = str,
              param: str | None = None, where: Any = st, **kwargs: Any) -> Any:
    """`url_selectbox`'s radio buttons."""
    return _url_choice(where.radio, label, options, key, default, format_func, param, **kwargs)


def _url_choice(widget: Callable[..., Any], label: str, options: list, key: str, default: Any,
                format_func: Callable[[Any], str], param: str | None, **kwargs: Any) -> Any:
    param = param or key
    value = query_value(param, default, type(options[0]), options)
    chosen = widget(label, options, index=options.index(value), key=key, format_func=format_func, **kwargs)
    set_query(**{param: chosen if chosen != default else None})
    return chosen


# ------------------------------------------------------------------------------------------------ images
def tiles_for(cache: Cache, ids: Sequence[int], kind: str = "overlay", which: str = "pred",
              opacity: float = 0.6, colormap: str = overlay.DEFAULT_COLORMAP, size: int = TILE,
              letterbox: bool = True, maps: Sequence[np.ndarray] | None = None,
              style: overlay.OverlayStyle = overlay.OverlayStyle()) -> list[np.ndarray]:
    """Rendered tiles for ``ids`` (analysis.present.tiles.image_tiles): "image", "map" or "overlay", each image with its own
    aspect ratio and the map on the region the model saw, letterboxed into size x size squares unless
    ``letterbox`` is False. Reads only these images' maps, unless ``maps`` gives them (one per id). ``style``:
    overlay.OverlayStyle (the Image page's: overlay.PHOTO_STYLE). Kept per cache state: a page's rerun (a click,
    a second visit) draws them once (25 tiles: 0.2-0.3 CPU s on 2 cores)."""
    if maps is not None:    # maps made on the page (the Image page's full-resolution ones): drawn as given
        return image_tiles(cache, ids, kind=kind, which=which, opacity=opacity, colormap=colormap, size=size,
                           letterbox=letterbox, maps=maps, style=style)
    return _kept_tiles(cache, cache_key(cache), tuple(int(i) for i in ids), kind, which, float(opacity), colormap,
                       int(size), bool(letterbox), style)


@st.cache_data(show_spinner=False, max_entries=32)   # a gallery page of 160-pixel tiles is 1.8 MB
def _kept_tiles(_cache: Cache, key: str, ids: tuple[int, ...], kind: str, which: str, opacity: float,
                colormap: str, size: int, letterbox: bool, style: overlay.OverlayStyle) -> list[np.ndarray]:
    # `style` is a dataclass: Streamlit keys it by its fields
    return image_tiles(_cache, ids, kind=kind, which=which, opacity=opacity, colormap=colormap, size=size,
                       letterbox=letterbox, style=style)


def placement_notice(cache: Cache, ids: Sequence[int]) -> None:
    """Say so on the page when some of ``ids`` have maps whose placement in the image is not known."""
    unknown = unknown_placements(cache, [int(i) for i in ids])
    if unknown:
        st.caption(":orange[" + UNKNOWN_PLACEMENT_NOTE.format(count=unknown) + "]")


def paginate(items: Sequence, per_page: int, key: str, label: str = "Page (of {pages})") -> list:
    """The page of `items` a page-number input chooses (shown only when there are several pages; URL-bound as
    ?key=, clamped into range). `label` may name {pages} and {count} (the number of items)."""
    items = list(items)
    pages = max(1, (len(items) + per_page - 1) // per_page)
    page = 1
    if pages > 1:
        page = int(st.number_input(label.format(pages=pages, count=len(items)), 1, pages, key=key,
                                   value=query_value(key, 1, int, low=1, high=pages)))
        set_query(**{key: page if page > 1 else None})
    return items[(page - 1) * per_page: page * per_page]


def gallery(cache: Cache, ids: Sequence[int], key: str, captions: Callable[[int], str] | None = None,
            kind: str = "overlay", which: str = "pred", columns: int = 6, **render: Any) -> None:
    """A paginated grid of tiles; only the current page's maps and images are read."""
    ids = [int(i) for i in ids]
    if not ids:
        st.info("No image to show.")
        return
    shown = paginate(ids, PAGE_SIZE, f"{key}_page", "Page (of {pages}, {count:,} images)")
    tiles = tiles_for(cache, shown, kind=kind, which=which, **render)
    placement_notice(cache, shown)
    for start in range(0, len(shown), columns):
        for column, image_id, tile in zip(st.columns(columns), shown[start:start + columns], tiles[start:start + columns]):
            column.image(tile, caption=captions(image_id) if captions else f"#{image_id}", width="stretch")


# ------------------------------------------------------------------------------------------------ downloads
def png_download(label: str, data: bytes, file_name: str, key: str) -> None:
    st.download_button(label, data, file_name=file_name, mime="image/png", key=key,
                       icon=":material/download:")


def csv_download(label: str, rows: pd.DataFrame | Callable[[], pd.DataFrame], file_name: str, key: str,
                 **button: Any) -> None:
    """A CSV download of table rows (statistics.table_csv: list columns as space-separated values). Given a
    function instead of rows, the rows are made only when the button is clicked (`deferred_download`: for
    exports that take seconds, which opening a page must not pay; the function must not use streamlit)."""
    button.setdefault("icon", ":material/download:")
    if callable(rows):
        deferred_download(label, lambda: table_csv(rows()), file_name, "text/csv", key, **button)
    else:
        st.download_button(label, table_csv(rows), file_name=file_name, mime="text/csv", key=key, **button)


# ------------------------------------------------------------------------------------------------ charts
def new_selection(selection: Any, key: str) -> bool:
    """True when a chart's selection differs from the one it reported on the previous run (remembered in the
    session under `key`; none at first). A chart reports its last selection on every rerun: a page acts only on
    a new one, so that it does not override a view opened since from a button or a link."""
    changed = selection != st.session_state.get(key)
    st.session_state[key] = selection
    return changed


def altair_chart(chart: Any, **kwargs: Any) -> Any:
    """st.altair_chart drawing the plot at the width/height its spec gives (Vega's "pad" autosize).

    Streamlit otherwise fits the axes, legend and title into that size too, which shrinks a labelled heatmap
    or a chart in a column to a few pixels. Returns what st.altair_chart returns (the selection with
    on_select="rerun")."""
    import altair as alt

    return st.altair_chart(chart.properties(autosize=alt.AutoSizeParams(type="pad")), **kwargs)


def deferred_download(label: str, make: Callable[[], bytes | str], file_name: str, mime: str, key: str,
                      **button: Any) -> None:
    """A download whose data ``make()`` builds only when the button is clicked, outside the script run (so it
    must not use streamlit): for files that take seconds, which opening a page must not pay.

    The click does not rerun the page (nothing depends on it). With a rerun, Streamlit 1.67 requests the file
    while the rerun replaces the page's deferred callables, and the request can find its callable gone: the
    click then downloads nothing (seen in tests/test_browser.py on a loaded machine).
    """
    st.download_button(label, data=make, file_name=file_name, mime=mime, key=key, on_click="ignore", **button)


def chart_png_download(label: str, chart: Any, file_name: str, key: str) -> None:
    """A PNG download of an Altair chart, rendered offline by vl-convert only when clicked (about a second per
    chart)."""
    from analysis.present import charts

    deferred_download(label, lambda: charts.chart_png(chart), file_name, "image/png", key,
                      icon=":material/download:")
