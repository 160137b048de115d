"""One image's maps at the resolution FG-CAM computes them, made again with the cache's model: the cache keeps
them area-resized to ``--map-size`` (28 or 64 cells), the Image page shows the fine grain (issue 24, item 5).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from analysis.pipeline.datasets import load_image, to_model_mode


def full_resolution_maps(cache: Any, loaded: Any, explainer: Any, image_id: int, classes: Sequence[int]
                         ) -> np.ndarray:
    """float32 [len(classes), h, w]: the image's map for each class at the cache's target layer's own
    resolution (the model's input size for pixel maps), with ``explainer`` (the cache's base, CAM layer, rule and
    denoising: ``concepts.concept_explainer(cache, loaded, denoise=...)``) on the image preprocessed as the job
    did. Area-resized to the cache's map size, these are the stored maps (up to their storage precision)."""
    target = (cache.manifest.get("options") or {}).get("target_layer", "input")
    image = loaded.transform(to_model_mode(load_image(cache.image_path(int(image_id))), loaded.in_channels))
    parameter = next(loaded.model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    images = image[None].expand(len(classes), *image.shape).to(device)  # one row per class: one forward run
    result = explainer(images, target_layer=target, classes=torch.tensor([int(c) for c in classes], device=device))
    return result.maps.detach().float().cpu().numpy()
