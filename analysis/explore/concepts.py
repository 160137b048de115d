"""Concepts: which CAM-layer channels carry a class's evidence, and where each one looks (issue 15).

FG-CAM (Qiu, Jin, Zhang, AAAI 2024) explains a class from the components I_k = w_k A_k of the CAM layer; the
job stores, for every image, the spatial sum of each I_k (``analysis.pipeline.channel_relevance``). Concept Relevance
Propagation (Achtibat et al., Nat. Mach. Intell. 2023) reads a network's channels as concepts: per class the
channels that hold the evidence, per channel the images it is most relevant in ("reference images"), and
where it looks in each. Here, for CAM components (ours: CRP's statistics on FG-CAM's channel relevance, and
the engine's per-channel maps, ``FGCAM.channel_maps``, for the regions):

* **per class** (the images the model predicts as the class, with the relevance for that class): the top
  concepts by mean relevance, each with its share of the class's evidence (its mean over the sum of the
  positive means: the shares of the channels with positive mean add up to 1);
* **per concept**: reference images, the top-n images by that channel's relevance (within a class for the
  class view, over the whole cache for the concept view), each with the channel's own fine-grained map (only
  component k carried down to the cache's target layer) and the region it points to: the square window of
  ``region_side`` of the map's side that holds the most positive relevance (CRP crops reference images to the
  receptive field of the channel's most relevant unit; a window over the fine-grained map plays that part);
* **possible shortcuts** (ours, a heuristic): a channel among the ``strong_rank`` most relevant channels of at
  least ``min_images`` images of a class but of at most ``max_prevalence`` of them: a feature a few images share.
  The flagged channels are ordered by the share of mistakes among those images (a channel that makes the model
  predict the class for images of other classes first), then by their number. A shortcut that every image of
  a class carries (the demo's tag on 97% of bags) is not "few images": it shows as a top concept instead, and
  its reference images and maps say what it is.

``python -m analysis concepts --cache DIR`` computes them (with the cache's model, for the maps) into
``DIR/analysis/concepts/`` (``read_concepts``); ``explain`` does it at its end, after the clustering, with the
model it holds; the dashboard's Concepts page reads them.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from analysis.cache.channels import relevance_share
from analysis.cache.derived import CONCEPTS, fingerprint_record, is_fresh

FORMAT_VERSION = 1

@dataclass(frozen=True)
class ConceptSettings:
    top: int = 5                  # concepts per class
    references: int = 8           # reference images per concept (per class, and over the whole cache)
    strong_rank: int = 3          # "strong in an image": among its strong_rank most relevant channels
    max_prevalence: float = 0.2   # "few images": in at most this share of the class's images
    min_images: int = 3           # ... and in at least this many
    shortcuts: int = 3            # flagged channels kept per class
    region_side: float = 0.35     # the region: the square window of this share of the side with the most relevance
    batch_size: int = 16


class ConceptsError(Exception):
    """One line for the user: why concepts cannot be computed or read."""


# ----------------------------------------------------------------------------------------------------------
# The method: statistics from the channel relevance
# ----------------------------------------------------------------------------------------------------------

def strong_channels(relevance: np.ndarray, strong_rank: int) -> np.ndarray:
    """bool [n, K]: the channels "strong in an image": among its ``strong_rank`` most relevant, with positive
    relevance (ties broken by channel order)."""
    ranks = np.argsort(np.argsort(-relevance, axis=1, kind="stable"), axis=1, kind="stable")
    return (ranks < strong_rank) & (relevance > 0)


def class_concepts(relevance: np.ndarray, pred: np.ndarray, settings: ConceptSettings,
                   labels: np.ndarray | None = None) -> pd.DataFrame:
    """Per predicted class: its top concepts and its flagged channels.

    ``relevance`` float32 [n, K] (each image's channel relevance for its predicted class), ``pred`` [n],
    ``labels`` [n] (the true classes; None: no mistake known). Rows: class, kind ("top" or "shortcut"), rank,
    channel, mean_relevance, share (of the class's evidence), n_images (of the class), n_strong (images where the
    channel is among the strong_rank most relevant, with positive relevance), prevalence (n_strong / n_images),
    strong_share_mean (its mean share of the evidence in those images), mistake_share (of those images, the
    share whose true class is another), possible_shortcut.
    """
    rows = []
    for c in np.unique(pred):
        members = relevance[pred == c]
        wrong = np.zeros(len(members), bool) if labels is None else labels[pred == c] != c
        n = len(members)
        mean = members.mean(axis=0)
        positive_total = float(np.clip(mean, 0, None).sum())
        shares = relevance_share(members)
        strong = strong_channels(members, settings.strong_rank)
        n_strong = strong.sum(axis=0)
        strong_mean = np.divide((shares * strong).sum(axis=0), n_strong, out=np.zeros(mean.shape, np.float64),
                                where=n_strong > 0)
        mistakes = np.divide((strong & wrong[:, None]).sum(axis=0), n_strong, out=np.zeros(mean.shape, np.float64),
                             where=n_strong > 0)
        prevalence = n_strong / n
        flagged = (n_strong >= settings.min_images) & (prevalence <= settings.max_prevalence)

        def row(kind: str, rank: int, k: int) -> dict[str, Any]:
            return {"class": int(c), "kind": kind, "rank": rank, "channel": int(k),
                    "mean_relevance": float(mean[k]),
                    "share": float(mean[k] / positive_total) if positive_total > 0 else 0.0,
                    "n_images": n, "n_strong": int(n_strong[k]), "prevalence": float(prevalence[k]),
                    "strong_share_mean": float(strong_mean[k]), "mistake_share": float(mistakes[k]),
                    "possible_shortcut": bool(flagged[k])}

        top = [int(k) for k in np.argsort(-mean, kind="stable")[:settings.top] if mean[k] > 0]
        rows += [row("top", rank, k) for rank, k in enumerate(top)]
        candidates = np.nonzero(flagged)[0]
        strongest = candidates[np.lexsort((-n_strong[candidates], -mistakes[candidates]))]
        rows += [row("shortcut", rank, k) for rank, k in enumerate(strongest[:settings.shortcuts])]
    columns = ["class", "kind", "rank", "channel", "mean_relevance", "share", "n_images", "n_strong", "prevalence",
               "strong_share_mean", "mistake_share", "possible_shortcut"]
    return pd.DataFrame(rows, columns=columns)


def reference_images(relevance: np.ndarray, ids: np.ndarray, pred: np.ndarray, concepts: pd.DataFrame,
                     count: int) -> pd.DataFrame:
    """The top-``count`` images by the channel's relevance: per row of ``concepts`` among its class's images
    (scope = the class index), and per channel over every image (scope -1). Rows: scope, channel, rank, id,
    relevance (for the image's predicted class)."""
    rows = []

    def add(scope: int, channel: int, where: np.ndarray) -> None:
        values = relevance[where, channel]
        for rank, i in enumerate(np.argsort(-values, kind="stable")[:count]):
            if values[i] > 0:
                rows.append({"scope": scope, "channel": channel, "rank": rank, "id": int(ids[where[i]]),
                             "relevance": float(values[i])})

    for (c, k), _ in concepts.groupby(["class", "channel"], sort=True):
        add(int(c), int(k), np.nonzero(pred == c)[0])
    everyone = np.arange(len(ids))
    for k in sorted(concepts["channel"].unique()):
        add(-1, int(k), everyone)
    return pd.DataFrame(rows, columns=["scope", "channel", "rank", "id", "relevance"])


def region_box(concept_map: np.ndarray, side: float) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in [0, 1] of the map's side: the square window of ``side`` of the map's side (at least one
    cell) holding the most positive relevance (the first such window; the top-left one for a map without any)."""
    h, w = concept_map.shape
    size_y, size_x = max(1, min(h, round(side * h))), max(1, min(w, round(side * w)))
    positive = np.clip(np.nan_to_num(np.asarray(concept_map, np.float64)), 0, None)
    integral = np.pad(positive.cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))
    sums = (integral[size_y:, size_x:] - integral[:-size_y, size_x:] - integral[size_y:, :-size_x]
            + integral[:-size_y, :-size_x])
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return float(x / w), float(y / h), float((x + size_x) / w), float((y + size_y) / h)


# ----------------------------------------------------------------------------------------------------------
# The concept maps: FG-CAM of one channel, with the cache's model
# ----------------------------------------------------------------------------------------------------------

def concept_explainer(cache: Any, loaded: Any = None, denoise: bool = False) -> tuple[Any, Any]:
    """(the cache's model as ``analysis.pipeline.models.LoadedModel``, an FGCAM with the cache's base, CAM layer
    and low-layer rule; no denoising unless ``denoise``: a concept is one component, and the stored relevance is
    taken before denoising; a whole map as the job made it needs the cache's own). ``loaded``: the model already
    in memory (the job's), else it is loaded from the manifest (ModelSpecError when it cannot be loaded here)."""
    from analysis.fgcam import FGCAM, parse_low_rule
    from analysis.pipeline.models import model_from_manifest

    options = cache.manifest.get("options") or {}
    loaded = loaded if loaded is not None else model_from_manifest(cache.manifest)
    rule = parse_low_rule(options["low_rule"]) if options.get("low_rule") else None
    explainer = FGCAM(loaded.model, base=options.get("base", "gradcam"), cam_layer=options.get("cam_layer"),
                      low_rule=rule, denoise=denoise)
    return loaded, explainer


def concept_maps(cache: Any, loaded: Any, explainer: Any, pairs: list[tuple[int, list[int]]], map_size: int,
                 classes: dict[int, int] | None = None, batch_size: int = 16,
                 progress: Callable[[int], Any] | None = None) -> dict[tuple[int, int], np.ndarray]:
    """{(id, channel): float32 [map_size, map_size]}: the map of that channel alone (FG-CAM carrying only
    component k down to the cache's target layer), for the image's predicted class (or ``classes[id]``).
    ``pairs``: (id, channels) per image. One forward run per batch; the channels of an image are walked
    together (``FGCAM.channel_maps``), images with fewer channels padded with their first."""
    from analysis.pipeline.scores import resize_maps
    from analysis.pipeline.datasets import load_image, to_model_mode

    target = (cache.manifest.get("options") or {}).get("target_layer", "input")
    table = cache.table.set_index("id")
    parameter = next(loaded.model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    out: dict[tuple[int, int], np.ndarray] = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        images = torch.stack([loaded.transform(to_model_mode(load_image(cache.image_path(i)), loaded.in_channels))
                              for i, _ in chunk]).to(device)
        width = max(len(channels) for _, channels in chunk)
        chosen = torch.tensor([channels + [channels[0]] * (width - len(channels)) for _, channels in chunk])
        wanted = torch.tensor([int((classes or {}).get(i, table.at[i, "pred"])) for i, _ in chunk])
        result = explainer.channel_maps(images, chosen.to(device), target_layer=target, classes=wanted.to(device))
        maps = resize_maps(result.maps.detach().float().flatten(0, 1), map_size).view(len(chunk), width,
                                                                                       map_size, map_size)
        for row, (i, channels) in enumerate(chunk):
            for m, k in enumerate(channels):
                out[(int(i), int(k))] = maps[row, m].cpu().numpy()
        if progress is not None:
            progress(len(chunk))
    return out


# ----------------------------------------------------------------------------------------------------------
# Computing and storing (CACHE/analysis/concepts/, atomically), reading
# ----------------------------------------------------------------------------------------------------------

@dataclass
class ConceptPlan:
    """The statistics (no model needed) and the concept maps they call for: ``pairs`` (id, channels) per image;
    for ``settings``."""
    settings: ConceptSettings
    classes: pd.DataFrame
    references: pd.DataFrame
    pairs: list[tuple[int, list[int]]]

    @property
    def n_maps(self) -> int:
        """Channel maps to compute: one FG-CAM walk each (an image's channels are walked together)."""
        return sum(len(channels) for _, channels in self.pairs)


def plan_concepts(cache: Any, settings: ConceptSettings = ConceptSettings()) -> ConceptPlan:
    """The per-class statistics and reference images from the stored channel relevance, and which concept maps
    they need. ConceptsError without stored channel relevance."""
    relevance = cache.channel_relevance(which="pred")
    if relevance is None:
        raise ConceptsError("this cache has no channel relevance (made before it was stored): re-run "
                            "`python -m analysis explain` with --overwrite to compute concepts")
    table = cache.columns(["id", "pred", "label"])
    ids, pred, labels = (table[name].to_numpy(np.int64) for name in ("id", "pred", "label"))
    classes = class_concepts(relevance, pred, settings, labels)
    references = reference_images(relevance, ids, pred, classes, settings.references)
    per_image: dict[int, list[int]] = {}
    for i, k in zip(references["id"], references["channel"]):
        if int(k) not in per_image.setdefault(int(i), []):
            per_image[int(i)].append(int(k))
    return ConceptPlan(settings, classes, references, sorted(per_image.items()))


def compute_concepts(cache: Any, settings: ConceptSettings = ConceptSettings(),
                     progress: Callable[[int], Any] | None = None, start: Callable[[int], Any] | None = None,
                     loaded: Any = None, plan: ConceptPlan | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """(classes, references with their region box and map row, maps float16 [R, S, S] normalised to max |.| 1
    with the scale in references.map_scale). ConceptsError without stored channel relevance. ``loaded``: the
    cache's model when it is in memory already (see ``concept_explainer``); ``plan``: ``plan_concepts`` of this
    cache when made already (used when made for these settings)."""
    if plan is None or plan.settings != settings:
        plan = plan_concepts(cache, settings)
    classes, references, pairs = plan.classes, plan.references, plan.pairs
    if start is not None:
        start(len(pairs))
    loaded, explainer = concept_explainer(cache, loaded)
    size = int(cache.map_size)
    maps = concept_maps(cache, loaded, explainer, pairs, size, batch_size=settings.batch_size, progress=progress)
    keys = sorted(maps)
    index = {key: row for row, key in enumerate(keys)}
    stacked = np.stack([maps[key] for key in keys]) if keys else np.zeros((0, size, size), np.float32)
    scale = np.abs(np.nan_to_num(stacked)).reshape(len(keys), -1).max(axis=1) if keys else np.zeros(0)
    stored = (stacked / np.where(scale > 0, scale, 1)[:, None, None]).astype(np.float16)
    references["map_row"] = [index[(int(i), int(k))] for i, k in zip(references["id"], references["channel"])]
    references["map_scale"] = [float(scale[r]) for r in references["map_row"]]
    boxes = np.array([region_box(stacked[r], settings.region_side) for r in references["map_row"]]
                     ).reshape(-1, 4)
    for column, values in zip(("x0", "y0", "x1", "y1"), boxes.T):
        references[column] = values.astype(np.float32)
    return classes, references, stored


def concepts_dir(cache_root: Path | str) -> Path:
    """Where the concepts of the cache at `cache_root` are stored (analysis.cache.derived.CONCEPTS)."""
    return CONCEPTS.path(cache_root)


def write_concepts(cache_root: Path | str, classes: pd.DataFrame, references: pd.DataFrame, maps: np.ndarray,
                   meta: dict[str, Any]) -> Path:
    """Write classes.parquet, references.parquet, maps.npy and meta.json as one folder, atomically (a reader
    sees the old folder or the new one)."""
    from analysis.cache.files import save_npy, folder_replaced_atomically

    final = concepts_dir(cache_root)
    with folder_replaced_atomically(final) as tmp:
        classes.to_parquet(tmp / "classes.parquet", index=False)
        references.to_parquet(tmp / "references.parquet", index=False)
        save_npy(tmp / "maps.npy", maps)
        (tmp / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=1))
    return final


@dataclass
class Concepts:
    """What ``python -m analysis concepts`` stored: ``classes`` (class_concepts' rows), ``references`` (scope,
    channel, rank, id, relevance, map_row, map_scale, x0, y0, x1, y1; the box in [0, 1] of the map's side),
    ``meta`` (settings, class names, cache fingerprint, created), ``stale`` (made for another generation of the
    cache: resumed with new images, or overwritten)."""
    classes: pd.DataFrame
    references: pd.DataFrame
    maps: np.ndarray
    meta: dict[str, Any]
    stale: bool

    def concept_map(self, reference_row: Any) -> np.ndarray:
        """float32 [S, S]: the stored concept map of one row of ``references``."""
        return self.maps[int(reference_row["map_row"])].astype(np.float32) * float(reference_row["map_scale"])

    def top_concepts(self, class_index: int) -> pd.DataFrame:
        rows = self.classes[(self.classes["class"] == class_index) & (self.classes["kind"] == "top")]
        return rows.sort_values("rank")

    def shortcuts(self, class_index: int) -> pd.DataFrame:
        rows = self.classes[(self.classes["class"] == class_index) & (self.classes["kind"] == "shortcut")]
        return rows.sort_values("rank")

    def references_of(self, channel: int, scope: int = -1) -> pd.DataFrame:
        """Reference images of a channel: within class ``scope``, or over the whole cache (-1)."""
        rows = self.references[(self.references["channel"] == channel) & (self.references["scope"] == scope)]
        return rows.sort_values("rank")


def read_concepts(cache: Any) -> Concepts | None:
    """The stored concepts of a loaded cache; None when none were computed. ConceptsError for a damaged folder."""
    folder = concepts_dir(cache.root)
    if not (folder / "meta.json").is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        classes = pd.read_parquet(folder / "classes.parquet")
        references = pd.read_parquet(folder / "references.parquet")
        maps = np.load(folder / "maps.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ConceptsError(f"the concepts in {folder} cannot be read ({str(error).splitlines()[0]})") from None
    return Concepts(classes, references, maps, meta, not is_fresh(meta, cache))


def run_concepts(cache_root: Path, settings: ConceptSettings = ConceptSettings(), show_progress: bool = True,
                 loaded: Any = None, plan: ConceptPlan | None = None) -> tuple[Path, pd.DataFrame, dict[str, Any]]:
    """Compute and store the concepts of the cache at ``cache_root``; (folder, classes, meta). ``loaded``: the
    cache's model when it is in memory already (the job's); ``plan``: its ``plan_concepts`` when made already."""
    from tqdm import tqdm

    from analysis.cache import load

    started = time.perf_counter()
    cache = load(cache_root)
    bar = None

    def start(total: int) -> None:
        nonlocal bar
        bar = tqdm(total=total, unit="img", disable=not show_progress, dynamic_ncols=True, desc="concept maps")

    classes, references, maps = compute_concepts(cache, settings, progress=lambda k: bar.update(k), start=start,
                                                 loaded=loaded, plan=plan)
    if bar is not None:
        bar.close()
    relevance = cache.channel_relevance([int(cache.table["id"].iloc[0])]) if len(cache.table) else None
    meta = {"settings": asdict(settings), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **fingerprint_record(cache), "class_names": list(cache.manifest.get("class_names") or []),
            "cam_layer": (cache.manifest.get("options") or {}).get("cam_layer"),
            "channels": int(relevance.shape[1]) if relevance is not None else 0, "n_images": int(len(cache.table)),
            "map_size": int(cache.map_size), "seconds": round(time.perf_counter() - started, 1)}
    return write_concepts(cache_root, classes, references, maps, meta), classes, meta
