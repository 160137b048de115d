"""Per-class maps: where, on average, does the model look for each class?

Each class gets its mean image (a sample of its images) beside the mean map of its correctly and of its
wrongly classified images (every image's positive map scaled to unit mass, so each image counts once). The mean
maps are read from CACHE/analysis/class_maps.parquet, which `python -m analysis cluster` streams through the
cache shard by shard (analysis.explore.cluster_offline.compute_class_aggregates): the page never reads every map.
Opening a class (?class=K) shows bigger maps and its images. View state in the URL: class, show, pc_page, pc_tag.
"""
from __future__ import annotations

import numpy as np
import streamlit as st

from analysis.explore import cluster_offline, statistics as explore
from analysis.present import overlay
from analysis.present.tiles import mean_model_view
from analysis.cache import Cache
from analysis.cache.derived import CLASS_MAPS, missing
from analysis.cache.classes import class_names
from dashboard import common, tagging

MEAN_IMAGE_SAMPLE = 64     # images averaged into a class's mean image (read from disk once, then cached)
GRID_TILE = 96
OPEN_TILE = 256
GRID_COLUMNS = 3           # classes per row of the grid
GRID_CLASSES_PER_PAGE = 24
SHOW = {"all": "all images", "correct": "correct only", "wrong": "wrong only"}


def class_maps_stamp(cache: Cache) -> tuple:
    """Changes when the cluster command (re)writes the per-class aggregates, so an open page picks them up."""
    path = cluster_offline.results_root(cache.root) / cluster_offline.CLASS_MAPS_FILE
    return common.cache_key(cache), path.stat().st_mtime_ns if path.exists() else None


@st.cache_data(show_spinner="Reading the mean maps of each class ...", max_entries=4)
def mean_maps(_cache: Cache, key: tuple) -> explore.ClassMeanMaps | None:
    """The stored per-class mean maps (None when the cluster command has not stored them for the cache as it is
    now)."""
    aggregates = cluster_offline.read_class_aggregates(_cache)
    return None if aggregates is None else aggregates.maps


@st.cache_data(show_spinner="Averaging the images of each class ...", max_entries=64)
def class_mean_image(_cache: Cache, key: tuple, label: int, size: int) -> np.ndarray:
    """Pixel mean of what the model saw of a seeded sample of the class's images (analysis.present.tiles.mean_model_view); a
    placeholder when none can be read."""
    rows = _cache.columns(["id", "label"])
    ids = rows.loc[rows["label"] == label, "id"].to_numpy()
    ids = ids[explore.sample_rows(len(ids), MEAN_IMAGE_SAMPLE, seed=label)]
    mean = mean_model_view(_cache, ids, size)
    return mean if mean is not None else overlay.placeholder(size, "no image")


def map_tile(mean_map: np.ndarray, count: int, size: int) -> np.ndarray:
    if count == 0 or not np.isfinite(mean_map).all():
        return overlay.placeholder(size, "no image")
    return overlay.heat(mean_map, size)


@st.cache_data(show_spinner="Drawing the grid ...", max_entries=4)
def grid_png(_cache: Cache, key: tuple, classes: tuple[int, ...]) -> bytes:
    """The grid as one PNG: per class, mean image | correct mean map | wrong mean map."""
    cache, names, means = _cache, class_names(_cache), mean_maps(_cache, key)
    tiles, captions = [], []
    for label in classes:
        tiles += [class_mean_image(cache, common.cache_key(cache), label, GRID_TILE * 2),
                  map_tile(means.correct[label], int(means.n_correct[label]), GRID_TILE * 2),
                  map_tile(means.wrong[label], int(means.n_wrong[label]), GRID_TILE * 2)]
        name = names[label]
        captions += [f"{name}: mean image", f"correct (n={means.n_correct[label]})",
                     f"wrong (n={means.n_wrong[label]})"]
    return overlay.png_bytes(overlay.image_grid(tiles, captions, columns=3, caption_height=20))


def open_class(label: int | None) -> None:
    """Button callback (runs before the page, so the class selector may still be set): open a class, or the
    grid for None."""
    st.session_state["pc_class"] = label
    common.set_query(**{"class": label, "show": None, "pc_page": None})


def show_grid(cache: Cache, means: explore.ClassMeanMaps, names: list[str], classes: list[int]) -> None:
    st.caption("Per class: the mean image, then the mean map of the correctly and of the wrongly classified "
               "images (white: no relevance, dark red: most). Click a class to open it.")
    for start in range(0, len(classes), GRID_COLUMNS):
        for column, label in zip(st.columns(GRID_COLUMNS), classes[start:start + GRID_COLUMNS]):
            with column, st.container(border=True):
                name = names[label]
                n_ok, n_bad = int(means.n_correct[label]), int(means.n_wrong[label])
                total = n_ok + n_bad
                st.markdown(f"**{name}** · {total:,} images, {n_ok / max(1, total):.0%} correct")
                a, b, c = st.columns(3)
                a.image(class_mean_image(cache, common.cache_key(cache), label, GRID_TILE), caption="mean image",
                        width="stretch")
                b.image(map_tile(means.correct[label], n_ok, GRID_TILE), caption=f"correct ({n_ok})",
                        width="stretch")
                c.image(map_tile(means.wrong[label], n_bad, GRID_TILE), caption=f"wrong ({n_bad})",
                        width="stretch")
                st.button(f"Open {name}", key=f"open_{label}", icon=":material/open_in_full:",
                          on_click=open_class, args=(label,))


def show_class(cache: Cache, means: explore.ClassMeanMaps, names: list[str], label: int) -> None:
    name = names[label]
    n_ok, n_bad = int(means.n_correct[label]), int(means.n_wrong[label])
    st.subheader(f"Class {name}")
    a, b, c = st.columns(3)
    a.image(class_mean_image(cache, common.cache_key(cache), label, OPEN_TILE),
            caption=f"mean of up to {MEAN_IMAGE_SAMPLE} images", width=OPEN_TILE)
    b.image(map_tile(means.correct[label], n_ok, OPEN_TILE), caption=f"mean map, correct ({n_ok} images)",
            width=OPEN_TILE)
    c.image(map_tile(means.wrong[label], n_bad, OPEN_TILE),
            caption=f"mean map of the prediction, wrong ({n_bad} images)", width=OPEN_TILE)
    show = common.url_radio("Images", list(SHOW), "pc_show", "all", SHOW.get, param="show", horizontal=True)
    rows = cache.columns(["id", "label", "pred_name", "correct", "confidence"])
    rows = rows[rows["label"] == label]
    if show != "all":
        rows = rows[rows["correct"] == (show == "correct")]
    rows = rows.sort_values(["correct", "confidence"], ascending=[True, False], kind="stable")
    by_id = rows.set_index("id")
    shown = tagging.tag_filter(cache, rows["id"].tolist(), key="pc", container=st.columns([2, 3])[0])
    common.gallery(cache, shown, key="pc", kind="overlay", captions=tagging.captions_with_tags(
        cache, shown, lambda i: f"#{i} → {by_id.at[i, 'pred_name']} ({by_id.at[i, 'confidence']:.0%})"))
    if shown:
        tagging.tag_controls(cache, shown, key="pc_tagging",
                             what=f"the {len(shown):,} image{'s' if len(shown) != 1 else ''} of this gallery "
                                  "(every page)")


def main() -> None:
    cache = common.get_cache()
    names = class_names(cache)
    st.title("Per-class maps")
    means = mean_maps(cache, class_maps_stamp(cache))
    if means is None:
        stale = (cluster_offline.results_root(cache.root) / cluster_offline.CLASS_MAPS_FILE).exists()
        common.show_missing(missing(CLASS_MAPS, cache.root, "stale" if stale else "missing",
                                    note="The explain job runs it at its end."))
        st.stop()
    classes = [int(c) for c in np.nonzero(means.n_correct + means.n_wrong)[0]]   # the true classes present

    options = [None] + classes
    chosen = st.selectbox("Class", options, format_func=lambda c: "all classes (grid)" if c is None else
                          names[c], index=options.index(common.query_value("class", None, int, classes)),
                          key="pc_class")
    common.set_query(**{"class": chosen})
    if chosen is None:
        # a 1,000-class model: draw a page of classes at a time
        shown = common.paginate(classes, GRID_CLASSES_PER_PAGE, "pc_grid_page", "Page of classes (of {pages})")
        common.png_download("Download this grid (PNG)", grid_png(cache, class_maps_stamp(cache), tuple(shown)),
                            "per_class_maps.png", key="pc_png")
        show_grid(cache, means, names, shown)
    else:
        st.button("Back to all classes", icon=":material/arrow_back:", key="pc_back", on_click=open_class,
                  args=(None,))
        show_class(cache, means, names, chosen)


if __name__ == "__main__":   # run as a page (st.navigation runs it as __main__); importable by tests
    main()
