"""Rendering of FG-CAM maps for people: diverging colour maps symmetric around 0 (red positive, blue
negative), overlays on the original image with an opacity, foreground outlines, placeholders for images that
are gone, image grids and PNG / data-URI encoding. Used by the dashboard and the HTML report; no streamlit.

Images are drawn with their own aspect ratio and the map only on the region the model saw (its crop box, see
analysis.pipeline.geometry); the rest of the image is dimmed and the region outlined (`view_tile`). Gallery tiles are
letterboxed to one square size so that grids stay aligned.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from analysis.cache.placement import place_map
from analysis.pipeline.geometry import covers_image, scale_box

T = TypeVar("T")

# Diverging colour maps as anchor colours from -1 (most negative) to +1 (most positive); 0 is the middle
# anchor. ColorBrewer / matplotlib anchors, interpolated linearly into a lookup table.
_ANCHORS = {
    "RdBu": ["#053061", "#2166ac", "#4393c3", "#92c5de", "#f7f7f7", "#f4a582", "#d6604d", "#b2182b", "#67001f"],
    "bwr": ["#0000ff", "#ffffff", "#ff0000"],
    "coolwarm": ["#3b4cc0", "#8db0fe", "#dddddd", "#f49a7b", "#b40426"],
    "seismic": ["#00004c", "#0000ff", "#ffffff", "#ff0000", "#7f0000"],
}
COLORMAPS = tuple(_ANCHORS)
DEFAULT_COLORMAP = "RdBu"
OUTLINE_COLOR = (0, 230, 64)   # green: distinct from both ends of every diverging map above
LUT_SIZE = 255
LETTERBOX_COLOR = (242, 242, 242)  # around an image in a square tile
OUTSIDE_COLOR = (150, 150, 150)    # what the model never saw fades towards this grey ...
OUTSIDE_KEEP = 0.35                # ... keeping this share of its own colour
OUTSIDE_MAP_COLOR = (215, 215, 215)  # the map alone: no map outside the region the model saw
BOX_COLORS = ((255, 255, 255), (40, 40, 40))  # the region's outline: a light line outside a dark one


def _hex(color: str) -> tuple[int, int, int]:
    color = color.lstrip("#")
    return tuple(int(color[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]


def colormap_lut(name: str) -> np.ndarray:
    """[255, 3] uint8 lookup table of a diverging colour map: entry 0 is -1, entry 127 is exactly 0 (an odd
    length, so zero gets the middle colour and not a neighbour of it), entry 254 is +1."""
    if name not in _ANCHORS:
        raise ValueError(f"colour map must be one of {COLORMAPS}, not {name!r}")
    anchors = np.array([_hex(c) for c in _ANCHORS[name]], dtype=np.float64)
    positions = np.linspace(0.0, 1.0, len(anchors))
    t = np.linspace(0.0, 1.0, LUT_SIZE)
    lut = np.stack([np.interp(t, positions, anchors[:, ch]) for ch in range(3)], axis=1)
    return np.round(lut).astype(np.uint8)


def symmetric_limit(signed_map: np.ndarray) -> float:
    """max |value| of a map (finite values only); 0 for an all-zero map."""
    values = np.abs(np.asarray(signed_map, dtype=np.float64))
    values = values[np.isfinite(values)]
    return float(values.max()) if values.size else 0.0


def normalise_signed(signed_map: np.ndarray, limit: float | None = None) -> np.ndarray:
    """Map values to [-1, 1] by dividing by `limit` (default: the map's max |value|) so 0 stays 0."""
    signed_map = np.asarray(signed_map, dtype=np.float32)
    limit = symmetric_limit(signed_map) if limit is None else float(limit)
    if not limit > 0:
        return np.zeros_like(signed_map)
    out = np.clip(signed_map / limit, -1.0, 1.0)
    return np.where(np.isfinite(out), out, 0.0).astype(np.float32)


def resize_map(signed_map: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a float map to size x size."""
    signed_map = np.asarray(signed_map, dtype=np.float32)
    if signed_map.shape == (size, size):
        return signed_map
    return np.asarray(Image.fromarray(signed_map, mode="F").resize((size, size), Image.BILINEAR), np.float32)


def colorize(signed_map: np.ndarray, colormap: str = DEFAULT_COLORMAP, size: int | None = None,
             limit: float | None = None) -> np.ndarray:
    """[h, w] signed map -> [size, size, 3] uint8 RGB, symmetric around 0 (0 -> the middle colour)."""
    values = normalise_signed(signed_map, limit)
    if size is not None:
        values = resize_map(values, size)
    half = (LUT_SIZE - 1) / 2
    index = np.clip(np.round((values + 1.0) * half), 0, LUT_SIZE - 1).astype(np.int64)
    return colormap_lut(colormap)[index]


def mask_outline(mask: np.ndarray, size: int, thickness: int = 2) -> np.ndarray:
    """bool [size, size]: the boundary pixels of a (map-sized) foreground mask scaled to `size`."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (size, size):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127
    return _boundary(mask, thickness)


def _boundary(mask: np.ndarray, thickness: int = 2) -> np.ndarray:
    """bool, the shape of `mask`: its pixels within `thickness` of its edge."""
    inner = mask.copy()
    for _ in range(max(1, thickness)):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def with_outline(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """A copy of an RGB image with the mask outline drawn in (unchanged when mask is None)."""
    out = np.array(image, dtype=np.uint8, copy=True)
    if mask is not None:
        out[mask_outline(mask, out.shape[0])] = OUTLINE_COLOR
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without scalable default font
        return ImageFont.load_default()


def placeholder(size: int, text: str = "image missing", height: int | None = None) -> np.ndarray:
    """A grey tile (size x size, or size wide and `height` high) with a short message, shown where an image
    file was deleted or cannot be read."""
    width, height = size, size if height is None else height
    tile = Image.new("RGB", (width, height), (200, 200, 200))
    draw = ImageDraw.Draw(tile)
    draw.rectangle([0, 0, width - 1, height - 1], outline=(120, 120, 120), width=2)
    draw.line([0, 0, width - 1, height - 1], fill=(170, 170, 170), width=1)
    draw.line([0, height - 1, width - 1, 0], fill=(170, 170, 170), width=1)
    font = _font(max(10, min(width, height) // 12))
    box = draw.textbbox((0, 0), text, font=font)
    x = (width - (box[2] - box[0])) // 2
    y = (height - (box[3] - box[1])) // 2
    draw.rectangle([x - 4, y - 4, x + box[2] - box[0] + 4, y + box[3] - box[1] + 6], fill=(235, 235, 235))
    draw.text((x, y), text, fill=(60, 60, 60), font=font)
    return np.asarray(tile, dtype=np.uint8)


def _read_image(path: Path | str | None, draw: Callable[[Image.Image], T]) -> T | None:
    """draw(the opened image at `path`), or None when there is no path or the file is missing or unreadable
    (a page shows a placeholder instead)."""
    if path is None:
        return None
    try:
        with Image.open(path) as img:
            return draw(img)
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def load_image(path: Path | str | None, size: int) -> np.ndarray | None:
    """The image at `path` as RGB uint8 [size, size, 3] (resized to the square the model saw), or None when the
    file is missing or unreadable."""
    return _read_image(path, lambda img: np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR),
                                                    dtype=np.uint8))


def display_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) of an image drawn with its own aspect ratio and its long side `size`."""
    scale = size / max(width, height, 1)
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def load_display(path: Path | str | None, size: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    """(RGB uint8 [h, w, 3] with the image's own aspect ratio and long side `size`, the original (width,
    height)), or None when the file is missing or unreadable."""
    def draw(img: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        original = img.size
        shown = display_size(*original, size)
        img.draft("RGB", shown)  # a JPEG decodes at a fraction of its size when that is enough
        return np.asarray(img.convert("RGB").resize(shown, Image.BILINEAR), dtype=np.uint8), original

    return _read_image(path, draw)


def model_view(path: Path | str | None, box: tuple[float, float, float, float], size: int) -> np.ndarray | None:
    """RGB uint8 [size, size, 3]: the region `box` (original pixels) of the image at `path`, stretched to the
    square the maps are stored in, black where the box leaves the image (as a padding crop does); None when the
    file is missing or unreadable."""
    def draw(img: Image.Image) -> np.ndarray:
        img = img.convert("RGB")
        x0, y0, x1, y1 = box
        factor = min(1.0, 2 * size / max(x1 - x0, y1 - y0))  # EXTENT does not antialias: shrink first
        if factor < 1.0:
            width, height = img.size
            img = img.resize((max(1, round(width * factor)), max(1, round(height * factor))), Image.BILINEAR)
            x0, y0, x1, y1 = scale_box(box, img.width / width, img.height / height)
        view = img.transform((size, size), Image.EXTENT, (x0, y0, x1, y1), Image.BILINEAR, fillcolor=(0, 0, 0))
        return np.asarray(view, dtype=np.uint8)

    return _read_image(path, draw)


@dataclass(frozen=True)
class OverlayStyle:
    """How an overlay is drawn on a photo. ``grey``: the photo in grey under the map (a red map stays visible on a
    red object); ``percentile``: the colour and alpha scale's limit is this percentile of |value| (None: the
    maximum; a fine-grained map's few extreme pixels then leave the rest nearly transparent); ``smooth``: the map
    blurred for display, a Gaussian of this share of its side (0: none). ``PHOTO_STYLE`` is the one chosen by
    measurement (bench/overlay_contrast.py)."""
    grey: bool = False
    percentile: float | None = None
    smooth: float = 0.0


# Measured on the photo cache's three photos at their input resolution (bench/overlay_contrast.py): CIELAB contrast
# between the map's top 10% and weakest half 29.6 (17.2 before: the photo, scaled by the maximum; the photo alone
# gives 16.5), on the red cup 27.5 (15.1); smoothing lowered it, p99 and p80 were lower than p95.
PHOTO_STYLE = OverlayStyle(grey=True, percentile=95)


def display_map(signed_map: np.ndarray, style: OverlayStyle, limit: float | None = None) -> np.ndarray:
    """The map in [-1, 1] as ``style`` draws it: smoothed, then divided by its limit (``limit`` when given)."""
    values = np.nan_to_num(np.asarray(signed_map, dtype=np.float32))
    if style.smooth > 0:
        from scipy.ndimage import gaussian_filter

        values = gaussian_filter(values, sigma=style.smooth * max(values.shape), mode="nearest").astype(np.float32)
    if limit is None and style.percentile is not None:
        magnitudes = np.abs(values[values != 0])
        limit = float(np.percentile(magnitudes, style.percentile)) if magnitudes.size else 0.0
        limit = limit if limit > 0 else None
    return normalise_signed(values, limit)


def grey(image: np.ndarray) -> np.ndarray:
    """float32 [h, w, 3]: the image's luminance (ITU-R 601) in every channel."""
    luminance = np.asarray(image, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(luminance[..., None], 3, axis=2)


def view_tile(image: np.ndarray, original_size: tuple[int, int], box: tuple[float, float, float, float] | None,
              signed_map: np.ndarray | None = None, kind: str = "overlay", opacity: float = 0.6,
              colormap: str = DEFAULT_COLORMAP, mask: np.ndarray | None = None, limit: float | None = None,
              tile: int | None = None, style: OverlayStyle = OverlayStyle()) -> np.ndarray:
    """One image drawn as it is, with a model-frame map placed on the region the model saw.

    image: RGB uint8 [h, w, 3], the original (width, height) = `original_size` drawn at any scale with its
    aspect ratio. box: the crop box in original pixels, None when unknown (then the map covers the whole image
    and a "placement unknown" band says so). kind: "image" (the image and the region's outline), "overlay"
    (the map blended in with alpha opacity * |value| / limit, the rest of the image dimmed) or "map" (the map
    alone on the region). mask: the foreground at map size (model frame), outlined in green. tile: letterbox
    into a tile x tile square. style: grey base, limit and smoothing of the drawing (``OverlayStyle``).
    """
    if kind not in ("image", "overlay", "map"):
        raise ValueError(f"kind must be 'image', 'overlay' or 'map', not {kind!r}")
    image = np.asarray(image, dtype=np.uint8)
    shown_height, shown_width = image.shape[:2]
    width, height = original_size
    known = box is not None
    shown_box = scale_box(box if known else (0.0, 0.0, width, height), shown_width / width, shown_height / height)
    out = grey(image) if style.grey and kind == "overlay" else image.astype(np.float32)
    if kind != "image" and signed_map is not None:
        values = place_map(display_map(signed_map, style, limit), shown_box, shown_width, shown_height)
        inside = np.isfinite(values)
        colors = colorize(np.nan_to_num(values), colormap, limit=1.0).astype(np.float32)
        if kind == "map":
            out = np.where(inside[..., None], colors, np.array(OUTSIDE_MAP_COLOR, np.float32))
        else:
            alpha = (float(np.clip(opacity, 0.0, 1.0)) * np.abs(np.nan_to_num(values)))[..., None]
            out = out * (1.0 - alpha) + colors * alpha
            out[~inside] = out[~inside] * OUTSIDE_KEEP + np.array(OUTSIDE_COLOR, np.float32) * (1 - OUTSIDE_KEEP)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    if mask is not None and np.asarray(mask).any():
        placed = place_map(np.asarray(mask, np.float32), shown_box, shown_width, shown_height)
        out[_boundary(np.nan_to_num(placed) >= 0.5)] = OUTLINE_COLOR
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    if not covers_image(shown_box, shown_width, shown_height, tolerance=0.5):
        _draw_region(draw, shown_box, shown_width, shown_height)
    if not known:
        font = _font(max(9, min(shown_width, shown_height) // 14))
        text = "placement unknown"
        bottom = draw.textbbox((0, 0), text, font=font)[3] + 4
        draw.rectangle([0, shown_height - bottom, shown_width, shown_height], fill=(255, 244, 200))
        draw.text((3, shown_height - bottom + 1), text, fill=(120, 80, 0), font=font)
    out = np.asarray(canvas, dtype=np.uint8)
    return letterbox(out, tile) if tile else out


def _draw_region(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], width: int, height: int) -> None:
    """The edges of the region the model saw that lie inside the image (an edge beyond it, where a crop
    padded, is not drawn: a line on the image's border would suggest a cut there)."""
    x0, y0, x1, y1 = box
    left, top = max(0.0, x0), max(0.0, y0)
    right, bottom = min(float(width), x1) - 1, min(float(height), y1) - 1
    edges = []
    if x0 > 0.5:
        edges.append(((x0, top), (x0, bottom), (-1, 0)))
    if x1 < width - 0.5:
        edges.append(((x1 - 1, top), (x1 - 1, bottom), (1, 0)))
    if y0 > 0.5:
        edges.append(((left, y0), (right, y0), (0, -1)))
    if y1 < height - 0.5:
        edges.append(((left, y1 - 1), (right, y1 - 1), (0, 1)))
    for (a, b, (dx, dy)) in edges:
        for offset, color in enumerate(BOX_COLORS[::-1]):  # dark on the region's side, light outside it
            shift_x, shift_y = dx * offset, dy * offset
            draw.line([(a[0] + shift_x, a[1] + shift_y), (b[0] + shift_x, b[1] + shift_y)], fill=color, width=1)


def letterbox(image: np.ndarray, size: int, color: tuple[int, int, int] = LETTERBOX_COLOR) -> np.ndarray:
    """The image centred in a size x size square (shrunk first if it is larger)."""
    image = np.asarray(image, dtype=np.uint8)
    height, width = image.shape[:2]
    if max(height, width) > size:
        shown = display_size(width, height, size)
        image = np.asarray(Image.fromarray(image).resize(shown, Image.BILINEAR), dtype=np.uint8)
        height, width = image.shape[:2]
    out = np.empty((size, size, 3), np.uint8)
    out[:] = color
    top, left = (size - height) // 2, (size - width) // 2
    out[top:top + height, left:left + width] = image
    return out


def mean_image(paths: list[Path], size: int,
               boxes: list[tuple[float, float, float, float] | None] | None = None) -> np.ndarray | None:
    """Pixel mean of the readable images among `paths` at size x size, or None if none could be read. With
    `boxes` (crop boxes in original pixels, None where unknown) each image contributes the region the model
    saw (`model_view`), so the mean lines up with mean maps."""
    total = np.zeros((size, size, 3), np.float64)
    count = 0
    for k, path in enumerate(paths):
        box = boxes[k] if boxes is not None else None
        image = model_view(path, box, size) if box is not None else load_image(path, size)
        if image is not None:
            total += image
            count += 1
    if count == 0:
        return None
    return np.round(total / count).astype(np.uint8)


def heat(values: np.ndarray, size: int) -> np.ndarray:
    """A non-negative map (e.g. a mean unit-mass map) as RGB with white = 0 and dark red = its maximum.

    Uses the positive half of the RdBu map so aggregated maps read like the positive part of single maps.
    """
    values = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0)
    limit = float(values.max()) if values.size else 0.0
    return colorize(np.clip(values, 0.0, None), DEFAULT_COLORMAP, size=size, limit=limit if limit > 0 else 1.0)


def image_grid(tiles: list[np.ndarray], captions: list[str] | None = None, columns: int = 6,
               pad: int = 6, caption_height: int = 18, background: tuple[int, int, int] = (255, 255, 255)
               ) -> Image.Image:
    """Lay equally sized RGB tiles out in a grid with an optional caption line under each (for PNG export)."""
    if not tiles:
        return Image.new("RGB", (1, 1), background)
    h, w = tiles[0].shape[:2]
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    cap = caption_height if captions else 0
    canvas = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + cap + pad) + pad), background)
    draw = ImageDraw.Draw(canvas)
    font = _font(max(9, caption_height - 6))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        x, y = pad + c * (w + pad), pad + r * (h + cap + pad)
        canvas.paste(Image.fromarray(np.asarray(tile, dtype=np.uint8)), (x, y))
        if captions:
            text = captions[i]
            while text and draw.textlength(text, font=font) > w:
                text = text[:-2] + "…" if len(text) > 2 else ""
            draw.text((x, y + h + 2), text, fill=(30, 30, 30), font=font)
    return canvas


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def png_data_uri(image: np.ndarray | Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
