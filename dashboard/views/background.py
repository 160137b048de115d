"""Background attention: which images does the model explain with something other than the object?

Ranks images by an attention score (background_hotspot by default when a foreground is known, otherwise the
annotation-free border_share / consensus_dissimilarity), flags those above a threshold, and shows them.
View state in the URL: score, threshold, class, view, bg_page.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from analysis.explore import statistics as explore
from analysis.present import charts
from analysis.cache import Cache
from analysis.cache.classes import class_names, num_classes
from dashboard import common, tagging

VIEWS = {"overlay": "overlay", "map": "map only", "image": "image only"}
ALL_CLASSES = -1


@st.cache_data(show_spinner="Comparing each map with its class consensus ...", max_entries=4)
def consensus_scores(_cache: Cache, key: str) -> np.ndarray:
    """consensus_dissimilarity of every row of the table (descriptors of all images: [n, D*D], small)."""
    table = _cache.table
    return explore.consensus_dissimilarity(_cache.descriptors(None, "positive"), table["pred"].to_numpy(),
                                           table["correct"].to_numpy(), num_classes(_cache))


def scored_table(cache: Cache) -> pd.DataFrame:
    table = cache.table
    return table.assign(consensus_dissimilarity=consensus_scores(cache, common.cache_key(cache)))


def why_this_score(table: pd.DataFrame, score: str, default: str) -> str:
    n_fg = int(table["has_foreground"].sum()) if "has_foreground" in table.columns else 0
    what = explore.SCORE_DESCRIPTIONS.get(score, score)
    if explore.has_foreground(table):
        reason = (f"The cache knows the object (mask or box) for **{n_fg:,} of {len(table):,}** images, so the "
                  f"default is `{default}`, which measures attention off the object directly.")
    else:
        reason = ("The cache has **no foreground** (no masks or boxes were given to the job), so attention off "
                  "the object cannot be measured directly; the page uses annotation-free scores instead: the "
                  "relevance in the image border, and how unlike its class's usual map an image's map is.")
    chosen = "" if score == default else f" You chose `{score}` instead of the default `{default}`."
    return f"Ranked by **`{score}`**: {what}. {reason}{chosen}"


def choose_settings(table: pd.DataFrame, names: list[str]) -> tuple[str, float, int, str]:
    """The score (its default: the best available), the flagging threshold, the true class and the tiles'
    kind, URL-bound; returns (score, threshold, class or ALL_CLASSES, view)."""
    scores = explore.available_attention_scores(table)
    default = scores[0]
    left, middle, right = st.columns([2, 2, 1])
    score = common.url_selectbox(
        "Score", scores, "bg_score", default, param="score", where=left,
        format_func=lambda s: f"{s} ({'needs a foreground' if s in explore.FOREGROUND_SCORES else 'annotation-free'})")
    st.markdown(why_this_score(table, score, default))

    values = table[score].to_numpy(np.float64)
    upper = float(max(1.0, np.nanmax(values))) if np.isfinite(values).any() else 1.0
    threshold_default = explore.default_flag_threshold(values)
    threshold = middle.slider("Flag images with a score of at least", 0.0, upper,
                              value=common.query_value("threshold", threshold_default, float, low=0.0, high=upper),
                              step=0.01, key=f"bg_threshold_{score}")
    common.set_query(threshold=f"{threshold:.2f}" if abs(threshold - threshold_default) > 1e-9 else None)
    class_options = [ALL_CLASSES] + sorted(int(c) for c in table["label"].unique())
    chosen_class = common.url_selectbox("True class", class_options, "bg_class", ALL_CLASSES, param="class",
                                        where=middle,
                                        format_func=lambda c: "all classes" if c == ALL_CLASSES else names[c])
    view = common.url_radio("Tiles", list(VIEWS), "bg_view", "overlay", VIEWS.get, param="view", where=right)
    return score, threshold, chosen_class, view


def show_counts(table: pd.DataFrame, flagged: pd.DataFrame, in_scope: pd.DataFrame, score: str,
                threshold: float) -> None:
    """How many images are flagged, and the score's distribution overall and per class."""
    values = table[score].to_numpy(np.float64)
    missing = int(table[score].isna().sum())
    a, b, c = st.columns(3)
    a.metric("Flagged images", f"{len(flagged):,}", help=f"{score} ≥ {threshold:.2f}")
    b.metric("Share of scored images", f"{len(flagged) / max(1, len(in_scope)):.1%}")
    c.metric("Images without this score", f"{missing:,}",
             help="no foreground known for them" if score in explore.FOREGROUND_SCORES else "map without positive relevance")

    chart_left, chart_right = st.columns(2)
    finite = values[np.isfinite(values)]
    with chart_left:
        common.altair_chart(charts.histogram_chart(charts.histogram_frame(finite, bins=30), f"{score}, all images",
                                                   threshold=threshold, width=380, height=220), width="content")
    with chart_right:
        common.altair_chart(charts.class_score_chart(charts.class_score_frame(table, score), score,
                                                     threshold=threshold), width="content")


def show_flagged(cache: Cache, flagged: pd.DataFrame, score: str, threshold: float, view: str) -> None:
    """The flagged images, highest score first: filter by tag, gallery, tag them all, download them."""
    st.subheader(f"Flagged images, highest {score} first")
    if view == "overlay":
        st.caption("Red: relevance for the predicted class, blue: against it. Green outline: the object "
                   "(mask or box), where known.")
    score_of = dict(zip(flagged["id"].to_numpy(), flagged[score].to_numpy()))
    rows = flagged.set_index("id")
    shown = tagging.tag_filter(cache, flagged["id"].tolist(), key="bg", container=st.columns([2, 3])[0])
    common.gallery(cache, shown, key="bg", kind=view,
                   captions=tagging.captions_with_tags(
                       cache, shown, lambda i: (f"#{i} {rows.at[i, 'label_name']}→{rows.at[i, 'pred_name']} "
                                                f"{score_of[i]:.2f}")))
    if shown:
        tagging.tag_controls(cache, shown, key="bg_tagging",
                             what=f"the {len(shown):,} image{'s' if len(shown) != 1 else ''} of this gallery "
                                  "(every page)")
    if len(flagged):
        export = tagging.with_tags_column(
            cache, flagged[["id", "path", "label_name", "pred_name", "confidence", "correct", score]])
        common.csv_download("Download the flagged images (CSV)", export, f"background_{score}_{threshold:.2f}.csv",
                            key="bg_csv")


def main() -> None:
    cache = common.get_cache()
    table = scored_table(cache)
    st.title("Background attention")
    score, threshold, chosen_class, view = choose_settings(table, class_names(cache))
    classes = None if chosen_class == ALL_CLASSES else [chosen_class]
    in_scope = explore.rank_by_score(table, score, classes=classes)
    flagged = explore.rank_by_score(table, score, threshold=threshold, classes=classes)
    show_counts(table, flagged, in_scope, score, threshold)
    show_flagged(cache, flagged, score, threshold, view)


if __name__ == "__main__":   # run as a page (st.navigation runs it as __main__); importable by tests
    main()
