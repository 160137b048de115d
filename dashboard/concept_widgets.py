"""Concept tiles and an image's top concepts (issue 15): shared by the Concepts page and, for "an image's top
concepts with their maps", the Image page (`image_concepts(cache, image_id)`). The tiles are drawn by
analysis.present.tiles (`model_frame`, `concept_tile`); this module loads and lays them out.

A concept is a CAM-layer channel (analysis/explore/concepts.py). Its map on an image is FG-CAM carrying that channel's
component alone down to the cache's target layer: read from CACHE/analysis/concepts/ for the reference images,
computed with the cache's model for any other image (one forward run for the image's top channels).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from analysis.cache import Cache
from analysis.cache.derived import CONCEPTS, missing
from analysis.explore.concepts import Concepts, ConceptsError, read_concepts
from analysis.present.tiles import CONCEPT_TILE, concept_tile, model_frame
from dashboard import common

TILE = CONCEPT_TILE


@st.cache_resource(show_spinner="Reading the concepts ...", max_entries=2)
def cached_concepts(_cache: Cache, key: str) -> Concepts | None:
    return read_concepts(_cache)


def concepts_or_message(cache: Cache) -> Concepts | None:
    """The stored concepts, or None after saying on the page why there are none (never raises)."""
    try:
        concepts = cached_concepts(cache, f"{cache.identity}:{_folder_token(cache)}")
    except ConceptsError as error:
        reason = str(error).replace(str(cache.root), "the cache")
        common.show_missing(missing(CONCEPTS, cache.root, "unreadable", reason))
        return None
    if concepts is None:
        has_relevance = cache.channel_relevance([int(cache.ids[0])]) is not None
        common.show_missing(missing(CONCEPTS, cache.root, note="" if has_relevance else (
            "This cache was made before the job stored each channel's relevance: re-run `python -m analysis explain` "
            "with `--overwrite` first.")))
        return None
    if concepts.stale:
        common.show_missing(missing(CONCEPTS, cache.root, "stale", "computed for an earlier state of the cache: it was "
                                    "resumed or overwritten since"))
    return concepts


def _folder_token(cache: Cache) -> str:
    from analysis.explore.concepts import concepts_dir

    meta = concepts_dir(cache.root) / "meta.json"
    return str(meta.stat().st_mtime_ns) if meta.exists() else "none"


def reference_tiles(cache: Cache, concepts: Concepts, rows: Any, crop: bool = True, size: int = TILE
                    ) -> list[np.ndarray]:
    """Tiles of rows of ``concepts.references`` (each an image with the concept's stored map)."""
    frame_side = max(size, 2 * int(concepts.maps.shape[-1]))
    return [concept_tile(model_frame(cache, int(row["id"]), frame_side), concepts.concept_map(row),
                         (row["x0"], row["y0"], row["x1"], row["y1"]), size=size, crop=crop)
            for _, row in rows.iterrows()]


# ------------------------------------------------------------------------------------------------ live maps
@st.cache_resource(show_spinner="Loading the cache's model for the concept maps ...", max_entries=2)
def cached_explainer(_cache: Cache, key: str) -> tuple[Any, Any]:
    from analysis.explore.concepts import concept_explainer

    return concept_explainer(_cache)


@st.cache_data(show_spinner="Computing the concept maps ...", max_entries=64)
def live_concept_maps(_cache: Cache, key: str, image_id: int, channels: tuple[int, ...], class_index: int
                      ) -> dict[int, np.ndarray]:
    from analysis.explore.concepts import concept_maps

    loaded, explainer = cached_explainer(_cache, key)
    maps = concept_maps(_cache, loaded, explainer, [(image_id, list(channels))], _cache.map_size,
                        classes={image_id: class_index})
    return {k: maps[(image_id, k)] for k in channels}


def image_concepts(cache: Cache, image_id: int, which: str = "pred", top: int = 3, size: int = TILE) -> None:
    """An image's top concepts (channels by relevance for the predicted or the true class) with their share of
    the image's evidence and their maps. For the Image page; never raises (a message instead)."""
    from analysis.cache.channels import relevance_share
    from analysis.explore.concepts import ConceptSettings, region_box

    image_id = int(image_id)
    relevance = cache.channel_relevance([image_id], which=which)
    if relevance is None:
        st.caption("No channel relevance in this cache (made before it was stored): re-run the job to see the "
                   "image's concepts.")
        return
    row = cache.columns(["id", "pred", "label"]).set_index("id").loc[image_id]
    class_index = int(row["pred"] if which == "pred" else row["label"])
    shares = relevance_share(relevance)[0]
    chosen = [int(k) for k in np.argsort(-relevance[0], kind="stable")[:top] if relevance[0][k] > 0]
    if not chosen:
        st.caption("No channel holds positive evidence for this class on this image.")
        return
    try:
        # keyed by the cache's folder and state: a copy with another manifest (another model path) loads its own
        maps = live_concept_maps(cache, common.cache_key(cache), image_id, tuple(chosen), class_index)
    except Exception as error:   # the model cannot be loaded here: the shares alone, and why
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        st.caption(f"Concept maps need the cache's model ({type(error).__name__}: "
                   f"{first.replace(str(cache.root), 'the cache')}).")
        maps = {}
    frame = model_frame(cache, image_id, max(size, 2 * cache.map_size))
    for column, k in zip(st.columns(len(chosen)), chosen):
        caption = f"concept #{k}: {shares[k]:.0%} of the evidence"
        if k in maps:
            column.image(concept_tile(frame, maps[k], region_box(maps[k], ConceptSettings().region_side), size=size,
                                      crop=False),
                         caption=caption, width="stretch")
        else:
            column.caption(caption)
        concept_link(column, k)


def concept_link(container: Any, channel: int) -> None:
    """A link to the Concepts page of one concept; a plain caption where that page is not in the app (a page
    link to an unregistered page raises)."""
    from streamlit.errors import StreamlitAPIException

    try:
        container.page_link("views/concepts.py", label=f"Concept #{channel}", query_params={"concept": str(channel)},
                            icon=":material/arrow_forward:")
    except StreamlitAPIException:
        container.caption(f"Concept #{channel} (Concepts page, ?concept={channel})")
