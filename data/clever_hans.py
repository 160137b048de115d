"""One row of the Clever-Hans benchmark (issue 21): plant an artefact on Fashion-MNIST, train the demo CNN on it,
run the product as a user would (`explain`, then `cluster --verify-top N`), and score what the finder flagged
against the ground truth the benchmark alone knows.

Ground truth. Every test image's original is kept, so for a carrier of the artefact the benchmark knows its
prediction with and without it. A carrier is *driven* by the artefact when the two differ; a *victim* is a
carrier of another class than the target that the model calls the target class (the images a user hunts).

What is scored (from the stored causal tests of every scope, CACHE/analysis/clustering/*/*/verification.parquet):
  * flagged: the clusters whose verdict is "shortcut"; `victims_flagged` is the share of the victims that are
    members of at least one of them, `purity` the share of carriers among all their members;
  * undecided: the same for the clusters called "undecided" (the honest fallback for spread artefacts), and
    `victims_not_cleared` for the two together (the victims that no reassuring verdict covers);
  * wrong verdicts: tested clusters that the artefact drives (>= 50% of their members driven) called "uses the
    object" or "not used" -- the false reassurance the issue forbids;
  * on a clean control (no artefact anywhere), every "shortcut" verdict is a false alarm;
  * concept findings: the images of the findings "a concept strong in few images" (analysis.findings.kinds, from
    the stored channel relevance; no causal test), `victims_concepts` and `purity_concepts` as above: a victims
    view that does not care where the artefact sits.
The table and its command are bench/clever_hans.py; tests/test_clever_hans.py runs small rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data import artefacts, fashion_mnist, in_process
from data.fashion_mnist import FOLDER_NAMES

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_SPEC = f"{REPO_ROOT / 'data' / 'demo_model.py'}:demo_cnn"
CLEAN = "clean"
CLEAN_BACKGROUNDS = "clean, random backgrounds"   # every image's background a random grey (artefacts.random_backgrounds)
CONTROLS = (CLEAN, CLEAN_BACKGROUNDS)
DRIVEN_MOST = 0.5            # "the artefact drives most of the cluster": at least this share of its members
REASSURING = ("uses the object", "not used", "off the object, not used")


@dataclass(frozen=True)
class BenchSettings:
    train_images: int = 12000
    test_images: int = 3000
    epochs: int = 2
    target: str = "sneaker"
    other_fraction: float = 0.01      # of each other class's test images (the rare victims)
    verify_top: int = 8
    seed: int = 0
    scopes: tuple[str, ...] = ("all", "mistakes", "pred")   # where victims and carriers gather (not "true": 15 min)
    embedding: str = "tsne"           # the layout is drawn, never scored: "spectral" gives the same verdicts (the
                                      # same verification tables, measured) 4 s sooner a row


@dataclass(frozen=True)
class RowSpec:
    kind: str                          # an artefacts.KINDS name, or one of CONTROLS
    strength: float                    # share of the target class's images (train and test) that carry it

    @property
    def name(self) -> str:
        return self.kind if self.kind in CONTROLS else f"{self.kind}@{self.strength:.0%}"


def load_splits(download_dir: Path) -> tuple[fashion_mnist.Split, fashion_mnist.Split]:
    return (fashion_mnist.load("train", download_dir, allow_download=False, allow_apt=True, log=None),
            fashion_mnist.load("test", download_dir, allow_download=False, allow_apt=True, log=None))


def plant_row(spec: RowSpec, settings: BenchSettings, images: np.ndarray, labels: np.ndarray,
              split: str) -> tuple[np.ndarray, np.ndarray]:
    """(planted images, carriers) of one split: the target class at the row's strength; in the test split also
    `other_fraction` of every other class; nothing on a clean row. Seeded by the settings' seed and the split."""
    if spec.kind == CLEAN:
        return np.array(images, copy=True), np.zeros(len(labels), bool)
    if spec.kind == CLEAN_BACKGROUNDS:
        rng = np.random.default_rng(settings.seed * 2 + (split == "test"))
        return artefacts.random_backgrounds(images, rng), np.zeros(len(labels), bool)
    target = FOLDER_NAMES.index(settings.target)
    other = settings.other_fraction if split == "test" else 0.0
    return artefacts.plant_split(images, labels, spec.kind, target, spec.strength, other,
                                 seed=settings.seed * 2 + (split == "test"))


def write_row_data(out: Path, spec: RowSpec, settings: BenchSettings, train: fashion_mnist.Split,
                   test: fashion_mnist.Split) -> pd.DataFrame:
    """Train the demo CNN on the planted training images, write the planted test split (with the original
    objects' masks) to out/test and out/masks, and return the truth table (one row per test image: path,
    label, target, carrier, pred_clean, pred_planted -- the model's outputs as class names)."""
    import torch
    from PIL import Image

    from data.demo import foreground_masks, image_relative_path
    from data.demo_model import CLASS_NAMES, predict, save_weights, train as train_model

    n_train, n_test = settings.train_images, settings.test_images
    planted_train, _ = plant_row(spec, settings, train.images[:n_train], train.labels[:n_train], "train")
    result = train_model(planted_train, train.labels[:n_train], epochs=settings.epochs, seed=settings.seed, log=None)
    save_weights(result.model, out / "model.pt", {"row": spec.name})
    images, labels = test.images[:n_test], test.labels[:n_test]
    planted, carriers = plant_row(spec, settings, images, labels, "test")
    masks = foreground_masks(images)
    paths = [image_relative_path(i, label) for i, label in enumerate(labels)]
    for folder in ("test", "masks"):
        for name in FOLDER_NAMES:
            (out / folder / name).mkdir(parents=True, exist_ok=True)
    for path, image, mask in zip(paths, planted, masks):
        Image.fromarray(image, "L").save(out / "test" / path)
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(out / "masks" / path)
    with torch.no_grad():
        clean, dirty = predict(result.model, images), predict(result.model, planted)
    return pd.DataFrame({"path": paths, "label": [FOLDER_NAMES[int(i)] for i in labels],
                         "carrier": carriers, "pred_clean": [CLASS_NAMES[int(i)] for i in clean],
                         "pred_planted": [CLASS_NAMES[int(i)] for i in dirty], "target": settings.target})


def run_product(out: Path, verify_top: int, scopes: tuple[str, ...] = BenchSettings.scopes,
                embedding: str = BenchSettings.embedding) -> Path:
    """The user's two commands on out/test: the explain job (without its own clustering), then the clustering
    of every scope with the causal test of its top clusters. Returns the cache folder."""
    cache = out / "cache"
    steps = (["explain", "--data", str(out / "test"), "--model", MODEL_SPEC, "--checkpoint", str(out / "model.pt"),
              "--out", str(cache), "--masks", str(out / "masks"), "--target-layer", "input", "--map-size", "28",
              "--descriptor-size", "14", "--batch-size", "128", "--workers", "0", "--quiet", "--no-cluster"],
             ["cluster", "--cache", str(cache), "--scopes", *scopes, "--verify-top", str(verify_top),
              "--embedding", embedding, "--quiet"])
    for arguments in steps:
        run_analysis(arguments)
    return cache


def run_analysis(arguments: list[str]) -> None:
    """`python -m analysis ARGUMENTS` in this process, its output kept; RuntimeError with its last words when it
    fails."""
    code, out, err = in_process.captured(in_process.run_analysis, arguments)
    if code != 0:
        raise RuntimeError(f"`{arguments[0]}` failed ({code}): {(out + err)[-1500:]}")


def tested_clusters(cache_dir: Path) -> list[dict[str, Any]]:
    """Every tested cluster of the cache's fresh clusterings: scope, clustering, rank, verdict, reason and its
    member ids."""
    from analysis.cache import load
    from analysis.cache.identity import cache_fingerprint
    from analysis.explore.cluster_offline import StoredClustering, choices_of, stored_scopes

    cache = load(cache_dir)
    out = []
    for stored in stored_scopes(cache.root, cache_fingerprint(cache)):
        if not stored.fresh or not (stored.path / "verification.parquet").is_file():
            continue
        records = {r["name"]: r for r in stored.meta.get("clusterings", [])}
        checks = pd.read_parquet(stored.path / "verification.parquet")
        for check in checks.to_dict("records"):
            clustering = StoredClustering(stored, records[check["clustering"]], choices_of([stored]))
            out.append({**check, "scope": stored.scope, "members": clustering.members(int(check["cluster"]))})
    return out


def score(cache_dir: Path, truth: pd.DataFrame) -> dict[str, Any]:
    """The row's numbers (see the module docstring) from the stored causal tests and the truth table."""
    from analysis.cache import load
    from analysis.findings.kinds import concepts_in_few_images

    cache = load(cache_dir)
    table = cache.columns(["id", "path"]).merge(truth, on="path", how="left")
    carrier = pd.Series(table["carrier"].to_numpy(bool), index=table["id"].to_numpy())
    driven = pd.Series((table["carrier"] & (table["pred_clean"] != table["pred_planted"])).to_numpy(bool),
                       index=table["id"].to_numpy())
    victims = set(table["id"][table["carrier"] & (table["label"] != table["target"])
                              & (table["pred_planted"] == table["target"])].tolist())
    clusters = tested_clusters(cache_dir)
    verdicts: dict[str, int] = {}
    wrong = 0
    for cluster in clusters:
        verdicts[cluster["verdict"]] = verdicts.get(cluster["verdict"], 0) + 1
        wrong += int(cluster["verdict"] in REASSURING and driven.loc[cluster["members"]].mean() >= DRIVEN_MOST)
    row = {"carriers": int(carrier.sum()), "driven": int(driven.sum()), "victims": len(victims),
           "tested": len(clusters), "verdicts": verdicts, "wrong_verdicts": wrong}
    for verdicts_in, key in ((("shortcut",), "flagged"), (("undecided",), "undecided"),
                             (("shortcut", "undecided"), "not_cleared")):
        members = set().union(*[set(c["members"].tolist()) for c in clusters if c["verdict"] in verdicts_in])
        row[f"{key}_clusters"] = sum(c["verdict"] in verdicts_in for c in clusters)
        row[f"victims_{key}"] = len(victims & members) / len(victims) if victims else float("nan")
        row[f"purity_{key}"] = float(carrier.loc[sorted(members)].mean()) if members else float("nan")
    concepts = concepts_in_few_images(cache)
    members = set().union(*[set(f.ids) for f in concepts])
    row["concept_findings"] = len(concepts)
    row["victims_concepts"] = len(victims & members) / len(victims) if victims else float("nan")
    row["purity_concepts"] = float(carrier.loc[sorted(members)].mean()) if members else float("nan")
    return row


def run_row(out: Path, spec: RowSpec, settings: BenchSettings, splits: tuple[Any, Any]) -> dict[str, Any]:
    """Plant, train, explain, cluster and verify, score: the row's numbers with its wall seconds."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    truth = write_row_data(out, spec, settings, *splits)
    truth.to_csv(out / "truth.csv", index=False)
    cache = run_product(out, settings.verify_top, settings.scopes, settings.embedding)
    return {"row": spec.name, "kind": spec.kind, "strength": spec.strength, **score(cache, truth),
            "seconds": time.perf_counter() - started}
