"""Faithfulness of relevance maps: deletion and insertion curves and their areas.

Petsiuk, Das, Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models", BMVC 2018:
pixels are moved, most relevant first, from the image to a baseline (deletion) or from the baseline to the
image (insertion), and the probability of the explained class is recorded after each step. A faithful map
makes the deletion curve fall fast (small area) and the insertion curve rise fast (large area). As in the
FG-CAM paper's evaluation (Qiu et al., AAAI 2024), the baseline is a Gaussian-blurred copy of the image for
both curves, and a map at an intermediate layer orders the *input* pixels after bilinear upsampling.

Cost: with ``steps`` steps, each curve has steps + 1 points; both curves share their two end points (the
image and its blurred copy), so one image costs ``2 * steps`` forward passes (`forward_passes_per_image`).

Everything here is a plain function on tensors: batched, on the model's device (CPU or GPU), no gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Reading the logits from a model output (a tensor, or the first tensor of a tuple such as GoogLeNet's) has one
# home: the engine's (analysis/fgcam/explainer.py).
from analysis.fgcam.explainer import logits_of


DEFAULT_STEPS = 20
DEFAULT_BLUR_SIGMA = 5.0       # pixels of the model input; RISE's blur (sigma 5) at 224 x 224
DEFAULT_FORWARD_BATCH = 256    # perturbed images per forward pass


def forward_passes_per_image(steps: int = DEFAULT_STEPS) -> int:
    """Extra forward passes one image costs for its deletion and insertion curves: 2 * steps."""
    _check_steps(steps)
    return 2 * steps


def cost_note(steps: int = DEFAULT_STEPS) -> str:
    """One line for a --help text: what the faithfulness curves cost."""
    return (f"deletion + insertion curves with {steps} steps: {forward_passes_per_image(steps)} extra forward "
            "passes per image (2 x steps; the explanation itself is not repeated)")


# ----------------------------------------------------------------------------------------------------------
# Validation (one clear line, before any work)
# ----------------------------------------------------------------------------------------------------------

def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def _check_sigma(sigma: float) -> None:
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"blur_sigma must be a positive number of pixels, got {sigma!r}")


def check_eval_mode(model: nn.Module) -> None:
    """Batch statistics or dropout would mix the perturbed images of one forward pass: refuse."""
    for name, module in model.named_modules():
        if module.training and isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
            raise ValueError(f"the model is in training mode ({name or type(module).__name__} is a "
                             f"{type(module).__name__}); call model.eval() first")


def _check_inputs(images: Tensor, maps: Tensor, classes: Tensor, num_classes: int | None = None) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    n = images.shape[0]
    if maps.dim() != 3 or maps.shape[0] != n:
        raise ValueError(f"maps must be [N, h, w] with N = {n} (one map per image), got shape {tuple(maps.shape)}")
    if classes.shape != (n,):
        raise ValueError(f"classes must be a vector of {n} class indices, got shape {tuple(classes.shape)}")
    if classes.dtype.is_floating_point or classes.dtype == torch.bool:
        raise ValueError(f"classes must hold integer class indices, got dtype {classes.dtype}")
    if n and (classes.min() < 0 or (num_classes is not None and classes.max() >= num_classes)):
        raise ValueError(f"classes must lie in [0, {num_classes}), got values from {int(classes.min())} "
                         f"to {int(classes.max())}")
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinite values")


# ----------------------------------------------------------------------------------------------------------
# Method
# ----------------------------------------------------------------------------------------------------------

def _mirror_indices(size: int, radius: int, device: torch.device) -> Tensor:
    """Indices -radius .. size-1+radius folded back into the image by mirroring about the edge pixels
    (d c b | a b c d | c b a), for any radius -- torch's "reflect" padding needs radius < size."""
    positions = torch.arange(-radius, size + radius, device=device)
    if size == 1:
        return torch.zeros_like(positions)
    period = 2 * (size - 1)
    folded = positions.abs() % period
    return torch.where(folded >= size, period - folded, folded)


def gaussian_blur(images: Tensor, sigma: float = DEFAULT_BLUR_SIGMA) -> Tensor:
    """Each channel blurred with a separable Gaussian of std `sigma` pixels, truncated at 3 sigma.

    Borders mirror the image about its edge pixels (scipy.ndimage's mode "mirror", torch's "reflect"):
    zero padding would darken the frame of the baseline, and replicating the edge pixels would keep
    whatever sits on the border -- a corner mark survives a replicate-padded blur at half its contrast.
    """
    _check_sigma(sigma)
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    n, c, h, w = images.shape
    flat = images.reshape(n * c, 1, h, w)
    flat = F.conv2d(flat[..., _mirror_indices(w, radius, images.device)], kernel.view(1, 1, 1, -1))
    flat = F.conv2d(flat[..., _mirror_indices(h, radius, images.device), :], kernel.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def upsample_maps(maps: Tensor, height: int, width: int) -> Tensor:
    """[N, h, w] -> float32 [N, height, width], bilinear (antialiased when shrinking), as the paper orders
    input pixels by a map of an intermediate layer."""
    maps = maps.float()
    if maps.shape[-2:] == (height, width):
        return maps
    shrinking = maps.shape[-2] > height or maps.shape[-1] > width
    return F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False,
                         antialias=shrinking)[:, 0]


def pixel_ranks(maps: Tensor, height: int, width: int) -> Tensor:
    """long [N, height * width]: each pixel's position when sorted by relevance, most relevant = 0.

    The map is upsampled to the input size first. Equal values keep row-major order (stable sort), so the
    result is deterministic on every device.
    """
    flat = upsample_maps(maps, height, width).reshape(maps.shape[0], -1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def step_counts(num_pixels: int, steps: int) -> np.ndarray:
    """int64 [steps + 1]: pixels moved after each step, floor(k * num_pixels / steps), 0 ... num_pixels."""
    _check_steps(steps)
    return (np.arange(steps + 1, dtype=np.int64) * num_pixels) // steps


def area_under_curve(fractions: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Trapezoidal area under curves [..., K] sampled at `fractions` [K] (0 ... 1): a value in [0, 1] for
    probabilities. With equal steps this is RISE's ``(sum - first/2 - last/2) / (K - 1)``."""
    fractions = np.asarray(fractions, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    widths = np.diff(fractions)
    return ((values[..., 1:] + values[..., :-1]) * 0.5 * widths).sum(axis=-1)


@dataclass
class FaithfulnessCurves:
    """Per-image deletion and insertion curves (probability of the explained class) and their areas."""

    fractions: np.ndarray      # float64 [steps + 1]: share of the pixels moved at each point (0 ... 1)
    deletion: np.ndarray       # float32 [N, steps + 1]: image -> blurred, most relevant pixels first
    insertion: np.ndarray      # float32 [N, steps + 1]: blurred -> image, most relevant pixels first
    deletion_auc: np.ndarray   # float32 [N], lower is better
    insertion_auc: np.ndarray  # float32 [N], higher is better


def _class_probabilities(model: nn.Module, inputs: Tensor, classes: Tensor, forward_batch: int) -> Tensor:
    """float32 [len(inputs)]: softmax probability of classes[i] for inputs[i], in forward passes of at most
    `forward_batch` images."""
    out = []
    for start in range(0, len(inputs), forward_batch):
        logits = logits_of(model(inputs[start:start + forward_batch])).float()
        if start == 0 and int(classes.max()) >= logits.shape[1]:  # before gather: no device-side assert on GPU
            raise ValueError(f"classes must lie in [0, {logits.shape[1]}) for this model, got {int(classes.max())}")
        out.append(torch.softmax(logits, dim=1).gather(1, classes[start:start + forward_batch, None])[:, 0])
    return torch.cat(out) if out else inputs.new_zeros(0, dtype=torch.float32)


def model_device_dtype(model: nn.Module, images: Tensor) -> tuple[torch.device, torch.dtype]:
    """Where and in which float type the model computes (its first parameter's; the images' if none)."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        return images.device, images.dtype if images.dtype.is_floating_point else torch.float32
    return parameter.device, parameter.dtype


def deletion_insertion_curves(model: nn.Module, images: Tensor, maps: Tensor, classes: Tensor,
                              steps: int = DEFAULT_STEPS, blur_sigma: float = DEFAULT_BLUR_SIGMA,
                              baseline: Tensor | None = None,
                              forward_batch: int = DEFAULT_FORWARD_BATCH) -> FaithfulnessCurves:
    """Deletion and insertion curves of `maps` [N, h, w] for `images` [N, C, H, W] and `classes` [N].

    Point k of a curve has floor(k H W / steps) pixels moved (all channels of a pixel move together), in
    the order of the map upsampled to H x W (most relevant first). `baseline` replaces the Gaussian blur
    of std `blur_sigma` pixels (e.g. zeros); the model must be in eval mode. Runs on the model's device.
    """
    _check_steps(steps)
    _check_sigma(blur_sigma)
    if not isinstance(forward_batch, int) or forward_batch < 1:
        raise ValueError(f"forward_batch must be a positive integer, got {forward_batch!r}")
    classes = torch.as_tensor(classes)
    _check_inputs(images, maps, classes)
    if baseline is not None and baseline.shape != images.shape:
        raise ValueError(f"baseline must have the images' shape {tuple(images.shape)}, got {tuple(baseline.shape)}")
    check_eval_mode(model)
    device, dtype = model_device_dtype(model, images)
    n, _, height, width = images.shape
    counts = step_counts(height * width, steps)
    fractions = counts / float(height * width)
    deletion = np.zeros((n, steps + 1), np.float32)
    insertion = np.zeros((n, steps + 1), np.float32)
    if n:
        with torch.inference_mode():
            images = images.to(device, dtype)
            classes = classes.to(device).long()
            blurred = gaussian_blur(images, blur_sigma) if baseline is None else baseline.to(device, dtype)
            ranks = pixel_ranks(maps.to(device), height, width).view(n, 1, 1, height, width)
            # The shared end points: the image (deletion's start, insertion's end) and the baseline.
            ends = _class_probabilities(model, torch.cat([images, blurred]), classes.repeat(2), forward_batch)
            deletion[:, 0], insertion[:, -1] = ends[:n].cpu().numpy(), ends[:n].cpu().numpy()
            deletion[:, -1], insertion[:, 0] = ends[n:].cpu().numpy(), ends[n:].cpu().numpy()
            inner = torch.as_tensor(counts[1:-1], device=device)
            if len(inner):
                # Build (image, step) pairs in chunks so that one chunk is about one forward batch.
                images_per_chunk = max(1, forward_batch // len(inner))
                steps_per_chunk = max(1, forward_batch // min(n, images_per_chunk))
                for i in range(0, n, images_per_chunk):
                    rows = slice(i, min(n, i + images_per_chunk))
                    for s in range(0, len(inner), steps_per_chunk):
                        chunk = inner[s:s + steps_per_chunk]
                        moved = ranks[rows] < chunk.view(1, -1, 1, 1, 1)          # [b, k, 1, H, W]
                        image, base = images[rows, None], blurred[rows, None]     # [b, 1, C, H, W]
                        b, k = moved.shape[:2]
                        batch_classes = classes[rows].repeat_interleave(k)
                        removed = torch.where(moved, base, image).flatten(0, 1)
                        inserted = torch.where(moved, image, base).flatten(0, 1)
                        deletion[rows, 1 + s:1 + s + k] = _class_probabilities(
                            model, removed, batch_classes, forward_batch).view(b, k).cpu().numpy()
                        insertion[rows, 1 + s:1 + s + k] = _class_probabilities(
                            model, inserted, batch_classes, forward_batch).view(b, k).cpu().numpy()
    return FaithfulnessCurves(fractions=fractions, deletion=deletion, insertion=insertion,
                              deletion_auc=area_under_curve(fractions, deletion).astype(np.float32),
                              insertion_auc=area_under_curve(fractions, insertion).astype(np.float32))


def faithfulness_scores(model: nn.Module, images: Tensor, maps: Tensor, classes: Tensor,
                        steps: int = DEFAULT_STEPS, blur_sigma: float = DEFAULT_BLUR_SIGMA,
                        forward_batch: int = DEFAULT_FORWARD_BATCH) -> dict[str, np.ndarray]:
    """Per-image columns for the job's table: {"deletion_auc", "insertion_auc"} -> float32 [N].

    Call once per batch with the batch's maps (any resolution: upsampled to the input size) and the
    explained classes; costs `forward_passes_per_image(steps)` forward passes per image.
    """
    curves = deletion_insertion_curves(model, images, maps, classes, steps=steps, blur_sigma=blur_sigma,
                                       forward_batch=forward_batch)
    return {"deletion_auc": curves.deletion_auc, "insertion_auc": curves.insertion_auc}
