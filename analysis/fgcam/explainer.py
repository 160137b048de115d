"""FG-CAM: fine-grained, high-faithfulness explanations from a CAM's channel components.

Qiu, Jin, Zhang, "Empowering CAM-Based Methods with Capability to Generate Fine-Grained and
High-Faithfulness Explanations", AAAI 2024, arXiv 2303.09171.

1. Components I [N, K, h, w] of a base CAM at ``cam_layer`` (``bases``).
2. Optional denoising: per image, rows minus their own mean, best rank d = floor(0.1 min(K, h w)).
3. Resolution increase: I is treated as relevance at the CAM layer's output and carried down to the
   output of ``target_layer`` (or the pixels) with the rules of ``rules``; the map is its channel sum.

On VGG this gives the reference implementation's numbers. Ours: batches, one forward pass instead of
three, any traceable CNN (``graph``, ``propagate``), CPU or GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .bases import BASES, NEEDS_GRADIENTS, CamInputs
from .graph import ModelGraph
from .propagate import NodeFlow, RelevanceWalk, walk_plan


@dataclass
class FGCAMResult:
    maps: Tensor     # [N, h, w] signed relevance at the output of the target layer, summed over channels
    classes: Tensor  # [N] the class explained
    logits: Tensor   # [N, num_classes] the model's logits for the batch


def denoise(components: Tensor) -> Tensor:
    """FG-CAM's denoising: each image's K x (h w) component matrix, rows centred, best rank-d approximation."""
    n, k, h, w = components.shape
    rows = components.reshape(n, k, h * w)
    rows = rows - rows.mean(dim=2, keepdim=True)  # the means are not added back, as in the paper
    d = int(0.1 * min(k, h * w))
    if d == 0:
        return torch.zeros_like(components)
    u, s, vh = torch.linalg.svd(rows, full_matrices=False)
    return ((u[:, :, :d] * s[:, None, :d]) @ vh[:, :d, :]).reshape(n, k, h, w)


def _on_model(model: nn.Module, images: Tensor) -> Tensor:
    """The images on the model's device, in its floating dtype, in channels-last layout.

    Channels-last makes every recorded activation channels-last too, which is the layout oneDNN's
    convolutions are fastest in on CPU; the rules then run without a single layout conversion (the model
    itself is not touched).
    """
    parameter = next(model.parameters(), None)
    if parameter is not None:
        images = images.to(parameter.device, parameter.dtype)
    return images.contiguous(memory_format=torch.channels_last)


def _logits(output: object) -> Tensor:
    """The logits from a model output (a tensor, or the first element of a tuple such as GoogLeNet's)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"the model returned {type(output).__name__}, expected a tensor of logits")


class FGCAM:
    """Explain a batch: ``FGCAM(model)(images, target_layer="input")`` -> maps [N, H, W]."""

    def __init__(self, model: nn.Module, base: str = "gradcam", cam_layer: str | None = None,
                 denoise: bool = False, score_batch_size: int = 64) -> None:
        if base not in BASES:
            raise ValueError(f"unknown base {base!r}; choose one of {', '.join(BASES)}")
        self.model, self.base, self.denoise = model, base, denoise
        self.score_batch_size = score_batch_size
        self.graph = ModelGraph(model)
        self.cam_layer = cam_layer if cam_layer is not None else self.graph.default_cam_layer()
        self._cam_node = self.graph.node_for(self.cam_layer)

    def logits(self, images: Tensor) -> Tensor:
        """A plain forward pass through the traced graph (no values kept, no gradients)."""
        return _logits(self.graph.run(images)[0])

    def __call__(self, images: Tensor, target_layer: str = "input", classes: Tensor | None = None, *,
                 flow: list[NodeFlow] | None = None) -> FGCAMResult:
        """``flow``: a list that receives, op by op down the walk, the relevance each op received and passed
        on, per image (``propagate.NodeFlow``; what ``check-model`` reports)."""
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        images = _on_model(self.model, images)
        target = self.graph.node_for(target_layer)
        cam = self._cam_node
        path = self.graph.path(target, cam)
        if target not in path:
            raise ValueError(f"target_layer {target_layer!r} is not below cam_layer {self.cam_layer!r}")
        gradients_needed = self.base in NEEDS_GRADIENTS
        plan = walk_plan(self.graph, target, cam)
        output, values = self.graph.run(images, plan.values | {cam}, plan.shapes,
                                        grad_from=cam if gradients_needed else None)
        logits = _logits(output)
        if classes is None:
            classes = logits.argmax(dim=1)
        classes = classes.to(logits.device).long()
        if classes.shape != (len(images),) or not ((classes >= 0) & (classes < logits.shape[1])).all():
            raise ValueError(f"classes must be a long tensor [N] with values in [0, {logits.shape[1]})")
        activations = values[cam]
        gradients = None
        if gradients_needed:
            score = logits.gather(1, classes[:, None]).sum()  # images are independent: one backward for all
            (gradients,) = torch.autograd.grad(score, activations)
            activations = activations.detach()
            values[cam] = activations
        with torch.no_grad():
            components = BASES[self.base](CamInputs(activations, gradients, images, classes, self.logits,
                                                     self.score_batch_size))
            if self.denoise:
                components = denoise(components)
            relevance = components if target is cam else \
                RelevanceWalk(self.graph, values, flow).run(cam, components, target)
        return FGCAMResult(relevance.sum(dim=1), classes, logits.detach())


class LRP:
    """Plain LRP from the logit with the same rules (z+ for hidden layers, z^B for the image-reading
    convolution): the baseline the paper compares FG-CAM with at the input layer.

    ``LRP(model)(images, target_layer="input")`` -> ``FGCAMResult``; relevance starts as the explained
    class's logit (all other logits zero) and is carried through the classifier head too.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.graph = ModelGraph(model)
        logits_node = self.graph.output_node.args[0]
        self._logits_node = logits_node[0] if isinstance(logits_node, (tuple, list)) else logits_node

    def __call__(self, images: Tensor, target_layer: str = "input", classes: Tensor | None = None) -> FGCAMResult:
        target = self.graph.node_for(target_layer)
        plan = walk_plan(self.graph, target, self._logits_node)
        output, values = self.graph.run(_on_model(self.model, images), plan.values, plan.shapes)
        logits = _logits(output)
        classes = logits.argmax(dim=1) if classes is None else classes.to(logits.device).long()
        start = torch.zeros_like(logits).scatter_(1, classes[:, None], logits.gather(1, classes[:, None]))
        with torch.no_grad():
            relevance = RelevanceWalk(self.graph, values).run(self._logits_node, start, target)
        return FGCAMResult(relevance.sum(dim=1), classes, logits)
