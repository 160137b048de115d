"""The Image page shows the maps at the resolution FG-CAM computes them (issue 24, item 5): on the photo cache
(pretrained EfficientNet-Lite0, 224 px input, maps stored at 28 x 28) the page explains the image again with the
cache's model and says so; when the model cannot be loaded it shows the cached maps and says why."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from analysis.cache import load
from analysis.pipeline.scores import resize_maps
from tests.helpers import open_page, page_texts


def photo_id(cache, name: str) -> int:
    return int(cache.table.loc[cache.table["path"].str.endswith(name), "id"].iloc[0])


def test_the_image_page_shows_the_map_at_the_models_input_resolution(photo_cache: Path, monkeypatch) -> None:
    from dashboard.views import image

    cache = load(photo_cache)
    coffee = photo_id(cache, "coffee.png")
    row = cache.table.set_index("id").loc[coffee]
    maps, line = image.shown_maps(cache, row, coffee)
    assert cache.map_size == 28 and maps is not None
    assert maps["pred"].shape == (224, 224)  # the model's input, 8 x 8 times the cache's cells
    assert "224 x 224" in line and "28 x 28" in line
    # the same explanation, finer: area-resized to the cache's size it is the stored map (stored as 8 bits a cell)
    stored = cache.maps([coffee], "pred")[0]
    shrunk = resize_maps(maps["pred"][None], cache.map_size)[0].numpy()
    assert np.abs(shrunk - stored).max() <= 0.02 * np.abs(stored).max()
    at = open_page(monkeypatch, photo_cache, "image", {"id": coffee})
    assert not at.exception
    texts = page_texts(at)
    assert "Maps at the model's input resolution, 224 x 224" in texts and "Showing the cache's" not in texts


def test_the_image_page_falls_back_to_the_cached_maps_and_says_why(photo_cache: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    moved = Path(shutil.copytree(photo_cache, tmp_path / "cache"))
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["model"]["spec"] = "/nowhere/model.py:build"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    coffee = photo_id(load(moved), "coffee.png")
    at = open_page(monkeypatch, moved, "image", {"id": coffee})
    assert not at.exception
    texts = page_texts(at)
    assert "Showing the cache's 28 x 28 maps: the model could not explain the image again here" in texts
    assert "no such file /nowhere/model.py" in texts and "Maps at the model's input resolution" not in texts
    assert len(at.get("imgs")) + len(at.get("image")) >= 3  # the panels are still drawn (original, overlay, map)


def test_the_photo_style_saturates_at_its_percentile_and_greys_the_base() -> None:
    from analysis.present import overlay

    spiky = np.zeros((10, 10), np.float32)
    spiky.flat[:100] = np.arange(1, 101)   # |values| 1 .. 100: the 95th percentile is 95.05
    shown = overlay.display_map(spiky, overlay.PHOTO_STYLE)
    assert shown.max() == 1.0 and np.isclose(shown.flat[49], 50 / 95.05) and (shown.flat[95:] == 1.0).all()
    assert np.isclose(overlay.display_map(spiky, overlay.OverlayStyle()).flat[49], 0.5)  # the old scale: the max
    grey = overlay.grey(np.array([[[200, 30, 30]]], np.uint8))
    assert np.allclose(grey, 0.299 * 200 + 0.587 * 30 + 0.114 * 30)


def test_a_red_map_on_a_red_object_shows_on_the_photo_style() -> None:
    """The faint case of issue 24: a red object under a red map. Where the map is high the tile must differ from
    where it is 0 (both on the object) far more in PHOTO_STYLE than in the old drawing."""
    from analysis.present import overlay

    rng = np.random.default_rng(0)
    cup = np.zeros((40, 40, 3), np.uint8)
    cup[:] = (190, 40, 35)
    signed = np.zeros((40, 40), np.float32)
    signed[:, :20] = rng.exponential(1.0, (40, 20)) ** 3  # fine-grained: a heavy tail of strong pixels
    box = (0.0, 0.0, 40.0, 40.0)

    def difference(style) -> float:
        tile = overlay.view_tile(cup, (40, 40), box, signed, opacity=0.6, colormap="RdBu", style=style).astype(float)
        return float(np.abs(tile[:, :20].mean(axis=(0, 1)) - tile[:, 20:].mean(axis=(0, 1))).sum())

    before, after = difference(overlay.OverlayStyle()), difference(overlay.PHOTO_STYLE)
    assert after > 3 * before, (before, after)  # measured 8.3 vs 1.9 (seed 1 of the map: 7.9 vs 2.0)
