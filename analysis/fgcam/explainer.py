"""FG-CAM: fine-grained, high-faithfulness explanations from a CAM's channel components.

Qiu, Jin, Zhang, "Empowering CAM-Based Methods with Capability to Generate Fine-Grained and
High-Faithfulness Explanations", AAAI 2024, arXiv 2303.09171.

1. Components I [N, K, h, w] of a base CAM at ``cam_layer`` (``bases``).
2. Optional denoising: per image, rows minus their own mean, best rank d = floor(0.1 min(K, h w)).
3. Resolution increase: I is treated as relevance at the CAM layer's output and carried down to the
   output of ``target_layer`` (or the pixels) with the rules of ``rules``; the map is its channel sum.

On VGG this gives the reference implementation's numbers. Ours: batches, one forward pass instead of
three, any traceable CNN (``graph``, ``propagate``), CPU or GPU.

Channels (ours; the concepts of Concept Relevance Propagation, Achtibat et al., Nat. Mach. Intell. 2023, for
CAM components): every rule is linear in the relevance given the forward values, so the map is the sum of
the maps of the single components. ``channels=`` carries only the chosen components down (their sum);
``channel_maps`` carries M of them separately, in one walk over one forward run. With ``denoise=True`` the
selection is made after denoising: a denoised row mixes every channel (it is a rank-d reconstruction), so
channel k's map is the map of row k of the denoised matrix, and the maps still add up to the full map.
``FGCAMResult.channel_relevance`` is the spatial sum of each component I_k before denoising (denoised rows
are centred: their sums are 0): how much of the CAM's evidence for the class each channel holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .bases import BASES, NEEDS_GRADIENTS, CamInputs
from .graph import ModelGraph, UnsupportedOperation
from .ops import LowRule
from .propagate import NodeFlow, RelevanceWalk, walk_plan


@dataclass
class FGCAMResult:
    maps: Tensor     # [N, h, w] signed relevance at the output of the target layer, summed over channels
                     #   ([N, M, h, w] from channel_maps: one map per chosen channel)
    classes: Tensor  # [N] the class explained
    logits: Tensor   # [N, num_classes] the model's logits for the batch
    channel_relevance: Tensor | None = None  # [N, K] the spatial sum of each CAM component (FGCAM only)
    channels: Tensor | None = None           # [N, M] the channels of channel_maps' maps (long)


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
    """Explain a batch: ``FGCAM(model)(images, target_layer="input")`` -> maps [N, H, W].

    ``low_rule``: another rule for the convolutions of the lowest layers (``LowRule``: gamma or epsilon up to a
    module; None, the default: z+ everywhere, as the paper).
    """

    def __init__(self, model: nn.Module, base: str = "gradcam", cam_layer: str | None = None,
                 denoise: bool = False, score_batch_size: int = 64, low_rule: LowRule | None = None) -> None:
        if base not in BASES:
            raise ValueError(f"unknown base {base!r}; choose one of {', '.join(BASES)}")
        if low_rule is not None and not isinstance(low_rule, LowRule):
            raise TypeError(f"low_rule must be an analysis.fgcam.LowRule or None, got {type(low_rule).__name__}")
        self.model, self.base, self.denoise, self.low_rule = model, base, denoise, low_rule
        self.score_batch_size = score_batch_size
        self.graph = ModelGraph(model)
        self.cam_layer = cam_layer if cam_layer is not None else self.graph.default_cam_layer()
        self._cam_node = self.graph.node_for(self.cam_layer)
        if low_rule is not None:
            self.graph.node_for(low_rule.through)  # an unknown module fails here, before any work

    def logits(self, images: Tensor) -> Tensor:
        """A plain forward pass through the traced graph (no values kept, no gradients)."""
        return _logits(self.graph.run(images)[0])

    def __call__(self, images: Tensor, target_layer: str = "input", classes: Tensor | None = None, *,
                 channels: Tensor | None = None, flow: list[NodeFlow] | None = None) -> FGCAMResult:
        """``channels``: carry only these components down (None: all): a long tensor [M] of channel indices for
        every image, or a boolean mask [N, K]; the map is then the sum of those channels' maps.
        ``flow``: a list that receives, op by op down the walk, the relevance each op received and passed
        on, per image (``propagate.NodeFlow``; what ``check-model`` reports)."""
        run = self._components(images, target_layer, classes)
        components = run.components
        if channels is not None:
            components = components * _channel_mask(channels, components).to(components.dtype)[:, :, None, None]
        with torch.no_grad():
            relevance = components if run.target is self._cam_node else \
                RelevanceWalk(self.graph, run.values, flow, self.low_rule).run(self._cam_node, components, run.target)
        return FGCAMResult(relevance.sum(dim=1), run.classes, run.logits, run.channel_relevance)

    def channel_maps(self, images: Tensor, channels: Tensor | int, target_layer: str = "input",
                     classes: Tensor | None = None) -> FGCAMResult:
        """One map per chosen channel: ``maps`` [N, M, h, w], map (n, m) carrying only component
        ``channels[n, m]`` of image n down to ``target_layer``; they add up to the map of those channels.

        ``channels``: a long tensor [N, M] of channel indices per image, or an int M: each image's M channels of
        highest ``channel_relevance`` (the top of the evidence), in decreasing order; ``result.channels`` says
        which. One forward run; the M walks run as one, stacked along the batch (the rules are linear in R given
        the forward values: each convolution's denominator is computed once for all M). Memory grows with
        N x M: pass fewer images for many channels.
        """
        run = self._components(images, target_layer, classes)
        components = run.components
        n, k = components.shape[:2]
        if isinstance(channels, int) and not isinstance(channels, bool):
            if not 1 <= channels <= k:
                raise ValueError(f"channels must be between 1 and the CAM layer's {k} channels, got {channels}")
            chosen = run.channel_relevance.topk(channels, dim=1).indices
        else:
            chosen = _channel_indices(channels, n, k).to(components.device)
        m = chosen.shape[1]
        picked = components[torch.arange(n, device=chosen.device)[:, None], chosen]  # [N, M, h, w]
        with torch.no_grad():
            if run.target is self._cam_node:
                maps = picked
            else:
                relevance = components.new_zeros((m, n, *components.shape[1:]))
                copy_index = torch.arange(m, device=chosen.device)[:, None].expand(m, n)
                image_index = torch.arange(n, device=chosen.device)[None, :].expand(m, n)
                relevance[copy_index, image_index, chosen.t()] = picked.transpose(0, 1)
                relevance = relevance.view(m * n, *components.shape[1:]).contiguous(memory_format=torch.channels_last)
                walked = RelevanceWalk(self.graph, run.values, low_rule=self.low_rule).run(
                    self._cam_node, relevance, run.target)
                maps = walked.sum(dim=1).view(m, n, *walked.shape[2:]).transpose(0, 1)
        return FGCAMResult(maps.contiguous(), run.classes, run.logits, run.channel_relevance, chosen)

    def _components(self, images: Tensor, target_layer: str, classes: Tensor | None) -> "_Run":
        """The forward run (keeping what the walk reads), the explained classes and the CAM components."""
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        images = _on_model(self.model, images)
        target = self.graph.node_for(target_layer)
        cam = self._cam_node
        path = self.graph.path(target, cam)
        if target not in path:
            raise ValueError(f"target_layer {target_layer!r} is not below cam_layer {self.cam_layer!r}")
        gradients_needed = self.base in NEEDS_GRADIENTS
        plan = walk_plan(self.graph, target, cam, self.low_rule)
        output, values = self.graph.run(images, plan.values | {cam}, plan.shapes,
                                        grad_from=cam if gradients_needed else None)
        logits = _logits(output)
        if classes is None:
            classes = logits.argmax(dim=1)
        classes = classes.to(logits.device).long()
        if classes.shape != (len(images),) or not ((classes >= 0) & (classes < logits.shape[1])).all():
            raise ValueError(f"classes must be a long tensor [N] with values in [0, {logits.shape[1]})")
        activations = values[cam]
        require_feature_map(activations, self.cam_layer)
        gradients = None
        if gradients_needed:
            score = logits.gather(1, classes[:, None]).sum()  # images are independent: one backward for all
            (gradients,) = torch.autograd.grad(score, activations)
            activations = activations.detach()
            values[cam] = activations
        with torch.no_grad():
            components = BASES[self.base](CamInputs(activations, gradients, images, classes, self.logits,
                                                     self.score_batch_size))
            channel_relevance = components.sum(dim=(2, 3))
            if self.denoise:
                components = denoise(components)
        return _Run(values, components, channel_relevance, classes, logits.detach(), target)


def require_feature_map(activations: object, cam_layer: str) -> None:
    """Raises UnsupportedOperation unless the CAM layer's output (a value or a shape-only stand-in) is a feature
    map [N, C, H, W]: a CAM weighs channels over positions. A transformer's tokens [N, tokens, D] (ViT) are
    refused here, in one line, before any rule runs."""
    if not isinstance(activations, Tensor) or activations.dim() != 4:
        shape = list(activations.shape) if isinstance(activations, Tensor) else type(activations).__name__
        raise UnsupportedOperation(f"the CAM layer {cam_layer!r} outputs {shape}, not a spatial feature map "
                                   "[N, C, H, W] (a transformer's tokens?): FG-CAM explains convolutional "
                                   "feature maps; pass a CAM layer that outputs one")


@dataclass
class _Run:
    values: dict                # the forward values the walk reads (the walk takes them over)
    components: Tensor          # [N, K, h, w], denoised if asked
    channel_relevance: Tensor   # [N, K] spatial sums of the components before denoising
    classes: Tensor
    logits: Tensor
    target: object              # the target layer's graph node


def _channel_mask(channels: Tensor, components: Tensor) -> Tensor:
    """A boolean mask [N, K] from ``channels=``: indices [M] for every image, or a mask [N, K] as it is."""
    n, k = components.shape[:2]
    if not isinstance(channels, Tensor):
        raise TypeError(f"channels must be a tensor (long [M] or bool [N, K]), got {type(channels).__name__}")
    if channels.dtype == torch.bool:
        if channels.shape != (n, k):
            raise ValueError(f"a boolean channel mask must be [N, K] = [{n}, {k}], got {list(channels.shape)}")
        return channels.to(components.device)
    if channels.dtype not in (torch.int64, torch.int32) or channels.dim() != 1:
        raise ValueError(f"channels must be a long tensor [M] of channel indices or a boolean mask [N, K], got "
                         f"{channels.dtype} {list(channels.shape)}")
    if len(channels) and not ((channels >= 0) & (channels < k)).all():
        raise ValueError(f"channel indices must be in [0, {k}) (the CAM layer's channels)")
    mask = torch.zeros(k, dtype=torch.bool, device=components.device)
    mask[channels.to(components.device).long()] = True
    return mask.expand(n, k)


def _channel_indices(channels: Tensor, n: int, k: int) -> Tensor:
    """``channel_maps``' channels as a long tensor [N, M], checked."""
    if not isinstance(channels, Tensor) or channels.dtype not in (torch.int64, torch.int32) or channels.dim() != 2 \
            or channels.shape[0] != n or channels.shape[1] == 0:
        shape = list(channels.shape) if isinstance(channels, Tensor) else type(channels).__name__
        raise ValueError(f"channels must be an int M or a long tensor [N, M] = [{n}, M >= 1] of channel indices, "
                         f"got {shape}")
    if not ((channels >= 0) & (channels < k)).all():
        raise ValueError(f"channel indices must be in [0, {k}) (the CAM layer's channels)")
    return channels.long()


class LRP:
    """Plain LRP from the logit with the same rules (z+ for hidden layers, z^B for the image-reading
    convolution; ``low_rule`` as FGCAM's): the baseline the paper compares FG-CAM with at the input layer.

    ``LRP(model)(images, target_layer="input")`` -> ``FGCAMResult``; relevance starts as the explained
    class's logit (all other logits zero) and is carried through the classifier head too.
    """

    def __init__(self, model: nn.Module, low_rule: LowRule | None = None) -> None:
        self.model, self.low_rule = model, low_rule
        self.graph = ModelGraph(model)
        if low_rule is not None:
            self.graph.node_for(low_rule.through)
        logits_node = self.graph.output_node.args[0]
        self._logits_node = logits_node[0] if isinstance(logits_node, (tuple, list)) else logits_node

    def __call__(self, images: Tensor, target_layer: str = "input", classes: Tensor | None = None) -> FGCAMResult:
        target = self.graph.node_for(target_layer)
        plan = walk_plan(self.graph, target, self._logits_node, self.low_rule)
        output, values = self.graph.run(_on_model(self.model, images), plan.values, plan.shapes)
        logits = _logits(output)
        classes = logits.argmax(dim=1) if classes is None else classes.to(logits.device).long()
        start = torch.zeros_like(logits).scatter_(1, classes[:, None], logits.gather(1, classes[:, None]))
        with torch.no_grad():
            relevance = RelevanceWalk(self.graph, values, low_rule=self.low_rule).run(self._logits_node, start, target)
        return FGCAMResult(relevance.sum(dim=1), classes, logits)
