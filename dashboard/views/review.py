"""Find more like these: pick a tag, rank every other image by how much its explanation resembles the tagged
ones (a linear probe on the cached descriptors, `analysis.review.probe`, as Reveal-to-Revise does), accept or reject
the top of the ranking, and the probe is fitted again on the next run. Also the tags in use with their counts,
and the tagged list as a download (the same as `python -m analysis export`).

View state in the URL: fm_tag, fm_top, fm_page.
"""
from __future__ import annotations

import json
import math

import pandas as pd
import streamlit as st

from analysis.review import tag_views
from analysis.cache import Cache
from analysis.review import Review, ReviewError, tagged_table
from dashboard import common, tagging

TOP = 12
COLUMNS = 6


def _decide(review: Review, image_ids: list[int], tag: str, accept: bool) -> None:
    """Button callback: accept images into the tag, or reject them (a negative for the next fit)."""
    try:
        if accept:
            review.tag(image_ids, tag, who=tagging.who())
        else:
            review.reject(image_ids, tag, who=tagging.who())
        st.session_state.pop("fm_error", None)
    except (ValueError, ReviewError) as error:
        st.session_state["fm_error"] = str(error).splitlines()[0]


@st.cache_data(show_spinner="Fitting the probe and ranking every image ...", max_entries=8)
def _candidates(_review: Review, state: str, tag: str, positives: tuple, rejected: tuple, top: int):
    """One round of find-more-like-these; refitted whenever the tagged or rejected images change (the key)."""
    return tag_views.find_more(_review, tag, top)


def _percent(value: float) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.2f}"


def show_tags(cache: Cache, review: Review) -> list[str]:
    """The tags in use with their counts, and the export of one of them (below the candidates: the loop is
    what this page is for); returns the tags in use."""
    counts = tag_views.tag_counts(review)
    st.subheader("Tags")
    if counts.empty:
        return []
    st.dataframe(counts, hide_index=True, key="fm_counts")
    tags = counts["tag"].tolist()
    left, right = st.columns([2, 3], vertical_alignment="bottom")
    export_tag = left.selectbox("Export the images tagged", tags, key="fm_export_tag")
    frame = tagged_table(review, export_tag)
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in export_tag)
    with right:
        a, b = st.columns(2)
        with a:
            common.csv_download(f"Download “{export_tag}” (CSV)", frame, f"tagged_{name}.csv", key="fm_export_csv")
        b.download_button(f"Download “{export_tag}” (JSON)",
                          (json.dumps(frame.to_dict("records"), indent=1, ensure_ascii=False, default=str) + "\n")
                          .encode(), file_name=f"tagged_{name}.json", mime="application/json",
                          icon=":material/download:", key="fm_export_json")
    st.caption(f"The same list as `{common.analysis_command(cache, 'export', '--tag', export_tag)}` "
               "(add `--format folder --out DIR` for an ImageFolder of links, ready for relabelling).")
    return tags


def find_more(cache: Cache, review: Review, tags: list[str]) -> None:
    if not tags:
        return
    left, right, _ = st.columns([2, 1, 2])
    tag = common.url_selectbox("Tag", tags, "fm_tag", tags[0], where=left)
    top = int(right.number_input("Candidates to show", 1, 96, key="fm_top",
                                 value=common.query_value("fm_top", TOP, int, low=1, high=96)))
    common.set_query(fm_top=top if top != TOP else None)
    try:
        candidates = _candidates(review, common.cache_key(cache), tag,
                                 tuple(review.ids(tag).tolist()), tuple(review.rejected(tag).tolist()), top)
    except ValueError as error:
        st.info(str(error).splitlines()[0])
        return
    show_probe(candidates, tag)
    error = st.session_state.pop("fm_error", None)
    if error:
        st.error(error)
    if candidates.empty:
        st.info("Every image is tagged or rejected: nothing left to rank.")
        return
    show_candidates(cache, review, candidates, tag)
    show_tagged(cache, review, tag)


def show_probe(candidates: pd.DataFrame, tag: str) -> None:
    """How well the probe separates the tagged images so far (cross-validated), and what it was fitted on."""
    probe = candidates.attrs.get("probe", {})
    a, b, c, d = st.columns(4)
    a.metric("Separation (cv ROC AUC)", _percent(probe.get("cv_roc_auc")),
             help="How well the probe tells held-out tagged images from the rest (cross-validated): 0.5 is chance, "
                  "1 perfect. Needs at least two tagged images.")
    b.metric("Average precision (cv)", _percent(probe.get("cv_average_precision")),
             help=f"Tagged against every negative; chance {_percent(probe.get('chance'))}. A lower bound: "
                  "untagged images of the same kind count as misses.")
    c.metric("Tagged", f"{probe.get('positives', 0):,}")
    d.metric("Rejected", f"{probe.get('rejected', 0):,}")
    st.caption("A class-balanced linear probe on the explanation descriptors, fitted on the "
               f"{probe.get('positives', 0):,} images tagged “{tag}” against the rejected ones and a sample of the rest; "
               f"{candidates.attrs.get('ranked', 0):,} untagged images ranked. Accept (✓) or reject (✗) the "
               "candidates: the probe is fitted again with them.")


def show_candidates(cache: Cache, review: Review, candidates: pd.DataFrame, tag: str) -> None:
    """The top of the ranking, each with accept / reject buttons, and buttons for all of them."""
    ids = candidates["id"].tolist()
    decide = not common.read_only()      # a read-only dashboard shows the ranking without its buttons
    everyone = st.columns(4)
    if decide:
        everyone[0].button(f"Accept all {len(ids)}", key="fm_accept_all", on_click=_decide,
                           args=(review, ids, tag, True), icon=":material/done_all:", width="stretch")
        everyone[1].button(f"Reject all {len(ids)}", key="fm_reject_all", on_click=_decide,
                           args=(review, ids, tag, False), icon=":material/block:", width="stretch")
    tiles = common.tiles_for(cache, ids, kind="overlay")
    common.placement_notice(cache, ids)
    rows = candidates.set_index("id")
    for start in range(0, len(ids), COLUMNS):
        row_ids, row_tiles = ids[start:start + COLUMNS], tiles[start:start + COLUMNS]
        for column, image_id, tile in zip(st.columns(COLUMNS), row_ids, row_tiles):
            row = rows.loc[image_id]
            with column, st.container(border=True):
                caption = common.image_caption(image_id, row["label_name"], row["pred_name"])
                st.image(tile, width="stretch", caption=f"{int(row['rank'])}. {caption} · score {row['score']:.2f}")
                if not decide:
                    continue
                yes, no = st.columns(2)
                yes.button("✓", key=f"fm_yes_{image_id}", on_click=_decide, args=(review, [image_id], tag, True),
                           help=f"Accept into “{tag}”", width="stretch")
                no.button("✗", key=f"fm_no_{image_id}", on_click=_decide, args=(review, [image_id], tag, False),
                          help=f"Not “{tag}” (a negative for the next fit)", width="stretch")


def show_tagged(cache: Cache, review: Review, tag: str) -> None:
    with st.expander(f"The images tagged “{tag}”"):
        tagged = review.ids(tag).tolist()
        common.gallery(cache, tagged, key="fm", captions=tagging.captions_with_tags(cache, tagged))
        if tagged:
            tagging.tag_controls(cache, tagged, key="fm_tagging", default=tag,
                                 what=f"the {len(tagged):,} images tagged “{tag}”")


def main() -> None:
    cache = common.get_cache()
    st.title("Find more like these")
    review = tagging.get_review(cache)
    if review is None:
        st.info("Nothing is tagged yet. Tag images on the Image page or in a gallery (Mistakes, Background "
                "attention, Clusters), then come back here to find more like them.")
        return
    tags = tag_views.tag_counts(review)["tag"].tolist()
    if not tags:
        st.info("Nothing is tagged yet (every tag was removed). Tag images on the Image page or in a gallery, "
                "then come back here to find more like them.")
        return
    find_more(cache, review, tags)
    show_tags(cache, review)


if __name__ == "__main__":   # run as a page (st.navigation runs it as __main__); importable by tests
    main()
