"""End to end on what users bring: real non-square photos (scikit-image's coffee 600 x 400, rocket 640 x 427,
chelsea 451 x 300, as PNG files in an ImageFolder), a real pretrained ImageNet model (EfficientNet-Lite0 from
PyPI), torchvision's standard Resize(256) + CenterCrop(224), boxes in original pixels, the real
`python -m analysis explain` command (tests/conftest.py: photo_cache). Then the cache's `map_in_image`, the
tiles the dashboard and the report draw, and the Image page."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from analysis.present import overlay
from analysis.present.tiles import image_tiles
from analysis.cache import load

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")

# The crop box of each photo under Resize(256) + CenterCrop(224), by hand (see tests/test_geometry.py):
# coffee 600 x 400 -> 384 x 256 (x 0.64), crop at (80, 16); rocket 640 x 427 -> 383 x 256, crop at
# (round(79.5) = 80, 16); chelsea 451 x 300 -> 384 x 256, crop at (80, 16).
CROP_BOXES = {
    "espresso/coffee.png": ((600, 400), (125.0, 25.0, 475.0, 375.0)),
    "missile/rocket.png": ((640, 427), (80 * 640 / 383, 16 * 427 / 256, 304 * 640 / 383, 240 * 427 / 256)),
    "tabby/chelsea.png": ((451, 300), (80 * 451 / 384, 16 * 300 / 256, 304 * 451 / 384, 240 * 300 / 256)),
}
CUP = (170, 15, 415, 305)   # tests/helpers.py: PHOTOS


def _id(cache, path: str) -> int:
    return int(cache.table.loc[cache.table["path"] == path, "id"].iloc[0])


def test_map_in_image_covers_exactly_the_centre_crop(photo_cache: Path) -> None:
    cache = load(photo_cache)
    assert cache.complete and len(cache) == 3
    assert cache.manifest["geometry"] == {"method": "derived", "transform": "Resize(short side 256) + CenterCrop(224)",
                                          "input_size": [224, 224]}
    table = cache.table.set_index("path")
    assert table.loc["espresso/coffee.png", "pred_name"] == "espresso"   # a real model on a real photo
    assert table.loc["missile/rocket.png", "pred_name"] == "missile"
    for path, ((width, height), box) in CROP_BOXES.items():
        image_id = _id(cache, path)
        geometry = cache.geometry(image_id)
        assert (geometry["width"], geometry["height"]) == (width, height) and geometry["known"]
        np.testing.assert_allclose(geometry["crop_box"], box, atol=1e-4)  # float32 storage
        assert geometry["aspect_change"] == pytest.approx(1.0, abs=0.003)  # Resize keeps the aspect (to 1 px)
        for which in ("pred", "true"):
            placed = cache.map_in_image(image_id, which)
            assert placed.shape == (height, width) and placed.dtype == np.float32
            # Finite exactly at the pixels whose centre lies in the crop box: the model looked nowhere else.
            rows, columns = np.arange(height)[:, None] + 0.5, np.arange(width)[None, :] + 0.5
            looked = (columns >= box[0]) & (columns < box[2]) & (rows >= box[1]) & (rows < box[3])
            np.testing.assert_array_equal(np.isfinite(placed), looked, err_msg=f"{path} {which}")
        # The map's values are the stored map's: each 8 x 8-pixel cell (12.5 original pixels for the coffee)
        # has its value at its centre.
    coffee = _id(cache, "espresso/coffee.png")
    placed, stored = cache.map_in_image(coffee), cache.maps([coffee])[0]
    centres = 125 + 12.5 * (np.arange(28) + 0.5), 25 + 12.5 * (np.arange(28) + 0.5)
    # pixel x holds centre x + 0.5: cell centres 131.25, 143.75, ... fall a quarter into pixels 131, 143, ...
    np.testing.assert_allclose(placed[np.floor(centres[1]).astype(int)][:, np.floor(centres[0]).astype(int)],
                               stored, atol=float(np.abs(stored).max()) * 0.05)
    # The espresso map peaks on the cup.
    peak_y, peak_x = np.unravel_index(np.nanargmax(placed), placed.shape)
    assert CUP[0] <= peak_x < CUP[2] and CUP[1] <= peak_y < CUP[3], (peak_x, peak_y)


def test_boxes_in_original_pixels_become_the_cells_of_the_crop(photo_cache: Path) -> None:
    cache = load(photo_cache)
    coffee = _id(cache, "espresso/coffee.png")
    # The cup's box (170, 15, 415, 305) in cells of 12.5 original pixels from (125, 25): x 3.6 .. 23.2,
    # y -0.8 (cut by the crop) .. 22.4: cells x 4..22 and y 0..21 are covered at least half.
    expected = np.zeros((28, 28), bool)
    expected[0:22, 4:23] = True
    np.testing.assert_array_equal(cache.foreground([coffee])[0], expected)
    row = cache.table.set_index("id").loc[coffee]
    positive = np.clip(cache.maps([coffee])[0], 0, None)
    assert row.background_share == pytest.approx((positive * ~expected).sum() / positive.sum(), rel=2e-3)


def test_tiles_keep_the_aspect_ratio_and_dim_what_the_model_never_saw(photo_cache: Path) -> None:
    cache = load(photo_cache)
    coffee = _id(cache, "espresso/coffee.png")
    original = np.asarray(Image.open(cache.image_path(coffee)).convert("RGB").resize((300, 200), Image.BILINEAR))
    tiles = {kind: image_tiles(cache, [coffee], kind, size=300, letterbox=False)[0]
             for kind in ("image", "overlay", "map")}
    assert all(tile.shape == (200, 300, 3) for tile in tiles.values())  # 600 x 400 drawn 300 x 200
    # The crop box at half size: x 62.5 .. 237.5, y 12.5 .. 187.5. Left of it the overlay is the image dimmed,
    # the map-only tile is grey; the plain image is untouched there.
    outside = np.s_[100:110, 10:50]
    dimmed = original[outside] * overlay.OUTSIDE_KEEP + np.array(overlay.OUTSIDE_COLOR) * (1 - overlay.OUTSIDE_KEEP)
    np.testing.assert_allclose(tiles["overlay"][outside], dimmed, atol=1.0)
    assert (tiles["map"][outside] == overlay.OUTSIDE_MAP_COLOR).all()
    np.testing.assert_array_equal(tiles["image"][outside], original[outside])
    # Inside it, the map-only tile is the stored map's colours, with the region's outline at its edges.
    inside = tiles["map"][20:180, 70:230]
    assert not (inside == overlay.OUTSIDE_MAP_COLOR).all(axis=-1).any()
    assert tuple(tiles["image"][100, 62]) in overlay.BOX_COLORS and tuple(tiles["image"][100, 61]) in overlay.BOX_COLORS
    # A gallery tile: the same drawing letterboxed into a square, the image centred.
    square = image_tiles(cache, [coffee], "overlay", size=300)[0]
    assert square.shape == (300, 300, 3)
    assert (square[:50] == overlay.LETTERBOX_COLOR).all() and (square[250:] == overlay.LETTERBOX_COLOR).all()
    np.testing.assert_array_equal(square[50:250], tiles["overlay"])


def test_image_page_draws_the_photo_and_says_what_the_model_saw(photo_cache: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FGCAM_CACHE", str(photo_cache))
    cache = load(photo_cache)
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["id"] = str(_id(cache, "espresso/coffee.png"))
    at.switch_page("views/image.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    captions = " ".join(c.value for c in at.caption)
    assert "The model saw the region x 125-475, y 25-375 of this 600 x 400 image" in captions
    assert "as a 224 x 224 input" in captions and "aspect ratio changed" not in captions
    assert "placement unknown" not in " ".join(c.value for c in at.caption).lower()
