"""An independent, one-image-at-a-time FG-CAM for torchvision's VGG, written as the paper's reference code
computes it: a forward pass through ``features`` that records each layer's input, the base CAM's weights at
the last layer of ``features``, then a loop from that layer down to the target, each layer applying its
rule through autograd (the gradient trick), with the first convolution using the z^B rule.

It shares no code with ``analysis.fgcam`` (no fx graph, no conv2d_input, no batching); the tests compare the
two on the same weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    safe = torch.where(b == 0, torch.ones_like(b), b)
    return torch.where(b == 0, torch.zeros_like(b), a / safe)


def _head(vgg: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return vgg.classifier(torch.flatten(vgg.avgpool(features), 1))


def reference_fgcam(vgg: nn.Module, image: torch.Tensor, target_index: int, base: str = "gradcam",
                    denoise: bool = False, target_class: int | None = None) -> tuple[torch.Tensor, int]:
    """FG-CAM map [h, w] of one image [1, C, H, W] at the output of ``vgg.features[target_index]`` (-1: pixels)."""
    layer_inputs = []
    x = image
    with torch.no_grad():
        for layer in vgg.features:
            layer_inputs.append(x.clone())
            x = layer(x.clone())
    activations = x
    if target_class is None:
        with torch.no_grad():
            target_class = int(_head(vgg, activations).argmax(dim=1)[0])

    if base == "gradcam":
        leaf = activations.clone().requires_grad_(True)
        with torch.enable_grad():
            logit = _head(vgg, leaf)[0, target_class]
            (gradient,) = torch.autograd.grad(logit, leaf)
        components = gradient.mean(dim=(2, 3), keepdim=True) * activations
    elif base == "scorecam":
        with torch.no_grad():
            maps = F.interpolate(activations, size=image.shape[-2:], mode="bilinear", align_corners=False)
            highs = maps.flatten(2).max(dim=-1)[0]
            lows = maps.flatten(2).min(dim=-1)[0]
            eps = torch.where(highs == 0, 1e-9, 0.0)
            maps = (maps - lows[:, :, None, None]) / (highs[:, :, None, None] - lows[:, :, None, None] + eps[:, :, None, None])
            maps = torch.nan_to_num(maps[0])  # a constant channel: 0/0, taken as an empty mask
            weights = []
            for i in range(0, maps.shape[0], 8):
                out = vgg(image * maps[i:i + 8, None])
                weights.append(torch.softmax(out, dim=1)[:, target_class])
            components = torch.cat(weights)[None, :, None, None] * activations
    else:
        raise ValueError(base)

    if denoise:
        matrix = components[0].reshape(components.shape[1], -1)
        matrix = matrix - matrix.mean(dim=1)[:, None]
        u, s, vt = torch.linalg.svd(matrix, full_matrices=True)
        d = int(s.shape[0] * 0.1)
        components = (u[:, :d] @ torch.diag(s[:d]) @ vt[:d, :]).reshape(components.shape)

    relevance = components
    for index in range(len(vgg.features) - 1, target_index, -1):
        layer, x = vgg.features[index], layer_inputs[index]
        if isinstance(layer, nn.MaxPool2d):
            x_pos = x.clamp(min=0).requires_grad_(True)
            with torch.enable_grad():
                y = layer(x_pos)
                relevance = torch.autograd.grad(y, x_pos, _divide(relevance, y))[0] * x_pos
        elif isinstance(layer, nn.Conv2d) and index == 0:
            w = layer.weight
            low = x * 0 + x.amin(dim=(1, 2, 3), keepdim=True)
            high = x * 0 + x.amax(dim=(1, 2, 3), keepdim=True)
            x, low, high = (t.detach().requires_grad_(True) for t in (x, low, high))
            with torch.enable_grad():
                y1 = F.conv2d(x, w, None, layer.stride, layer.padding)
                y2 = F.conv2d(low, w.clamp(min=0), None, layer.stride, layer.padding)
                y3 = F.conv2d(high, w.clamp(max=0), None, layer.stride, layer.padding)
                s = _divide(relevance, y1 - y2 - y3)
                relevance = (x * torch.autograd.grad(y1, x, s)[0] - low * torch.autograd.grad(y2, low, s)[0]
                             - high * torch.autograd.grad(y3, high, s)[0])
        elif isinstance(layer, nn.Conv2d):
            x_pos = x.clamp(min=0).requires_grad_(True)
            x_neg = x.clamp(max=0).requires_grad_(True)
            with torch.enable_grad():
                y1 = F.conv2d(x_pos, layer.weight.clamp(min=0), None, layer.stride, layer.padding, groups=layer.groups)
                y2 = F.conv2d(x_neg, layer.weight.clamp(max=0), None, layer.stride, layer.padding, groups=layer.groups)
                s = _divide(relevance, y1 + y2)
                relevance = x_pos * torch.autograd.grad(y1, x_pos, s)[0] + x_neg * torch.autograd.grad(y2, x_neg, s)[0]
        elif isinstance(layer, (nn.ReLU, nn.BatchNorm2d)):
            pass
        else:
            raise TypeError(type(layer))
        relevance = relevance.detach()
    return relevance.sum(dim=1)[0], target_class
