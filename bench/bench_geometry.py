"""Benchmark of the crop-box bookkeeping (analysis/pipeline/geometry.py): what finding an image's crop box, placing its
mask in the model's frame and laying its map back on the original cost, next to preprocessing the image itself.

    .venv/bin/python bench/bench_geometry.py                  # scikit-image's coffee (600 x 400), 20 repeats

Derived boxes (torchvision Resize / CenterCrop) are arithmetic. A measured box (a transform the job cannot read)
sends five probe images through the transform, once per distinct image size (memoised); a dataset whose images
all differ in size pays that on every image. Times are medians of --repeats rounds, each step timed once a
round (in turns), on one thread.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.cache.placement import place_map  # noqa: E402
from analysis.pipeline.geometry import MeasuredGeometry, foreground_in_frame, geometry_of  # noqa: E402


def interleaved_median_ms(steps: list, repeats: int) -> list[float]:
    """Median ms of each function, timed in turns (one call of each per round), so that the machine's drift
    affects them alike."""
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for k, function in enumerate(steps):
            start = time.perf_counter()
            function()
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) * 1000 for t in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--map-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import skimage.data
    from PIL import Image
    from torchvision import transforms as T

    image = Image.fromarray(skimage.data.coffee())
    width, height = image.size
    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    derived = geometry_of(transform)
    box, _ = derived.locate(width, height)
    mask = np.zeros((height, width), bool)
    mask[15:305, 170:415] = True
    frame_map = np.random.default_rng(0).standard_normal((args.map_size, args.map_size)).astype(np.float32)

    def measured_first() -> None:
        MeasuredGeometry(transform, 3).locate(width, height)  # a fresh memo: the probes run

    memo = MeasuredGeometry(transform, 3)
    memo.locate(width, height)
    steps = [
        ("preprocessing the image (the transform)", lambda: transform(image)),
        ("derived crop box", lambda: derived.locate(width, height)),
        ("measured crop box, new image size (5 probes)", measured_first),
        ("measured crop box, size seen before (memo)", lambda: memo.locate(width, height)),
        (f"mask -> model frame at map size {args.map_size}", lambda: foreground_in_frame(mask, box, args.map_size)),
        ("map -> original image (map_in_image)", lambda: place_map(frame_map, box, width, height)),
    ]
    rows = list(zip([name for name, _ in steps], interleaved_median_ms([f for _, f in steps], args.repeats)))
    base = rows[0][1]
    print(f"{width} x {height} image, Resize(256) + CenterCrop(224), median of {args.repeats}")
    print("| step | ms | vs preprocessing |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} | {ms / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
