"""The dashboard: `streamlit run dashboard/app.py -- --cache DIR` (or FGCAM_CACHE=DIR).

A thin shell: find the cache, open it once, and hand over to the pages (dashboard/views/*.py), each of
which loads what it needs through dashboard/common.py, calls `analysis`, and draws.
"""
from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `streamlit run` puts only dashboard/ on the path

from dashboard import common, tagging  # noqa: E402

PAGES = [  # (file, title, url path, icon); adding a page is one line here
    ("overview.py", "Overview", "overview", ":material/dashboard:"),
    ("clusters.py", "Clusters", "clusters", ":material/scatter_plot:"),
    ("background.py", "Background attention", "background", ":material/filter_center_focus:"),
    ("per_class.py", "Per-class maps", "per-class", ":material/grid_view:"),
    ("mistakes.py", "Mistakes", "mistakes", ":material/rule:"),
    ("image.py", "Image", "image", ":material/image:"),
    ("trust.py", "Trust", "trust", ":material/verified:"),
    ("review.py", "Find more like these", "review", ":material/sell:"),
    ("concepts.py", "Concepts", "concepts", ":material/psychology:"),
]

st.set_page_config(page_title="FG-CAM explanations", page_icon=":material/center_focus_strong:", layout="wide")
st.set_option("client.showErrorDetails", "none")  # behind common.run_guarded: no stack trace ever reaches a page
cache, problem = common.open_cache_or_problem()
if cache is None:
    navigation = st.navigation([st.Page(common.no_cache_page, title="No cache", url_path="no-cache", default=True)])
else:
    here = Path(__file__).resolve().parent / "views"
    navigation = st.navigation([st.Page(here / file, title=title, url_path=url, icon=icon, default=i == 0)
                                for i, (file, title, url, icon) in enumerate(PAGES) if (here / file).exists()])
    common.sidebar_summary(cache)
    tagging.who_sidebar()
common.run_guarded(navigation.run)
