"""Unit tests of analysis.explore and analysis.present.overlay on inputs small enough to check by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis.explore import statistics as explore
from analysis.present import overlay


def _table(labels, preds, **scores) -> pd.DataFrame:
    labels = np.asarray(labels)
    preds = np.asarray(preds)
    frame = pd.DataFrame({"id": np.arange(len(labels)), "label": labels, "pred": preds,
                          "correct": labels == preds})
    for name, values in scores.items():
        frame[name] = np.asarray(values, dtype=np.float32)
    return frame


# ---------------------------------------------------------------------------------------------- maps

def test_unit_mass_keeps_positive_part_and_sums_to_one():
    maps = np.array([[[2.0, -1.0], [0.0, 2.0]], [[-1.0, -2.0], [0.0, 0.0]]], np.float32)
    out = explore.unit_mass(maps, "positive")
    np.testing.assert_allclose(out[0], [[0.5, 0.0], [0.0, 0.5]])
    np.testing.assert_array_equal(out[1], np.zeros((2, 2)))  # no positive mass: stays zero, not uniform
    absolute = explore.unit_mass(maps, "absolute")
    np.testing.assert_allclose(absolute[1], [[1 / 3, 2 / 3], [0.0, 0.0]])
    with pytest.raises(ValueError):
        explore.unit_mass(maps, "negative")


def test_class_mean_maps_split_correct_and_wrong():
    # 2x2 descriptors; class 0: two correct images (mass top-left / top-right), one wrong (bottom-right).
    desc = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], np.float32)
    labels = np.array([0, 0, 0, 1])
    correct = np.array([True, True, False, True])
    means = explore.class_mean_maps(desc, labels, correct, n_classes=3)
    np.testing.assert_allclose(means.correct[0], [[0.5, 0.5], [0.0, 0.0]])
    np.testing.assert_allclose(means.wrong[0], [[0.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(means.correct[1], [[0.0, 0.0], [1.0, 0.0]])
    assert np.isnan(means.wrong[1]).all() and np.isnan(means.correct[2]).all()  # empty groups are NaN
    np.testing.assert_array_equal(means.n_correct, [2, 1, 0])
    np.testing.assert_array_equal(means.n_wrong, [1, 0, 0])


def test_consensus_dissimilarity_uses_correct_images_of_the_predicted_class():
    desc = np.array([[1, 0], [1, 0], [0, 1], [0.5, 0.5]], np.float32)
    preds = np.array([0, 0, 0, 1])
    correct = np.array([True, True, False, False])   # class 0 consensus = [1, 0]; class 1: fallback to all
    dissimilarity = explore.consensus_dissimilarity(desc, preds, correct, n_classes=2)
    np.testing.assert_allclose(dissimilarity, [0.0, 0.0, 1.0, 0.0], atol=1e-6)


def test_cosine_dissimilarity_of_zero_rows_is_nan():
    out = explore.cosine_dissimilarity(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 0.0], [-1.0, 0.0]]))
    assert np.isnan(out[0])
    assert out[1] == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------- confusion

def test_confusion_matrix_frame_and_top_confusions():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    preds = [0, 1, 1, 1, 0, 2, 1, 0, 0]
    matrix = explore.confusion_matrix(labels, preds, 3)
    np.testing.assert_array_equal(matrix, [[1, 2, 0], [1, 1, 0], [2, 1, 1]])
    frame = explore.confusion_frame(matrix, ["a", "b", "c"])
    cell = frame[(frame["true"] == 2) & (frame["pred"] == 0)].iloc[0]
    assert cell["count"] == 2 and cell["row_share"] == pytest.approx(0.5) and cell["true_name"] == "c"
    top = explore.top_confusions(matrix, ["a", "b", "c"], k=3)
    # Two cells of count 2: (0->1) before (2->0) by true class; then the 1-count cells by (true, pred).
    assert list(zip(top["true"], top["pred"], top["count"])) == [(0, 1, 2), (2, 0, 2), (1, 0, 1)]


def test_per_class_accuracy():
    table = _table([0, 0, 1, 1, 1], [0, 1, 1, 1, 0])
    acc = explore.per_class_accuracy(table, ["cat", "dog"])
    assert acc["class_name"].tolist() == ["cat", "dog"]
    assert acc["images"].tolist() == [2, 3]
    np.testing.assert_allclose(acc["accuracy"], [0.5, 2 / 3])


# ---------------------------------------------------------------------------------------------- neighbours

def test_nearest_neighbours_by_cosine_excludes_query_and_zero_rows():
    desc = np.array([[1, 0], [0.9, 0.1], [0, 1], [0, 0], [1, 0.01]], np.float32)
    rows, dist = explore.nearest_neighbours(desc, 0, k=3)
    assert rows.tolist() == [4, 1, 2]
    assert dist[0] < dist[1] < dist[2] and dist[2] == pytest.approx(1.0)
    assert 3 not in explore.nearest_neighbours(desc, 0, k=10)[0].tolist()
    assert explore.nearest_neighbours(desc, 3, k=2)[0].size == 0  # zero map: no direction, no neighbours


# ---------------------------------------------------------------------------------------------- rankings

def test_attention_scores_depend_on_foreground():
    with_fg = _table([0, 1], [0, 1], background_share=[0.1, 0.2], background_hotspot=[0.3, 0.4],
                     border_share=[0.1, 0.1])
    no_fg = _table([0, 1], [0, 1], background_share=[np.nan, np.nan], background_hotspot=[np.nan, np.nan],
                   border_share=[0.1, 0.1])
    assert explore.available_attention_scores(with_fg)[0] == "background_hotspot"
    assert explore.available_attention_scores(no_fg) == ["border_share", "consensus_dissimilarity"]


def test_rank_by_score_threshold_classes_and_ties():
    table = _table([0, 0, 1, 1], [0, 1, 1, 1], border_share=[0.5, 0.9, 0.5, np.nan])
    ranked = explore.rank_by_score(table, "border_share")
    assert ranked["id"].tolist() == [1, 0, 2]                  # NaN dropped, tie 0.5 in id order
    assert explore.rank_by_score(table, "border_share", threshold=0.6)["id"].tolist() == [1]
    assert explore.rank_by_score(table, "border_share", classes=[1])["id"].tolist() == [2]


def test_sample_rows_is_sorted_uniform_and_reproducible():
    assert explore.sample_rows(5, 10).tolist() == [0, 1, 2, 3, 4]
    sample = explore.sample_rows(1000, 100, seed=3)
    assert len(sample) == 100 and len(set(sample.tolist())) == 100 and np.all(np.diff(sample) > 0)
    assert np.array_equal(sample, explore.sample_rows(1000, 100, seed=3))


# ---------------------------------------------------------------------------------------------- overlay

def test_colormap_is_symmetric_red_positive_blue_negative():
    signed = np.array([[-2.0, 0.0, 2.0]], np.float32)
    rgb = overlay.colorize(signed, "bwr")
    assert tuple(rgb[0, 0]) == (0, 0, 255)       # most negative: blue
    assert tuple(rgb[0, 1]) == (255, 255, 255)   # zero: the middle colour, whatever the range
    assert tuple(rgb[0, 2]) == (255, 0, 0)       # most positive: red
    skewed = overlay.colorize(np.array([[-1.0, 0.0, 4.0]], np.float32), "bwr")
    assert tuple(skewed[0, 1]) == (255, 255, 255)  # symmetric limit: 0 stays white even for skewed maps
    assert skewed[0, 0, 2] == 255 and skewed[0, 0, 0] > 150  # -1 of 4: a light blue
    for name in overlay.COLORMAPS:
        lut = overlay.colormap_lut(name)
        assert lut[-1, 0] > lut[-1, 2] and lut[0, 2] > lut[0, 0]


def test_overlay_leaves_zero_relevance_pixels_unchanged_and_draws_outline():
    image = np.full((8, 8, 3), 100, np.uint8)
    signed = np.zeros((4, 4), np.float32)
    signed[0, 0] = 1.0
    whole = (0.0, 0.0, 8.0, 8.0)  # the model saw the whole 8 x 8 image
    out = overlay.view_tile(image, (8, 8), whole, signed, opacity=1.0, colormap="bwr")
    assert tuple(out[7, 7]) == (100, 100, 100)          # no relevance: image unchanged
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50     # full relevance at full opacity: red
    faint = overlay.view_tile(image, (8, 8), whole, signed, opacity=0.0)
    np.testing.assert_array_equal(faint, image)
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    outlined = overlay.view_tile(image, (8, 8), whole, signed, opacity=0.0, mask=mask)
    assert tuple(outlined[2, 2]) == overlay.OUTLINE_COLOR   # boundary of the upscaled mask
    assert tuple(outlined[0, 7]) == (100, 100, 100)


def test_view_tile_places_the_map_on_the_crop_box_and_dims_the_rest():
    image = np.full((20, 40, 3), 100, np.uint8)          # a 400 x 200 original drawn at 40 x 20
    signed = np.ones((4, 4), np.float32)
    out = overlay.view_tile(image, (400, 200), (100, 0, 300, 200), signed, opacity=1.0, colormap="bwr")
    assert out.shape == (20, 40, 3)
    dimmed = round(100 * overlay.OUTSIDE_KEEP + overlay.OUTSIDE_COLOR[0] * (1 - overlay.OUTSIDE_KEEP))
    assert tuple(out[10, 5]) == (dimmed,) * 3 and tuple(out[10, 35]) == (dimmed,) * 3   # x 50 and 350: outside
    assert tuple(out[10, 20]) == (255, 0, 0)                                           # inside: all relevance
    assert tuple(out[10, 10]) in overlay.BOX_COLORS and tuple(out[10, 9]) in overlay.BOX_COLORS  # the outline
    only_map = overlay.view_tile(image, (400, 200), (100, 0, 300, 200), signed, kind="map", colormap="bwr")
    assert tuple(only_map[10, 5]) == overlay.OUTSIDE_MAP_COLOR and tuple(only_map[10, 20]) == (255, 0, 0)
    unknown = overlay.view_tile(image, (400, 200), None, signed, opacity=1.0, colormap="bwr", tile=48)
    assert unknown.shape == (48, 48, 3) and tuple(unknown[0, 0]) == overlay.LETTERBOX_COLOR
    assert tuple(unknown[18, 6]) == (255, 0, 0)          # drawn over the whole (centred 40 x 20) image ...
    assert (unknown[14:34] == (255, 244, 200)).all(axis=-1).any()  # ... and labelled "placement unknown"
    with pytest.raises(ValueError, match="kind"):
        overlay.view_tile(image, (400, 200), None, signed, kind="nope")


def test_mask_outline_is_the_boundary():
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    outline = overlay.mask_outline(mask, 6, thickness=1)
    assert outline.sum() == 12 and not outline[2, 2] and outline[1, 1]


def test_load_image_missing_and_placeholder(tmp_path):
    assert overlay.load_image(tmp_path / "gone.png", 16) is None
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert overlay.load_image(tmp_path / "broken.png", 16) is None
    Image.fromarray(np.full((10, 20, 3), 7, np.uint8)).save(tmp_path / "ok.png")
    loaded = overlay.load_image(tmp_path / "ok.png", 16)
    assert loaded.shape == (16, 16, 3) and loaded.dtype == np.uint8 and loaded[5, 5, 0] == 7
    tile = overlay.placeholder(64)
    assert tile.shape == (64, 64, 3) and (tile < 150).any()   # text is drawn


def test_mean_image_and_grid(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(tmp_path / "b.png")
    mean = overlay.mean_image([tmp_path / "a.png", tmp_path / "b.png", tmp_path / "missing.png"], 4)
    assert mean[0, 0, 0] == 100
    grid = overlay.image_grid([np.zeros((10, 10, 3), np.uint8)] * 5, ["a"] * 5, columns=2, pad=2,
                              caption_height=12)
    assert grid.size == (2 * 12 + 2, 3 * (10 + 12 + 2) + 2)
    assert overlay.png_bytes(grid)[:8] == b"\x89PNG\r\n\x1a\n"
    assert overlay.png_data_uri(np.zeros((2, 2, 3), np.uint8)).startswith("data:image/png;base64,iVBOR")


def test_table_csv_writes_list_columns_as_space_separated_values():
    import io
    frame = pd.DataFrame({
        "id": [0, 1],
        "top5_classes": [np.array([2, 0, 1]), np.array([1, 2, 0])],
        "top5_probs": [np.array([0.5, 0.3, 0.2], np.float32), np.array([0.9, 0.05, 0.05], np.float32)],
        "correct": [True, False],
    })
    text = explore.table_csv(frame).decode()
    assert text.splitlines()[0] == "id,top5_classes,top5_probs,correct"
    back = pd.read_csv(io.StringIO(text))
    assert back["top5_classes"].tolist() == ["2 0 1", "1 2 0"]
    assert back["top5_probs"].tolist() == ["0.5 0.3 0.2", "0.9 0.05 0.05"]
    assert back["correct"].tolist() == [True, False]
    assert "array(" not in text and "[" not in text
    assert frame["top5_classes"].iloc[0].tolist() == [2, 0, 1]   # the caller's frame is left alone


def test_default_flag_threshold_is_the_90th_percentile_rounded_up():
    values = np.arange(1, 11) / 20                   # 0.05 ... 0.5: 90th percentile 0.455 -> 0.46
    assert explore.default_flag_threshold(values) == 0.46
    assert explore.default_flag_threshold(np.r_[values, np.nan, np.inf, -np.inf]) == 0.46   # non-finite ignored
    assert explore.default_flag_threshold(np.array([2.0, 3.0])) == 1.0                      # at most 1
    assert explore.default_flag_threshold(np.array([np.nan])) == 0.5                       # nothing finite
