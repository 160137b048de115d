"""Background swap test: does the model depend on what lies around the object?

After Xiao, Engstrom, Ilyas, Madry, "Noise or Signal: The Role of Image Backgrounds in Object Recognition",
ICLR 2021 (arXiv 2006.09994), who keep each object and change what lies around it (Only-FG: a black
background; Mixed-Same / Mixed-Rand: the background of an image of the same / a random class). A model that
decides by the object keeps its prediction; one that depends on the background changes it where the new
background lacks what the old one held. A region test cannot see such a dependence when the evidence is
spread over the background (a colour, a texture); this test needs no region, only the objects' masks or
boxes.

Ours: the new background is the dataset's *typical* one (`typical_background`: per pixel, the median of a
sample of images' background pixels), so that an image whose background is already typical is not changed
(`removal` near 0: the test could not show a dependence) and no other image's artefact is pasted in -- with
a random class's background, a grey background planted on another class made clean dresses change class,
which is that artefact's doing, not theirs (measured, bench/clever_hans.py). The control gives each member
the background of another member of the same selection (Mixed-Same within a cluster: what the cluster's
backgrounds share stays), so that a swap that breaks predictions by itself (seams, a new colour) shows
there too; the two are paired per image and compared by an exact McNemar test. The swap is made on the
model's input (after its preprocessing).

Method: `typical_background`, `swap_backgrounds`, `background_swap_test`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from analysis.trust.region_removal import known_outputs, model_probabilities, relative_change


def typical_background(images: Tensor, foreground: Tensor) -> Tensor:
    """[C, H, W]: per pixel, the median of `images` [N, C, H, W] where they are background (`foreground` bool
    [N, H, W] False); a pixel that no image shows as background takes the median of all background pixels."""
    if images.dim() != 4 or foreground.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"images {tuple(images.shape)} and foreground {tuple(foreground.shape)} do not fit")
    values = images.float().masked_fill(foreground[:, None], float("nan"))
    typical = values.nanmedian(dim=0).values                                   # [C, H, W], NaN where never seen
    background = ~foreground[:, None].expand_as(images)
    overall = images.float().transpose(0, 1)[background.transpose(0, 1)].reshape(images.shape[1], -1) \
        if background.any() else images.float().transpose(0, 1).reshape(images.shape[1], -1)
    fill = overall.median(dim=1).values[:, None, None].expand_as(typical)
    return torch.where(torch.isnan(typical), fill, typical).to(images.dtype)


def swap_backgrounds(images: Tensor, foreground: Tensor, backgrounds: Tensor) -> Tensor:
    """images [N, C, H, W] with every pixel outside their `foreground` (bool [N, H, W]) taken from
    `backgrounds` ([C, H, W] for all, or [N, C, H, W] paired by row). A new tensor."""
    if foreground.shape != (images.shape[0], *images.shape[2:]) or backgrounds.shape[-3:] != images.shape[1:]:
        raise ValueError(f"images {tuple(images.shape)}, foreground {tuple(foreground.shape)} and backgrounds "
                         f"{tuple(backgrounds.shape)} do not fit")
    return torch.where(foreground[:, None], images, backgrounds.expand_as(images))


@dataclass
class BackgroundSwapResult:
    changed_typical: np.ndarray        # bool [N]: the prediction changed with the typical background
    changed_same: np.ndarray           # bool [N]: ... with another member's background (the control)
    removal: float                     # mean |change| of the typical swap on the background / the images' contrast


def background_swap_test(model: nn.Module, images: Tensor, foreground: Tensor, typical: Tensor,
                         same: Tensor, same_foreground: Tensor, forward_batch: int = 64,
                         before: Tensor | None = None) -> BackgroundSwapResult:
    """Each member (`images`, bool `foreground` [N, H, W] at the input size) with the `typical` background
    [C, H, W], and with the background of another member (`same` [N, C, H, W], paired by row, with its
    `same_foreground`: where that member's own object lies, the typical background fills in); which
    predictions change. 3 forward passes per image (2 with `before`: the model's softmax outputs on `images`
    where already known)."""
    before = known_outputs(before, model, images, forward_batch).argmax(1)
    swapped = swap_backgrounds(images, foreground, typical)
    control = swap_backgrounds(images, foreground, torch.where(same_foreground[:, None], typical.expand_as(same), same))
    changed_typical = (model_probabilities(model, swapped, forward_batch).argmax(1) != before).numpy()
    changed_same = (model_probabilities(model, control, forward_batch).argmax(1) != before).numpy()
    return BackgroundSwapResult(changed_typical, changed_same, relative_change(images, swapped, ~foreground[:, None]))
