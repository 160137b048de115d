"""Causal shortcut test: does the model really use the region its explanations point to?

For a selection of images (a cluster, a class, any list of ids), the region the selection's prototype map
points to -- the top q% of its mean map -- is blurred away on every image and the model is run again.
Accuracy and the share of changed predictions before and after are compared with a control: an equally
large region (the same shape, moved to a random place on each image) blurred the same way. A large change
for the prototype region and a small one for the control is causal evidence that the model depends on what
the region holds (Lapuschkin et al., "Unmasking Clever Hans predictors", Nature Communications 2019).

With foreground masks or boxes, two more predictions per image, in the spirit of Xiao, Engstrom, Ilyas,
Madry, "Noise or Signal: The Role of Image Backgrounds in Object Recognition", ICLR 2021 (arXiv 2006.09994):
the object only (background blurred away) and the background only (object blurred away), per image and per
class. Xiao et al. black out or replace regions; we blur, with the same Gaussian baseline as the
faithfulness metrics (Petsiuk et al. 2018), so that no new sharp edges appear.

Method: `prototype_map`, `top_region`, `control_regions`, `blur_regions`, `shortcut_test`,
`foreground_test`, `per_class_foreground`. Machinery: loading the cache's model and images
(`analysis.pipeline.models.model_from_manifest`, `load_inputs`), `shortcut_test_on_cache` for the dashboard. The command line
(`python -m analysis shortcut-test`) is analysis/commands/region_removal.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.fgcam.explainer import logits_of
from analysis.pipeline.faithfulness import (DEFAULT_BLUR_SIGMA, DEFAULT_FORWARD_BATCH, check_eval_mode, gaussian_blur,
                                            model_device_dtype, upsample_maps)
from analysis.pipeline.models import model_from_manifest


DEFAULT_Q = 5.0            # percent of the image area
CONTROL_TRIES = 16         # random placements tried per image; the one overlapping the region least is kept


def check_q(q: float) -> None:
    """ValueError unless `q` (the share of a map's pixels that make its region) is a percentage in (0, 100]."""
    if not (isinstance(q, (int, float)) and math.isfinite(q) and 0 < q <= 100):
        raise ValueError(f"q must be a percentage in (0, 100], got {q!r}")


def prototype_map(maps: np.ndarray | Tensor) -> np.ndarray:
    """float32 [h, w]: mean of the selection's maps [n, h, w], each scaled to unit positive mass first, so
    that images with large relevance values do not decide the prototype alone (maps without positive
    relevance are left out). ValueError when no map has positive relevance."""
    from analysis.explore.statistics import unit_mass

    maps = maps.detach().cpu().numpy() if isinstance(maps, Tensor) else np.asarray(maps)
    if maps.ndim != 3 or len(maps) == 0:
        raise ValueError(f"maps must be [n, h, w] with n >= 1, got shape {maps.shape}")
    unit = unit_mass(maps, "positive")
    has_mass = unit.reshape(len(unit), -1).sum(axis=1) > 0
    if not has_mass.any():
        raise ValueError("no map of the selection has positive relevance: there is no region to test")
    return unit[has_mass].mean(axis=0).astype(np.float32)


def region_pixel_count(num_pixels: int, q: float) -> int:
    """Pixels in "the top q%": ceil(q / 100 * num_pixels), at least 1."""
    check_q(q)
    return max(1, math.ceil(q / 100.0 * num_pixels - 1e-9))


def top_region(prototype: np.ndarray | Tensor, q: float, height: int, width: int) -> Tensor:
    """bool [height, width]: the top q% pixels of the prototype upsampled bilinearly to the input size
    (ties in row-major order, as the faithfulness metrics order pixels)."""
    check_q(q)
    prototype = torch.as_tensor(np.asarray(prototype, dtype=np.float32))
    if prototype.dim() != 2:
        raise ValueError(f"the prototype must be a 2-D map [h, w], got shape {tuple(prototype.shape)}")
    flat = upsample_maps(prototype[None], height, width).reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    region = torch.zeros(height * width, dtype=torch.bool)
    region[order[:region_pixel_count(height * width, q)]] = True
    return region.view(height, width)


def control_regions(region: Tensor, count: int, seed: int = 0, tries: int = CONTROL_TRIES) -> Tensor:
    """bool [count, H, W]: for each image, the region moved by a random cyclic shift -- the same number of
    pixels and the same shape -- choosing, of `tries` random shifts, the one overlapping the region least.

    The same shape matters: blurring a scattered set of single pixels barely changes an image (each is
    replaced by an average of its neighbours), which would make the control look better than it is.
    """
    height, width = region.shape
    generator = np.random.default_rng(seed)
    overlaps = shift_overlaps(region)
    out = torch.empty((count, height, width), dtype=torch.bool)
    for i in range(count):
        best, best_overlap = (0, 0), None
        for _ in range(tries):
            dy, dx = int(generator.integers(0, height)), int(generator.integers(0, width))
            if dy == 0 and dx == 0 and height * width > 1:
                continue
            if best_overlap is None or overlaps[dy, dx] < best_overlap:
                best, best_overlap = (dy, dx), overlaps[dy, dx]
        out[i] = torch.roll(region, shifts=best, dims=(0, 1))
    return out


def shift_overlaps(region: Tensor) -> np.ndarray:
    """int [H, W]: for every cyclic shift (dy, dx), the pixels that `region` shares with itself shifted by it
    (torch.roll's direction) -- a circular autocorrelation, by FFT: one table instead of a roll per try."""
    mask = np.asarray(region, np.float64)
    spectrum = np.fft.rfft2(mask)
    return np.rint(np.fft.irfft2(spectrum * np.conj(spectrum), s=mask.shape)).astype(np.int64)


def relative_change(images: Tensor, changed: Tensor, mask: Tensor) -> float:
    """How much a removal changed what it removed: the mean absolute change of `changed` against `images`
    ([N, C, H, W]) on the pixels of `mask` (broadcast to the images: [H, W] or [N, 1, H, W]; 0 when empty),
    over the images' mean absolute deviation from their own mean (their contrast; NaN without contrast). Near 0
    where the region was flat, already smooth, or already what replaced it."""
    selected = mask.expand_as(images)
    change = (changed - images).abs()[selected].mean() if selected.any() else torch.tensor(0.0)
    contrast = (images - images.mean(dim=(1, 2, 3), keepdim=True)).abs().mean()
    return float(change / contrast) if float(contrast) > 0 else float("nan")


def blur_regions(images: Tensor, regions: Tensor, blur_sigma: float = DEFAULT_BLUR_SIGMA) -> Tensor:
    """images [N, C, H, W] with the pixels of regions ([H, W] or [N, H, W], bool) taken from a Gaussian-blurred
    copy (all channels of a pixel)."""
    if regions.dim() == 2:
        regions = regions[None]
    if regions.shape[-2:] != images.shape[-2:] or regions.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"regions {tuple(regions.shape)} do not fit images {tuple(images.shape)}")
    regions = regions.to(images.device)[:, None]
    return torch.where(regions, gaussian_blur(images, blur_sigma), images)


def model_probabilities(model: nn.Module, images: Tensor, forward_batch: int) -> Tensor:
    """float32 [N, classes] softmax outputs, on the CPU."""
    check_eval_mode(model)
    device, dtype = model_device_dtype(model, images)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), forward_batch):
            logits = logits_of(model(images[start:start + forward_batch].to(device, dtype))).float()
            out.append(torch.softmax(logits, dim=1).cpu())
    return torch.cat(out)


def known_outputs(before: Tensor | None, model: nn.Module, images: Tensor, forward_batch: int) -> Tensor:
    """`before` (the model's softmax outputs on `images`, known from earlier), checked, or computed now."""
    if before is None:
        return model_probabilities(model, images, forward_batch)
    if before.dim() != 2 or len(before) != len(images):
        raise ValueError(f"before must be [{len(images)}, classes] outputs of the images, got {tuple(before.shape)}")
    return before


@dataclass
class ShortcutTestResult:
    summary: dict[str, float]   # see SUMMARY_KEYS
    per_image: pd.DataFrame     # one row per image (columns: see `shortcut_test`)
    region: np.ndarray          # bool [H, W]: the prototype region at the input size


SUMMARY_KEYS = ("n", "q", "region_pixels", "region_share", "accuracy_before", "accuracy_prototype",
                "accuracy_random", "changed_prototype", "changed_random", "probability_before",
                "probability_prototype", "probability_random")


def shortcut_test(model: nn.Module, images: Tensor, labels: Tensor | None, prototype: np.ndarray | Tensor,
                  q: float = DEFAULT_Q, blur_sigma: float = DEFAULT_BLUR_SIGMA, seed: int = 0,
                  forward_batch: int = DEFAULT_FORWARD_BATCH, before: Tensor | None = None) -> ShortcutTestResult:
    """Blur the top-q% region of `prototype` on every image, and a random region of the same size and shape.
    `before`: the model's softmax outputs on `images` where already known (`RunInputs`), else computed.

    per_image columns: label (-1 when unknown), pred_before, probability_before (of pred_before),
    pred_prototype / probability_prototype (prediction, and probability of pred_before, with the prototype
    region blurred), pred_random / probability_random (the control), changed_prototype, changed_random,
    control_overlap (pixels the control shares with the region). Summary: means of those; accuracies are
    NaN without labels. 3 forward passes per image (2 with `before`).
    """
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be [N, C, H, W] with N >= 1, got shape {tuple(images.shape)}")
    if labels is not None and torch.as_tensor(labels).shape != (len(images),):
        raise ValueError(f"labels must be a vector of {len(images)} class indices")
    check_q(q)
    if not isinstance(forward_batch, int) or forward_batch < 1:
        raise ValueError(f"forward_batch must be a positive integer, got {forward_batch!r}")
    n, _, height, width = images.shape
    region = top_region(prototype, q, height, width)
    controls = control_regions(region, n, seed=seed)
    before = known_outputs(before, model, images, forward_batch)
    prototype_blurred = model_probabilities(model, blur_regions(images, region, blur_sigma), forward_batch)
    random_blurred = model_probabilities(model, blur_regions(images, controls, blur_sigma), forward_batch)
    pred = before.argmax(1)
    take = lambda probs: probs.gather(1, pred[:, None])[:, 0].numpy()  # noqa: E731 -- p(original prediction)
    frame = pd.DataFrame({
        "label": (torch.as_tensor(labels).long().cpu().numpy() if labels is not None else np.full(n, -1)),
        "pred_before": pred.numpy(), "probability_before": take(before),
        "pred_prototype": prototype_blurred.argmax(1).numpy(), "probability_prototype": take(prototype_blurred),
        "pred_random": random_blurred.argmax(1).numpy(), "probability_random": take(random_blurred),
    })
    frame["changed_prototype"] = frame["pred_prototype"] != frame["pred_before"]
    frame["changed_random"] = frame["pred_random"] != frame["pred_before"]
    frame["control_overlap"] = (controls & region).flatten(1).sum(1).numpy()
    known = labels is not None
    accuracy = (lambda column: float((frame[column] == frame["label"]).mean()) if known else float("nan"))
    summary = {
        "n": float(n), "q": float(q), "region_pixels": float(region.sum()),
        "region_share": float(region.sum()) / (height * width),
        "accuracy_before": accuracy("pred_before"), "accuracy_prototype": accuracy("pred_prototype"),
        "accuracy_random": accuracy("pred_random"),
        "changed_prototype": float(frame["changed_prototype"].mean()),
        "changed_random": float(frame["changed_random"].mean()),
        "probability_before": float(frame["probability_before"].mean()),
        "probability_prototype": float(frame["probability_prototype"].mean()),
        "probability_random": float(frame["probability_random"].mean()),
    }
    return ShortcutTestResult(summary=summary, per_image=frame, region=region.numpy())


def foreground_to_input(foreground: np.ndarray | Tensor, height: int, width: int) -> Tensor:
    """bool [N, S, S] foreground at map size -> bool [N, height, width] (nearest neighbour)."""
    foreground = torch.as_tensor(np.asarray(foreground)).bool()
    if foreground.shape[-2:] == (height, width):
        return foreground
    return F.interpolate(foreground[:, None].float(), size=(height, width), mode="nearest")[:, 0] > 0.5


def foreground_test(model: nn.Module, images: Tensor, labels: Tensor | None, foreground: Tensor,
                    blur_sigma: float = DEFAULT_BLUR_SIGMA,
                    forward_batch: int = DEFAULT_FORWARD_BATCH) -> pd.DataFrame:
    """Predictions on the full image, the object only (background blurred) and the background only (object
    blurred), after Xiao et al. 2021. `foreground` is bool [N, H, W] at the input size (see
    `foreground_to_input`); images whose foreground is empty or the whole image are left out (the two
    variants would be meaningless). Columns: row (index into `images`), label, pred_full, pred_object_only,
    pred_background_only, probability_* (of pred_full), correct_* (NaN-free only with labels).
    2 forward passes per image (the full image's prediction reuses a third)."""
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    foreground = torch.as_tensor(foreground).bool()
    if foreground.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"foreground must be bool [N, H, W] = {[images.shape[0], *images.shape[-2:]]}, "
                         f"got {list(foreground.shape)}")
    area = foreground.flatten(1).sum(1)
    usable = (area > 0) & (area < foreground[0].numel())
    rows = torch.nonzero(usable)[:, 0]
    columns = ["row", "label", "pred_full", "pred_object_only", "pred_background_only", "probability_full",
               "probability_object_only", "probability_background_only", "correct_full", "correct_object_only",
               "correct_background_only"]
    if len(rows) == 0:
        return pd.DataFrame({name: pd.Series(dtype=float) for name in columns})
    images, mask = images[rows], foreground[rows]
    full = model_probabilities(model, images, forward_batch)
    object_only = model_probabilities(model, blur_regions(images, ~mask, blur_sigma), forward_batch)
    background_only = model_probabilities(model, blur_regions(images, mask, blur_sigma), forward_batch)
    pred = full.argmax(1)
    take = lambda probs: probs.gather(1, pred[:, None])[:, 0].numpy()  # noqa: E731
    label = (torch.as_tensor(labels).long().cpu()[rows].numpy() if labels is not None
             else np.full(len(rows), -1))
    frame = pd.DataFrame({"row": rows.numpy(), "label": label, "pred_full": pred.numpy(),
                          "pred_object_only": object_only.argmax(1).numpy(),
                          "pred_background_only": background_only.argmax(1).numpy(),
                          "probability_full": take(full), "probability_object_only": take(object_only),
                          "probability_background_only": take(background_only)})
    for variant in ("full", "object_only", "background_only"):
        frame[f"correct_{variant}"] = frame[f"pred_{variant}"] == frame["label"] if labels is not None else np.nan
    return frame[columns]


def per_class_foreground(frame: pd.DataFrame, class_names: Sequence[str]) -> pd.DataFrame:
    """Per true class: n and accuracy on the full image, object only and background only (Xiao et al.'s
    table), plus how often each variant keeps the full image's prediction."""
    rows = []
    for label, group in frame.groupby("label", sort=True):
        rows.append({
            "class": class_names[int(label)] if 0 <= int(label) < len(class_names) else str(label),
            "n": len(group),
            "accuracy_full": float(group["correct_full"].mean()),
            "accuracy_object_only": float(group["correct_object_only"].mean()),
            "accuracy_background_only": float(group["correct_background_only"].mean()),
            "kept_object_only": float((group["pred_object_only"] == group["pred_full"]).mean()),
            "kept_background_only": float((group["pred_background_only"] == group["pred_full"]).mean()),
        })
    return pd.DataFrame(rows, columns=["class", "n", "accuracy_full", "accuracy_object_only",
                                       "accuracy_background_only", "kept_object_only", "kept_background_only"])


@dataclass
class Inputs:
    """A selection's images loaded like the job (`RunInputs.load`)."""
    images: Tensor                    # float [n_ok, C, H, W]
    positions: list[int]              # of the loaded ones among the paths asked for
    errors: list[tuple[int, str]]     # (position, reason) of the images that could not be loaded
    outputs: Tensor | None            # float32 [n_ok, classes]: the model's softmax outputs, when a model was given


class RunInputs:
    """The images of one run with one model (`cluster --verify-top`), preprocessed, and the model's softmax outputs
    on them unchanged, kept by path. The run tests many selections that share images: a scope's two clusterings
    share most members, its scopes share images, the insertion tests toward one class paste into the same
    targets, and every test compares a change with the image's own prediction. Decoding them again took a fifth
    of `cluster --verify-top 8` on a Fashion-MNIST row, and their outputs a tenth of the demo's. Each image is
    decoded and goes through the model once while what is kept fits in `budget` bytes; past it, each time."""

    def __init__(self, budget: int = 512 << 20) -> None:
        self.budget, self.used = budget, 0
        self.decoded: dict[str, Tensor | str] = {}      # the tensor, or why the image could not be loaded
        self.outputs: dict[str, Tensor] = {}

    def _keep(self, kept: dict[str, Any], key: str, value: Any) -> None:
        size = value.element_size() * value.nelement() if isinstance(value, Tensor) else 0
        if self.used + size <= self.budget:
            kept[key], self.used = value, self.used + size

    def _image(self, path: Path | str, transform: Any, channels: int) -> Tensor | str:
        key = str(path)
        if key not in self.decoded:
            from analysis.pipeline.datasets import load_image, to_model_mode

            try:
                found: Tensor | str = transform(to_model_mode(load_image(Path(path)), channels))
            except Exception as error:  # any decode/preprocess failure: skip and say why
                found = f"{type(error).__name__}: {str(error)[:200]}"
            self._keep(self.decoded, key, found)
            return found
        return self.decoded[key]

    def _outputs(self, model: nn.Module, images: Tensor, keys: list[str], forward_batch: int) -> Tensor:
        missing = [i for i, key in enumerate(keys) if key not in self.outputs]
        found = dict(zip((keys[i] for i in missing),
                         model_probabilities(model, images[missing], forward_batch) if missing else []))
        for key, row in found.items():
            self._keep(self.outputs, key, row.clone())
        return torch.stack([found[key] if key in found else self.outputs[key] for key in keys])

    def load(self, paths: Sequence[Path | str], transform: Any, channels: int, model: nn.Module | None = None,
             forward_batch: int = DEFAULT_FORWARD_BATCH) -> Inputs:
        """Decode and preprocess `paths` like the job (`transform`, `channels`: the cache's model's), skipping
        and recording those that cannot be loaded; with `model`, its outputs on the loaded ones too."""
        from analysis.pipeline.datasets import Item, collate_items

        items = []
        for position, path in enumerate(paths):
            found = self._image(path, transform, channels)
            items.append(Item(position, 0, found, None) if isinstance(found, Tensor)
                         else Item(position, 0, None, None, found))
        batch = collate_items(items)
        positions = batch.ids.tolist()
        outputs = None if model is None or not positions else \
            self._outputs(model, batch.images, [str(paths[p]) for p in positions], forward_batch)
        return Inputs(batch.images, positions, batch.errors, outputs)


def load_inputs(paths: Sequence[Path], transform: Any,
                channels: int) -> tuple[Tensor, list[int], list[tuple[int, str]]]:
    """Decode and preprocess images like the job, once: (float [n_ok, C, H, W], positions of the loaded ones in
    `paths`, [(position, reason)] of the skipped ones). A run that loads images again keeps a `RunInputs`."""
    loaded = RunInputs(budget=0).load(paths, transform, channels)
    return loaded.images, loaded.positions, loaded.errors


def fresh_maps(model: nn.Module, images: Tensor, base: str, batch_size: int = 64) -> Tensor:
    """Input-level FG-CAM maps [N, H, W] of the predicted classes with `base`, in batches (on the CPU)."""
    from analysis.fgcam import FGCAM

    explainer = FGCAM(model, base=base)
    device, dtype = model_device_dtype(model, images)
    return torch.cat([explainer(images[i:i + batch_size].to(device, dtype)).maps.detach().cpu()
                      for i in range(0, len(images), batch_size)])


@dataclass
class CacheShortcutReport:
    ids: np.ndarray                      # ids tested (loaded), in order
    result: ShortcutTestResult           # per_image rows match `ids` (with `id`, `path` columns added)
    foreground: pd.DataFrame | None      # object-only / background-only per image (with `id`), or None
    per_class: pd.DataFrame | None       # per_class_foreground of it
    skipped: list[tuple[int, str]]       # (id, reason) of images that could not be loaded
    stored_pred_mismatches: int          # images whose prediction now differs from the cache's `pred`


def shortcut_test_on_cache(cache: Any, ids: Sequence[int] | np.ndarray, q: float = DEFAULT_Q,
                           loaded: Any = None, prototype: np.ndarray | None = None,
                           device: str | torch.device = "cpu", blur_sigma: float = DEFAULT_BLUR_SIGMA,
                           seed: int = 0, forward_batch: int = 64,
                           prototype_base: str | None = None) -> CacheShortcutReport:
    """The shortcut test on the images `ids` of an `analysis.cache.Cache`.

    `prototype` (a [h, w] map, e.g. a cluster's mean descriptor reshaped) defaults to `prototype_map` of the
    selection's stored maps of the predicted class, or, with `prototype_base` (e.g. "layercam"), of fresh
    input-level FG-CAM maps of the predicted class with that base -- for a cache whose base does not suit the
    model (compare-methods tells). `loaded` (a LoadedModel) defaults to
    `model_from_manifest(cache.manifest)`, which raises ModelSpecError when the model cannot be loaded here.
    With a foreground in the cache, the object-only / background-only test runs too.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        raise ValueError("the selection is empty")
    check_q(q)
    known = set(cache.ids.tolist())
    missing = [int(i) for i in ids if int(i) not in known]
    if missing:
        raise ValueError(f"{len(missing)} id(s) are not in the cache (e.g. {missing[:5]})")
    if prototype is not None and prototype_base is not None:
        raise ValueError("give either a prototype map or a prototype_base, not both")
    if prototype is None and prototype_base is None:
        prototype = prototype_map(cache.maps(ids, "pred"))
    if loaded is None:
        loaded = model_from_manifest(cache.manifest)
    model = loaded.model.to(device)
    images, positions, errors = load_inputs(cache.image_paths(ids), loaded.transform,
                                            loaded.in_channels)
    skipped = [(int(ids[p]), reason) for p, reason in errors]
    if not positions:
        raise ValueError(f"none of the {len(ids)} images could be loaded (first: {skipped[0][1]})")
    tested = ids[positions]
    if prototype is None:
        prototype = prototype_map(fresh_maps(model, images, prototype_base, batch_size=forward_batch))
    table = cache.table.set_index("id").loc[tested]
    labels = torch.from_numpy(table["label"].to_numpy(np.int64).copy())
    result = shortcut_test(model, images, labels, prototype, q=q, blur_sigma=blur_sigma, seed=seed,
                           forward_batch=forward_batch)
    result.per_image.insert(0, "path", table["path"].to_numpy())
    result.per_image.insert(0, "id", tested)
    mismatches = int((result.per_image["pred_before"].to_numpy() != table["pred"].to_numpy()).sum())
    foreground_frame = per_class = None
    stored_foreground = cache.foreground(tested)
    if stored_foreground is not None:
        mask = foreground_to_input(stored_foreground, images.shape[-2], images.shape[-1])
        foreground_frame = foreground_test(model, images, labels, mask, blur_sigma=blur_sigma,
                                           forward_batch=forward_batch)
        foreground_frame.insert(0, "id", tested[foreground_frame["row"].to_numpy(np.int64)])
        foreground_frame = foreground_frame.drop(columns="row")
        per_class = per_class_foreground(foreground_frame, cache.manifest.get("class_names", []))
    return CacheShortcutReport(ids=tested, result=result, foreground=foreground_frame, per_class=per_class,
                               skipped=skipped, stored_pred_mismatches=mismatches)
