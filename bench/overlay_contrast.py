"""Which overlay makes a fine-grained map visible on a photo (issue 24, item 5): each style's contrast between
the map's high and low regions in the rendered tile.

    .venv/bin/python bench/overlay_contrast.py --cache PHOTO_CACHE      # tests/helpers.py: make_photo_cache

Each photo of the cache is explained again at the model's input resolution (the Image page's maps,
analysis/explore/full_maps.py) and drawn as the Image page draws it (480 px, opacity 0.6, RdBu) in every style
of ``STYLES``. In the region the model saw, H is the map's top 10% (the strongest evidence for the class) and L
its weakest half (|value| below the median), both from the map itself, whatever the style draws:

* ``contrast``: CIELAB distance between the mean colours of H and L in the rendered tile (what an eye compares);
* ``mark``: how much more the drawing changes H than L, mean CIELAB distance to the base it is drawn on (the
  photo, or the grey photo): a red map on a red cup changes little, so its mark is small.

The photo alone (no map) is the first row: the contrast its own content gives H and L.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.cache import load  # noqa: E402
from analysis.present import overlay  # noqa: E402
from analysis.explore.concepts import concept_explainer  # noqa: E402
from analysis.explore.full_maps import full_resolution_maps  # noqa: E402
from analysis.pipeline.geometry import place_map, scale_box  # noqa: E402

STYLES = {
    "photo, max (before)": overlay.OverlayStyle(),
    "grey, max": overlay.OverlayStyle(grey=True),
    "photo, p99": overlay.OverlayStyle(percentile=99),
    "photo, p99, smooth 1%": overlay.OverlayStyle(percentile=99, smooth=0.01),
    "grey, p99": overlay.OverlayStyle(grey=True, percentile=99),
    "grey, p95": overlay.OverlayStyle(grey=True, percentile=95),
    "grey, p90": overlay.OverlayStyle(grey=True, percentile=90),
    "grey, p80": overlay.OverlayStyle(grey=True, percentile=80),
    "grey, p99, smooth 1%": overlay.OverlayStyle(grey=True, percentile=99, smooth=0.01),
    "grey, p99, smooth 2%": overlay.OverlayStyle(grey=True, percentile=99, smooth=0.02),
}
SIZE, OPACITY = 480, 0.6


def lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(rgb, np.float64) / 255.0)


def measure(tile: np.ndarray, base: np.ndarray, high: np.ndarray, low: np.ndarray) -> tuple[float, float]:
    t, b = lab(tile), lab(base)
    contrast = float(np.linalg.norm(t[high].mean(axis=0) - t[low].mean(axis=0)))
    change = np.linalg.norm(t - b, axis=-1)
    return contrast, float(change[high].mean() - change[low].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True)
    args = parser.parse_args()
    cache = load(args.cache)
    loaded, explainer = concept_explainer(cache)
    rows: dict[str, list[tuple[float, float]]] = {"photo alone (no map)": [], **{name: [] for name in STYLES}}
    names = []
    for image_id, pred in zip(cache.table["id"], cache.table["pred"]):
        signed = full_resolution_maps(cache, loaded, explainer, int(image_id), [int(pred)])[0]
        image, original = overlay.load_display(cache.image_path(int(image_id)), SIZE)
        box = cache.geometry(int(image_id))["crop_box"]
        shown_box = scale_box(box, image.shape[1] / original[0], image.shape[0] / original[1])
        values = place_map(signed, shown_box, image.shape[1], image.shape[0])
        inside = np.isfinite(values)
        high = inside & (np.nan_to_num(values) >= np.quantile(values[inside], 0.9))
        low = inside & (np.abs(np.nan_to_num(values)) <= np.quantile(np.abs(values[inside]), 0.5))
        names.append(Path(cache.table.set_index("id").at[image_id, "path"]).stem)
        rows["photo alone (no map)"].append(measure(image, image, high, low))
        for name, style in STYLES.items():
            tile = overlay.view_tile(image, original, box, signed, opacity=OPACITY, style=style)
            base = overlay.grey(image) if style.grey else image
            rows[name].append(measure(tile, base, high, low))
    header = "".join(f"{n:>18s}" for n in names)
    print(f"{'style':24s}{header}{'mean':>18s}    (contrast / mark, CIELAB units)")
    for name, values in rows.items():
        cells = "".join(f"{c:9.1f} /{m:6.1f} " for c, m in values)
        mc, mm = np.mean([c for c, _ in values]), np.mean([m for _, m in values])
        print(f"{name:24s}{cells}{mc:9.1f} /{mm:6.1f}")


if __name__ == "__main__":
    main()
