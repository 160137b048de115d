"""Concepts: which CAM-layer channels carry a class's evidence, and where each one looks (issue 15).

A class (?class=NAME) -> its top concepts, each a row of reference crops (the images of the class where the
channel is most relevant, cut to the region its own FG-CAM map points to) with the share of the class's evidence
it carries, and the channels strong in few of its images (possible shortcuts). A concept (?concept=K) -> its
reference images over the whole cache with their concept maps, and the classes it serves. Computed offline by
`python -m analysis concepts` (analysis/explore/concepts.py); this page only reads.
"""
from __future__ import annotations

import streamlit as st

from analysis.cache import Cache
from analysis.cache.classes import class_names
from analysis.explore.concepts import Concepts
from dashboard import common
from dashboard.concept_widgets import TILE, concept_link, concepts_or_message, reference_tiles

COLUMNS = 8


def reference_row(cache: Cache, concepts: Concepts, channel: int, class_index: int, crop: bool) -> None:
    """One concept's reference images of a class as a row of tiles."""
    refs = concepts.references_of(channel, class_index)
    for column, tile, (_, ref) in zip(st.columns(COLUMNS), reference_tiles(cache, concepts, refs, crop=crop),
                                      refs.iterrows()):
        column.image(tile, caption=f"#{int(ref['id'])}", width="stretch")


def concept_heading(text: str, channel: int) -> None:
    head, link = st.columns([5, 1])
    head.markdown(text)
    concept_link(link, channel)


def show_class(cache: Cache, concepts: Concepts, names: list[str], channels: int) -> None:
    """A class -> its top concepts and the channels strong in few of its images."""
    classes_with = sorted(int(c) for c in concepts.classes["class"].unique())
    options = [names[c] for c in classes_with]   # class_names covers every predicted index
    if not options:
        st.info("No class has a concept with positive evidence.")
        return
    chosen = common.query_value("class", options[0], str, choices=options)
    picked = st.selectbox("Class (as predicted)", options, index=options.index(chosen), key="concepts_class")
    common.set_query(**{"class": picked if picked != options[0] else None})
    class_index = classes_with[options.index(picked)]
    crop = st.toggle("Crop to the concept's region", value=True, key="concepts_crop",
                     help="Cut each reference image to the region its concept map points to (outlined in green)")
    top = concepts.top_concepts(class_index)
    n_images = int(top["n_images"].iloc[0]) if len(top) else 0
    settings = concepts.meta["settings"]
    st.subheader(f"Top concepts of {picked}")
    st.caption(f"{n_images:,} images predicted {picked}; {channels:,} channels at "
               f"`{concepts.meta.get('cam_layer')}`. Share: the channel's mean relevance over the sum of the "
               "positive means (the class's evidence).")
    for _, row in top.iterrows():
        k = int(row["channel"])
        concept_heading(f"**Concept #{k}** · {row['share']:.0%} of the class's evidence · among the "
                        f"{settings['strong_rank']} strongest channels of {int(row['n_strong']):,} of its images"
                        + (" · :orange[strong in few images: a possible shortcut]" if row["possible_shortcut"]
                           else ""), k)
        reference_row(cache, concepts, k, class_index, crop)
    flagged = concepts.shortcuts(class_index)
    st.subheader("Strong in few images")
    st.caption(f"Channels among the {settings['strong_rank']} strongest of at least {settings['min_images']} but at "
               f"most {settings['max_prevalence']:.0%} of the class's images: a feature a few images share, such as "
               "an artefact. Those whose images are mostly mistakes come first: look at where their maps sit.")
    if flagged.empty:
        st.info("None in this class.")
    for _, row in flagged.iterrows():
        k = int(row["channel"])
        concept_heading(f"**Concept #{k}** · strong in {int(row['n_strong']):,} of {int(row['n_images']):,} "
                        f"images ({row['prevalence']:.0%}), holding {row['strong_share_mean']:.0%} of their "
                        f"evidence there on average · {row['mistake_share']:.0%} of them are mistakes", k)
        reference_row(cache, concepts, k, class_index, crop)


def show_concept(cache: Cache, concepts: Concepts, names: list[str], concept: int) -> None:
    """A concept -> its reference images over the whole cache with their concept maps, and the classes it serves."""
    st.page_link("views/concepts.py", label="All classes", icon=":material/arrow_back:")
    st.subheader(f"Concept #{concept}")
    serves = concepts.classes[concepts.classes["channel"] == concept]
    if not serves.empty:
        st.caption("; ".join(
            f"{'top concept' if r['kind'] == 'top' else 'strong in few images'} of "
            f"{names[int(r['class'])]} "
            f"({r['share']:.0%} of its evidence)" for _, r in serves.iterrows()))
    refs = concepts.references_of(concept, -1)
    if refs.empty:
        st.info("No image where this channel holds positive evidence.")
        return
    st.caption("The images where this channel is most relevant (for their predicted class), with its own "
               "FG-CAM map; the green box is the window where its positive relevance is densest.")
    table = cache.columns(["id", "pred", "label"]).set_index("id")
    tiles = reference_tiles(cache, concepts, refs, crop=False, size=2 * TILE)
    for start in range(0, len(refs), 4):
        for column, tile, (_, ref) in zip(st.columns(4), tiles[start:start + 4],
                                          list(refs.iterrows())[start:start + 4]):
            pred = int(table.at[int(ref["id"]), "pred"])
            column.image(tile, caption=f"#{int(ref['id'])}, predicted {names[pred]}", width="stretch")


def main() -> None:
    cache = common.get_cache()
    names = class_names(cache)
    st.title("Concepts")
    st.caption("A concept is one channel of the CAM layer: FG-CAM's map is the sum of the maps of its channels, so "
               "each channel's share of the evidence and its own map say what the model uses and where it looks "
               "(after Concept Relevance Propagation, Achtibat et al. 2023).")
    concepts = concepts_or_message(cache)
    if concepts is None:
        return
    known_concepts = sorted(int(k) for k in concepts.references["channel"].unique())
    concept = common.query_value("concept", None, int, choices=known_concepts)
    if st.query_params.get("concept") is not None and concept is None:
        st.warning("The link names a concept this cache has no reference images for; showing the classes instead.")
        common.set_query(concept=None)
    if concept is None:
        show_class(cache, concepts, names, int(concepts.meta.get("channels", 0)))
    else:
        show_concept(cache, concepts, names, concept)


if __name__ == "__main__":   # run as a page (st.navigation runs it as __main__); importable by tests
    main()
