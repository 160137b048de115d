"""Scores and descriptors against values computed by hand on tiny maps."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.pipeline.scores import (all_scores, background_hotspot, background_share, border_share, concentration,
                             descriptors, dilate, frame_mask, resize_maps, top_pixel_count)


def test_background_share_by_hand() -> None:
    maps = np.array([[[4.0, -3.0], [1.0, 5.0]]], np.float32)   # positive mass 4 + 1 + 5 = 10
    fg = np.array([[[True, True], [False, False]]])           # outside: 1 + 5 = 6 (the -3 does not count)
    assert background_share(maps, fg).item() == pytest.approx(0.6)


def test_background_share_of_map_without_positive_relevance_is_nan() -> None:
    maps = np.array([[[-1.0, 0.0], [0.0, -2.0]]], np.float32)
    assert math.isnan(background_share(maps, np.ones((1, 2, 2), bool)).item())
    assert math.isnan(border_share(maps).item())
    assert math.isnan(concentration(maps).item())
    assert math.isnan(background_hotspot(maps, np.ones((1, 2, 2), bool)).item())


def test_top_pixel_count() -> None:
    assert top_pixel_count(64 * 64) == 205  # ceil(0.05 * 4096 = 204.8)
    assert top_pixel_count(100) == 5
    assert top_pixel_count(4) == 1


def test_concentration_by_hand() -> None:
    # 10 x 10 map: top 5 pixels hold 5 * 10 = 50; 95 others hold 95 * 1 = 95 -> 50 / 145.
    maps = np.ones((1, 10, 10), np.float32)
    maps[0, 0, :5] = 10.0
    maps[0, 9, 9] = -100.0  # negative relevance is neither in the numerator nor the denominator
    expected = 50.0 / (50.0 + 94.0)
    assert concentration(maps).item() == pytest.approx(expected)


def test_border_share_by_hand() -> None:
    # 10 x 10: the frame is 1 pixel wide (round(0.1 * 10)), 36 pixels.
    frame = frame_mask(10, 10)
    assert frame.sum().item() == 36 and not frame[1:9, 1:9].any()
    maps = np.zeros((1, 10, 10), np.float32)
    maps[0, 0, 0] = 3.0   # corner: in the frame
    maps[0, 5, 5] = 1.0   # centre
    maps[0, 9, 4] = 2.0   # bottom edge: in the frame
    assert border_share(maps).item() == pytest.approx(5.0 / 6.0)
    # 64 x 64: round(6.4) = 6 pixels per side.
    assert frame_mask(64, 64).sum().item() == 64 * 64 - 52 * 52


def test_dilate_by_one_pixel_uses_the_8_neighbourhood() -> None:
    fg = np.zeros((1, 5, 5), bool)
    fg[0, 2, 2] = True
    grown = dilate(fg, 1)[0].numpy()
    expected = np.zeros((5, 5), bool)
    expected[1:4, 1:4] = True
    np.testing.assert_array_equal(grown, expected)


def test_background_hotspot_by_hand() -> None:
    # 10 x 10 map, top 5% = 5 pixels. Foreground: rows 0-2, cols 0-2; dilated: rows 0-3, cols 0-3.
    fg = np.zeros((1, 10, 10), bool)
    fg[0, 0:3, 0:3] = True
    maps = np.full((1, 10, 10), 0.01, np.float32)
    maps[0, 1, 1] = 9.0   # inside
    maps[0, 3, 3] = 8.0   # on the dilated rim: counts as inside
    maps[0, 0, 2] = 7.0   # inside
    maps[0, 8, 8] = 6.0   # outside
    maps[0, 9, 0] = 5.0   # outside
    assert background_hotspot(maps, fg).item() == pytest.approx(2 / 5)
    # Mass share: 95 cold pixels of 0.01, 7 of them inside the 9-pixel foreground; (3,3) is outside the
    # undilated foreground, so mass outside = 8 + 6 + 5 + 0.01 * 88.
    total = 9 + 8 + 7 + 6 + 5 + 0.01 * 95
    outside = 8 + 6 + 5 + 0.01 * (95 - 7)
    assert background_share(maps, fg).item() == pytest.approx(outside / total, rel=1e-5)


def test_descriptors_by_hand() -> None:
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0] = 2.0    # top-left 2 x 2 cell: mean 0.5
    maps[0, 3, 3] = 6.0    # bottom-right cell: mean 1.5
    maps[0, 0, 3] = -4.0   # top-right cell: -1 (positive: 0; absolute: 1)
    positive = descriptors(maps, 2, "positive")[0].numpy()
    np.testing.assert_allclose(positive, [0.25, 0.0, 0.0, 0.75])
    absolute = descriptors(maps, 2, "absolute")[0].numpy()
    np.testing.assert_allclose(absolute, [0.5 / 3, 1 / 3, 0.0, 1.5 / 3], rtol=1e-6)
    flat = descriptors(torch.full((1, 4, 4), -1.0), 2, "positive")[0].numpy()
    np.testing.assert_allclose(flat, [0.25] * 4)  # no positive mass: uniform, never NaN
    with pytest.raises(ValueError, match="kind"):
        descriptors(maps, 2, "negative")


def test_resize_maps_uses_area_averaging() -> None:
    maps = torch.arange(16.0).reshape(1, 4, 4)
    np.testing.assert_allclose(resize_maps(maps, 2)[0].numpy(), [[2.5, 4.5], [10.5, 12.5]])
    assert resize_maps(maps, 4) is maps or torch.equal(resize_maps(maps, 4), maps)


def test_all_scores_are_nan_without_foreground() -> None:
    maps = torch.rand(3, 8, 8)
    fg = torch.zeros(3, 8, 8, dtype=torch.bool)
    fg[:, 2:6, 2:6] = True
    known = torch.tensor([True, False, True])
    scores = all_scores(maps, fg, known)
    assert torch.isnan(scores["background_share"][1]) and torch.isnan(scores["background_hotspot"][1])
    assert not torch.isnan(scores["background_share"][[0, 2]]).any()
    none = all_scores(maps, None, None)
    assert torch.isnan(none["background_share"]).all() and not torch.isnan(none["border_share"]).any()
