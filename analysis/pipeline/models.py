"""Model specs for the offline job: loading, checkpoints, preprocessing, weight hashing.

Specs:
  torchvision:NAME              a torchvision model (optionally --weights ENUM, --checkpoint FILE, --num-classes)
  package.module:callable       an importable callable
  path/to/file.py:callable      a callable in a Python file
The callables take no argument and return an nn.Module or (nn.Module, transform).

Preprocessing, first that applies: the torchvision weights' transforms; the callable's transform;
Resize((--image-size, --image-size)) + ToTensor + Normalize(--mean, --std).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pickle
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from analysis.pipeline.geometry import TransformGeometry, geometry_of

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224


class ModelSpecError(ValueError):
    """A model spec, weights name or checkpoint that cannot be used (one-line message)."""


@dataclass
class LoadedModel:
    model: nn.Module                       # in eval mode, on CPU
    transform: Callable[[Any], Tensor]     # PIL image (already in the model's mode) -> [C, H, W]
    preprocessing: str                     # "weights", "callable" or "options": where `transform` came from
    in_channels: int                       # 1 or 3
    geometry: TransformGeometry            # where the transform's output lies in the original image
    weights_sha256: str
    output_names: list[str] | None         # class names of the outputs when the weights know them


def model_from_manifest(manifest: dict[str, Any]) -> LoadedModel:
    """The model a cache was made with (eval mode, CPU), built from the manifest's spec, checkpoint and
    preprocessing options.

    Raises `ModelSpecError` with one line saying why it cannot be loaded here (not
    importable, file or weights missing, or weights that differ from those the cache was made with).
    """
    model_info = manifest.get("model") or {}
    options = manifest.get("options") or {}
    spec = model_info.get("spec")
    if not spec:
        raise ModelSpecError("the cache's manifest names no model")
    checkpoint = model_info.get("checkpoint")
    num_classes = model_info.get("num_classes") if str(spec).startswith("torchvision:") else None
    try:
        loaded = load_model(spec, weights=options.get("weights"), checkpoint=Path(checkpoint) if checkpoint else None,
                            num_classes=num_classes, image_size=options.get("image_size"),
                            mean=options.get("mean"), std=options.get("std"))
    except ModelSpecError as error:
        raise ModelSpecError(f"cannot load the cache's model here: {error}") from None
    expected = model_info.get("weights_sha256")
    if expected and loaded.weights_sha256 != expected:
        raise ModelSpecError(f"the model {spec} now has other weights than the cache was made with "
                             "(checkpoint or weights file changed); re-run the explain job or restore them")
    return loaded


# ----------------------------------------------------------------------------------------------------------
# Building the module
# ----------------------------------------------------------------------------------------------------------

def _split_spec(spec: str) -> tuple[str, str]:
    if ":" not in spec:
        raise ModelSpecError(f"--model {spec!r}: expected torchvision:NAME, package.module:callable "
                             "or path/to/file.py:callable")
    target, name = spec.rsplit(":", 1)
    if not target or not name:
        raise ModelSpecError(f"--model {spec!r}: expected torchvision:NAME, package.module:callable "
                             "or path/to/file.py:callable")
    return target, name


def _torchvision_weights(model_name: str, weights: str) -> Any:
    import torchvision.models as tvm

    try:
        if "." in weights:
            return tvm.get_weight(weights)
        return tvm.get_model_weights(model_name)[weights] if weights != "DEFAULT" else \
            tvm.get_model_weights(model_name).DEFAULT
    except (KeyError, ValueError, AttributeError):
        try:
            choices = ", ".join(w.name for w in tvm.get_model_weights(model_name))
        except Exception:
            choices = "see torchvision.models.get_model_weights"
        raise ModelSpecError(f"--weights {weights!r}: not a weights name of torchvision {model_name} "
                             f"(choose DEFAULT or one of {choices})") from None


def _build_torchvision(name: str, weights: str | None, checkpoint: Path | None,
                       num_classes: int | None) -> tuple[nn.Module, Any]:
    import torchvision.models as tvm

    if name not in tvm.list_models():
        close = [m for m in tvm.list_models() if name.lower() in m or m in name.lower()][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelSpecError(f"--model torchvision:{name}: torchvision has no model {name!r}{hint}")
    weights_enum = _torchvision_weights(name, weights) if weights else None
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if checkpoint is not None or weights_enum is None:
        # With a checkpoint the weights enum only names the preprocessing and classes: nothing is downloaded.
        try:
            model = tvm.get_model(name, weights=None, **kwargs)
        except (TypeError, ValueError) as error:
            raise ModelSpecError(f"--model torchvision:{name}: {error}") from None
        return model, weights_enum
    if num_classes is not None and num_classes != len(weights_enum.meta.get("categories", [])):
        raise ModelSpecError(f"--num-classes {num_classes} contradicts --weights {weights} "
                             f"({len(weights_enum.meta['categories'])} classes); use --checkpoint for a fine-tuned head")
    try:
        model = tvm.get_model(name, weights=weights_enum)
    except Exception as error:  # no network, corrupt download, ...: one line, with what to do instead
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelSpecError(f"--weights {weights}: could not get the weights ({first}); download them where "
                             "you have network access, or pass --checkpoint FILE.pth") from None
    return model, weights_enum


def _import_callable(target: str, name: str, spec: str) -> Callable[[], Any]:
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelSpecError(f"--model {spec!r}: no such file {path}")
        module_name = f"_explain_model_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ModelSpecError(f"--model {spec!r}: cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # so DataLoader workers and pickling can find its classes
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            raise ModelSpecError(f"--model {spec!r}: importing {path} failed: {type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise ModelSpecError(f"--model {spec!r}: cannot import {target} ({error})") from None
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise ModelSpecError(f"--model {spec!r}: {target} has no callable {name!r}")
    return factory


def _load_checkpoint(model: nn.Module, checkpoint: Path) -> None:
    if not checkpoint.is_file():
        raise ModelSpecError(f"--checkpoint {checkpoint}: no such file")
    try:
        with warnings.catch_warnings():  # the safe unpickler warns about pickle protocols, in several lines
            warnings.simplefilter("ignore")
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own message advises weights_only=False, which runs whatever code the file holds: never that.
        if "Unsupported global" in str(error):
            raise ModelSpecError(f"--checkpoint {checkpoint}: holds pickled Python objects besides tensors (a whole "
                                 "model?), not a state dict; save torch.save(model.state_dict(), PATH) where the "
                                 "model is trusted, or build the model in a file.py:callable") from None
        raise ModelSpecError(f"--checkpoint {checkpoint}: not a state dict torch can read (not a torch.save file, "
                             "or damaged)") from None
    except EOFError:
        raise ModelSpecError(f"--checkpoint {checkpoint}: empty or truncated, not a state dict") from None
    except Exception:  # RuntimeError of a zip that is no torch file, KeyError of text, ...: no useful detail
        raise ModelSpecError(f"--checkpoint {checkpoint}: not a state dict torch can read (not a torch.save file, "
                             "or damaged)") from None
    # Common wrappers: {"state_dict": ...} / {"model": ...}, and DDP's "module." prefixes.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelSpecError(f"--checkpoint {checkpoint}: holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        if len(detail) > 300:
            detail = detail[:300] + "..."
        raise ModelSpecError(f"--checkpoint {checkpoint} does not fit the model ({detail}); check --num-classes") \
            from None


# ----------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------

def default_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable[[Any], Tensor]:
    from torchvision import transforms as T

    return T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), T.Normalize(list(mean), list(std))])


def _channels_of(model: nn.Module, transform: Any) -> int:
    """1 or 3: the transform's Grayscale output, else the first convolution's input channels, else 3."""
    from torchvision import transforms as T
    from torchvision.transforms import v2

    def grayscale(step: Any) -> int | None:
        if isinstance(step, (T.Compose, v2.Compose)):
            for s in step.transforms:
                found = grayscale(s)
                if found is not None:
                    return found
        if isinstance(step, (T.Grayscale, v2.Grayscale)):
            return int(step.num_output_channels)
        return None

    found = grayscale(transform)
    if found is not None:
        return found
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return 1 if module.in_channels == 1 else 3
    return 3


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the state dict: every tensor's name, dtype, shape and bytes, in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())   # the buffer itself: no copy of the bytes
    return digest.hexdigest()


PROBE_SIZE = (96, 64)   # width, height of the probe image: not square, so a crop or an aspect change shows


def _probe_image() -> Any:
    """A fixed RGB image with gradients and a fine pattern: any change of resize, crop or values shows in its
    preprocessed pixels."""
    import numpy as np
    from PIL import Image

    width, height = PROBE_SIZE
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + 2 * y) * 37 % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def describe_transform(transform: Any) -> str:
    """The transform's repr on one line, without memory addresses (a lambda's or a plain object's repr names
    one, which differs between runs)."""
    import re

    return " ".join(re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform)).split())


def preprocessing_fingerprint(transform: Callable[[Any], Tensor], channels: int) -> dict[str, str]:
    """What the preprocessing is, for the manifest: its description and the sha256 of its output on a fixed
    probe image (rounded to 1e-4, so that arithmetic noise does not count; shape included). Two
    preprocessings with the same fingerprint turn an image into the same model input, whatever their code
    looks like; editing the transform of a file.py:callable between a run and its resume changes it."""
    import numpy as np

    from analysis.pipeline.datasets import to_model_mode

    try:
        output = transform(to_model_mode(_probe_image(), channels))
        values = np.round(np.asarray(torch.as_tensor(output).detach().cpu(), dtype=np.float64), 4) + 0.0  # no -0.0
        digest = hashlib.sha256(f"{values.shape}".encode() + values.tobytes()).hexdigest()
    except Exception as error:  # the dry run reports a failing transform; here it only has to be told apart
        digest = f"fails on the probe image: {type(error).__name__}"
    return {"description": describe_transform(transform), "probe_sha256": digest}


def load_model(spec: str, weights: str | None = None, checkpoint: Path | None = None,
               num_classes: int | None = None, image_size: int | None = None,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> LoadedModel:
    """Build the model of `spec` in eval mode on the CPU, with its preprocessing; ModelSpecError if impossible."""
    target, name = _split_spec(spec)
    weights_enum = None
    transform = None
    if target == "torchvision":
        model, weights_enum = _build_torchvision(name, weights, checkpoint, num_classes)
    else:
        if weights:
            raise ModelSpecError("--weights applies to torchvision:NAME models only; use --checkpoint for others")
        factory = _import_callable(target, name, spec)
        try:
            built = factory()
        except Exception as error:
            raise ModelSpecError(f"--model {spec!r}: calling {name}() failed: {type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''}") from None
        if isinstance(built, tuple) and len(built) == 2:
            model, transform = built
        else:
            model = built
        if not isinstance(model, nn.Module):
            raise ModelSpecError(f"--model {spec!r}: {name}() returned {type(model).__name__}, "
                                 "expected an nn.Module or (nn.Module, transform)")
        if transform is not None and not callable(transform):
            raise ModelSpecError(f"--model {spec!r}: the transform returned by {name}() is not callable")
    if checkpoint is not None:
        _load_checkpoint(model, Path(checkpoint))
    model.eval()

    if weights_enum is not None and image_size is None and mean is None and std is None:
        transform, source = weights_enum.transforms(), "weights"
    elif transform is not None and image_size is None and mean is None and std is None:
        source = "callable"
    else:
        source = "options"
    output_names = list(weights_enum.meta["categories"]) if weights_enum is not None and \
        "categories" in weights_enum.meta and checkpoint is None else None
    channels = _channels_of(model, transform) if transform is not None else _channels_of(model, None)
    if source == "options":
        default_mean = IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,)
        default_std = IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,)
        mean = tuple(mean) if mean else default_mean
        std = tuple(std) if std else default_std
        for option, values in (("--mean", mean), ("--std", std)):
            if len(values) not in (1, channels):
                raise ModelSpecError(f"{option} needs 1 or {channels} values for this {channels}-channel model, "
                                     f"got {len(values)}")
        if any(s <= 0 for s in std):
            raise ModelSpecError("--std values must be positive")
        transform = default_transform(image_size or DEFAULT_IMAGE_SIZE, mean, std)
    return LoadedModel(model=model, transform=transform, preprocessing=source, in_channels=channels,
                       geometry=geometry_of(transform, channels), weights_sha256=weights_sha256(model),
                       output_names=output_names)
