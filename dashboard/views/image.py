"""Image: one image by id (?id=): the original, the map of the predicted class and, when the prediction is wrong,
the map of the true class, as overlays and as maps (each image with its own aspect ratio, the map on the region
the model saw); its scores; and its nearest neighbours in explanation space.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from analysis.cache import Cache
from analysis.cache.classes import class_names
from analysis.explore import statistics as explore
from analysis.present import overlay
from analysis.explore.concepts import concept_explainer
from analysis.explore.full_maps import full_resolution_maps
from analysis.pipeline.geometry import covers_image
from dashboard import common, tagging
from dashboard.concept_widgets import cached_explainer, image_concepts

VIEW_SIZE = 480    # long side of the big panels (the image keeps its aspect ratio)
NEIGHBOURS = 8
SCORES = ("confidence", "background_share", "background_hotspot", "border_share", "concentration",
          "deletion_auc", "insertion_auc")


@st.cache_data(show_spinner="Reading the descriptors ...", max_entries=2)
def _descriptors(_cache, key: str) -> np.ndarray:
    """Every image's positive descriptor, in table order (one read per cache state)."""
    return _cache.descriptors(None, "positive")


def choose_view(ids: np.ndarray) -> tuple[int, float, str]:
    """The image id (?id=, an unknown id falls back to the first), overlay opacity and colour map (URL-bound)."""
    known = set(ids.tolist())
    requested = common.query_value("id", int(ids[0]), int)
    if requested not in known:
        st.warning(f"There is no explained image with id {requested}; showing #{int(ids[0])}.")
        requested = int(ids[0])
    controls = st.columns([1, 1, 1, 2])
    with controls[0]:
        image_id = int(st.number_input("Image id", int(ids.min()), int(ids.max()), requested,
                                       key=f"img_id_{requested}"))
        if image_id not in known:
            st.caption(f"No image with id {image_id}; showing #{requested}.")
            image_id = requested
    with controls[1]:
        opacity = float(st.slider("Overlay opacity", 0.0, 1.0,
                                  common.query_value("opacity", 0.6, float, low=0.0, high=1.0), 0.05,
                                  key="img_opacity"))
    with controls[2]:
        colormaps = list(overlay.COLORMAPS)
        colormap = common.url_selectbox("Colour map", colormaps, "img_cmap", overlay.DEFAULT_COLORMAP, param="cmap")
    common.set_query(id=image_id, opacity=opacity if opacity != 0.6 else None)
    return image_id, opacity, colormap


@st.cache_resource(show_spinner="Loading the cache's model ...", max_entries=2)
def _map_explainer(_cache: Cache, key: str) -> tuple[Any, Any]:
    """The cache's model and an explainer that makes its maps as the job did (errors are not cached). The model
    is the one the concept maps load (concept_widgets.cached_explainer): one copy in memory for both."""
    loaded, explainer = cached_explainer(_cache, key)
    if not (_cache.manifest.get("options") or {}).get("denoise"):
        return loaded, explainer
    return concept_explainer(_cache, loaded, denoise=True)


@st.cache_data(show_spinner="Explaining the image at the model's input resolution ...", max_entries=32)
def _full_maps(_cache: Cache, key: str, image_id: int, classes: tuple[int, ...]) -> np.ndarray:
    loaded, explainer = _map_explainer(_cache, key)
    return full_resolution_maps(_cache, loaded, explainer, image_id, classes)


def shown_maps(cache: Cache, row: pd.Series, image_id: int) -> tuple[dict[str, np.ndarray] | None, str]:
    """The maps the panels draw ({"pred": map, "true": map}; None: the cached ones) and the line that says which:
    the image explained again at the model's input resolution when the cache's model loads here, else the
    cache's maps (--map-size) and why."""
    stored = f"{cache.map_size} x {cache.map_size}"
    classes = (int(row["pred"]),) if row["correct"] else (int(row["pred"]), int(row["label"]))
    try:
        maps = _full_maps(cache, common.cache_key(cache), int(image_id), classes)
    except Exception as error:  # the model cannot be loaded or run here: the cached maps, and why
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return None, (f":orange[Showing the cache's {stored} maps: the model could not explain the image again "
                      f"here ({type(error).__name__}: {first.replace(str(cache.root), 'the cache')}).]")
    height, width = maps.shape[1:]
    target = (cache.manifest.get("options") or {}).get("target_layer", "input")
    where = "the model's input resolution" if target == "input" else f"the resolution of layer {target}"
    return dict(zip(("pred", "true"), maps)), (f"Maps at {where}, {height} x {width}: the image explained again "
                                               f"with the cache's model (the cache stores them at {stored}).")


def show_panels(cache: Cache, row: pd.Series, image_id: int, opacity: float, colormap: str) -> None:
    """The original, the prediction's overlay and map, and the true class's when the prediction is wrong."""
    maps, which_maps = shown_maps(cache, row, image_id)
    render = dict(opacity=opacity, colormap=colormap, size=VIEW_SIZE, letterbox=False, style=overlay.PHOTO_STYLE)

    def tile(kind: str, which: str) -> np.ndarray:
        return common.tiles_for(cache, [image_id], kind, which, maps=None if maps is None else [maps[which]],
                                **render)[0]

    panels = [("original", common.tiles_for(cache, [image_id], "image", size=VIEW_SIZE, letterbox=False)[0]),
              (f"FG-CAM for the prediction ({row['pred_name']})", tile("overlay", "pred")),
              ("map (prediction)", tile("map", "pred"))]
    if not row["correct"]:
        panels += [(f"FG-CAM for the true class ({row['label_name']})", tile("overlay", "true")),
                   ("map (true class)", tile("map", "true"))]
    for column, (caption, image) in zip(st.columns(len(panels)), panels):
        with column:
            st.image(image, caption=caption, width="stretch")
    st.caption(which_maps)
    st.caption(f"Red: evidence for the class, blue: against it, on the photo in grey (symmetric scale per map, full "
               f"colour from the {overlay.PHOTO_STYLE.percentile:g}th percentile of |relevance| up). A green line "
               "outlines the object when the cache knows its mask or box.")
    show_placement(cache, image_id)


def show_placement(cache: Cache, image_id: int) -> None:
    """One line: which region of the image the model saw, at which input size and aspect change."""
    geometry = cache.geometry(image_id)
    if not geometry["known"]:
        common.placement_notice(cache, [image_id])
        return
    x0, y0, x1, y1 = geometry["crop_box"]
    width, height = geometry["width"], geometry["height"]
    if covers_image(geometry["crop_box"], width, height, tolerance=0.5):
        where = f"the whole {width} x {height} image"
    else:
        padded = x0 < -0.5 or y0 < -0.5 or x1 > width + 0.5 or y1 > height + 0.5
        where = (f"the region x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f} of this {width} x {height} image (outlined; "
                 f"the rest is dimmed: the model never saw it{', and saw padding beyond the image' if padded else ''})")
    size, aspect = geometry["input_size"], geometry["aspect_change"]
    stretch = "" if aspect is None or abs(aspect - 1) < 0.01 else \
        f"; its aspect ratio changed: width scaled {aspect:.2f} times as much as height"
    st.caption(f"The model saw {where}" + (f" as a {size[0]} x {size[1]} input" if size else "") + stretch + ".")


def show_scores(table: pd.DataFrame, row: pd.Series, names: list[str]) -> None:
    st.subheader("Scores")
    present = [s for s in SCORES if s in table.columns and pd.notna(row[s])]
    for column, score in zip(st.columns(max(1, len(present))), present):
        column.metric(score.replace("_", " "), f"{row[score]:.3f}", help=explore.SCORE_DESCRIPTIONS.get(score))
    top5 = pd.DataFrame({"class": [names[int(c)] if 0 <= int(c) < len(names) else str(c)
                                   for c in row["top5_classes"]],
                         "probability": np.asarray(row["top5_probs"], np.float64)})
    st.dataframe(top5, hide_index=True, column_config={
        "probability": st.column_config.ProgressColumn("probability", format="percent", min_value=0, max_value=1)})


def show_neighbours(cache: Cache, image_id: int, opacity: float, colormap: str) -> None:
    """The images whose maps point the same way, each a button that opens it here."""
    table = cache.table
    ids = table["id"].to_numpy(np.int64)
    st.subheader("Nearest neighbours in explanation space")
    st.caption("Images whose (positive, unit-mass) maps point the same way: cosine distance of the descriptors.")
    position = int(np.searchsorted(ids, image_id))
    rows, distances = explore.nearest_neighbours(_descriptors(cache, common.cache_key(cache)), position, NEIGHBOURS)
    if len(rows) == 0:
        st.info("This map has no positive relevance, so it has no direction to compare.")
        return
    neighbour_ids = ids[rows]
    neighbours = table.set_index("id").loc[neighbour_ids]
    tiles = common.tiles_for(cache, neighbour_ids, "overlay", "pred", opacity=opacity, colormap=colormap)
    for column, neighbour, tile, distance in zip(st.columns(len(neighbour_ids)), neighbour_ids, tiles, distances):
        info = neighbours.loc[neighbour]
        with column:
            st.image(tile, width="stretch")
            # A button writing ?id= rather than st.page_link: a page link to the page itself shows the new image
            # but leaves the old id in the browser's address bar (Streamlit 1.67), which breaks copied links.
            st.button(common.image_caption(int(neighbour), info["label_name"], info["pred_name"]),
                      key=f"neighbour_{neighbour}",
                      on_click=common.set_query, kwargs={"id": int(neighbour)}, icon=":material/open_in_new:",
                      width="stretch")
            st.caption(f"distance {distance:.3f}" + ("" if info["correct"] else " · wrong"))


def main() -> None:
    cache = common.get_cache()
    table = cache.table
    st.title("Image")
    image_id, opacity, colormap = choose_view(table["id"].to_numpy(np.int64))
    row = table.loc[table["id"] == image_id].iloc[0]
    st.markdown(f"**#{image_id}** `{row['path']}` · true **{row['label_name']}**, predicted **{row['pred_name']}** "
                f"({row['confidence']:.1%}) · {':green[correct]' if row['correct'] else ':red[wrong]'}")
    show_panels(cache, row, image_id, opacity, colormap)
    st.subheader("Tags")
    tagging.image_tags(cache, image_id, key="img")
    st.subheader("Concepts")
    st.caption("The CAM-layer channels that carry most of this image's evidence for the prediction, each with its own "
               "map (the Concepts page has their reference images).")
    image_concepts(cache, image_id, which="pred")
    show_scores(table, row, class_names(cache))
    show_neighbours(cache, image_id, opacity, colormap)


if __name__ == "__main__":   # run as a page (st.navigation runs it as __main__); importable by tests
    main()
