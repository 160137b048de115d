"""The explanation methods the Trust checks compare (``METHODS``), made for the same images and class: FG-CAM
with and without denoising, its base CAM, LRP, and two references that ignore the model's reasoning (uniform
noise, the image's edges). The faithfulness comparison (``compare``) and the sanity checks (``sanity``) both
call ``method_maps``; neither imports the other for it."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.fgcam.opsets import PADS


METHODS = ("fgcam", "fgcam_denoised", "cam", "lrp", "random", "edge")
BASE_LABELS = {"gradcam": "Grad-CAM", "scorecam": "Score-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM",
               "layercam": "LayerCAM"}


def method_label(method: str, base: str) -> str:
    """The name a table shows for a method."""
    return {"fgcam": f"FG-CAM ({BASE_LABELS.get(base, base)})",
            "fgcam_denoised": f"FG-CAM ({BASE_LABELS.get(base, base)}), denoised",
            "cam": f"{BASE_LABELS.get(base, base)}, upsampled",
            "lrp": "LRP (z+, z^B)", "random": "random map", "edge": "edge map (Sobel)"}[method]


def default_intermediate_layer(explainer: Any, image: Tensor) -> str:
    """A middle layer between the input and the CAM layer, from the model's own structure.

    The modules (called once) strictly between the input and the CAM layer are grouped by the spatial size
    of their output; of the distinct sizes, largest first, the middle one is taken (VGG-16: 56 x 56,
    ResNet-50: 28 x 28), and at that size the outermost module, the last one in the graph (a stage's
    output: ResNet's ``layer2``, VGG's last ReLU at 56 x 56). `image` [1, C, H, W] gives the shapes.
    """
    graph = explainer.graph
    cam = graph.node_for(explainer.cam_layer)
    between = graph.path(graph.input_node, cam) - {graph.input_node, cam}
    # a pad module's output (EfficientNet's `static_padding`) is the layer below with a border: not a layer of
    # its own, and its odd size would stand for a resolution of its own
    candidates = [(name, outs[0]) for name, outs in graph.module_outputs.items()
                  if len(outs) == 1 and outs[0] in between and not PADS.match(outs[0], graph.module(outs[0]))]
    parameter = next(explainer.model.parameters(), None)
    if parameter is not None:
        image = image.to(parameter.device, parameter.dtype)
    with torch.no_grad():
        _, values = graph.run(image[:1], shapes={node for _, node in candidates})
    spatial = [(name, node, tuple(values[node].shape[-2:])) for name, node in candidates
               if isinstance(values.get(node), Tensor) and values[node].dim() == 4]
    if not spatial:
        raise ValueError(f"no module between the input and the CAM layer {explainer.cam_layer!r} outputs a "
                         "spatial map; pass --layer NAME")
    sizes = sorted({size for *_, size in spatial}, key=lambda s: (s[0] * s[1], s), reverse=True)
    middle = sizes[len(sizes) // 2]
    at_size = [(name, node) for name, node, size in spatial if size == middle]
    outermost = min(name.count(".") for name, _ in at_size)
    return max(((name, node) for name, node in at_size if name.count(".") == outermost),
               key=lambda item: (graph.order[item[1]], -len(item[0])))[0]


def check_intermediate_layer(explainers: "Explainers", layer: str) -> None:
    """ValueError (one line) unless `layer` names a module whose output lies between the input and the CAM
    layer, where FG-CAM, the upsampled CAM and LRP all have a map."""
    graph = explainers.fgcam.graph
    if layer == "input":
        raise ValueError("--layer input: the input is always compared; name an intermediate layer")
    node = graph.node_for(layer)  # ValueError naming known layers for an unknown name
    cam = graph.node_for(explainers.fgcam.cam_layer)
    if node is not cam and node not in graph.path(graph.input_node, cam):
        raise ValueError(f"--layer {layer}: not between the input and the CAM layer {explainers.fgcam.cam_layer!r}; "
                         "name a module below the CAM layer (or pass --cam-layer)")


@dataclass
class Explainers:
    """The explainers of one comparison (each traces the model once)."""

    fgcam: Any
    fgcam_denoised: Any
    lrp: Any
    base: str

    @classmethod
    def build(cls, model: nn.Module, base: str = "gradcam", cam_layer: str | None = None,
              low_rule: Any = None) -> "Explainers":
        """``low_rule``: the engine's rule for the lowest convolutions (``analysis.fgcam.LowRule``; None: z+),
        for FG-CAM, denoised or not, and LRP alike."""
        from analysis.fgcam import FGCAM, LRP

        plain = FGCAM(model, base=base, cam_layer=cam_layer, denoise=False, low_rule=low_rule)
        denoised = FGCAM(model, base=base, cam_layer=plain.cam_layer, denoise=True, low_rule=low_rule)
        return cls(plain, denoised, LRP(model, low_rule=low_rule), base)


def random_maps(count_or_indices: Sequence[int], layer: str, size: tuple[int, int], seed: int) -> Tensor:
    """float32 [N, h, w] uniform noise; image i's map depends only on (seed, its index, layer), so it does not
    change with the batch size or with the other layers compared."""
    out = torch.empty((len(count_or_indices), *size))
    for row, index in enumerate(count_or_indices):
        state = np.random.SeedSequence([seed, int(index), zlib.crc32(layer.encode())]).generate_state(2)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        out[row] = torch.rand(size, generator=generator)
    return out


def edge_maps(images: Tensor, size: tuple[int, int]) -> Tensor:
    """float32 [N, h, w]: the Sobel gradient magnitude of each image's channel mean (edges replicated),
    resized to `size` like a map of that layer (`upsample_maps`: area-like when shrinking). It reads the
    image only: the reference a map that shows the image, not the model, looks like."""
    from analysis.pipeline.faithfulness import upsample_maps

    gray = F.pad(images.float().mean(dim=1, keepdim=True), (1, 1, 1, 1), mode="replicate")
    derivative = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
    gx = F.conv2d(gray, derivative.view(1, 1, 3, 3))
    gy = F.conv2d(gray, derivative.t().contiguous().view(1, 1, 3, 3))
    return upsample_maps(torch.sqrt(gx * gx + gy * gy)[:, 0], *size)


def method_maps(explainers: Explainers, method: str, images: Tensor, layer: str, classes: Tensor,
                layer_size: tuple[int, int], image_indices: Sequence[int], seed: int = 0) -> Tensor:
    """[N, h, w] maps of `method` for `classes` at `layer` (h, w = `layer_size`, the layer's resolution;
    the input's for "input"); the faithfulness metrics upsample them to the input size. `image_indices`
    and `seed` make the random maps reproducible per image."""
    if method == "fgcam":
        return explainers.fgcam(images, target_layer=layer, classes=classes).maps
    if method == "fgcam_denoised":
        return explainers.fgcam_denoised(images, target_layer=layer, classes=classes).maps
    if method == "cam":
        cam = explainers.fgcam(images, target_layer=explainers.fgcam.cam_layer, classes=classes).maps
        if tuple(cam.shape[-2:]) == tuple(layer_size):
            return cam
        return F.interpolate(cam[:, None].float(), size=layer_size, mode="bilinear", align_corners=False)[:, 0]
    if method == "lrp":
        return explainers.lrp(images, target_layer=layer, classes=classes).maps
    if method == "random":
        return random_maps(image_indices, layer, layer_size, seed).to(images.device)
    if method == "edge":
        return edge_maps(images, layer_size)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
