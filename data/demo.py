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
  6. explain   The offline job, FG-CAM at the input layer, on the test split -> OUT/cache.
  7. dashboard `streamlit run dashboard/app.py -- --cache OUT/cache` on localhost only (--address to share it,
               --read-only for a dashboard without tag forms that writes nothing), URL printed (skip with
               --no-dashboard).

--small runs a quick version (12,000 training images, 2 epochs, 1,000 test images) into demo_out/small.
--fix then trains the model again without the shortcut, explains the same test split into OUT/cache_fixed, compares
the two caches and opens the dashboard with the Compare page (data/demo_fix.py).
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
import signal
import socket
import subprocess
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

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "demo_out"
MARKER = ".fgcam-demo"             # marks a folder as the demo's own: only such folders are ever cleaned up
MASK_THRESHOLD = shortcut.FREE_CORNER_THRESHOLD   # the object stands on black: above this is object
MAP_SIZE = 28                      # the images' own resolution: input-level maps stored without resampling
DESCRIPTOR_SIZE = 14               # 2x2 pooling of the 28x28 maps for clustering
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
    command = [sys.executable, "-m", "analysis", "explain", "--data", str(paths.test), *model_arguments(paths),
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
    done = subprocess.run(command, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise DemoError(f"the explanation job failed (exit code {done.returncode}, its message is above); fix "
                        "that and rerun `python -m data.demo`: it resumes where the job stopped")
    say(f"        done in {time.perf_counter() - started:.0f} s")


# ----------------------------------------------------------------------------------------------------------
# Measurements (for the README and the tests; they read shortcut.csv, which the dashboard never does)
# ----------------------------------------------------------------------------------------------------------

CORNER_PIXELS = 4   # the mark's 3x3 plus one pixel: the corner region whose relevance counts as "on the mark"


def corner_share(descriptors: np.ndarray, map_side: int = 28, corner_pixels: int = CORNER_PIXELS) -> np.ndarray:
    """Share of each unit-mass descriptor [n, D*D] in the cells covering the top-left corner_pixels square."""
    descriptors = np.asarray(descriptors, dtype=np.float64)
    side = int(round(np.sqrt(descriptors.shape[1])))
    cells = int(np.ceil(corner_pixels * side / map_side))
    return descriptors.reshape(-1, side, side)[:, :cells, :cells].sum(axis=(1, 2))


def ranking_quality(scores: np.ndarray, positives: np.ndarray) -> dict[str, float]:
    """How well ranking by `scores` (descending) puts the `positives` first: ROC AUC and precision at
    k = number of positives. NaN scores rank last."""
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    finite = np.isfinite(scores)
    scores = np.where(finite, scores, (scores[finite].min() if finite.any() else 0.0) - 1.0)
    k = int(positives.sum())
    top = np.lexsort((np.arange(len(scores)), -scores))[:k]   # ties: lower row first, reproducibly
    return {"roc_auc": float(roc_auc_score(positives, scores)) if 0 < k < len(scores) else float("nan"),
            "precision_at_k": float(positives[top].mean()) if k else float("nan"), "k": k}


def marked_table(paths: DemoPaths) -> tuple[Any, Any]:
    """(the cache, its table with a boolean `marked` column joined from shortcut.csv by path)."""
    import pandas as pd

    from analysis.cache import load

    cache = load(paths.cache)
    marks = pd.DataFrame(read_shortcut_csv(paths.shortcut_csv))[["path", "marked"]]
    table = cache.table.merge(marks, on="path", how="left")
    if table["marked"].isna().any():
        raise DemoError(f"{paths.cache} lists images that are not in {paths.shortcut_csv}: rerun the demo")
    table["marked"] = table["marked"].astype(bool)
    return cache, table


def cluster_shortcut(cache: Any, table: Any, settings: Any = None) -> tuple[Any, int]:
    """Cluster the explanations of every image with the clustering engine (k-means with the eigengap's k on the
    Euclidean kNN graph of the unit-mass maps, as `python -m analysis cluster --metric euclidean` does) and
    summarise: one row per cluster, most suspicious first, with the prototype's share on the mark's corner, the
    fraction of marked members and the member ids added; and the eigengap's k."""
    from analysis.explore import clustering, statistics as explore

    # Euclidean: the geometry the demo's numbers were measured in (the cosine default also puts the marked images
    # in a cluster of their own, ranked first, but its prototype holds less of its mass on the corner: 0.29 against
    # 0.51 on the small demo). The layout is not read: the spectral one costs nothing.
    settings = settings or clustering.ClusteringSettings(algorithms=("kmeans",), metric="euclidean",
                                                         embedding="spectral")
    ids = table["id"].to_numpy(np.int64)
    descriptors = cache.descriptors(ids, kind=settings.descriptor)
    found = clustering.cluster_points(descriptors, settings)
    labels = found.labels[clustering.clustering_name(*found.chosen[0][:2])]
    consensus = explore.class_consensus(descriptors, table["pred"].to_numpy(), table["correct"].to_numpy(bool),
                                        len(cache.manifest["class_names"]))
    summary, prototypes = clustering.summarize_clusters(labels, table, descriptors, consensus,
                                                        list(cache.manifest["class_names"]))
    summary["corner_share"] = corner_share(prototypes, map_side=cache.map_size)
    marked = table["marked"].to_numpy(bool)
    summary["marked_fraction"] = [float(marked[labels == c].mean()) for c in summary["cluster"]]
    summary["members"] = [ids[labels == c] for c in summary["cluster"]]
    return summary, found.suggested_k


def measure_shortcut(paths: DemoPaths) -> dict[str, Any]:
    """What the shortcut does, measured on the demo's cache (see the README)."""
    cache, table = marked_table(paths)
    marked = table["marked"].to_numpy(bool)
    same = (table["label_name"] == shortcut.SHORTCUT_CLASS).to_numpy()
    to_shortcut = (table["pred_name"] == shortcut.SHORTCUT_CLASS).to_numpy()
    others = marked & ~same
    border = table["border_share"].to_numpy(np.float64)
    summary, suggested_k = cluster_shortcut(cache, table)
    on_mark = summary[summary["corner_share"] >= 0.3]
    return {
        "images": int(len(table)), "accuracy": float(table["correct"].mean()),
        "marked": int(marked.sum()), "marked_others": int(others.sum()),
        "marked_others_predicted_shortcut": float(to_shortcut[others].mean()) if others.any() else None,
        "unmarked_others_predicted_shortcut": float(to_shortcut[~marked & ~same].mean()),
        "border_share_median": {"marked": float(np.nanmedian(border[marked])),
                                "marked_others": float(np.nanmedian(border[others])),
                                "unmarked": float(np.nanmedian(border[~marked]))},
        "ranking_of_marked_images": {score: ranking_quality(table[score].to_numpy(np.float64), marked)
                                     for score in ("background_hotspot", "background_share", "border_share",
                                                   "concentration")},
        "clusters": {"suggested_k": int(suggested_k),
                     "n_clusters": int(len(summary)),
                     "on_mark_ranks": [int(r) for r in on_mark["rank"]],
                     "top": summary.head(5)[["rank", "size", "accuracy", "class_mix", "suspicion", "corner_share",
                                             "marked_fraction"]].round(3).to_dict("records")},
    }


# ----------------------------------------------------------------------------------------------------------
# Step 7: the dashboard
# ----------------------------------------------------------------------------------------------------------

def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def dashboard_command(paths: DemoPaths, port: int, address: str = "localhost", read_only: bool = False,
                      compare: Path | None = None) -> list[str]:
    """`streamlit run dashboard/app.py`: on `address` only (localhost: nobody else on the network reaches it), no
    "Deploy" button (a minimal toolbar), read-only when asked (no tag forms, nothing written); with `compare`, a
    second cache for the Compare page (--fix)."""
    return [sys.executable, "-m", "streamlit", "run", str(REPO_ROOT / "dashboard" / "app.py"),
            "--server.port", str(port), "--server.address", address, "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
            "--", "--cache", str(paths.cache), *(["--read-only"] if read_only else []),
            *(["--compare", str(compare)] if compare is not None else [])]


def step_dashboard(paths: DemoPaths, port: int, address: str = "localhost", read_only: bool = False,
                   compare: Path | None = None) -> int:
    app = REPO_ROOT / "dashboard" / "app.py"
    if not app.is_file():
        raise DemoError(f"{app} is missing: the checkout is incomplete (git status / git pull)")
    if not port_is_free(port):
        raise DemoError(f"port {port} is in use (another dashboard?): stop it, or rerun with --port N")
    shared = address not in ("localhost", "127.0.0.1", "::1")
    host = address if shared and address not in ("0.0.0.0", "::") else "localhost"
    say(f"[7/7] dashboard: open http://{host}:{port}  (Ctrl-C stops it; the cache stays in {paths.cache})"
        + (f"; it listens on {address}: others on the network can open it" if shared else "")
        + ("; read-only" if read_only else ""))
    say("        What is this model really looking at? Start with the clusters ranked most suspicious.")
    # The pages that run the model load it from the cache's manifest (its spec and --checkpoint): no variable.
    process = subprocess.Popen(dashboard_command(paths, port, address, read_only, compare), cwd=REPO_ROOT)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # a SIGTERM to the demo must not leave the dashboard running on its own

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def run_measure(paths: DemoPaths) -> int:
    if not cache_is_complete(paths.cache) or not paths.shortcut_csv.is_file():
        raise DemoError(f"no complete demo output in {paths.out}: run `python -m data.demo --no-dashboard"
                        f"{' --small' if paths.out.name == 'small' else ''}` first")
    result = measure_shortcut(paths)
    text = json.dumps(result, indent=2)
    (paths.out / "measurements.json").write_text(text)
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = dataclasses.replace(DemoSettings.small() if args.small else DemoSettings.full(), seed=args.seed)
    out = args.out if args.out is not None else (DEFAULT_OUT / "small" if args.small else DEFAULT_OUT)
    paths = DemoPaths(out.resolve())
    started = time.perf_counter()
    try:
        if args.measure:
            return run_measure(paths)
        claim_output_folder(paths.out)
        say("[1/7] environment: ready (made by `make setup`)")
        train, test = load_data(paths, settings, allow_download=not args.offline, allow_apt=not args.offline)
        say(f"[2/7] Fashion-MNIST: {len(train.labels)} training and {len(test.labels)} test images from "
            f"{train.source}")
        step_testset(paths, test)
        step_model(paths, settings, train, test, args.threads)
        step_explain(paths, batch_size=args.batch_size)
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
    sys.exit(main())
