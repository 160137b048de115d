"""Labelled image datasets for the offline job: listing (ImageFolder tree or CSV manifest), foreground
sources (mask folder, boxes), robust image decoding (any PIL mode), and the torch Dataset that turns one
listed image into a model input plus its crop box (where the input lies in the original, see analysis.pipeline.geometry)
and its foreground at map size in the model's frame -- or into a recorded error, never a crash.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile
from torch import Tensor

from analysis.pipeline.geometry import Box, TransformGeometry, foreground_in_frame

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")

# Never let PIL decode a truncated file into a half-grey image silently: we want the error.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DatasetError(ValueError):
    """A dataset, mask folder or box file that cannot be used (one-line message, raised before any work)."""


@dataclass
class Sample:
    """One listed image. `path` is relative to the dataset root, with forward slashes."""

    path: str
    label_name: str
    mask: str | None = None             # mask path relative to the mask root (None: no mask listed)
    boxes: list[Box] = field(default_factory=list)  # pixel boxes x0, y0, x1, y1 (x1, y1 exclusive)


@dataclass
class DatasetListing:
    root: Path                          # absolute dataset root (ImageFolder root, or the manifest's folder)
    kind: str                           # "imagefolder" or "csv"
    samples: list[Sample]               # sorted by path: the index is the image id
    label_names: list[str]              # class names, index = model output: sorted as strings (class_order)
    mask_root: Path | None = None       # where Sample.mask paths live
    has_foreground: bool = False        # a foreground source was given (masks or boxes)

    def fingerprint(self) -> str:
        """sha256 of the listed (path, label) pairs: a different file list means a different dataset."""
        digest = hashlib.sha256()
        for sample in self.samples:
            digest.update(f"{sample.path}\t{sample.label_name}\n".encode())
        return digest.hexdigest()


def class_order(names: set[str]) -> list[str]:
    """Class names in model-output order: torchvision's ImageFolder order, a plain sort of the names as strings
    (code points: "10" before "2", "B" before "a", "é" after "z"), so a model trained with ImageFolder has its
    outputs named right. A numeric sort would give folders 0..10 other labels than the model was trained with."""
    return sorted(names)


def read_text(path: Path, what: str) -> str:
    """A text file the user gives (CSV manifest, --boxes, --classes) as UTF-8 (an optional BOM is dropped); a
    DatasetError naming the line of the first byte that is not UTF-8, instead of a UnicodeDecodeError."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        offset = error.start + (len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0)
        line = raw[:offset].count(b"\n") + 1
        raise DatasetError(f"{what}: not UTF-8 text (byte 0x{raw[offset]:02x} on line {line}); save the file as "
                           "UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _csv_rows(path: Path, what: str) -> csv.DictReader:
    """A DictReader over a UTF-8 CSV file whose header names each column once (csv.DictReader would keep the
    last of two same-named columns without a word)."""
    reader = csv.DictReader(io.StringIO(read_text(path, what), newline=""))
    columns = [name.strip() for name in reader.fieldnames or []]
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    if repeated:
        raise DatasetError(f"{what}: column(s) {', '.join(repeated)} appear more than once in the header; keep "
                           "one of each")
    return reader


def _relative_inside(root: Path, relative: str, what: str) -> str:
    path = PurePosixPath(relative.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise DatasetError(f"{what} {relative!r} must be a path relative to {root} without '..' "
                           f"(put the CSV at the top of the image tree)")
    return str(path)


def list_image_folder(root: Path) -> DatasetListing:
    """root/<class>/**/<image>: every file with an image extension, sorted by relative path.

    The classes are the class folders, as torchvision's ImageFolder finds them (with allow_empty=True): every
    folder is a class, an empty one too, so output i is the i-th folder whatever the split holds. Hidden
    folders (.name) are not classes (ImageFolder counts them)."""
    root = Path(root).resolve()
    classes = class_order({p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")})
    if not classes:
        raise DatasetError(f"--data {root}: no class folders (expected root/<class>/<image>)")
    samples = []
    for name in classes:
        for path in (root / name).rglob("*"):
            if path.suffix.lower() in IMAGE_EXTENSIONS and not any(p.startswith(".") for p in path.parts[-2:]) \
                    and (path.is_file() or path.is_symlink()):
                samples.append(Sample(path=path.relative_to(root).as_posix(), label_name=name))
    if not samples:
        raise DatasetError(f"--data {root}: no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    samples.sort(key=lambda s: s.path)
    return DatasetListing(root=root, kind="imagefolder", samples=samples, label_names=classes)


def _parse_box(row: dict[str, str], where: str) -> Box | None:
    values = [row.get(column) for column in BOX_COLUMNS]
    if all(v is None or str(v).strip() == "" for v in values):
        return None
    try:
        box = tuple(float(v) for v in values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: box columns x0,y0,x1,y1 must be numbers, got {values}") from None
    return box  # type: ignore[return-value]


def list_csv_manifest(manifest: Path) -> DatasetListing:
    """CSV with columns path,label and optional mask and x0,y0,x1,y1; paths relative to the CSV's folder.

    Several rows for the same path are allowed only to list several boxes (labels must agree).
    """
    manifest = Path(manifest).resolve()
    root = manifest.parent
    reader = _csv_rows(manifest, f"--data {manifest}")
    columns = set(reader.fieldnames or [])
    missing = {"path", "label"} - columns
    if missing:
        raise DatasetError(f"--data {manifest}: missing column(s) {', '.join(sorted(missing))} "
                           "(expected path,label[,mask][,x0,y0,x1,y1])")
    by_path: dict[str, Sample] = {}
    for line, row in enumerate(reader, start=2):
        where = f"{manifest.name} line {line}"
        if not (row.get("path") or "").strip():
            raise DatasetError(f"{where}: empty path")
        relative = _relative_inside(root, row["path"].strip(), f"{where}: path")
        label = (row.get("label") or "").strip()
        if not label:
            raise DatasetError(f"{where}: empty label")
        mask = (row.get("mask") or "").strip() or None
        if mask is not None:
            mask = _relative_inside(root, mask, f"{where}: mask")
        box = _parse_box(row, where)
        sample = by_path.get(relative)
        if sample is None:
            sample = by_path[relative] = Sample(path=relative, label_name=label, mask=mask)
        elif sample.label_name != label:
            raise DatasetError(f"{where}: {relative} listed with labels {sample.label_name!r} and {label!r}")
        if box is not None:
            sample.boxes.append(box)
    if not by_path:
        raise DatasetError(f"--data {manifest}: the manifest lists no images")
    samples = sorted(by_path.values(), key=lambda s: s.path)
    has_masks = any(s.mask for s in samples)
    has_boxes = any(s.boxes for s in samples)
    return DatasetListing(root=root, kind="csv", samples=samples,
                          label_names=class_order({s.label_name for s in samples}),
                          mask_root=root if has_masks else None, has_foreground=has_masks or has_boxes)


def list_dataset(data: Path) -> DatasetListing:
    """An ImageFolder directory or a .csv manifest."""
    data = Path(data)
    if not data.exists():
        raise DatasetError(f"--data {data}: no such file or directory")
    if data.is_dir():
        return list_image_folder(data)
    if data.suffix.lower() == ".csv":
        return list_csv_manifest(data)
    raise DatasetError(f"--data {data}: expected an ImageFolder directory or a .csv manifest")


def attach_masks(listing: DatasetListing, mask_root: Path) -> None:
    """--masks DIR mirrors the image tree: image a/b.jpg has mask DIR/a/b.png (a missing one: no foreground)."""
    mask_root = Path(mask_root).resolve()
    if not mask_root.is_dir():
        raise DatasetError(f"--masks {mask_root}: not a directory")
    found = 0
    for sample in listing.samples:
        relative = PurePosixPath(sample.path).with_suffix(".png").as_posix()
        if (mask_root / relative).exists():
            sample.mask = relative
            found += 1
        else:
            sample.mask = None
    if found == 0:
        raise DatasetError(f"--masks {mask_root}: no mask found (image a/b.jpg needs mask {mask_root}/a/b.png)")
    listing.mask_root = mask_root
    listing.has_foreground = True


def attach_boxes(listing: DatasetListing, box_file: Path) -> None:
    """--boxes FILE: CSV path,x0,y0,x1,y1 (several rows per image allowed: their union is the foreground)."""
    box_file = Path(box_file)
    if not box_file.is_file():
        raise DatasetError(f"--boxes {box_file}: no such file")
    by_path = {s.path: s for s in listing.samples}
    for sample in listing.samples:
        sample.boxes = []
    matched = 0
    reader = _csv_rows(box_file, f"--boxes {box_file}")
    missing = {"path", *BOX_COLUMNS} - set(reader.fieldnames or [])
    if missing:
        raise DatasetError(f"--boxes {box_file}: missing column(s) {', '.join(sorted(missing))} "
                           "(expected path,x0,y0,x1,y1)")
    for line, row in enumerate(reader, start=2):
        where = f"{box_file.name} line {line}"
        relative = _relative_inside(listing.root, (row.get("path") or "").strip(), f"{where}: path")
        box = _parse_box(row, where)
        sample = by_path.get(relative)
        if sample is not None and box is not None:
            sample.boxes.append(box)
            matched += 1
    if matched == 0:
        raise DatasetError(f"--boxes {box_file}: no row matches an image of the dataset "
                           f"(paths must be relative to {listing.root})")
    listing.has_foreground = True


def evenly_spaced(count: int, limit: int | None) -> list[int]:
    """Indices of a deterministic subset of size `limit`, spread evenly over the sorted list (all classes)."""
    if limit is None or limit >= count:
        return list(range(count))
    if limit <= 0:
        return []
    return sorted({int(i) for i in np.floor(np.arange(limit) * (count / limit)).astype(np.int64)})


# ----------------------------------------------------------------------------------------------------------
# Decoding and preprocessing
# ----------------------------------------------------------------------------------------------------------

def to_model_mode(image: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> 'RGB' (channels 3) or 'L' (channels 1), 8 bits per channel.

    16-bit and 32-bit integer images are scaled to 0..255 (I;16: / 257; mode I: / 257 when values exceed
    255, as 16-bit PNG/TIFF data does), float images 0..1 or 0..255 are mapped likewise. A plain
    `convert('L')` would clip everything above 255 to white.
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            values = values / 257.0
        elif image.mode == "F" and values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        elif values.size and values.max() > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids PIL's warning; alpha is dropped below like for RGBA
    elif image.mode in ("1", "LA"):
        image = image.convert("L")
    target = "RGB" if channels == 3 else "L"
    return image if image.mode == target else image.convert(target)


def load_image(path: Path) -> Image.Image:
    """Open and fully decode an image (so truncation is detected here, not later in a worker's transform)."""
    if path.stat().st_size == 0:
        raise ValueError("zero-byte file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()
            return image.copy()


def _short_reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    name = type(error).__name__
    return f"{name}: {text}" if text and name not in ("ValueError",) else (text or name)


def mask_foreground(mask: Image.Image) -> np.ndarray:
    """bool [H, W]: the mask's non-zero pixels are the object, whatever its mode and bit depth (a 16-bit mask
    with values 1..128 included; alpha is ignored, a palette mask is read through its colours)."""
    if mask.mode in ("1", "L", "I", "F") or mask.mode.startswith("I;16"):
        values = np.asarray(mask)
        return np.nan_to_num(values.astype(np.float64)) != 0 if mask.mode == "F" else values != 0
    if mask.mode in ("LA", "La"):
        return np.asarray(mask)[..., 0] != 0
    if mask.mode not in ("RGB", "RGBA", "RGBa", "RGBX"):
        mask = mask.convert("RGBA" if mask.mode == "P" and "transparency" in mask.info else "RGB")
    return np.asarray(mask)[..., :3].any(axis=-1)


def boxes_to_mask(boxes: Sequence[Box], width: int, height: int) -> np.ndarray:
    """Union of pixel boxes (x1, y1 exclusive, clipped to the image) as a bool [height, width] mask."""
    mask = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in boxes:
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"empty box {x0:g},{y0:g},{x1:g},{y1:g} (needs x1 > x0 and y1 > y0)")
        c0, r0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        c1, r1 = min(width, math.ceil(x1)), min(height, math.ceil(y1))
        if c1 <= c0 or r1 <= r0:
            raise ValueError(f"box {x0:g},{y0:g},{x1:g},{y1:g} lies outside the {width}x{height} image")
        mask[r0:r1, c0:c1] = True
    return mask


@dataclass
class Item:
    """What the Dataset returns for one id: an input tensor, or None and the reason it was skipped."""

    id: int
    label: int
    image: Tensor | None
    foreground: Tensor | None      # bool [map_size, map_size], or None (no foreground known for this image)
    error: str | None = None
    size: tuple[int, int] = (0, 0)  # the original image's (width, height)
    box: Box | None = None          # the crop box the model saw, in original pixels (None: unknown)


class ExplainDataset(torch.utils.data.Dataset):
    """Decodes listed images for the job; a bad file becomes an Item with `error` set, never an exception."""

    def __init__(self, listing: DatasetListing, labels: Sequence[int], transform: Callable[[Image.Image], Tensor],
                 channels: int, map_size: int, geometry: TransformGeometry | None):
        self.listing = listing
        self.labels = list(labels)
        self.transform = transform
        self.channels = channels
        self.map_size = map_size
        self.geometry = geometry

    def __len__(self) -> int:
        return len(self.listing.samples)

    def __getitem__(self, index: int) -> Item:
        sample = self.listing.samples[index]
        label = self.labels[index]
        try:
            image = load_image(self.listing.root / sample.path)
        except Exception as error:  # PIL raises many types for bad files; every one means "skip and record"
            return Item(index, label, None, None, f"unreadable image: {_short_reason(error)}")
        located = self.geometry.locate(*image.size) if self.geometry is not None else None
        box = located[0] if located is not None else None
        try:
            foreground = self._foreground(sample, image.size, box)
        except Exception as error:
            return Item(index, label, None, None, f"bad foreground: {_short_reason(error)}")
        try:
            tensor = self.transform(to_model_mode(image, self.channels))
        except Exception as error:
            return Item(index, label, None, None, f"preprocessing failed: {_short_reason(error)}")
        if not isinstance(tensor, Tensor) or tensor.dim() != 3:
            return Item(index, label, None, None, "preprocessing did not return a [C, H, W] tensor")
        return Item(index, label, tensor, foreground, size=image.size, box=box)

    def _foreground(self, sample: Sample, size: tuple[int, int], box: Box | None) -> Tensor | None:
        """The object at map size in the model's frame: the mask and boxes (original pixels) placed through the
        crop box. None without a mask or box, or when the box is unknown (nowhere to place them)."""
        width, height = size
        mask: np.ndarray | None = None
        if sample.mask is not None and self.listing.mask_root is not None:
            with Image.open(self.listing.mask_root / sample.mask) as mask_image:
                mask_image.load()
                if mask_image.size != size:
                    raise ValueError(f"mask {sample.mask} is {mask_image.size[0]}x{mask_image.size[1]}, "
                                     f"the image is {width}x{height}")
                mask = mask_foreground(mask_image)
        if sample.boxes:
            box_mask = boxes_to_mask(sample.boxes, width, height)
            mask = box_mask if mask is None else (mask | box_mask)
        if mask is None or box is None:
            return None
        return torch.from_numpy(foreground_in_frame(mask, box, self.map_size))


@dataclass
class Batch:
    ids: Tensor                    # long [n] explained images
    labels: Tensor                 # long [n]
    images: Tensor                 # float [n, C, H, W]
    foreground: Tensor | None      # bool [n, M, M] (rows without a foreground are all False), or None
    has_foreground: Tensor         # bool [n]
    errors: list[tuple[int, str]]  # (id, reason) of the skipped images of this batch
    sizes: Tensor | None = None    # long [n, 2]: each original image's (width, height)
    boxes: Tensor | None = None    # float64 [n, 4]: each crop box x0, y0, x1, y1 (NaN: unknown)

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True): page-locked images make the copy to the GPU asynchronous."""
        if self.images.numel():
            self.images = self.images.pin_memory()
        return self


def collate_items(items: list[Item]) -> Batch:
    """Stack good items; failed ones (and any whose tensor shape differs from the batch's) become errors."""
    errors = [(item.id, item.error or "") for item in items if item.image is None]
    good = [item for item in items if item.image is not None]
    if good:
        shapes = [tuple(item.image.shape) for item in good]
        common = max(set(shapes), key=shapes.count)
        for item, shape in zip(list(good), shapes):
            if shape != common:
                errors.append((item.id, f"preprocessed size {list(shape)} differs from the batch's "
                                        f"{list(common)}: give the model a transform with a fixed output size"))
        good = [item for item, shape in zip(good, shapes) if shape == common]
    errors.sort()
    if not good:
        return Batch(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0),
                     None, torch.zeros(0, dtype=torch.bool), errors, torch.zeros((0, 2), dtype=torch.long),
                     torch.zeros((0, 4), dtype=torch.float64))
    has_fg = torch.tensor([item.foreground is not None for item in good])
    foreground = None
    if has_fg.any():
        size = next(item.foreground for item in good if item.foreground is not None).shape
        foreground = torch.stack([item.foreground if item.foreground is not None
                                  else torch.zeros(size, dtype=torch.bool) for item in good])
    return Batch(ids=torch.tensor([item.id for item in good], dtype=torch.long),
                 labels=torch.tensor([item.label for item in good], dtype=torch.long),
                 images=torch.stack([item.image for item in good]), foreground=foreground,
                 has_foreground=has_fg, errors=errors,
                 sizes=torch.tensor([list(item.size) for item in good], dtype=torch.long),
                 boxes=torch.tensor([list(item.box) if item.box is not None else [math.nan] * 4 for item in good],
                                    dtype=torch.float64))
