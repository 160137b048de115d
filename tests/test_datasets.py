"""Dataset listing, image decoding of every mode, masks, boxes and the job's Dataset, on real files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from analysis.pipeline.geometry import foreground_in_frame, geometry_of
from analysis.pipeline.datasets import (DatasetError, ExplainDataset, Item, attach_boxes, attach_masks, boxes_to_mask,
                           collate_items, evenly_spaced, list_dataset, load_image, to_model_mode)
from tests.helpers import make_image_folder, make_mask_folder


def test_image_folder_listing_is_sorted_and_skips_non_images(tmp_path: Path) -> None:
    paths = make_image_folder(tmp_path, per_class=3)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / "sub").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "dog" / "sub" / "deep.PNG")  # nested, upper-case extension
    (tmp_path / ".hidden").mkdir()
    listing = list_dataset(tmp_path)
    assert listing.kind == "imagefolder" and listing.label_names == ["cat", "dog", "fox"]
    assert [s.path for s in listing.samples] == sorted(paths + ["dog/sub/deep.PNG"])
    assert {s.label_name for s in listing.samples if s.path.startswith("dog/")} == {"dog"}
    before = listing.fingerprint()
    (tmp_path / "fox" / "img_000.png").rename(tmp_path / "fox" / "img_zzz.png")
    assert list_dataset(tmp_path).fingerprint() != before


def test_missing_or_empty_dataset_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        list_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no class folders"):
        list_dataset(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        list_dataset(tmp_path)


def test_csv_manifest_with_masks_and_several_boxes(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "masks").mkdir()
    Image.new("L", (20, 20), 255).save(tmp_path / "masks" / "m.png")
    (tmp_path / "list.csv").write_text(
        "path,label,mask,x0,y0,x1,y1\n"
        "imgs/dog/img_000.png,dog,masks/m.png,,,,\n"
        "imgs/cat/img_001.png,cat,,1,2,5,6\n"
        "imgs/cat/img_001.png,cat,,10,10,12,12\n"
        "imgs/cat/img_000.png,cat,,,,,\n")
    listing = list_dataset(tmp_path / "list.csv")
    assert listing.kind == "csv" and listing.root == tmp_path.resolve()
    assert [s.path for s in listing.samples] == ["imgs/cat/img_000.png", "imgs/cat/img_001.png",
                                                 "imgs/dog/img_000.png"]
    assert listing.samples[1].boxes == [(1, 2, 5, 6), (10, 10, 12, 12)]
    assert listing.samples[2].mask == "masks/m.png" and listing.has_foreground
    assert listing.label_names == ["cat", "dog"]


@pytest.mark.parametrize("content, message", [
    ("file,label\na.png,x\n", "missing column"),
    ("path,label\n../a.png,x\n", "without '..'"),
    ("path,label\n/abs/a.png,x\n", "without '..'"),
    ("path,label\na.png,x\na.png,y\n", "labels"),
    ("path,label,x0,y0,x1,y1\na.png,x,1,2,three,4\n", "must be numbers"),
    ("path,label\n", "no images"),
])
def test_bad_csv_manifests(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(DatasetError, match=message):
        list_dataset(tmp_path / "m.csv")


CLASS_ORDER_CASES = {
    "numeric": [str(i) for i in range(11)],                      # ImageFolder: 0, 1, 10, 2, ... (not 0..10)
    "mixed_case": ["apple", "Banana", "cherry", "Date", "elder", "FIG"],
    "non_ascii": ["zebra", "éclair", "Ångström", "apple", "Zürich", "ß", "日本", "10", "9"],
}


@pytest.mark.parametrize("case", list(CLASS_ORDER_CASES))
def test_class_order_is_torchvision_image_folders_for_folders_and_csv(tmp_path: Path, case: str) -> None:
    """Output i of a model trained with ImageFolder is the i-th class folder in ImageFolder's order: the job must
    name the outputs the same way, for a folder tree and for the same labels in a CSV manifest."""
    from torchvision.datasets import ImageFolder

    names = CLASS_ORDER_CASES[case]
    root = tmp_path / "images"
    rows = ["path,label"]
    for name in names:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(root / name / "x.png")
        rows.append(f"{name}/x.png,{name}")
    expected = ImageFolder(str(root)).class_to_idx
    listing = list_dataset(root)
    assert {name: i for i, name in enumerate(listing.label_names)} == expected
    (root / "list.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert {name: i for i, name in enumerate(list_dataset(root / "list.csv").label_names)} == expected
    if case == "numeric":
        assert listing.label_names[:4] == ["0", "1", "10", "2"]


def test_an_empty_class_folder_keeps_its_output_index(tmp_path: Path) -> None:
    """A split without images of one class still has the class: the next classes keep their indices, as with
    ImageFolder(allow_empty=True); a hidden folder is no class."""
    from torchvision.datasets import ImageFolder

    make_image_folder(tmp_path, per_class=1)
    (tmp_path / "cow").mkdir()
    (tmp_path / ".ipynb_checkpoints").mkdir()
    listing = list_dataset(tmp_path)
    assert listing.label_names == ["cat", "cow", "dog", "fox"]
    (tmp_path / ".ipynb_checkpoints").rmdir()
    assert ImageFolder(str(tmp_path), allow_empty=True).class_to_idx == {n: i for i, n in
                                                                         enumerate(listing.label_names)}


def test_attach_masks_and_boxes(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "imgs", per_class=2)
    make_mask_folder(tmp_path / "imgs", tmp_path / "masks")
    (tmp_path / "masks" / "cat" / "img_001.png").unlink()
    listing = list_dataset(tmp_path / "imgs")
    attach_masks(listing, tmp_path / "masks")
    assert [s.mask for s in listing.samples[:2]] == ["cat/img_000.png", None]
    with pytest.raises(DatasetError, match="no mask found"):
        attach_masks(list_dataset(tmp_path / "imgs"), tmp_path / "imgs" / "cat")
    (tmp_path / "boxes.csv").write_text("path,x0,y0,x1,y1\ndog/img_000.png,0,0,4,4\nother/x.png,0,0,1,1\n")
    listing = list_dataset(tmp_path / "imgs")
    attach_boxes(listing, tmp_path / "boxes.csv")
    assert [s.boxes for s in listing.samples if s.boxes] == [[(0, 0, 4, 4)]]
    (tmp_path / "bad.csv").write_text("path,x0,y0\ncat/img_000.png,0,0\n")
    with pytest.raises(DatasetError, match="missing column"):
        attach_boxes(listing, tmp_path / "bad.csv")


def test_evenly_spaced_limit() -> None:
    assert evenly_spaced(10, None) == list(range(10))
    assert evenly_spaced(10, 20) == list(range(10))
    assert evenly_spaced(10, 5) == [0, 2, 4, 6, 8]
    assert evenly_spaced(24, 3) == [0, 8, 16]  # one image of each of 3 classes of 8


def test_every_image_mode_becomes_8_bit_rgb_or_l() -> None:
    gray = np.array([[0, 100], [200, 255]], np.uint8)
    expected_l = gray
    i16 = Image.fromarray(gray.astype(np.uint16) * 257)  # mode I;16: 255 * 257 = 65535
    i32 = Image.fromarray(gray.astype(np.int32) * 257, "I")
    small_i = Image.fromarray(gray.astype(np.int32), "I")              # 8-bit data in mode I: unchanged
    floats = Image.fromarray(gray.astype(np.float32) / 255, "F")
    for image in (i16, i32, small_i, floats, Image.fromarray(gray, "L")):
        np.testing.assert_array_equal(np.asarray(to_model_mode(image, 1)), expected_l, err_msg=image.mode)
        rgb = to_model_mode(image, 3)
        assert rgb.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(rgb)[..., 1], expected_l)
    rgba = Image.fromarray(np.dstack([np.full((2, 2, 3), 50, np.uint8), np.zeros((2, 2), np.uint8)]), "RGBA")
    assert to_model_mode(rgba, 3).mode == "RGB" and np.asarray(to_model_mode(rgba, 3)).max() == 50
    palette = Image.fromarray(np.full((2, 2, 3), 77, np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert np.asarray(to_model_mode(palette, 3)).tolist() == [[[77] * 3] * 2] * 2
    palette.info["transparency"] = 0
    assert to_model_mode(palette, 3).mode == "RGB"
    assert to_model_mode(Image.new("1", (2, 2), 1), 1).mode == "L"
    assert to_model_mode(Image.new("CMYK", (2, 2)), 3).mode == "RGB"


def test_boxes_to_mask() -> None:
    mask = boxes_to_mask([(1, 0, 3, 2), (3.5, 3, 10, 9)], width=5, height=4)
    expected = np.zeros((4, 5), bool)
    expected[0:2, 1:3] = True
    expected[3:4, 3:5] = True  # floor(3.5) = 3, clipped to the image
    np.testing.assert_array_equal(mask, expected)
    with pytest.raises(ValueError, match="empty box"):
        boxes_to_mask([(3, 0, 3, 2)], 5, 4)
    with pytest.raises(ValueError, match="outside"):
        boxes_to_mask([(6, 0, 8, 2)], 5, 4)


def test_mask_follows_resize_and_center_crop() -> None:
    transform = T.Compose([T.Resize(8), T.CenterCrop(4), T.ToTensor(), T.Normalize([0.5], [0.5])])
    geometry = geometry_of(transform)
    assert geometry.method == "derived"
    # 16 x 8 (W x H) mask: left half set. Resize(8): shorter side 8 -> 16 x 8; crop 4 x 4 at x 6..9, y 2..5.
    box, input_size = geometry.locate(16, 8)
    assert box == (6.0, 2.0, 10.0, 6.0) and input_size == (4, 4)
    mask = np.zeros((8, 16), bool)
    mask[:, :8] = True
    np.testing.assert_array_equal(foreground_in_frame(mask, box, 4), np.tile([True, True, False, False], (4, 1)))
    assert geometry_of(lambda image: image).method == "measured"
    assert geometry_of(T.Compose([T.RandomHorizontalFlip()])).method == "measured"


def _write_bad_files(root: Path) -> None:
    (root / "cat" / "zero.png").write_bytes(b"")
    good = (root / "cat" / "img_000.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "dog" / "text.jpg").write_text("this is not a jpeg")


def test_dataset_turns_bad_files_into_errors(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "imgs", per_class=2, modes=("RGB", "L", "RGBA", "P", "I;16", "I"))
    _write_bad_files(tmp_path / "imgs")
    make_mask_folder(tmp_path / "imgs", tmp_path / "masks")
    Image.new("L", (7, 7)).save(tmp_path / "masks" / "dog" / "img_001.png")  # wrong size
    listing = list_dataset(tmp_path / "imgs")
    attach_masks(listing, tmp_path / "masks")
    transform = T.Compose([T.Resize((20, 20)), T.ToTensor()])
    dataset = ExplainDataset(listing, [0] * len(listing.samples), transform, 3, 10, geometry_of(transform))
    items = {listing.samples[i].path: dataset[i] for i in range(len(dataset))}
    assert items["cat/zero.png"].error == "unreadable image: zero-byte file"
    assert items["cat/truncated.png"].error.startswith("unreadable image:")
    assert items["dog/text.jpg"].error.startswith("unreadable image:")
    assert "is 7x7, the image is 20x20" in items["dog/img_001.png"].error
    good = [p for p, item in items.items() if item.error is None]
    assert sorted(good) == ["cat/img_000.png", "cat/img_001.png", "dog/img_000.png", "fox/img_000.png",
                            "fox/img_001.tif"]
    for path in good:
        assert items[path].image.shape == (3, 20, 20)
    # The mask (object square) lands on the object after resizing to the 10 x 10 map.
    fg = items["cat/img_000.png"].foreground
    assert fg.shape == (10, 10) and 0 < fg.sum() < 100
    # Missing mask -> explained without a foreground.
    assert items["cat/truncated.png"].foreground is None


def test_load_image_reads_16_bit_png(tmp_path: Path) -> None:
    values = np.array([[0, 1000], [40000, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "x.png")
    image = load_image(tmp_path / "x.png")
    assert image.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(to_model_mode(image, 1)), np.rint(values / 257).astype(np.uint8))


def test_collate_skips_failed_and_mismatched_items() -> None:
    ok = Item(0, 1, torch.zeros(3, 4, 4), None)
    ok2 = Item(2, 0, torch.ones(3, 4, 4), torch.ones(2, 2, dtype=torch.bool))
    odd = Item(3, 0, torch.zeros(3, 5, 4), None)
    bad = Item(1, 0, None, None, "unreadable image: zero-byte file")
    batch = collate_items([ok, bad, ok2, odd])
    assert batch.ids.tolist() == [0, 2] and batch.labels.tolist() == [1, 0]
    assert batch.images.shape == (2, 3, 4, 4)
    assert batch.has_foreground.tolist() == [False, True]
    assert batch.foreground[0].sum() == 0 and batch.foreground[1].all()
    assert [e[0] for e in batch.errors] == [1, 3] and "differs" in batch.errors[1][1]
    empty = collate_items([bad])
    assert len(empty.ids) == 0 and empty.errors == [(1, "unreadable image: zero-byte file")]
