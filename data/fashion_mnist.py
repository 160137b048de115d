"""Fashion-MNIST (Xiao et al. 2017): 70,000 real 28x28 grayscale product photos in 10 classes, read from the
original idx files.

Where the files come from, first that works:
  1. $FASHION_MNIST_DIR, when set (a folder with the four *-ubyte[.gz] files; nothing else is tried then);
  2. Debian's `dataset-fashion-mnist` package: /usr/share/datasets/fashion-mnist/ (offline);
  3. a previous torchvision download in DOWNLOAD_DIR/FashionMNIST/raw/;
  4. torchvision's download into DOWNLOAD_DIR (online);
  5. `apt-get install dataset-fashion-mnist` (when running as root with apt-get available), then 2.
Local files come first so that a machine that has them never touches the network. If nothing works,
`FashionMNISTUnavailable` says in one line what to do.
"""
from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
ENV_DIR = "FASHION_MNIST_DIR"

# Label i of the idx files is LABEL_NAMES[i] (the dataset's own order and names).
LABEL_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# The same classes as folder names (no '/', no spaces), in label order.
FOLDER_NAMES = ("tshirt_top", "trouser", "pullover", "dress", "coat",
                "sandal", "shirt", "sneaker", "bag", "ankle_boot")

IMAGE_SIDE = 28
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
_FILE_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# idx type codes (byte 3 of the magic number) -> numpy dtype, big-endian as the format specifies.
_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
DOWNLOAD_TIMEOUT_S = 30.0


class IdxFormatError(ValueError):
    """An idx file that is truncated, not gzip when named .gz, or whose header does not fit its contents."""


class FashionMNISTUnavailable(RuntimeError):
    """No source of the Fashion-MNIST files worked; the message says what to do (one line)."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray    # uint8 [N, 28, 28], white object on black
    labels: np.ndarray    # int64 [N], values 0..9 (index into LABEL_NAMES / FOLDER_NAMES)
    source: Path          # folder the files were read from


def read_idx(path: Path) -> np.ndarray:
    """Parse one idx file (gzip-compressed when its name ends in .gz) into an array of its declared shape."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError; a truncated .gz raises EOFError
        raise IdxFormatError(f"{path}: cannot be read ({type(error).__name__}: {error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise IdxFormatError(f"{path}: not an idx file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise IdxFormatError(f"{path}: truncated header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise IdxFormatError(f"{path}: header declares shape {shape} ({expected} bytes of data) but the file holds "
                             f"{len(raw) - header_size} bytes (truncated or corrupt download)")
    array = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def has_files(folder: Path) -> bool:
    """All four idx files (compressed or not) are in `folder`."""
    return all(_find_file(folder, stem) is not None for stems in _FILE_STEMS.values() for stem in stems)


def read_split(folder: Path, split: str) -> Split:
    """Read and validate one split from a folder holding the idx files."""
    if split not in _FILE_STEMS:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    image_stem, label_stem = _FILE_STEMS[split]
    image_file, label_file = _find_file(folder, image_stem), _find_file(folder, label_stem)
    if image_file is None or label_file is None:
        raise IdxFormatError(f"{folder}: missing {image_stem}[.gz] or {label_stem}[.gz]")
    images, labels = read_idx(image_file), read_idx(label_file)
    n = SPLIT_SIZES[split]
    if images.shape != (n, IMAGE_SIDE, IMAGE_SIDE) or images.dtype != np.uint8:
        raise IdxFormatError(f"{image_file}: expected {n} uint8 images of {IMAGE_SIDE}x{IMAGE_SIDE}, got "
                             f"{images.dtype} {images.shape} (not the Fashion-MNIST {split} split)")
    if labels.shape != (n,) or labels.size and int(labels.max()) >= len(LABEL_NAMES):
        raise IdxFormatError(f"{label_file}: expected {n} labels in 0..{len(LABEL_NAMES) - 1}, got shape "
                             f"{labels.shape}" + (f", max {int(labels.max())}" if labels.size else ""))
    return Split(images=np.ascontiguousarray(images), labels=labels.astype(np.int64), source=folder)


def _torchvision_raw_dir(download_dir: Path) -> Path:
    # torchvision.datasets.FashionMNIST(root) keeps the idx files in root/FashionMNIST/raw/.
    return Path(download_dir) / "FashionMNIST" / "raw"


def _download_with_torchvision(download_dir: Path) -> None:
    from torchvision.datasets import FashionMNIST

    previous = socket.getdefaulttimeout()
    # Offline, a DNS failure is quick, but a filtered network can hang a socket for minutes: cap each wait.
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        FashionMNIST(str(download_dir), train=True, download=True)  # fetches all four files
    finally:
        socket.setdefaulttimeout(previous)


def _install_debian_package() -> str | None:
    """Try apt-get; returns None on success, else why it was not possible."""
    if not shutil.which("apt-get"):
        return "apt-get is not available"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "not running as root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", DEBIAN_PACKAGE]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"`{' '.join(command)}` failed ({error})"
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1]
            return f"`{' '.join(command)}` failed ({last})"
    return None


def locate(download_dir: Path, allow_download: bool = True, allow_apt: bool = True,
           debian_dir: Path = DEBIAN_DIR, log: Callable[[str], None] | None = print) -> Path:
    """The folder holding the four idx files, fetching them if needed (see the module docstring for the order)."""
    say = log or (lambda message: None)
    explicit = os.environ.get(ENV_DIR)
    if explicit:
        if has_files(Path(explicit)):
            return Path(explicit)
        raise FashionMNISTUnavailable(
            f"${ENV_DIR}={explicit} does not hold the four Fashion-MNIST files (train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz): fix the folder, "
            f"or unset {ENV_DIR} to use the Debian package or the download")
    if has_files(debian_dir):
        return debian_dir
    raw = _torchvision_raw_dir(download_dir)
    if has_files(raw):
        return raw
    failures = []
    if allow_download:
        say(f"Fashion-MNIST: downloading with torchvision into {download_dir} ...")
        try:
            _download_with_torchvision(download_dir)
        except Exception as error:  # URLError, timeouts, checksum errors: all mean "try the next source"
            # torchvision's message spans lines (file, mirror tried, the URL error): keep it, on one line.
            detail = " ".join(str(error).split()) or type(error).__name__
            failures.append(f"the torchvision download failed ({detail[:300]})")
        else:
            if has_files(raw):
                return raw
            failures.append(f"the torchvision download left no files in {raw}")
    if allow_apt:
        say(f"Fashion-MNIST: trying `apt-get install {DEBIAN_PACKAGE}` ...")
        why = _install_debian_package()
        if why is None and has_files(debian_dir):
            return debian_dir
        failures.append(f"apt-get install was not possible ({why or f'it left no files in {debian_dir}'})")
    raise FashionMNISTUnavailable(
        f"Fashion-MNIST not found in {debian_dir} or {raw}; " + "; ".join(failures or ["no download allowed"])
        + f". Do one of: `sudo apt-get install {DEBIAN_PACKAGE}`; rerun when online; or put the four "
        f"*-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist in a folder and set {ENV_DIR}=FOLDER")


def load(split: str, download_dir: Path, allow_download: bool = True, allow_apt: bool = True,
         log: Callable[[str], None] | None = print) -> Split:
    """One split ("train": 60,000 images, "test": 10,000), from the first source that works."""
    folder = locate(download_dir, allow_download=allow_download, allow_apt=allow_apt, log=log)
    try:
        return read_split(folder, split)
    except IdxFormatError as error:
        if folder == DEBIAN_DIR:
            fix = f"reinstall it: sudo apt-get install --reinstall {DEBIAN_PACKAGE}"
        elif folder == _torchvision_raw_dir(download_dir):
            fix = f"delete {folder} and rerun to download again"
        else:
            fix = f"replace the files in {folder}"
        raise FashionMNISTUnavailable(f"{error}; {fix}") from None
