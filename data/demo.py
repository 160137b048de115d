"""`python -m data.demo` (what `make demo` runs): the whole product on real images, with a planted shortcut
to find.

Steps, each skipped when its output exists and was made with the same settings:
  2. data      Fashion-MNIST's 70,000 images (data/fashion_mnist.py: Debian package, download, or apt-get).
  3. testset   OUT/test/<class>/<index:05d>.png (the 10,000 test images, index = position in the idx file),
               OUT/masks/<class>/<index:05d>.png (foreground = the original pixels above MASK_THRESHOLD, holes
               filled; computed before the mark is planted), OUT/shortcut.csv (which test images carry it).
  4.           The mark (data/shortcut.py) is planted in the test PNGs here and in the training images in step 5.
  5. model     A small CNN (data/demo_model.py) trained on the 60,000 training images -> OUT/model.pt,
               OUT/train_report.json (accuracy, training time, what the shortcut does to predictions).
  6. explain   The offline job, FG-CAM at the input layer, on the test split -> OUT/cache, with its clustering;
               then the causal test of the top VERIFY_TOP clusters of every scope (`cluster --verify-top`).
  7. dashboard `streamlit run dashboard/app.py -- --cache OUT/cache` on localhost only (--address to share it,
               --read-only for a dashboard without tag forms that writes nothing), URL printed (skip with
               --no-dashboard); data/demo_dashboard.py.

--small runs a quick version (12,000 training images, 2 epochs, 1,000 test images) into demo_out/small.
--fix then trains the model again without the shortcut, explains the same test split into OUT/cache_fixed, compares
the two caches and opens the dashboard with the Compare page (data/demo_fix.py).
--measure prints what the shortcut does on an existing output (data/demo_measure.py).
A failing step stops with one line saying what to do; a rerun continues from the first missing output.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import inspect
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.cache.files import file_replaced_atomically, write_json_atomic
from analysis.commands.cli_types import OneLineParser, positive_int as _positive_int
from data import fashion_mnist, shortcut
from data.fashion_mnist import FOLDER_NAMES, FashionMNISTUnavailable, Split
from data.in_process import run_analysis

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "demo_out"
MARKER = ".fgcam-demo"             # marks a folder as the demo's own: only such folders are ever cleaned up
MASK_THRESHOLD = shortcut.FREE_CORNER_THRESHOLD   # the object stands on black: above this is object
MAP_SIZE = 28                      # the images' own resolution: input-level maps stored without resampling
DESCRIPTOR_SIZE = 14               # 2x2 pooling of the 28x28 maps for clustering
VERIFY_TOP = 3                     # clusters causally tested per clustering of every scope (step 6)
MODEL_SPEC = f"{REPO_ROOT / 'data' / 'demo_model.py'}:demo_cnn"   # the architecture; --checkpoint: the weights


class DemoError(Exception):
    """A step that cannot go on; the message (one line) says what to do."""


@dataclass(frozen=True)
class DemoSettings:
    train_images: int | None      # None: all 60,000 (the first N of the idx file otherwise)
    test_images: int | None       # None: all 10,000
    epochs: int
    seed: int = 0

    @classmethod
    def full(cls) -> "DemoSettings":
        return cls(train_images=None, test_images=None, epochs=3)

    @classmethod
    def small(cls) -> "DemoSettings":
        return cls(train_images=12000, test_images=1000, epochs=2)


@dataclass(frozen=True)
class DemoPaths:
    out: Path

    @property
    def test(self) -> Path:
        return self.out / "test"

    @property
    def masks(self) -> Path:
        return self.out / "masks"

    @property
    def shortcut_csv(self) -> Path:
        return self.out / "shortcut.csv"

    @property
    def model(self) -> Path:
        return self.out / "model.pt"

    @property
    def train_report(self) -> Path:
        return self.out / "train_report.json"

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    @property
    def downloads(self) -> Path:
        return self.out / "downloads"

    @property
    def steps(self) -> Path:
        return self.out / "steps"


def say(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Step bookkeeping: a step's stamp records the settings its output was made with
# ----------------------------------------------------------------------------------------------------------

def _stamp_path(paths: DemoPaths, step: str) -> Path:
    return paths.steps / f"{step}.json"


def read_stamp(paths: DemoPaths, step: str) -> dict[str, Any] | None:
    try:
        return json.loads(_stamp_path(paths, step).read_text())
    except (OSError, ValueError):
        return None


def write_stamp(paths: DemoPaths, step: str, stamp: dict[str, Any]) -> None:
    write_json_atomic(_stamp_path(paths, step), stamp)


def claim_output_folder(out: Path) -> None:
    """Create OUT, or accept it if it is the demo's own; never take over a folder with someone else's files."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} exists and is not a folder: choose another --out")
    # A folder holding only other demo outputs (demo_out/ after a --small run made demo_out/small/) is fine.
    foreign = [p for p in out.iterdir() if not (p / MARKER).exists()] if out.is_dir() else []
    if foreign and not (out / MARKER).exists():
        raise DemoError(f"--out {out} is not empty and was not made by the demo: choose another --out "
                        "(the demo deletes and rewrites its outputs there)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("Made by `python -m data.demo`; its outputs here are rewritten when settings change.\n")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ----------------------------------------------------------------------------------------------------------
# Step 2: data
# ----------------------------------------------------------------------------------------------------------

def load_data(paths: DemoPaths, settings: DemoSettings, allow_download: bool = True,
              allow_apt: bool = True) -> tuple[Split, Split]:
    """The training and test splits, cut to the settings' sizes (the first N images of each idx file)."""
    try:
        train = fashion_mnist.load("train", paths.downloads, allow_download, allow_apt, log=say)
        test = fashion_mnist.load("test", paths.downloads, allow_download, allow_apt, log=say)
    except FashionMNISTUnavailable as error:
        raise DemoError(str(error)) from None

    def cut(split: Split, n: int | None) -> Split:
        return split if n is None else Split(split.images[:n], split.labels[:n], split.source)

    return cut(train, settings.train_images), cut(test, settings.test_images)


# ----------------------------------------------------------------------------------------------------------
# Steps 3-4: the test split as an ImageFolder with masks, and the planted mark
# ----------------------------------------------------------------------------------------------------------

def foreground_masks(images: np.ndarray, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """bool [N, H, W]: pixels above `threshold`, with enclosed holes filled (a dark print on a shirt is still
    shirt). Computed on the original images: the mark is not part of the object."""
    from scipy.ndimage import binary_fill_holes

    above = np.asarray(images) > threshold
    return np.stack([binary_fill_holes(mask) for mask in above]) if len(above) else above


def image_relative_path(index: int, label: int) -> str:
    """The test image's path relative to the ImageFolder root: <class folder>/<index:05d>.png."""
    return f"{FOLDER_NAMES[int(label)]}/{int(index):05d}.png"


def marked_test_images(test: Split) -> np.ndarray:
    """bool [N]: the test images that carry the mark (chosen on the full split, so --small marks a subset of
    the same images)."""
    full = fashion_mnist.read_split(test.source, "test")
    return shortcut.choose_marked(full.images, full.labels, "test")[:len(test.labels)]


def split_stamp(test: Split) -> dict[str, Any]:
    return {"n_images": int(len(test.labels)), "mask_threshold": MASK_THRESHOLD, "mark": shortcut.MARK.tolist(),
            "mark_at": [shortcut.MARK_TOP, shortcut.MARK_LEFT], "shortcut_class": shortcut.SHORTCUT_CLASS,
            "fractions": [shortcut.TEST_SAME_FRACTION, shortcut.TEST_OTHER_FRACTION], "seed": shortcut.SEED,
            "labels_sha256": hashlib.sha256(test.labels.tobytes()).hexdigest()}


def write_test_split(paths: DemoPaths, test: Split, marked: np.ndarray, indices: np.ndarray | None = None) -> None:
    """Write images (with the mark where `marked`), masks and shortcut.csv; the folders appear complete or not
    at all (written under temporary names, then renamed). `indices`: each image's position in the idx file,
    which names its PNG (default 0..N-1)."""
    from PIL import Image

    indices = np.arange(len(test.labels)) if indices is None else np.asarray(indices)
    if not (len(indices) == len(marked) == len(test.labels)):
        raise ValueError("need one index and one marked flag per image")

    planted = shortcut.plant(test.images, marked)
    masks = foreground_masks(test.images)
    tmp_test, tmp_masks = paths.out / ".test.partial", paths.out / ".masks.partial"
    for folder in (tmp_test, tmp_masks):
        _remove(folder)
        for name in FOLDER_NAMES:
            (folder / name).mkdir(parents=True)
    rows = []
    for index, label, image, mask, is_marked in zip(indices, test.labels, planted, masks, marked):
        relative = image_relative_path(index, label)
        Image.fromarray(image, "L").save(tmp_test / relative)
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(tmp_masks / relative)
        rows.append({"path": relative, "index": int(index), "label": FOLDER_NAMES[int(label)],
                     "marked": int(is_marked)})
    for final, tmp in ((paths.test, tmp_test), (paths.masks, tmp_masks)):
        _remove(final)
        tmp.rename(final)
    with file_replaced_atomically(paths.shortcut_csv) as tmp_csv, open(tmp_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "index", "label", "marked"])
        writer.writeheader()
        writer.writerows(rows)


def read_shortcut_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of shortcut.csv: path (relative to OUT/test), index, label (folder name), marked (bool)."""
    with open(path, newline="") as handle:
        return [{"path": row["path"], "index": int(row["index"]), "label": row["label"],
                 "marked": row["marked"] == "1"} for row in csv.DictReader(handle)]


def step_testset(paths: DemoPaths, test: Split) -> bool:
    """Steps 3-4 on the test split; returns True when it (re)wrote the files."""
    stamp = split_stamp(test)
    if read_stamp(paths, "testset") == stamp and paths.test.is_dir() and paths.masks.is_dir() \
            and paths.shortcut_csv.is_file():
        say(f"[3-4/7] test split, masks and mark: already in {paths.test} (skipped)")
        return False
    say(f"[3-4/7] writing {len(test.labels)} test images with masks and the planted mark to {paths.test} ...")
    marked = marked_test_images(test)
    write_test_split(paths, test, marked)
    write_stamp(paths, "testset", stamp)
    others = marked & (test.labels != shortcut.SHORTCUT_LABEL)
    say(f"        {int(marked.sum())} test images carry the mark ({int(others.sum())} of them are not "
        f"'{shortcut.SHORTCUT_CLASS}'); the list is {paths.shortcut_csv} (not read by the dashboard)")
    return True


# ----------------------------------------------------------------------------------------------------------
# Step 5: training
# ----------------------------------------------------------------------------------------------------------

def evaluate(model: Any, test: Split, marked: np.ndarray) -> dict[str, Any]:
    """Accuracy on the test split as written (marks included) and what the mark does to predictions."""
    from data.demo_model import CLASS_NAMES, OUTPUT_OF_LABEL, predict

    pred = predict(model, shortcut.plant(test.images, marked))
    truth = OUTPUT_OF_LABEL[test.labels]
    shortcut_output = CLASS_NAMES.index(shortcut.SHORTCUT_CLASS)
    same = test.labels == shortcut.SHORTCUT_LABEL
    others = marked & ~same

    def rate(values: np.ndarray) -> float | None:
        return float(values.mean()) if len(values) else None

    return {
        "test_accuracy": rate(pred == truth),
        "test_accuracy_unmarked": rate(pred[~marked] == truth[~marked]),
        "marked_others": int(others.sum()),
        "marked_others_predicted_shortcut": rate(pred[others] == shortcut_output),
        "shortcut_class_accuracy_marked": rate(pred[marked & same] == shortcut_output),
        "shortcut_class_accuracy_unmarked": rate(pred[~marked & same] == shortcut_output),
    }


def step_model(paths: DemoPaths, settings: DemoSettings, train: Split, test: Split, threads: int | None) -> bool:
    """Step 5; returns True when it trained a new model."""
    import torch

    from data.demo_model import DemoCNN, load_weights, save_weights
    from data.demo_model import train as train_model

    # A changed architecture or training recipe (their source) invalidates a trained model, like its settings.
    recipe = hashlib.sha256((repr(DemoCNN()) + inspect.getsource(train_model)).encode()).hexdigest()
    stamp = {"train_images": int(len(train.labels)), "epochs": settings.epochs, "seed": settings.seed,
             "recipe_sha256": recipe,
             "mark": shortcut.MARK.tolist(), "mark_at": [shortcut.MARK_TOP, shortcut.MARK_LEFT],
             "shortcut_class": shortcut.SHORTCUT_CLASS, "fraction": shortcut.TRAIN_FRACTION,
             "mark_seed": shortcut.SEED}
    previous = read_stamp(paths, "model")
    if previous is not None and {k: previous.get(k) for k in stamp} == stamp and paths.model.is_file() \
            and previous.get("model_sha256") == file_sha256(paths.model):
        say(f"[5/7] model: already trained, {paths.model} (skipped)")
        return False
    if threads:
        torch.set_num_threads(threads)
    full_train = fashion_mnist.read_split(train.source, "train")
    marked_train = shortcut.choose_marked(full_train.images, full_train.labels, "train")[:len(train.labels)]
    say(f"[5/7] training the demo CNN on {len(train.labels)} images ({int(marked_train.sum())} "
        f"'{shortcut.SHORTCUT_CLASS}' images carry the mark), {settings.epochs} epochs, "
        f"{torch.get_num_threads()} CPU threads ...")
    result = train_model(shortcut.plant(train.images, marked_train), train.labels, epochs=settings.epochs,
                         seed=settings.seed, log=say)
    report = {"train_seconds": round(result.seconds, 1), "train_images": result.images, "epochs": result.epochs,
              "threads": torch.get_num_threads(),
              **evaluate(result.model, test, marked_test_images(test))}
    save_weights(result.model, paths.model, report)
    load_weights(paths.model)  # what the job will load must load
    paths.train_report.write_text(json.dumps(report, indent=2))
    write_stamp(paths, "model", {**stamp, "model_sha256": file_sha256(paths.model)})
    say(f"        trained in {report['train_seconds']:.0f} s: test accuracy {report['test_accuracy']:.1%} "
        f"(unmarked images {report['test_accuracy_unmarked']:.1%}); report in {paths.train_report}")
    return True


# ----------------------------------------------------------------------------------------------------------
# Step 6: the offline job
# ----------------------------------------------------------------------------------------------------------

def model_arguments(paths: DemoPaths) -> list[str]:
    """The job's options that load the demo's trained model; the manifest records the checkpoint's absolute path,
    so the pages that run the model load it for a demo made with any --out."""
    return ["--model", MODEL_SPEC, "--checkpoint", str(paths.model.resolve())]


def explain_command(paths: DemoPaths, overwrite: bool, batch_size: int, workers: int | None) -> list[str]:
    command = ["explain", "--data", str(paths.test), *model_arguments(paths),
               "--out", str(paths.cache), "--masks", str(paths.masks), "--target-layer", "input",
               "--map-size", str(MAP_SIZE), "--descriptor-size", str(DESCRIPTOR_SIZE),
               "--batch-size", str(batch_size)]
    if workers is not None:
        command += ["--workers", str(workers)]
    if overwrite:
        command.append("--overwrite")
    return command


def cache_is_complete(cache_dir: Path) -> bool:
    from analysis.cache import CacheError, load

    try:
        return load(cache_dir).complete
    except (CacheError, OSError, ValueError):
        return False


def step_explain(paths: DemoPaths, batch_size: int = 64, workers: int | None = None,
                 quiet: bool = False) -> None:
    stamp = {"model_sha256": file_sha256(paths.model), "testset": read_stamp(paths, "testset"),
             "map_size": MAP_SIZE, "descriptor_size": DESCRIPTOR_SIZE, "model": model_arguments(paths)}
    same_inputs = read_stamp(paths, "explain") == stamp
    if same_inputs and cache_is_complete(paths.cache):
        say(f"[6/7] explanations: already in {paths.cache} (skipped)")
        return
    # Same inputs: the job resumes its committed shards. Different inputs (new model or test split): the
    # cache is the demo's own and stale, so it is replaced.
    overwrite = paths.cache.exists() and not same_inputs
    write_stamp(paths, "explain", stamp)
    command = explain_command(paths, overwrite, batch_size, workers)
    if quiet:
        command.append("--quiet")
    say(f"[6/7] explaining the test split with FG-CAM at the input layer into {paths.cache} ...")
    started = time.perf_counter()
    code = run_analysis(command)
    if code != 0:
        raise DemoError(f"the explanation job failed (exit code {code}, its message is above); fix "
                        "that and rerun `python -m data.demo`: it resumes where the job stopped")
    say(f"        done in {time.perf_counter() - started:.0f} s")


def step_verify(cache_dir: Path, label: str, step: str = "6/7") -> None:
    """The causal test of the top clusters of every scope of a cache: what makes a "shortcut" finding, or shows
    there is none (without it the Findings page can only say "undecided"). The command skips what it tested."""
    say(f"[{step}] causal test of the top {VERIFY_TOP} clusters of every scope of {label} ...")
    if run_analysis(["cluster", "--cache", str(cache_dir), "--verify-top", str(VERIFY_TOP), "--device", "cpu",
                     "--quiet"]) != 0:
        raise DemoError(f"the causal test of {cache_dir} failed (its message is above); rerun the same command")


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------

def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m data.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default {DEFAULT_OUT}, or {DEFAULT_OUT}/small with --small)")
    parser.add_argument("--small", action="store_true",
                        help="quick version: 12,000 training images, 2 epochs, 1,000 test images")
    parser.add_argument("--no-dashboard", action="store_true", help="stop after the explanations (step 6)")
    parser.add_argument("--port", type=_port, default=8501, help="dashboard port (default 8501)")
    parser.add_argument("--address", default="localhost",
                        help="the dashboard's address (default localhost: this machine only; 0.0.0.0: every "
                             "network interface, for sharing, best with --read-only)")
    parser.add_argument("--read-only", action="store_true",
                        help="a dashboard to share: tags are shown, no tag form, nothing written in the cache")
    parser.add_argument("--offline", action="store_true",
                        help="never download or apt-get (use local Fashion-MNIST files only)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads for training (default: torch's, one per core)")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch in the explanation job (default 64)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed (default 0; the mark's placement is fixed, see data/shortcut.py)")
    parser.add_argument("--measure", action="store_true",
                        help="only measure what the shortcut does on an existing demo output (prints JSON, also "
                             "written to OUT/measurements.json) -- uses shortcut.csv, which the dashboard never "
                             "reads")
    parser.add_argument("--fix", action="store_true",
                        help="then train the model again without the shortcut (the tag on every class), explain "
                             "the same test images into OUT/cache_fixed and compare the two (data/demo_fix.py); "
                             "the dashboard opens with the Compare page")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = dataclasses.replace(DemoSettings.small() if args.small else DemoSettings.full(), seed=args.seed)
    out = args.out if args.out is not None else (DEFAULT_OUT / "small" if args.small else DEFAULT_OUT)
    paths = DemoPaths(out.resolve())
    started = time.perf_counter()
    try:
        if args.measure:
            from data.demo_measure import run_measure

            return run_measure(paths)
        claim_output_folder(paths.out)
        say("[1/7] environment: ready (made by `make setup`)")
        train, test = load_data(paths, settings, allow_download=not args.offline, allow_apt=not args.offline)
        say(f"[2/7] Fashion-MNIST: {len(train.labels)} training and {len(test.labels)} test images from "
            f"{train.source}")
        step_testset(paths, test)
        step_model(paths, settings, train, test, args.threads)
        step_explain(paths, batch_size=args.batch_size)
        step_verify(paths.cache, "the demo's cache")
        compare = None
        if args.fix:
            from data import demo_fix

            demo_fix.run_fix(paths, settings, train, test, args.threads, args.batch_size)
            compare = demo_fix.FixedPaths(paths.out).cache
        say(f"demo data ready in {time.perf_counter() - started:.0f} s: {paths.out}")
        if args.no_dashboard:
            say(f"dashboard: streamlit run dashboard/app.py -- --cache {paths.cache}"
                + (f" --compare {compare}" if compare else ""))
            return 0
        from data.demo_dashboard import step_dashboard

        return step_dashboard(paths, args.port, args.address, args.read_only, compare)
    except DemoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Every step writes its output atomically, so what finished is kept and an interrupted step redoes.
        print(f"\ninterrupted: rerun the same command to continue (finished steps in {paths.out} are kept)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m data.demo` runs this file as __main__, while data/demo_measure.py, data/demo_dashboard.py and
    # data/demo_fix.py import data.demo: a second copy with its own DemoError, which this copy's main would not
    # catch (a traceback instead of one line). Run that copy's main.
    import data.demo

    sys.exit(data.demo.main())
