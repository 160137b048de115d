"""Per-channel FG-CAM maps (issue 15): the cost of M channel maps per image, next to one full map.

    .venv/bin/python bench/bench_channels.py                          # Lite0 (ImageNet weights) and ResNet-50
    .venv/bin/python bench/bench_channels.py --models resnet50 --channels 4 16 --batch 2

Four ways to get them, timed in turns (a, b, c, d, a, b, ...) in one run, as ratios to one full map:

* ``full``: ``FGCAM(model)(images)``, one map per image (what the job computes today);
* ``channel_maps``: ``explainer.channel_maps(images, M)``: one forward run, the M walks stacked along the batch,
  sharing the forward values and each convolution's denominator (z is computed once for the M copies);
* ``values copied``: the same stacked walk, but with every kept forward value copied M times (what stacking
  costs without sharing the values: each rule then recomputes z for every copy);
* ``one call per channel``: M calls ``explainer(images, channels=mask)``, each with its own forward run.

Also the cost of ``channel_relevance`` ([N, K], the spatial sum of each component; computed in every call):
a sum over the components, measured against the full call. Random weights for ResNet-50 (speed does not
depend on them); Lite0 is the pretrained one on scikit-image's photos.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.fgcam import FGCAM  # noqa: E402
from analysis.fgcam.propagate import RelevanceWalk  # noqa: E402
from bench.bench_engine import timed  # noqa: E402


def photos(batch: int, transform) -> torch.Tensor:
    import skimage.data
    from PIL import Image
    names = ["chelsea", "coffee", "astronaut", "rocket"]
    return torch.stack([transform(Image.fromarray(getattr(skimage.data, names[i % 4])())) for i in range(batch)])


def build(name: str, batch: int, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    if name == "lite0":
        from tests.pretrained_models import efficientnet_lite0
        model, transform = efficientnet_lite0()
        return model, photos(batch, transform)
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval(), torch.randn(batch, 3, size, size)


def copied_values_walk(explainer: FGCAM, images: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """channel_maps' walk with the forward values copied M times (no sharing): [N, M, H, W]."""
    run = explainer._components(images, "input", None)
    n, m = chosen.shape
    components = run.components
    relevance = components.new_zeros((m, n, *components.shape[1:]))
    picked = components[torch.arange(n)[:, None], chosen]
    relevance[torch.arange(m)[:, None].expand(m, n), torch.arange(n)[None].expand(m, n), chosen.t()] = \
        picked.transpose(0, 1)
    relevance = relevance.view(m * n, *components.shape[1:]).contiguous(memory_format=torch.channels_last)

    def copy(value):
        if isinstance(value, torch.Tensor) and value.device.type != "meta" and value.dim() and value.shape[0] == n:
            return value.repeat(m, *([1] * (value.dim() - 1)))
        return value

    values = {node: copy(value) for node, value in run.values.items()}
    with torch.no_grad():
        walked = RelevanceWalk(explainer.graph, values).run(explainer._cam_node, relevance, run.target)
    return walked.sum(dim=1).view(m, n, *walked.shape[2:]).transpose(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lite0", "resnet50"])
    parser.add_argument("--channels", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cpu")
    print(f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}, batch {args.batch}, "
          f"median of {args.repeats}; times as multiples of one full map")
    print("| model | M channels | full map (s) | channel_maps | values copied | one call per channel "
          "| channel_maps vs one call per channel |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        model, images = build(name, args.batch, args.size)
        explainer = FGCAM(model)
        for m in args.channels:
            chosen = explainer.channel_maps(images, m).channels
            k = explainer(images[:1], target_layer=explainer.cam_layer).channel_relevance.shape[1]
            masks = [torch.nn.functional.one_hot(chosen[:, j], k).bool() for j in range(m)]
            # the three give the same maps (to float rounding): check before timing
            stacked = explainer.channel_maps(images, chosen).maps
            copied = copied_values_walk(explainer, images, chosen)
            single = torch.stack([explainer(images, channels=mask).maps for mask in masks], 1)
            scale = float(single.abs().max())
            assert float((stacked - single).abs().max()) <= 1e-4 * scale
            assert float((copied - single).abs().max()) <= 1e-4 * scale
            fns = {"full": lambda: explainer(images),
                   "channel_maps": lambda: explainer.channel_maps(images, chosen),
                   "copied": lambda: copied_values_walk(explainer, images, chosen),
                   "per_channel": lambda: [explainer(images, channels=mask) for mask in masks]}
            t = timed(fns, args.repeats, device)
            print(f"| {name} | {m} | {t['full']:.2f} | {t['channel_maps'] / t['full']:.2f} | "
                  f"{t['copied'] / t['full']:.2f} | {t['per_channel'] / t['full']:.2f} | "
                  f"{t['per_channel'] / t['channel_maps']:.2f}x faster |", flush=True)


if __name__ == "__main__":
    main()
