"""Mistakes: the confusion matrix, and for a cell its images with the map of the predicted class beside the
map of the true class (what made the model say X, and what it saw of Y).

A click on a cell, or on a row of the top confusions, opens the cell. View state in the URL: true, pred,
value, mk_page, find (a class searched by name), classes (how many the matrix draws when more occur). Only
the classes that occur are drawn, at most MAX_MATRIX_CLASSES of them: a 1,000 x 1,000 matrix froze the browser.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from analysis.cache.classes import class_names
from analysis.explore import statistics as explore
from analysis.present import charts
from analysis.review import tag_views, verifications_state
from analysis.cache import Cache
from dashboard import common, tagging

VALUES = {"count": "image counts", "row_share": "share of the true class"}
VIEWS = {"confusions": "Confusion matrix", "label_errors": "Likely label errors"}
LABEL_ERROR_TOP = 24
PAIRS_PER_PAGE = 8
PAIR_TILE = 150
MATRIX_CLASSES = 20        # classes drawn at first when more occur (a 1,000-output model)
MAX_MATRIX_CLASSES = 30    # the most that stay readable in the matrix's column (11 px rows)
TOP_CONFUSIONS = 10
MATRIX_SIDE = 340          # px: the matrix, its class names and legend fit the left column beside the top confusions
MIN_CELL = 11              # px: a row still fits its class name, a cell is still clickable
NO_CLASS = -1              # "no class searched" in the find box (its options are ints, as the URL casts them)


def open_cell(true: int, pred: int) -> None:
    """Button callback: open a cell (written to the URL; the chart's own selection is left as it is)."""
    common.set_query(true=true, pred=pred, mk_page=None)
    st.session_state.pop("mk_page", None)  # a new cell starts on its first page


def selected_cell(n: int) -> tuple[int, int] | None:
    true = common.query_value("true", None, int, choices=range(n))
    pred = common.query_value("pred", None, int, choices=range(n))
    return (true, pred) if true is not None and pred is not None else None


def chart_selection(event: object) -> tuple[int, int] | None:
    """The cell a click on the heatmap selected, or None (no click, or the click was undone)."""
    try:
        points = event.selection[charts.CONFUSION_CELL]  # type: ignore[attr-defined]
    except (AttributeError, KeyError, TypeError):
        return None
    if not points:
        return None
    return int(points[0]["true"]), int(points[0]["pred"])


def show_cell(cache: Cache, rows: pd.DataFrame, names: list[str], true: int, pred: int) -> None:
    rows = rows.sort_values(["confidence", "id"], ascending=[False, True], kind="stable")
    st.subheader(f"True {names[true]}, predicted {names[pred]}: {len(rows):,} image{'s' if len(rows) != 1 else ''}")
    if rows.empty:
        st.info("No image falls in this cell.")
        return
    export = tagging.with_tags_column(cache, rows[["id", "path", "label_name", "pred_name", "confidence"]])
    common.csv_download("Download this cell's images (CSV)", export,
                        f"mistakes_{names[true]}_as_{names[pred]}.csv", key="mk_csv")
    if true == pred:
        st.caption("A diagonal cell: the model was right, so the map of the predicted class is the map of the "
                   "true class. Most confident first.")
    else:
        st.caption(f"Most confident first. Left: the image; middle: what made the model say **{names[pred]}**; "
                   f"right: the relevance for the true class **{names[true]}** (red for, blue against).")
    ids = tagging.tag_filter(cache, rows["id"].tolist(), key="mk", container=st.columns([2, 3])[0])
    if not ids:
        st.info("No image of this cell passes the tag filter.")
        return
    tagging.tag_controls(cache, ids, key="mk_tagging",
                         what=f"the {len(ids):,} image{'s' if len(ids) != 1 else ''} of this cell" +
                              ("" if len(ids) == len(rows) else " that pass the filter"))
    shown = common.paginate(ids, PAIRS_PER_PAGE, "mk_page")
    images = common.tiles_for(cache, shown, kind="image", size=PAIR_TILE)
    pred_maps = common.tiles_for(cache, shown, kind="overlay", which="pred", size=PAIR_TILE)
    true_maps = pred_maps if true == pred else common.tiles_for(cache, shown, kind="overlay", which="true",
                                                                size=PAIR_TILE)
    common.placement_notice(cache, shown)
    confidence = dict(zip(rows["id"], rows["confidence"]))
    caption = tagging.captions_with_tags(cache, shown, lambda i: f"#{i} · confidence {confidence[i]:.0%}")
    for start in range(0, len(shown), 2):  # two images per row, each as image | pred map | true map
        columns = st.columns(2)
        for k, column in zip(range(start, min(start + 2, len(shown))), columns):
            with column, st.container(border=True):
                st.caption(caption(shown[k]))
                a, b, c = st.columns(3)
                a.image(images[k], caption="image", width="stretch")
                b.image(pred_maps[k], caption=f"map for {names[pred]} (predicted)", width="stretch")
                c.image(true_maps[k], caption=f"map for {names[true]} (true)", width="stretch")


def find_class(matrix: np.ndarray, names: list[str], where: Any) -> int | None:
    """A class chosen by name (the selectbox filters as one types) among those that occur; URL: find."""
    options = [NO_CLASS] + sorted(explore.occurring_classes(matrix).tolist(), key=lambda c: names[c].lower())
    chosen = common.url_selectbox("Find a class (type its name)", options, "mk_find", NO_CLASS, param="find",
                                  format_func=lambda c: "—" if c == NO_CLASS else names[c], where=where)
    return None if chosen == NO_CLASS else int(chosen)


def choose_matrix_classes(matrix: np.ndarray, names: list[str], selected: tuple[int, int] | None,
                          found: int | None, where: Any) -> list[int]:
    """Only the classes that occur, and of those at most what a person can read (a model with 1,000 outputs):
    the ones with the most mistakes, the open cell's and the found class always among them; URL: classes."""
    occurring = len(explore.occurring_classes(matrix))
    limit = occurring
    if occurring > MATRIX_CLASSES:
        most = min(occurring, MAX_MATRIX_CLASSES)
        limit = int(where.number_input(
            f"Classes in the matrix ({occurring:,} of {len(names):,} occur)", 2, most, key="mk_classes",
            value=common.query_value("classes", MATRIX_CLASSES, int, low=2, high=most),
            help="The classes with the most mistakes (as true or as predicted class); the open cell's classes and "
                 "the class found by name are always drawn."))
        common.set_query(classes=limit if limit != MATRIX_CLASSES else None)
    keep = (*(selected or ()), *(() if found is None else (found,)))
    return explore.matrix_classes(matrix, limit, keep)


def show_top_confusions(matrix: np.ndarray, names: list[str], selected: tuple[int, int] | None,
                        found: int | None) -> None:
    """The largest off-diagonal cells as buttons that open them (those of the found class when one is)."""
    st.markdown("**Top confusions**" + ("" if found is None else f" of **{names[found]}**"))
    top = explore.top_confusions(matrix, names, k=TOP_CONFUSIONS, involving=found)
    if top.empty:
        st.info("No image is misclassified." if found is None else f"No mistake involves {names[found]}.")
    for row in top.itertuples(index=False):
        label = f"{row.true_name} → {row.pred_name}: {row.count:,} ({row.row_share:.0%} of {row.true_name})"
        st.button(label, key=f"mk_top_{row.true}_{row.pred}", on_click=open_cell, args=(int(row.true), int(row.pred)),
                  type="primary" if selected == (row.true, row.pred) else "secondary", width="stretch")


def label_errors_key(cache: Cache) -> str:
    """The cache's state and the causal tests' results (a new `cluster --verify-top` changes the victims)."""
    return f"{common.cache_key(cache)}|{verifications_state(cache)}"


@st.cache_data(show_spinner="Ranking likely label errors ...", max_entries=2)
def label_errors(_cache: Cache, state: str):
    return tag_views.label_error_table(_cache)


@st.cache_data(show_spinner=False, max_entries=2)
def shortcut_victims(_cache: Cache, state: str):
    return tag_views.shortcut_victim_table(_cache)


def show_shortcut_victims(cache: Cache) -> None:
    """The wrong predictions a verified shortcut explains, apart from the ranking (a short section)."""
    victims = shortcut_victims(cache, label_errors_key(cache))
    st.subheader(f"Shortcut victims, set apart: {len(victims):,}")
    if victims.empty:
        st.caption("None: no cluster's causal test found a shortcut (run "
                   f"`{common.analysis_command(cache, 'cluster', '--verify-top', '3')}` to test the most suspicious "
                   "clusters).")
        return
    st.caption("Wrong predictions that a verified shortcut explains: the image belongs to a cluster whose region "
               "the causal test found off the object and decisive, and most of its own evidence lies in that region "
               "(region share). Fix the shortcut, not these labels.")
    st.dataframe(victims, hide_index=True, height=min(320, 38 + 35 * len(victims)), key="mk_victims_table",
                 column_config={"region_share": st.column_config.NumberColumn("region share", format="percent"),
                                "confidence": st.column_config.NumberColumn("confidence", format="percent")})
    common.csv_download("Download the shortcut victims (CSV)", victims, "shortcut_victims.csv", key="mk_victims_csv")


def show_label_errors(cache: Cache) -> None:
    """Every image ranked by how likely its label is wrong (Cleanlab), as a sortable table and a gallery."""
    frame = label_errors(cache, label_errors_key(cache))
    st.markdown("Every image ranked by **label quality** (Cleanlab's normalized margin: the probability of the "
                "given label minus the highest other one, rescaled; lowest first = most likely mislabelled), "
                "except the shortcut victims (below). Click a column header to sort.")
    st.caption("The probabilities are the model's own, in-sample for images it was trained on: a model that "
               "has learnt a wrong label believes it, so this list is conservative (it misses such errors). "
               "Out-of-sample probabilities (cross-validation) find more: `python -m analysis label-errors "
               "--probabilities FILE`. A confidently wrong prediction of another origin than the ones set apart "
               "ranks high too: look before relabelling.")
    if frame.attrs.get("probabilities") == "top-5":
        st.caption(":orange[This cache was made before the job stored every class probability: the ranking uses "
                   "each image's top-5 probabilities (the rest spread evenly).]")
    with_tags = tagging.with_tags_column(cache, frame)
    st.dataframe(with_tags, hide_index=True, height=320, key="mk_le_table", column_config={
        "label_quality": st.column_config.NumberColumn("label quality", format="%.3g"),
        "confidence": st.column_config.NumberColumn("confidence", format="percent"),
        "path": st.column_config.TextColumn("path", width="medium")})
    common.csv_download("Download the ranking (CSV)", with_tags, "label_errors.csv", key="mk_le_csv")
    st.subheader("The most likely label errors")
    left, right, _ = st.columns([1, 2, 2])
    top = int(left.number_input("How many", 1, len(frame), key="mk_le_top",
                                value=common.query_value("le_top", min(LABEL_ERROR_TOP, len(frame)), int, low=1,
                                                         high=len(frame))))
    common.set_query(le_top=top if top != min(LABEL_ERROR_TOP, len(frame)) else None)
    quality = dict(zip(frame["id"], frame["label_quality"]))
    rows = frame.set_index("id")
    shown = tagging.tag_filter(cache, frame["id"].head(top).tolist(), key="mk_le", container=right)
    common.gallery(cache, shown, key="mk_le", kind="image", captions=tagging.captions_with_tags(
        cache, shown, lambda i: f"#{i} {rows.at[i, 'label_name']}→{rows.at[i, 'pred_name']} q {quality[i]:.2g}"))
    if shown:
        tagging.tag_controls(cache, shown, key="mk_le_tagging", default="label error",
                             what=f"the {len(shown):,} image{'s' if len(shown) != 1 else ''} of this gallery "
                                  "(every page)")
    show_shortcut_victims(cache)


def main() -> None:
    cache = common.get_cache()
    table = cache.table
    names = class_names(cache)
    n = len(names)
    st.title("Mistakes")
    view = common.url_radio("Show", list(VIEWS), "mk_view", "confusions", VIEWS.get, horizontal=True)
    if view == "label_errors":
        show_label_errors(cache)
        return
    matrix = explore.confusion_matrix(table["label"].to_numpy(), table["pred"].to_numpy(), n)
    wrong = int(matrix.sum() - np.trace(matrix))
    st.markdown(f"**{wrong:,}** of **{int(matrix.sum()):,}** images are misclassified "
                f"({wrong / max(1, int(matrix.sum())):.1%}). Click a cell of the matrix, or a row of the top "
                "confusions, to see its images.")

    controls = st.columns([2, 2, 2])
    value = common.url_radio("Colour cells by", list(VALUES), "mk_value", "count", VALUES.get, param="value",
                             horizontal=True, where=controls[0])
    selected = selected_cell(n)
    found = find_class(matrix, names, controls[1])
    shown = choose_matrix_classes(matrix, names, selected, found, controls[2])
    frame = explore.confusion_frame(matrix, names, shown)
    left, right = st.columns([3, 2])
    with left:
        cell = max(MIN_CELL, min(28, MATRIX_SIDE // max(1, len(shown))))   # the matrix fits its column
        event = common.altair_chart(charts.confusion_chart(frame, value=value, selectable=True, selected=selected,
                                                           cell_size=cell),
                                    on_select="rerun", key="mk_matrix", width="content")
        common.chart_png_download("Confusion matrix (PNG)", charts.confusion_chart(frame, value=value,
                                                                                   selectable=False),
                                  "confusion_matrix.png", "mk_matrix_png")
    clicked = chart_selection(event)
    if common.new_selection(clicked, "mk_last_click") and clicked is not None and clicked != selected:
        open_cell(*clicked)
        st.rerun()
    with right:
        show_top_confusions(matrix, names, selected, found)

    if selected is None:
        st.info("No cell selected yet.")
        return
    true, pred = selected
    show_cell(cache, table[(table["label"] == true) & (table["pred"] == pred)], names, true, pred)


if __name__ == "__main__":   # run as a page (st.navigation runs it as __main__); importable by tests
    main()
