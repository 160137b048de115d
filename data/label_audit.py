"""A planted audit set for the label-error ranking with shortcut victims present (issue 24, item 6), shared
by bench/bench_label_errors.py and tests/test_label_errors_apart.py.

What is planted (all seeded):
  * A DemoCNN (data/demo_model.py) trained on the first `train_images` Fashion-MNIST training images with the
    demo's shortcut (data/shortcut.py: 97% of the bags carry a white corner tag, nothing else does).
  * The audit set: Fashion-MNIST test images `audit` (never seen in training, so the model's probabilities are
    out-of-sample), written as an ImageFolder: 97% of its bags and `other_fraction` of the other images carry
    the tag (the model calls many of those "bag": the shortcut's victims), and `flips` trousers (never
    tagged ones) are filed in the dress folder (the label errors to find).
  * The real job (`explain`, FG-CAM at the input layer) and the real clustering with its causal test
    (`cluster --verify-top`), as a user would run them.

truth.csv (path relative to the ImageFolder, index, true, filed, marked, flipped) is for measurements only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data import fashion_mnist, shortcut
from data.fashion_mnist import FOLDER_NAMES

MODEL_SPEC = f"{Path(__file__).resolve().parent / 'demo_model.py'}:load_demo_model"
FLIP_FROM, FLIP_TO = "trouser", "dress"


@dataclass(frozen=True)
class AuditRecipe:
    train_images: int = 6000
    epochs: int = 2
    audit_start: int = 1000          # test images audit_start .. audit_start + audit_images - 1
    audit_images: int = 2000
    flips: int = 100
    other_fraction: float = 0.06     # share of the non-bag audit images that carry the tag
    seed: int = 0                    # training, the flips and the tags of other images
    scopes: tuple[str, ...] = ("all", "mistakes")
    verify_top: int = 3


def write_audit_set(root: Path, recipe: AuditRecipe) -> pd.DataFrame:
    """The ImageFolder root/images and root/truth.csv; returns the truth table."""
    from data.label_noise import write_moved_split

    test = fashion_mnist.read_split(fashion_mnist.DEBIAN_DIR, "test")
    indices = np.arange(recipe.audit_start, recipe.audit_start + recipe.audit_images)
    marked = shortcut.choose_marked(test.images, test.labels, "test", seed=shortcut.SEED + recipe.seed,
                                    other_fraction=recipe.other_fraction)[indices]
    moved = write_moved_split(root / "images", FLIP_FROM, FLIP_TO, count=recipe.flips, indices=indices,
                              seed=recipe.seed, marked=marked)
    labels = test.labels[indices]
    truth = pd.DataFrame({"index": indices, "true": [FOLDER_NAMES[k] for k in labels], "marked": marked})
    truth["path"] = [f"{t}/{i:05d}.png" for t, i in zip(truth["true"], indices)]
    flipped = truth["path"].str.replace(f"{FLIP_FROM}/", f"{FLIP_TO}/", regex=False).isin(moved) & \
        (truth["true"] == FLIP_FROM)
    truth["flipped"] = flipped
    truth.loc[flipped, "path"] = truth.loc[flipped, "path"].str.replace(f"{FLIP_FROM}/", f"{FLIP_TO}/", regex=False)
    truth["filed"] = truth["path"].str.split("/").str[0]
    truth = truth[["path", "index", "true", "filed", "marked", "flipped"]]
    truth.to_csv(root / "truth.csv", index=False)
    return truth


def train_model(path: Path, recipe: AuditRecipe) -> Path:
    """Train the DemoCNN with the planted shortcut and save it to `path`."""
    from data.demo_model import save_weights, train

    data = fashion_mnist.read_split(fashion_mnist.DEBIAN_DIR, "train")
    images, labels = data.images[:recipe.train_images], data.labels[:recipe.train_images]
    marked = shortcut.choose_marked(data.images, data.labels, "train")[:recipe.train_images]
    result = train(shortcut.plant(images, marked), labels, epochs=recipe.epochs, seed=recipe.seed, log=None)
    save_weights(result.model, path, {"train_images": result.images, "epochs": result.epochs})
    return path


def build(root: Path, recipe: AuditRecipe, threads: int = 1) -> tuple[Path, pd.DataFrame]:
    """Everything under `root`: the model, the audit set, its cache (explained and clustered with the causal
    test). Returns (cache folder, truth table with the cache's id per image)."""
    from analysis.__main__ import main
    from analysis.cache import load
    from data.demo_model import WEIGHTS_ENV

    root.mkdir(parents=True, exist_ok=True)
    truth = write_audit_set(root, recipe)
    weights = train_model(root / "model.pt", recipe)
    previous = os.environ.get(WEIGHTS_ENV)
    os.environ[WEIGHTS_ENV] = str(weights)
    try:
        cache = root / "cache"
        steps = [["explain", "--data", str(root / "images"), "--model", MODEL_SPEC, "--out", str(cache),
                  "--target-layer", "input", "--map-size", "28", "--descriptor-size", "14", "--batch-size", "100",
                  "--device", "cpu", "--workers", "0", "--no-cluster", "--quiet"],
                 ["cluster", "--cache", str(cache), "--scopes", *recipe.scopes, "--embedding", "spectral",
                  "--null-partitions", "0", "--verify-top", str(recipe.verify_top), "--device", "cpu",
                  "--threads", str(threads), "--seed", str(recipe.seed), "--quiet"]]
        for step in steps:
            code = main(step)
            if code != 0:
                raise RuntimeError(f"`python -m analysis {' '.join(step)}` failed with exit code {code}")
    finally:
        if previous is None:
            os.environ.pop(WEIGHTS_ENV, None)
        else:
            os.environ[WEIGHTS_ENV] = previous
    ids = load(cache).table[["id", "path", "pred_name", "label_name"]]
    return cache, truth.merge(ids, on="path", how="left", validate="one_to_one")


def true_victims(truth: pd.DataFrame) -> np.ndarray:
    """bool per truth row: a tagged non-bag the model called "bag" (the shortcut's victims, by construction)."""
    return (truth["marked"] & (truth["true"] != shortcut.SHORTCUT_CLASS)
            & (truth["pred_name"] == shortcut.SHORTCUT_CLASS)).to_numpy(bool)


def measure(cache_dir: Path, truth: pd.DataFrame, top: int = 100) -> pd.DataFrame:
    """One row per Cleanlab method: AP of the flips over every image (victims left in) and over the ranking
    with the victims set apart, and how many of the top `top` are true victims in each; plus the victims set
    apart against the true ones (precision, recall)."""
    from sklearn.metrics import average_precision_score

    from analysis.cache import load
    from analysis.review import LABEL_QUALITY_METHODS, label_issues, shortcut_victims

    cache = load(cache_dir)
    by_id = truth.set_index("id")
    victims = by_id.index.isin(shortcut_victims(cache)["id"])
    real = pd.Series(true_victims(truth), index=truth["id"])
    found, actual = set(by_id.index[victims]), set(real.index[real])
    rows = []
    for method in LABEL_QUALITY_METHODS:
        row: dict = {"method": method}
        for name, set_apart in (("mixed", False), ("apart", True)):
            ranking = label_issues(cache, method=method, set_apart=set_apart)
            flipped = by_id.loc[ranking["id"], "flipped"].to_numpy(bool)
            row[f"ap_{name}"] = float(average_precision_score(flipped, -ranking["label_quality"].to_numpy()))
            row[f"victims_top{top}_{name}"] = int(real.loc[ranking["id"].head(top)].sum())
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs.update(victims_found=len(found), victims_true=len(actual), flips=int(truth["flipped"].sum()),
                       victims_precision=len(found & actual) / max(1, len(found)),
                       victims_recall=len(found & actual) / max(1, len(actual)))
    return frame
