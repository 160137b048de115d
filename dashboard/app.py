"""The dashboard: `streamlit run dashboard/app.py -- --cache DIR` (or FGCAM_CACHE=DIR); add `--read-only` (or
FGCAM_READ_ONLY=1) for a dashboard to share: tags shown, no tag form, nothing written; add `--compare DIR2` (or
FGCAM_COMPARE=DIR2) for the Compare page, DIR against a second cache of the same images. .streamlit/config.toml keeps
it on localhost with a minimal toolbar when started in the repository (`--server.address 0.0.0.0` to share).

A thin shell: find the cache, open it once, and hand over to the pages (dashboard/views/*.py), each of
which loads what it needs through dashboard/common.py, calls `analysis`, and draws.
"""
from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `streamlit run` puts only dashboard/ on the path

from dashboard import common, tagging  # noqa: E402

PAGES = {  # sidebar section -> (file, title, url path, icon); adding a page is one line here. The sections follow
    # the user's path: find what the model does, check it on single images and against other methods, fix it.
    "Find": [
        ("findings.py", "Findings", "findings", ":material/lightbulb:"),
        ("overview.py", "Overview", "overview", ":material/dashboard:"),
        ("clusters.py", "Clusters", "clusters", ":material/scatter_plot:"),
        ("background.py", "Background attention", "background", ":material/filter_center_focus:"),
        ("per_class.py", "Per-class maps", "per-class", ":material/grid_view:"),
        ("concepts.py", "Concepts", "concepts", ":material/psychology:"),
    ],
    "Check": [
        ("mistakes.py", "Mistakes", "mistakes", ":material/rule:"),
        ("image.py", "Image", "image", ":material/image:"),
        ("trust.py", "Trust", "trust", ":material/verified:"),
    ],
    "Fix": [
        ("review.py", "Find more like these", "review", ":material/sell:"),
        ("compare.py", "Compare", "compare", ":material/compare:"),   # only with --compare
    ],
}

st.set_page_config(page_title="FG-CAM explanations", page_icon=":material/center_focus_strong:", layout="wide")
st.set_option("client.showErrorDetails", "none")  # behind common.run_guarded: no stack trace ever reaches a page
cache, problem = common.open_cache_or_problem()
if cache is None:
    navigation = st.navigation([st.Page(common.no_cache_page, title="No cache", url_path="no-cache", default=True)])
else:
    here = Path(__file__).resolve().parent / "views"
    first = next(iter(PAGES.values()))[0][0]
    shown = {file for pages in PAGES.values() for file, *_ in pages
             if (here / file).exists() and (file != "compare.py" or common.compare_dir() is not None)}
    navigation = st.navigation({section: [st.Page(here / file, title=title, url_path=url, icon=icon,
                                                  default=file == first)
                                          for file, title, url, icon in pages if file in shown]
                                for section, pages in PAGES.items()})
    common.sidebar_summary(cache)
    tagging.who_sidebar()
common.run_guarded(navigation.run)
