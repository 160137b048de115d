"""Rendering of FG-CAM maps for people: diverging colour maps symmetric around 0 (red positive, blue
negative), overlays on the original image with an opacity, foreground outlines, placeholders for images that
are gone, image grids and PNG / data-URI encoding. Used by the dashboard and the HTML report; no streamlit.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

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
    inner = mask.copy()
    for _ in range(max(1, thickness)):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def overlay(image: np.ndarray, signed_map: np.ndarray, opacity: float = 0.6,
            colormap: str = DEFAULT_COLORMAP, mask: np.ndarray | None = None,
            limit: float | None = None) -> np.ndarray:
    """Blend the coloured map over an RGB image [s, s, 3] uint8.

    The colour's alpha is opacity * |value| / limit, so pixels without relevance show the image unchanged
    rather than washed out by the map's middle colour. A mask adds its outline.
    """
    image = np.asarray(image, dtype=np.uint8)
    size = image.shape[0]
    values = resize_map(normalise_signed(signed_map, limit), size)
    colors = colorize(values, colormap, limit=1.0).astype(np.float32)
    alpha = (float(np.clip(opacity, 0.0, 1.0)) * np.abs(values))[..., None]
    blended = image.astype(np.float32) * (1.0 - alpha) + colors * alpha
    out = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    if mask is not None:
        out[mask_outline(mask, size)] = OUTLINE_COLOR
    return out


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


def placeholder(size: int, text: str = "image missing") -> np.ndarray:
    """A grey tile with a short message, shown where an image file was deleted or cannot be read."""
    tile = Image.new("RGB", (size, size), (200, 200, 200))
    draw = ImageDraw.Draw(tile)
    draw.rectangle([0, 0, size - 1, size - 1], outline=(120, 120, 120), width=2)
    draw.line([0, 0, size - 1, size - 1], fill=(170, 170, 170), width=1)
    draw.line([0, size - 1, size - 1, 0], fill=(170, 170, 170), width=1)
    font = _font(max(10, size // 12))
    box = draw.textbbox((0, 0), text, font=font)
    x = (size - (box[2] - box[0])) // 2
    y = (size - (box[3] - box[1])) // 2
    draw.rectangle([x - 4, y - 4, x + box[2] - box[0] + 4, y + box[3] - box[1] + 6], fill=(235, 235, 235))
    draw.text((x, y), text, fill=(60, 60, 60), font=font)
    return np.asarray(tile, dtype=np.uint8)


def load_image(path: Path | str | None, size: int) -> np.ndarray | None:
    """The image at `path` as RGB uint8 [size, size, 3] (resized to the square the model saw), or None when the
    file is missing or unreadable."""
    if path is None:
        return None
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def mean_image(paths: list[Path], size: int) -> np.ndarray | None:
    """Pixel mean of the readable images among `paths` at size x size, or None if none could be read."""
    total = np.zeros((size, size, 3), np.float64)
    count = 0
    for path in paths:
        image = load_image(path, size)
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
