"""Compare: this cache (A) against a second cache of the same images (B, `--compare DIR2`): before and after a
fix, or two models. Shown only when the app was started with --compare.

The page shows what analysis.findings.compare measures: each finding of A and what became of its images in B
(with A's and B's maps of a few of them side by side), accuracy and score changes per class, the images whose
prediction changed, and the findings new in B. Caches of other datasets are refused in one line.
"""
from __future__ import annotations

import streamlit as st

from analysis.cache import Cache
from analysis.findings.compare import CachesNotComparable, Comparison, FindingFate, compare_caches
from dashboard import common

TILES = 4
VERDICT_COLOURS = {"shortcut": "red", "undecided": "orange", "observation": "blue", "gone": "green"}


@st.cache_data(show_spinner="Comparing the two caches ...", max_entries=2)
def comparison_of(_a: Cache, _b: Cache, key: str) -> Comparison:
    """The comparison of A and B (`key`: both caches' keys, so a changed cache computes it again)."""
    return compare_caches(_a, _b)


def show_fate(a: Cache, b: Cache, number: int, fate: FindingFate) -> None:
    before = VERDICT_COLOURS.get(fate.finding.verdict, "gray")
    after = VERDICT_COLOURS.get(fate.verdict_b, "gray")
    with st.container(border=True):
        st.markdown(f"#### {number}. {fate.finding.title}  :{before}-badge[A: {fate.finding.verdict}] "
                    f":{after}-badge[B: {fate.verdict_b}]")
        st.caption(f"In A: {fate.finding.text()}")
        st.markdown(fate.text())
        pairs = fate.examples[:TILES]
        if not pairs:
            return
        names_a = a.columns(["id", "label_name", "pred_name"]).set_index("id")
        names_b = b.columns(["id", "pred_name"]).set_index("id")
        tiles_a = common.tiles_for(a, [i for i, _ in pairs], kind="overlay")
        tiles_b = common.tiles_for(b, [j for _, j in pairs], kind="overlay")
        left, right = st.columns(2)
        for side, label, tiles, captions in (
                (left, "A", tiles_a, [common.image_caption(i, names_a.at[i, 'label_name'], names_a.at[i, 'pred_name'])
                                      for i, _ in pairs]),
                (right, "B", tiles_b, [common.image_caption(j, names_a.at[i, 'label_name'], names_b.at[j, 'pred_name'])
                                       for i, j in pairs])):
            side.markdown(f"**{label}**" + (" · changed predictions first" if label == "A" else ""))
            for column, tile, caption in zip(side.columns(TILES), tiles, captions):
                column.image(tile, caption=caption, width="stretch")


def show_tables(comparison: Comparison) -> None:
    st.subheader("Per class")
    st.caption("By true label; change = B − A.")
    shown = [c for c in comparison.classes.columns
             if c in ("class", "images") or c.startswith(("accuracy", "confidence"))]
    st.dataframe(comparison.classes[shown].round(3), hide_index=True, width="stretch")
    with st.expander("Mean explanation scores per class"):
        st.dataframe(comparison.classes.round(3), hide_index=True, width="stretch")


def main() -> None:
    a = common.get_cache()
    st.title("Compare")
    b, problem = common.open_compare_or_problem()
    if b is None:
        st.error(problem)
        return
    try:
        comparison = comparison_of(a, b, f"{common.cache_key(a)}||{common.cache_key(b)}")
    except CachesNotComparable as error:
        st.error(common.without_paths(str(error)))
        return
    st.caption(f"A: `{comparison.root_a.name}` · B: `{comparison.root_b.name}` · images matched by their path")
    for line in comparison.summary():
        st.markdown(line)
    st.subheader("The findings of A, in B")
    if not comparison.fates:
        st.info("A has no finding.")
    for number, fate in enumerate(comparison.fates, 1):
        show_fate(a, b, number, fate)
    show_tables(comparison)
    st.subheader(f"Predictions that changed ({len(comparison.changed):,})")
    st.dataframe(comparison.changed.round(3), hide_index=True, width="stretch")
    common.csv_download("Download as CSV", comparison.changed, "changed_predictions.csv", key="compare_changed")
    st.subheader("New in B")
    if not comparison.new_in_b:
        st.markdown("No finding of B is new.")
    for finding in comparison.new_in_b:
        st.markdown(f"**{finding.title}** :{VERDICT_COLOURS.get(finding.verdict, 'gray')}-badge[{finding.verdict}] "
                    f"{finding.text()}")


if __name__ == "__main__":   # run as a page (st.navigation runs it as __main__); importable by tests
    main()
