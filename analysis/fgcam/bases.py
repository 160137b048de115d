"""The base CAMs: how each weighs the channels of the activations A [N, K, h, w] at the CAM layer.

Each returns the explanation components I [N, K, h, w] (I_k = w_k * A_k, or a per-location weight for
LayerCAM) that FG-CAM carries down to finer layers. Summed over k they are the base CAM before its ReLU.

- gradcam (Selvaraju et al. 2017): w_k = spatial mean of d logit_c / d A_k.
- gradcam++ (Chattopadhay et al. 2018): w_k = sum_ij alpha_kij relu(g_kij), alpha = g^2 / (2 g^2 + sum(A_k) g^3).
- xgradcam (Fu et al. 2020): w_k = sum_ij A_kij / sum(A_k) * g_kij.
- layercam (Jiang et al. 2021): I_kij = relu(g_kij) * A_kij.
- scorecam (Wang et al. 2020), as in the FG-CAM reference: w_k = softmax(model(x * M_k))_c with M_k the
  bilinearly upsampled, min-max normalised channel k; no baseline subtracted.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .rules import safe_divide


@dataclass
class CamInputs:
    activations: Tensor                   # A at the CAM layer [N, K, h, w]
    gradients: Tensor | None              # d logit_c / d A, for the gradient bases
    images: Tensor                        # the model input [N, C, H, W]
    classes: Tensor                       # [N]
    logits_of: Callable[[Tensor], Tensor]  # the model, for bases that re-run it
    batch_size: int = 64                  # masked images per forward pass (scorecam)


def gradcam(cam: CamInputs) -> Tensor:
    return cam.gradients.mean(dim=(2, 3), keepdim=True) * cam.activations


def gradcam_plus_plus(cam: CamInputs) -> Tensor:
    g, a = cam.gradients, cam.activations
    alpha = safe_divide(g ** 2, 2 * g ** 2 + a.sum(dim=(2, 3), keepdim=True) * g ** 3)
    return (alpha * g.clamp(min=0)).sum(dim=(2, 3), keepdim=True) * a


def xgradcam(cam: CamInputs) -> Tensor:
    a = cam.activations
    return (safe_divide(a, a.sum(dim=(2, 3), keepdim=True)) * cam.gradients).sum(dim=(2, 3), keepdim=True) * a


def layercam(cam: CamInputs) -> Tensor:
    return cam.gradients.clamp(min=0) * cam.activations


def score_masks(activations: Tensor, size: tuple[int, int]) -> Tensor:
    """Each channel upsampled to the input size and min-max normalised to [0, 1] (constant channel: 0)."""
    up = F.interpolate(activations, size=size, mode="bilinear", align_corners=False)
    flat = up.flatten(2)
    low, high = flat.amin(dim=2)[..., None, None], flat.amax(dim=2)[..., None, None]
    span = high - low + torch.where(high == 0, 1e-9, 0.0)  # the reference's guard for an all-zero channel
    return safe_divide(up - low, span)


def scorecam(cam: CamInputs) -> Tensor:
    # One image's K masked copies at a time: all N*K at once would not fit in memory for VGG at 224 px.
    weights = []
    for image, activations, c in zip(cam.images, cam.activations, cam.classes):
        masks = score_masks(activations[None], cam.images.shape[-2:])[0]  # [K, H, W]
        for start in range(0, len(masks), cam.batch_size):
            masked = image[None] * masks[start:start + cam.batch_size, None]
            weights.append(torch.softmax(cam.logits_of(masked), dim=1)[:, c])
    return torch.cat(weights).view(cam.activations.shape[:2] + (1, 1)) * cam.activations


BASES: dict[str, Callable[[CamInputs], Tensor]] = {
    "gradcam": gradcam, "gradcam++": gradcam_plus_plus, "xgradcam": xgradcam, "layercam": layercam,
    "scorecam": scorecam,
}
NEEDS_GRADIENTS = {"gradcam", "gradcam++", "xgradcam", "layercam"}
