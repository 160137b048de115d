"""FG-CAM engine speed: images/s and cost in plain forward passes, next to a plain forward pass and
pytorch-grad-cam's (coarse) GradCAM on the same batch.

    .venv/bin/python bench/bench_engine.py                      # VGG16-bn and ResNet-50, 224 px, batch 1 and 16
    .venv/bin/python bench/bench_engine.py --device cuda        # on a GPU
    .venv/bin/python bench/bench_engine.py --models resnet50 --batches 1 --repeats 3

Prints a markdown table (the README's). Random weights: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.fgcam import FGCAM  # noqa: E402


def timed(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time of each function over ``repeats`` runs, after one warm-up run each.

    The functions take turns (a, b, c, a, b, c, ...), so that a machine whose speed drifts while the
    benchmark runs (shared cores, turbo) affects all of them alike and the ratios stay fair.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def cam_target_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.features[-1] if name.startswith("vgg") else model.layer4[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg16_bn", "resnet50"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-grad-cam", action="store_true", help="skip the pytorch-grad-cam comparison")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    print(f"device: {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else
                                 f" ({torch.get_num_threads()} threads)") + f", torch {torch.__version__}")
    print("| model | batch | forward img/s | FG-CAM img/s | FG-CAM cost (forward passes) "
          "| pytorch-grad-cam GradCAM img/s | FG-CAM / GradCAM speed |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        model = getattr(torchvision.models, name)().eval().to(device)
        explainer = FGCAM(model, base="gradcam")
        for batch in args.batches:
            images = torch.randn(batch, 3, args.size, args.size, device=device)

            def forward():
                with torch.no_grad():
                    model(images)

            def grad_cam():
                from pytorch_grad_cam import GradCAM
                # made for each call (it only registers two hooks), so that its hooks, which copy the
                # activations, are not on the model while the plain forward pass is timed
                with GradCAM(model=model, target_layers=[cam_target_layer(model, name)]) as cam:
                    cam(images, targets=None)

            fns = {"forward": forward, "fgcam": lambda: explainer(images, target_layer="input")}
            if not args.no_grad_cam:
                fns["grad_cam"] = grad_cam
            t = timed(fns, args.repeats, device)
            model.zero_grad(set_to_none=True)
            row = [name, str(batch), f"{batch / t['forward']:.2f}", f"{batch / t['fgcam']:.2f}",
                   f"{t['fgcam'] / t['forward']:.2f}"]
            row += ["-", "-"] if args.no_grad_cam else [f"{batch / t['grad_cam']:.2f}", f"{t['grad_cam'] / t['fgcam']:.2f}x"]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
