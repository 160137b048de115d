"""Where the model's input lies in the original image (analysis/pipeline/geometry.py), and the job, cache and masks that
use it: crop boxes derived from torchvision's transforms (checked against torchvision's own output), measured
for a user's own function, maps laid back on the original (`Cache.map_in_image`), masks and boxes in original
pixels scored in the model's frame, 16-bit masks. Real transforms, real files, the real job."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import v2

from analysis.cache import UnknownGeometry, load
from analysis.cache.placement import place_map
from analysis.pipeline.geometry import (DerivedGeometry, MeasuredGeometry, NoGeometry, foreground_in_frame,
                                        frame_coverage, geometry_of, measure_box)
from analysis.pipeline.datasets import ExplainDataset, list_dataset, mask_foreground
from tests.helpers import TINY_MODEL_FILE, run_main

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ----------------------------------------------------------------------------------------------------------
# Deriving the crop box from torchvision's transforms
# ----------------------------------------------------------------------------------------------------------

# (transform, width, height, crop box by hand, input size (w, h))
HAND_COMPUTED = [
    # Resize(256): 600 x 400 -> 384 x 256 (scale 0.64); CenterCrop(224): left 80, top 16 -> /0.64
    (T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(*IMAGENET)]), 600, 400,
     (125.0, 25.0, 475.0, 375.0), (224, 224)),
    # 451 x 300 -> int(256 * 451 / 300) = 384 x 256: x scale 384 / 451, y scale 256 / 300; left 80, top 16
    (T.Compose([T.Resize(256), T.CenterCrop(224)]), 451, 300,
     (80 * 451 / 384, 16 * 300 / 256, 304 * 451 / 384, 240 * 300 / 256), (224, 224)),
    # 640 x 427 -> 383 x 256; left = round(159 / 2) = round(79.5) = 80 (half to even), top 16
    (v2.Compose([v2.ToImage(), v2.Resize(256), v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True)]), 640, 427,
     (80 * 640 / 383, 16 * 427 / 256, 304 * 640 / 383, 240 * 427 / 256), (224, 224)),
    # 427 x 640 (portrait): 256 x 383; top = round(79.5) = 80
    (T.Compose([T.Resize(256), T.CenterCrop(224)]), 427, 640,
     (16 * 427 / 256, 80 * 640 / 383, 240 * 427 / 256, 304 * 640 / 383), (224, 224)),
    # Resize to (h, w): the whole image, aspect changed
    (T.Compose([T.Resize((224, 224)), T.ToTensor()]), 600, 400, (0.0, 0.0, 600.0, 400.0), (224, 224)),
    # max_size: 600 x 400 -> short side 256 would make the long side 384 > 300: 300 x int(300 * 256 / 384) = 200
    (T.Resize(256, max_size=300), 600, 400, (0.0, 0.0, 600.0, 400.0), (300, 200)),
    # v2 Resize(None, max_size=50): long side 50 -> 50 x 33; CenterCrop(40): pad rows 3 above, 4 below; left 5
    (v2.Compose([v2.Resize(None, max_size=50), v2.CenterCrop(40)]), 600, 400,
     (5 * 12.0, -3 * 400 / 33, 45 * 12.0, 37 * 400 / 33), (40, 40)),
    # CenterCrop larger than the image: 300 x 100 padded by (224 - 100) // 2 = 62 rows above; left = 38
    (T.CenterCrop(224), 300, 100, (38.0, -62.0, 262.0, 162.0), (224, 224)),
]


@pytest.mark.parametrize("transform, width, height, box, size", HAND_COMPUTED)
def test_derived_box_matches_the_hand_computed_one(transform, width, height, box, size) -> None:
    geometry = geometry_of(transform)
    assert isinstance(geometry, DerivedGeometry)
    found, input_size = geometry.locate(width, height)
    np.testing.assert_allclose(found, box, rtol=0, atol=1e-9)
    assert input_size == size
    real = transform(Image.new("RGB", (width, height)))
    real_size = real.size if isinstance(real, Image.Image) else (real.shape[-1], real.shape[-2])
    assert tuple(real_size) == size  # torchvision's own output


def test_imagenet_preset_of_torchvision_weights() -> None:
    from torchvision.models import ResNet50_Weights

    transform = ResNet50_Weights.IMAGENET1K_V2.transforms()  # Resize(232) + CenterCrop(224), no download
    box, size = geometry_of(transform).locate(600, 400)
    # 600 x 400 -> 348 x 232 (scale 0.58); left = round(62) = 62, top = round(4) = 4
    np.testing.assert_allclose(box, (62 / 0.58, 4 / 0.58, 286 / 0.58, 228 / 0.58), rtol=1e-12)
    assert size == (224, 224) and geometry_of(transform).describe() == "Resize(short side 232) + CenterCrop(224)"


@pytest.mark.parametrize("crop", [(7, 7), (8, 5), (12, 20), (30, 11), (9, 40)])
@pytest.mark.parametrize("size", [(20, 10), (11, 13), (9, 40)])
def test_derived_center_crop_takes_exactly_torchvision_pixels(crop, size) -> None:
    """Independent check of the offsets, rounding and padding: the derived box, cut out of a noise image with
    PIL (zeros outside the image), is pixel for pixel what torchvision's CenterCrop returns."""
    rng = np.random.default_rng(sum(crop) * 100 + sum(size))
    image = Image.fromarray(rng.integers(1, 256, (size[1], size[0], 3), dtype=np.uint8))
    for transform in (T.CenterCrop(crop), v2.CenterCrop(crop)):
        (x0, y0, x1, y1), _ = geometry_of(transform).locate(*size)
        assert all(float(v).is_integer() for v in (x0, y0, x1, y1))
        expected = np.asarray(image.crop((int(x0), int(y0), int(x1), int(y1))))
        np.testing.assert_array_equal(np.asarray(transform(image)), expected)


@pytest.mark.parametrize("transform", [
    T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(*IMAGENET)]),
    T.Compose([T.Resize((50, 90)), T.ToTensor()]),
    T.Compose([T.Resize(40), T.CenterCrop((30, 60)), T.Grayscale(), T.ToTensor()]),
    T.Compose([T.CenterCrop((500, 100)), T.ToTensor()]),
])
@pytest.mark.parametrize("width, height", [(600, 400), (451, 300), (37, 91)])
def test_measured_box_agrees_with_the_derived_one(transform, width, height) -> None:
    derived = geometry_of(transform).locate(width, height)
    measured = measure_box(transform, width, height)
    assert measured is not None
    assert measured[1] == derived[1]
    np.testing.assert_allclose(measured[0], derived[0], rtol=0, atol=1.0 + width / 255)


def test_a_plain_function_is_measured_and_random_or_flipping_ones_are_unknown() -> None:
    geometry = geometry_of(lambda image: T.functional.to_tensor(image.crop((100, 30, 400, 270)).resize((150, 120))))
    assert isinstance(geometry, MeasuredGeometry)
    box, size = geometry.locate(500, 300)
    np.testing.assert_allclose(box, (100, 30, 400, 270), atol=2.0)
    assert size == (150, 120)
    for transform in (T.Compose([T.RandomResizedCrop(50), T.ToTensor()]),
                      T.Compose([T.Resize(50), T.RandomHorizontalFlip(1.0), T.ToTensor()]),
                      T.Compose([T.Resize(50), T.RandomRotation((30, 30)), T.ToTensor()]),
                      lambda image: torch.zeros(3, 4, 4),
                      lambda image: "not a tensor"):
        assert geometry_of(transform).locate(100, 80) is None
    assert NoGeometry("why").locate(10, 10) is None


# ----------------------------------------------------------------------------------------------------------
# Moving maps and masks between the frames
# ----------------------------------------------------------------------------------------------------------

def test_place_map_by_hand() -> None:
    # A 2 x 2 map on the box x 2..6, y 0..4 of an 8 x 5 image: cell centres at x 3 and 5, y 1 and 3.
    frame_map = np.array([[0.0, 4.0], [8.0, 12.0]])
    placed = place_map(frame_map, (2, 0, 6, 4), width=8, height=5)
    assert placed.shape == (5, 8) and placed.dtype == np.float32
    finite = np.isfinite(placed)
    expected_finite = np.zeros((5, 8), bool)
    expected_finite[0:4, 2:6] = True  # pixel centres 2.5 .. 5.5 and 0.5 .. 3.5
    np.testing.assert_array_equal(finite, expected_finite)
    # Pixel (x 3, y 1): centre (3.5, 1.5) is a quarter of the way from cell (0, 0) to its neighbours.
    assert placed[1, 3] == pytest.approx(0.75 * 0.75 * 0 + 0.25 * 0.75 * 4 + 0.75 * 0.25 * 8 + 0.25 * 0.25 * 12)
    assert placed[0, 2] == pytest.approx(0.0) and placed[3, 5] == pytest.approx(12.0)  # clamped at the edges
    # A box reaching outside the image (padding): only the image's pixels come back.
    padded = place_map(np.ones((4, 4)), (-2, -2, 6, 6), width=4, height=4)
    assert np.isfinite(padded).all()


def test_frame_coverage_by_hand() -> None:
    mask = np.zeros((4, 8), bool)
    mask[:, 3:5] = True                                  # columns 3 and 4
    # Box x 2..6, y 0..4 in 2 x 2 cells of 2 x 2 pixels: the left cell holds columns 2, 3 (half object).
    np.testing.assert_allclose(frame_coverage(mask, (2, 0, 6, 4), 2), [[0.5, 0.5], [0.5, 0.5]])
    # A fractional box: x 2.5..4.5 in one cell: object over [3, 4.5) of [2.5, 4.5): 0.75.
    assert frame_coverage(mask, (2.5, 0, 4.5, 4), 1)[0, 0] == pytest.approx(0.75)
    # Padding counts as not covered: box x -4..4 over an all-object mask covers half of it.
    assert frame_coverage(np.ones((4, 4), bool), (-4, 0, 4, 4), 1)[0, 0] == pytest.approx(0.5)
    np.testing.assert_array_equal(foreground_in_frame(mask, (2, 0, 6, 4), 2), np.ones((2, 2), bool))


def test_mask_non_zero_pixels_are_the_object_at_any_bit_depth(tmp_path: Path) -> None:
    values = np.array([[0, 1], [128, 0]], np.uint16)
    Image.fromarray(values).save(tmp_path / "sixteen.png")              # a 16-bit PNG, values 1..128
    with Image.open(tmp_path / "sixteen.png") as mask:
        assert mask.mode.startswith("I")
        np.testing.assert_array_equal(mask_foreground(mask), values > 0)
    expected = np.array([[False, True], [True, False]])
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 1, 2] = 1
    rgb[1, 0, 0] = 200
    for mask in (Image.fromarray(rgb), Image.fromarray(rgb).convert("RGBA"),
                 Image.fromarray((values * 257).astype(np.int32), "I"), Image.fromarray(values.astype(np.float32), "F"),
                 Image.fromarray((values > 0).astype(np.uint8) * 255).convert("1")):
        np.testing.assert_array_equal(mask_foreground(mask), expected, err_msg=mask.mode)
    transparent_but_black = Image.fromarray(np.dstack([rgb, np.zeros((2, 2), np.uint8)]), "RGBA")
    np.testing.assert_array_equal(mask_foreground(transparent_but_black), expected)  # alpha is not the object


# ----------------------------------------------------------------------------------------------------------
# The job: maps back on the original, masks and boxes in the model's frame
# ----------------------------------------------------------------------------------------------------------

MARKER = (300, 80, 324, 104)   # x0, y0, x1, y1 of a bright 24 x 24 square in a 500 x 300 image


def _marker_image(path: Path) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(20, 70, (300, 500, 3), dtype=np.uint8)   # dark, textured
    x0, y0, x1, y1 = MARKER
    pixels[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True)
    Image.fromarray(pixels).save(path)


def _explain(capsys, data: Path, out: Path, model: str, *extra: str):
    code, _, err = run_main(capsys, "explain", "--data", str(data), "--model", f"{TINY_MODEL_FILE}:{model}",
                            "--out", str(out), "--device", "cpu", "--workers", "0", "--quiet", "--no-cluster", *extra)
    assert code == 0, err
    return load(out)


# (model callable, crop box by hand (x0, y0, x1, y1) of the 500 x 300 image, input size, method)
MARKER_CASES = [
    ("brightness_center_crop", (150, 50, 350, 250), (200, 200), "derived"),
    ("brightness_resize_square", (0, 0, 500, 300), (160, 160), "derived"),       # aspect change
    ("brightness_resize_short_side", (0, 0, 500, 300), (250, 150), "derived"),
    ("brightness_padding_crop", (10, -10, 490, 310), (480, 320), "derived"),     # pads 10 rows each side
    ("brightness_own_function", (100, 30, 400, 270), (150, 120), "measured"),    # crop and aspect change
]
CROPPING = ("brightness_center_crop", "brightness_own_function")  # where the whole-image drawing misses


@pytest.mark.parametrize("model, box, size, method", MARKER_CASES, ids=[c[0] for c in MARKER_CASES])
def test_the_peak_of_map_in_image_lands_on_the_marker(tmp_path: Path, capsys, model, box, size, method) -> None:
    _marker_image(tmp_path / "images" / "bright" / "marker.png")
    (tmp_path / "classes.txt").write_text("bright\ndark\n")
    cache = _explain(capsys, tmp_path / "images", tmp_path / "cache", model, "--map-size", "32",
                     "--classes", str(tmp_path / "classes.txt"))
    assert cache.manifest["geometry"]["method"] == method
    assert cache.manifest["geometry"]["input_size"] == list(size)
    geometry = cache.geometry(0)
    assert (geometry["width"], geometry["height"]) == (500, 300) and geometry["known"]
    np.testing.assert_allclose(geometry["crop_box"], box, atol=2.0 if method == "measured" else 1e-4)
    placed = cache.map_in_image(0)
    assert placed.shape == (300, 500) and placed.dtype == np.float32
    # NaN exactly where the model never looked (to the pixel: box edges here fall on pixel edges or are
    # measured to within 2 pixels).
    rows = np.arange(300)[:, None] + 0.5
    columns = np.arange(500)[None, :] + 0.5
    x0, y0, x1, y1 = box
    looked = (columns >= x0) & (columns < x1) & (rows >= y0) & (rows < y1)
    if method == "derived":
        np.testing.assert_array_equal(np.isfinite(placed), looked)
    else:
        assert (np.isfinite(placed) != looked).mean() < 0.02
    peak_y, peak_x = np.unravel_index(np.nanargmax(placed), placed.shape)
    cell_x, cell_y = (x1 - x0) / 32, (y1 - y0) / 32
    mx0, my0, mx1, my1 = MARKER
    assert mx0 - cell_x / 2 <= peak_x <= mx1 + cell_x / 2 and my0 - cell_y / 2 <= peak_y <= my1 + cell_y / 2, \
        (peak_x, peak_y)
    if model in CROPPING:  # the old drawing (the model's frame stretched over the whole image) missed it
        stretched_x = (peak_x + 0.5 - x0) / (x1 - x0) * 500
        stretched_y = (peak_y + 0.5 - y0) / (y1 - y0) * 300
        assert not (mx0 <= stretched_x <= mx1 and my0 <= stretched_y <= my1), (stretched_x, stretched_y)


def _crop_dataset(root: Path) -> None:
    """Two 60 x 30 images (model: CenterCrop(30) -> it sees x 15..45): one with a mask, one with a box."""
    rng = np.random.default_rng(0)
    (root / "bright").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(140, 256, (30, 60, 3), dtype=np.uint8)).save(root / "bright" / name)
    mask = np.zeros((30, 60), np.uint8)
    mask[7:21, 19:28] = 1          # rows 7..20, columns 19..27: a 0/1 mask, as many tools write them
    Image.fromarray(mask).save(root / "a_mask.png")
    (root / "list.csv").write_text("path,label,mask,x0,y0,x1,y1\n"
                                   "bright/a.png,bright,a_mask.png,,,,\n"
                                   "bright/b.png,bright,,19.5,7,28,21\n")


def test_mask_and_box_in_original_pixels_score_against_the_right_cells_after_a_crop(tmp_path: Path, capsys) -> None:
    _crop_dataset(tmp_path / "data")
    (tmp_path / "classes.txt").write_text("bright\ndark\n")
    cache = _explain(capsys, tmp_path / "data" / "list.csv", tmp_path / "cache", "brightness_crop30",
                     "--map-size", "10", "--classes", str(tmp_path / "classes.txt"))
    # By hand: the crop box is x 15..45 (60 - 30 = 30, left 15), y 0..30; map cells are 3 x 3 pixels.
    # Object columns 19..27 -> frame pixels 4..12: cells 1 (3, 4, 5: 2/3 object), 2, 3; cell 4 (12, 13, 14)
    # holds a third only. Rows 7..20: cells 2 (6, 7, 8: 2/3) .. 6 (18, 19, 20). A cell is object when at
    # least half its area is: the corner cell (2, 1) has 2/3 x 2/3 = 4/9 and is not. The box 19.5..28 x 7..21
    # covers the same pixels (x0 floored, x1 exclusive).
    expected = np.zeros((10, 10), bool)
    expected[2:7, 1:4] = True
    expected[2, 1] = False
    assert cache.table["has_foreground"].all()
    for image_id in cache.ids:
        assert cache.geometry(int(image_id))["crop_box"] == (15.0, 0.0, 45.0, 30.0)
        np.testing.assert_array_equal(cache.foreground([image_id])[0], expected, err_msg=str(image_id))
    # The score counts positive relevance outside exactly those cells (from the stored float16 maps).
    maps = cache.maps(cache.ids)
    positive = np.clip(maps, 0, None)
    share = (positive * ~expected).sum(axis=(1, 2)) / positive.sum(axis=(1, 2))
    assert np.all((share > 0.2) & (share < 0.99))
    np.testing.assert_allclose(cache.table["background_share"], share, rtol=2e-3)


def test_16_bit_mask_with_small_values_keeps_its_object(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "images" / "bright").mkdir(parents=True)
    (tmp_path / "masks" / "bright").mkdir(parents=True)
    Image.fromarray(rng.integers(140, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "images/bright/x.png")
    mask = np.zeros((40, 40), np.uint16)
    mask[10:30, 10:30] = 1
    mask[15:20, 15:20] = 128      # labels 1..128 in a 16-bit PNG: to_model_mode would divide them to 0
    Image.fromarray(mask).save(tmp_path / "masks/bright/x.png")
    (tmp_path / "classes.txt").write_text("bright\ndark\n")
    cache = _explain(capsys, tmp_path / "images", tmp_path / "cache", "brightness_resize_square",
                     "--masks", str(tmp_path / "masks"), "--map-size", "8", "--classes", str(tmp_path / "classes.txt"))
    row = cache.table.iloc[0]
    assert row.has_foreground
    expected = np.zeros((8, 8), bool)
    expected[2:6, 2:6] = True      # pixels 10..29 of 40 in cells of 5
    np.testing.assert_array_equal(cache.foreground([0])[0], expected)
    assert 0.5 < row.background_share < 0.9  # bright everywhere: about 3/4 of the relevance is off the object


def test_dataset_without_a_box_has_no_foreground_and_unknown_geometry(tmp_path: Path) -> None:
    _crop_dataset(tmp_path / "data")
    listing = list_dataset(tmp_path / "data" / "list.csv")
    transform = T.Compose([T.RandomResizedCrop(30), T.ToTensor()])
    dataset = ExplainDataset(listing, [0, 0], transform, 3, 10, NoGeometry("random"))
    item = dataset[0]
    assert item.error is None and item.box is None and item.size == (60, 30) and item.foreground is None


@pytest.fixture()
def old_cache(small_cache: Path, tmp_path: Path) -> Path:
    """A cache as written before crop boxes were recorded: its parts lack the columns, its manifest the key."""
    import json
    import shutil

    import pyarrow.parquet as pq

    from analysis.cache import BOX_COLUMNS, SIZE_COLUMNS

    old = Path(shutil.copytree(small_cache, tmp_path / "old"))
    for part in old.glob("compact-*"):
        table = pq.read_table(part / "table.parquet")
        pq.write_table(table.drop_columns(list(SIZE_COLUMNS + BOX_COLUMNS)), part / "table.parquet")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["geometry"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    return old


def test_an_old_cache_without_geometry_still_opens(old_cache: Path, small_cache: Path) -> None:
    cache = load(old_cache)
    assert len(cache) == 24 and (cache.table["image_width"] == 0).all() and cache.table["crop_x0"].isna().all()
    geometry = cache.geometry(0)
    assert geometry == {"width": None, "height": None, "crop_box": None, "known": False, "input_size": None,
                        "scale": None, "aspect_change": None, "method": "unknown"}
    with pytest.raises(UnknownGeometry, match="re-run the job"):
        cache.map_in_image(0)
    # The new cache it was copied from knows: 20 x 20 images resized to 20 x 20.
    new = load(small_cache)
    assert new.geometry(0)["crop_box"] == (0.0, 0.0, 20.0, 20.0) and new.geometry(0)["method"] == "derived"
    assert new.map_in_image(0).shape == (20, 20) and np.isfinite(new.map_in_image(0)).all()


def test_pages_and_report_say_when_the_placement_is_unknown(old_cache: Path, small_cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    from analysis import report
    from analysis.present import tiles

    app = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
    for cache_dir, unknown in ((old_cache, True), (small_cache, False)):
        monkeypatch.setenv("FGCAM_CACHE", str(cache_dir))
        for page, query in (("image", {"id": "3"}), ("background", {"threshold": "0"})):
            at = AppTest.from_file(app, default_timeout=120)
            for name, value in query.items():
                at.query_params[name] = value
            at.switch_page(f"views/{page}.py")
            at.run()
            assert not at.exception, [e.value for e in at.exception]
            captions = " ".join(c.value for c in at.caption)
            assert ("is not recorded for" in captions) == unknown, (cache_dir, page, captions)
        cache = load(cache_dir)
        assert tiles.unknown_placements(cache) == (24 if unknown else 0)
        tile = tiles.image_tiles(cache, [3], "overlay", size=64)[0]
        assert tile.shape == (64, 64, 3)
        band = (tile[-8:] == np.array([255, 244, 200])).all(axis=-1).any()  # the "placement unknown" label
        assert band == unknown
    document = report.build_report(load(old_cache))
    assert "is not recorded for 24 image(s)" in document and "not recorded (an older cache)" in document


def test_tiles_of_missing_images_still_show_the_map_on_the_recorded_shape(photo_cache: Path, tmp_path: Path) -> None:
    """The photos moved away after the job: tiles are grey stand-ins of each photo's recorded shape with the map
    on its crop box (a placeholder, never an exception)."""
    import json
    import shutil

    from analysis.present import overlay, tiles

    moved = Path(shutil.copytree(photo_cache, tmp_path / "cache"))
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["dataset"]["root"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    cache = load(moved)
    coffee = int(cache.table.loc[cache.table["path"].str.endswith("coffee.png"), "id"].iloc[0])
    for kind in ("image", "overlay", "map"):
        tile = tiles.image_tiles(cache, [coffee], kind, size=300, letterbox=False)[0]
        assert tile.shape == (200, 300, 3)  # the recorded 600 x 400, not a square
    tile = tiles.image_tiles(cache, [coffee], "map", size=300, letterbox=False)[0]
    assert (tile[100, 10] == overlay.OUTSIDE_MAP_COLOR).all() and not (tile[100, 150] == overlay.OUTSIDE_MAP_COLOR).all()
