"""Image tiles for people, from a cache: gallery tiles of images with their maps (`image_tiles`), what the model
saw of a set of images averaged (`mean_model_view`), a cluster's prototype map (`prototype_tile`), a region
tinted on a tile (`tint_region`, the Trust page's region tests) and a concept's map over the model's view of an
image (`model_frame`, `concept_tile`, the Concepts and Image pages). Drawn with analysis.present.overlay; used
by the dashboard, the HTML report (analysis/report.py) and the Trust page's data (analysis/trust/page.py).
No streamlit here.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from analysis.cache import Cache, CacheError
from analysis.present import overlay

TILE = 112                            # pixels of one image tile in the report (and image_tiles' default)
REGION_COLOR = (178, 24, 43)          # a region test's region, tinted over the mean of what the model saw
CONCEPT_TILE = 150                    # pixels of a concept tile (the Concepts page's)
CROP_MIN = 0.5   # a crop covers at least half of the map's side, centred on the concept's region


# ------------------------------------------------------------------------------------------------ gallery tiles
def image_tiles(cache: Cache, ids: Sequence[int], kind: str = "overlay", which: str = "pred", opacity: float = 0.6,
                colormap: str = overlay.DEFAULT_COLORMAP, size: int = TILE, letterbox: bool = True,
                maps: Sequence[np.ndarray] | None = None, style: overlay.OverlayStyle = overlay.OverlayStyle()
                ) -> list[np.ndarray]:
    """Images of `ids` with their own aspect ratio (long side `size`), the map on the region the model saw:
    kind "image", "overlay" or "map" (see overlay.view_tile), with the foreground outline when the cache knows
    it; letterboxed into size x size squares for grids. Reads only these images' maps and files; `maps` (one per
    id, any resolution) are drawn instead of the cached ones (the Image page's full-resolution maps); `style`: how
    (overlay.OverlayStyle).

    A placement the cache does not know (an older cache, a transform whose geometry could not be measured,
    or an image file whose size changed since the job) is drawn over the whole image and labelled so.
    """
    ids = [int(i) for i in ids]
    if not ids:
        return []
    if maps is None:
        maps = cache.maps(ids, which) if kind != "image" else [None] * len(ids)
    masks = cache.foreground(ids)
    tiles = []
    for k, image_id in enumerate(ids):
        geometry = cache.geometry(image_id)
        recorded = (geometry["width"], geometry["height"])
        try:
            loaded = overlay.load_display(cache.image_path(image_id), size)
            problem = "image missing"
        except CacheError:
            loaded, problem = None, "outside dataset"
        if loaded is None:  # draw the map on a grey stand-in of the image's recorded shape
            shown = overlay.display_size(*recorded, size) if geometry["known"] else (size, size)
            loaded = overlay.placeholder(shown[0], problem, height=shown[1]), \
                recorded if geometry["known"] else shown
        image, original = loaded
        box = geometry["crop_box"] if geometry["known"] and tuple(original) == recorded else None
        mask = None if masks is None or not masks[k].any() else masks[k]
        tiles.append(overlay.view_tile(image, original, box, maps[k], kind=kind, opacity=opacity,
                                       colormap=colormap, mask=mask, tile=size if letterbox else None, style=style))
    return tiles


def mean_model_view(cache: Cache, ids: Sequence[int], size: int) -> np.ndarray | None:
    """Pixel mean of what the model saw of the images `ids` (each crop box stretched to the maps' square; the
    whole image where the box is unknown), so that it lines up with mean maps; None when none can be read."""
    paths, boxes = [], []
    for image_id in ids:
        try:
            paths.append(cache.image_path(int(image_id)))
        except CacheError:  # a path outside the dataset root is never read
            continue
        boxes.append(cache.geometry(int(image_id))["crop_box"])
    return overlay.mean_image(paths, size, boxes)


def unknown_placements(cache: Cache, ids: Sequence[int] | None = None) -> int:
    """How many of `ids` (default: all) have no recorded crop box (their maps cannot be placed exactly)."""
    table = cache.table if ids is None else cache.table.set_index("id").loc[list(ids)]
    box = table[["crop_x0", "crop_y0", "crop_x1", "crop_y1"]].to_numpy(np.float64)
    return int((~np.isfinite(box).all(axis=1) | (table["image_width"].to_numpy() <= 0)).sum())


UNKNOWN_PLACEMENT_NOTE = ("Where the model's input lies in the image is not recorded for {count} image(s) (a cache "
                          "made before crop boxes were recorded, or a preprocessing whose geometry could not be "
                          "measured): their maps are drawn over the whole image, labelled \"placement unknown\", "
                          "and are misplaced if the preprocessing cropped. Re-run the job to record it.")


def prototype_tile(prototype: np.ndarray, size: int) -> np.ndarray:
    side = int(round(np.sqrt(prototype.size)))
    return overlay.heat(np.asarray(prototype).reshape(side, side), size)


# ------------------------------------------------------------------------------------------------ region tests
def tint_region(tile: np.ndarray, region: np.ndarray) -> np.ndarray:
    """`tile` (uint8 [s, s, 3]) with `region` (bool [h, w], resized nearest) blended 55% red and outlined."""
    side = tile.shape[0]
    mask = np.asarray(Image.fromarray(np.asarray(region, bool).astype(np.uint8) * 255).resize(
        (tile.shape[1], side), Image.NEAREST)) > 127
    tinted = tile.astype(np.float32)
    tinted[mask] = 0.45 * tinted[mask] + 0.55 * np.array(REGION_COLOR, np.float32)
    return overlay.with_outline(np.round(tinted).astype(np.uint8), np.asarray(region, bool))


# ------------------------------------------------------------------------------------------------ concepts
def model_frame(cache: Cache, image_id: int, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3]: what the model saw of the image (its crop box stretched to the maps' square),
    a grey placeholder when the file cannot be read."""
    try:
        path = cache.image_path(int(image_id))
    except (CacheError, KeyError):
        path = None
    geometry = cache.geometry(int(image_id))
    box = geometry["crop_box"]
    if box is None and path is not None:
        try:
            with Image.open(path) as img:
                box = (0.0, 0.0, float(img.width), float(img.height))
        except OSError:
            path = None
    view = overlay.model_view(path, box, size) if path is not None and box is not None else None
    return view if view is not None else overlay.placeholder(size, "image missing")


def concept_tile(frame: np.ndarray, concept_map: np.ndarray, box: tuple[float, float, float, float] | None,
                 size: int = CONCEPT_TILE, crop: bool = True, opacity: float = 0.7) -> np.ndarray:
    """The concept's map over the model's view of the image, its region outlined; with ``crop``, cut to the
    region (widened to at least CROP_MIN of the side, kept square) and scaled to ``size``."""
    side = frame.shape[0]
    values = overlay.normalise_signed(overlay.resize_map(np.nan_to_num(concept_map), side))
    colors = overlay.colorize(values, limit=1.0).astype(np.float32)
    alpha = (opacity * np.abs(values))[..., None]
    out = Image.fromarray(np.clip(frame * (1 - alpha) + colors * alpha, 0, 255).astype(np.uint8))
    if box is not None:
        x0, y0, x1, y1 = (v * side for v in box)
        ImageDraw.Draw(out).rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 200, 90), width=max(1, side // 64))
        if crop:
            half = max(x1 - x0, y1 - y0, CROP_MIN * side) / 2
            cx = min(max((x0 + x1) / 2, half), side - half)
            cy = min(max((y0 + y1) / 2, half), side - half)
            out = out.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
    return np.asarray(out.resize((size, size), Image.NEAREST if out.width < size else Image.BILINEAR))
