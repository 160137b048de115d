"""Per-image channel relevance in the cache (issue 15): how much of the CAM's evidence each CAM-layer channel holds.

FG-CAM starts from the components I_k = w_k A_k of the CAM layer (Qiu, Jin, Zhang, AAAI 2024); the spatial sum
of I_k is channel k's share of the class's evidence (``FGCAMResult.channel_relevance``, computed by the engine
in every call, before denoising). The job stores it for every image: for the predicted class, and for the true
class (on a mistake the engine's second call, on a correct image the same values as the predicted class). These
are the "concepts" of Concept Relevance Propagation (Achtibat et al., Nat. Mach. Intell. 2023) for CAM
components; ``analysis.explore.concepts`` builds the per-class statistics and reference images from them, and
``analysis.cache.channels.concept_descriptors`` makes them a clustering descriptor (ours): images whose evidence
comes from the same channels, in the same proportions, are near each other, wherever in the image those
channels look.

Storage: two of the cache's per-row arrays (``cache.ROW_ARRAYS``), float16 [n, K] each (K: the CAM layer's
channels; 2 x 2 K bytes per image, e.g. 5 KiB for EfficientNet-Lite0's 1280 channels). Values beyond float16's
range (|x| > 65504) are clipped to it, so a row never holds inf. Caches made before the arrays existed read None.
This module writes them (``channel_relevance_arrays``, for the job); ``analysis.cache.channels`` reads them.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

from analysis.cache.channels import PRED, TRUE

_FLOAT16_MAX = float(np.finfo(np.float16).max)


def channel_relevance_arrays(pred: Tensor, true_of_wrong: Tensor | None, wrong: Tensor) -> dict[str, np.ndarray]:
    """The job's row arrays for one batch: ``pred`` [n, K] (the predicted class's channel relevance),
    ``true_of_wrong`` [n_wrong, K] (the true class's, for the rows where ``wrong`` [n] is True, in order; None
    when there is no mistake) -> {PRED: float16 [n, K], TRUE: float16 [n, K]}."""
    pred = pred.detach().float()
    true = pred.clone()
    if true_of_wrong is not None and bool(wrong.any()):
        true[wrong.to(true.device)] = true_of_wrong.detach().float().to(true.device)
    return {name: values.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).cpu().numpy().astype(np.float16)
            for name, values in ((PRED, pred), (TRUE, true))}
