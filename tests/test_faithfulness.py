"""Deletion / insertion curves (Petsiuk et al. 2018) against curves computed by hand on a model whose answer
is known: its class-0 logit is w * (sum of the top-left 2 x 2 pixels), its class-1 logit is 0, so the
class-0 probability is sigmoid(w * that sum) and nothing else in the image matters."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from analysis.pipeline.faithfulness import (area_under_curve, cost_note, deletion_insertion_curves, faithfulness_scores,
                                            forward_passes_per_image, gaussian_blur, pixel_ranks, step_counts)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class CornerReader(nn.Module):
    """Logits [w * sum(x[:, :, :2, :2]), 0]; counts the images it sees (to check the documented cost)."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(weight)))
        self.images_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(x)
        score = self.weight * x[:, :, :2, :2].sum(dim=(1, 2, 3))
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def corner_image(corner: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0), rest: float = 0.5) -> torch.Tensor:
    """[1, 1, 4, 4]: the 2 x 2 corner holds `corner` (row-major), every other pixel `rest`."""
    image = torch.full((1, 1, 4, 4), rest)
    image[0, 0, :2, :2] = torch.tensor(corner).view(2, 2)
    return image


def map_from_order(order: list[int], size: int = 4) -> torch.Tensor:
    """A [1, size, size] map whose pixel ranking is `order` (flat indices, most relevant first)."""
    values = torch.zeros(size * size)
    values[torch.tensor(order)] = torch.arange(size * size, 0, -1).float()
    return values.view(1, size, size)


CORNER_FIRST = map_from_order([0, 1, 4, 5] + [i for i in range(16) if i not in (0, 1, 4, 5)])
CORNER_LAST = map_from_order([i for i in range(16) if i not in (0, 1, 4, 5)] + [0, 1, 4, 5])
CLASS0 = torch.tensor([0])


def test_deleting_the_read_region_first_drops_the_probability_at_once() -> None:
    model = CornerReader().eval()
    image = corner_image()
    zeros = torch.zeros_like(image)
    curves = deletion_insertion_curves(model, image, CORNER_FIRST, CLASS0, steps=4, baseline=zeros)
    s4 = sigmoid(4.0)
    # 16 pixels, 4 steps of 4 pixels: the first step removes exactly the corner (sum 4 -> 0).
    np.testing.assert_allclose(curves.fractions, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(curves.deletion[0], [s4, 0.5, 0.5, 0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(curves.insertion[0], [0.5, s4, s4, s4, s4], rtol=1e-6)
    # Trapezoids of width 1/4 by hand.
    np.testing.assert_allclose(curves.deletion_auc[0], 0.25 * ((s4 + 0.5) / 2 + 0.5 + 0.5 + 0.5), rtol=1e-6)
    np.testing.assert_allclose(curves.insertion_auc[0], 0.25 * ((0.5 + s4) / 2 + 3 * s4), rtol=1e-6)

    # The same image with the corner ranked last: the curves swap roles (worst possible map).
    worst = deletion_insertion_curves(model, image, CORNER_LAST, CLASS0, steps=4, baseline=zeros)
    np.testing.assert_allclose(worst.deletion[0], [s4, s4, s4, s4, 0.5], rtol=1e-6)
    np.testing.assert_allclose(worst.insertion[0], [0.5, 0.5, 0.5, 0.5, s4], rtol=1e-6)
    assert curves.deletion_auc[0] < worst.deletion_auc[0] and curves.insertion_auc[0] > worst.insertion_auc[0]


def test_uneven_steps_and_pixel_by_pixel_order() -> None:
    """Corner values 1, 2, 3, 4 (flat indices 0, 1, 4, 5); 16 pixels in 3 steps: 5, 10, 16 pixels moved."""
    model = CornerReader().eval()
    image = corner_image((1.0, 2.0, 3.0, 4.0))
    order = [5, 10, 15, 3, 12, 0, 8, 9, 2, 6, 1, 4, 7, 11, 13, 14]
    curves = deletion_insertion_curves(model, image, map_from_order(order), CLASS0, steps=3,
                                       baseline=torch.zeros_like(image))
    np.testing.assert_array_equal(step_counts(16, 3), [0, 5, 10, 16])
    np.testing.assert_allclose(curves.fractions, [0, 5 / 16, 10 / 16, 1])
    # First 5 moved: {5,10,15,3,12} holds corner pixel 5 (value 4); first 10 add pixel 0 (value 1).
    deletion = [sigmoid(10), sigmoid(10 - 4), sigmoid(10 - 4 - 1), sigmoid(0)]
    insertion = [sigmoid(0), sigmoid(4), sigmoid(4 + 1), sigmoid(10)]
    np.testing.assert_allclose(curves.deletion[0], deletion, rtol=1e-6)
    np.testing.assert_allclose(curves.insertion[0], insertion, rtol=1e-6)
    widths = [5 / 16, 5 / 16, 6 / 16]
    expected_deletion_auc = sum(w * (a + b) / 2 for w, a, b in zip(widths, deletion[:-1], deletion[1:]))
    expected_insertion_auc = sum(w * (a + b) / 2 for w, a, b in zip(widths, insertion[:-1], insertion[1:]))
    np.testing.assert_allclose(curves.deletion_auc[0], expected_deletion_auc, rtol=1e-6)
    np.testing.assert_allclose(curves.insertion_auc[0], expected_insertion_auc, rtol=1e-6)


def test_equal_steps_area_is_rises_formula() -> None:
    values = np.array([[0.9, 0.4, 0.3, 0.2, 0.1]])
    rise = (values.sum() - values[0, 0] / 2 - values[0, -1] / 2) / (values.shape[1] - 1)
    np.testing.assert_allclose(area_under_curve(np.linspace(0, 1, 5), values), [rise])


def test_a_coarse_map_orders_input_pixels_after_bilinear_upsampling() -> None:
    """A 2 x 2 map [[1, 0], [0, 0]] upsampled bilinearly to 4 x 4 has row/column weights 1, .75, .25, 0:
    its four largest pixels are the corner, so it gives the corner-first curves."""
    coarse = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    ranks = pixel_ranks(coarse, 4, 4)[0].view(4, 4)
    assert set(ranks[:2, :2].flatten().tolist()) == {0, 1, 2, 3}
    assert ranks[0, 0] == 0 and ranks[1, 1] == 3
    model = CornerReader().eval()
    image = corner_image()
    curves = deletion_insertion_curves(model, image, coarse, CLASS0, steps=4, baseline=torch.zeros_like(image))
    np.testing.assert_allclose(curves.deletion[0], [sigmoid(4), 0.5, 0.5, 0.5, 0.5], rtol=1e-6)


def test_reversing_a_map_swaps_deletion_and_insertion() -> None:
    """Deleting the k least relevant pixels of a map leaves the same image as inserting its N - k most
    relevant ones: with N divisible by the steps, AUC_deletion(-m) = AUC_insertion(m), on any model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)).eval()
    images, maps = torch.rand(4, 3, 8, 8), torch.randn(4, 8, 8)
    classes = torch.tensor([0, 1, 2, 0])
    forward = deletion_insertion_curves(model, images, maps, classes, steps=8, blur_sigma=1.0)
    reverse = deletion_insertion_curves(model, images, -maps, classes, steps=8, blur_sigma=1.0)
    np.testing.assert_allclose(reverse.deletion, forward.insertion[:, ::-1], rtol=1e-5)
    np.testing.assert_allclose(reverse.deletion_auc, forward.insertion_auc, rtol=1e-5)
    np.testing.assert_allclose(reverse.insertion_auc, forward.deletion_auc, rtol=1e-5)


def test_ties_keep_row_major_order() -> None:
    ranks = pixel_ranks(torch.zeros(1, 2, 3), 2, 3)
    assert ranks.tolist() == [[0, 1, 2, 3, 4, 5]]


def test_the_default_baseline_is_a_gaussian_blur_like_scipys() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((2, 3, 9, 7)).astype(np.float32)
    for sigma in (1.0, 2.0, 4.0):  # radius 3, 6 and 12 (12 > the image: the mirroring must fold repeatedly)
        ours = gaussian_blur(torch.from_numpy(images), sigma).numpy()
        reference = np.stack([np.stack([gaussian_filter(channel.astype(np.float64), sigma, mode="mirror",
                                                        truncate=3.0) for channel in image]) for image in images])
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    # The curves' end point (all pixels moved) is the model on the blurred image.
    model = CornerReader().eval()
    image = corner_image((1.0, 2.0, 3.0, 4.0), rest=0.0)
    blurred = gaussian_filter(image[0, 0].numpy().astype(np.float64), 1.5, mode="mirror", truncate=3.0)
    curves = deletion_insertion_curves(model, image, CORNER_FIRST, CLASS0, steps=4, blur_sigma=1.5)
    np.testing.assert_allclose(curves.deletion[0, -1], sigmoid(blurred[:2, :2].sum()), rtol=1e-5)
    np.testing.assert_allclose(curves.insertion[0, 0], sigmoid(blurred[:2, :2].sum()), rtol=1e-5)


def test_batched_images_get_their_own_maps_and_batch_size_changes_nothing() -> None:
    model = CornerReader(weight=0.5).eval()
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.random((5, 2, 4, 4)).astype(np.float32))
    maps = torch.from_numpy(rng.standard_normal((5, 4, 4)).astype(np.float32))
    classes = torch.tensor([0, 1, 0, 1, 0])
    together = deletion_insertion_curves(model, images, maps, classes, steps=5, blur_sigma=1.0)
    for forward_batch in (1, 3):
        chunked = deletion_insertion_curves(model, images, maps, classes, steps=5, blur_sigma=1.0,
                                            forward_batch=forward_batch)
        np.testing.assert_allclose(chunked.deletion, together.deletion, rtol=1e-6)
        np.testing.assert_allclose(chunked.insertion, together.insertion, rtol=1e-6)
    for i in range(5):
        alone = deletion_insertion_curves(model, images[i:i + 1], maps[i:i + 1], classes[i:i + 1], steps=5,
                                          blur_sigma=1.0)
        np.testing.assert_allclose(alone.deletion[0], together.deletion[i], rtol=1e-6)
    # Class 1's probability is 1 - class 0's.
    np.testing.assert_allclose(together.deletion[1], 1 - deletion_insertion_curves(
        model, images[1:2], maps[1:2], torch.tensor([0]), steps=5, blur_sigma=1.0).deletion[0], rtol=1e-5)
    scores = faithfulness_scores(model, images, maps, classes, steps=5, blur_sigma=1.0)
    assert set(scores) == {"deletion_auc", "insertion_auc"}
    np.testing.assert_array_equal(scores["deletion_auc"], together.deletion_auc)
    assert scores["insertion_auc"].dtype == np.float32 and scores["insertion_auc"].shape == (5,)


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_the_documented_cost_is_the_number_of_images_the_model_sees(steps: int) -> None:
    model = CornerReader().eval()
    images = torch.rand(3, 1, 4, 4)
    faithfulness_scores(model, images, torch.rand(3, 4, 4), torch.zeros(3, dtype=torch.long), steps=steps)
    assert model.images_seen == 3 * forward_passes_per_image(steps) == 3 * 2 * steps
    assert str(2 * steps) in cost_note(steps)


def test_wrong_options_fail_before_any_forward_pass() -> None:
    model = CornerReader().eval()
    image, good_map = corner_image(), CORNER_FIRST
    cases = [
        (dict(steps=0), "steps must be a positive integer"),
        (dict(blur_sigma=-1.0), "blur_sigma must be a positive number"),
        (dict(maps=torch.zeros(2, 4, 4)), "maps must be [N, h, w] with N = 1"),
        (dict(classes=torch.tensor([0.0])), "integer class indices"),
        (dict(classes=torch.tensor([-1])), "classes must lie in"),
        (dict(maps=torch.full((1, 4, 4), float("nan"))), "NaN"),
        (dict(forward_batch=0), "forward_batch must be a positive integer"),
    ]
    for change, message in cases:
        arguments = dict(maps=good_map, classes=CLASS0, steps=4, blur_sigma=1.0, forward_batch=8) | change
        with pytest.raises(ValueError) as error:
            deletion_insertion_curves(model, image, **arguments)
        assert message in str(error.value) and "\n" not in str(error.value)
    assert model.images_seen == 0
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 2\)"):
        deletion_insertion_curves(model, image, good_map, torch.tensor([2]), steps=2)
    training = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(2)).train()
    with pytest.raises(ValueError, match=r"training mode .* call model.eval\(\) first"):
        deletion_insertion_curves(training, image, good_map, CLASS0, steps=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_gives_the_cpu_curves() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 3)).eval()
    images, maps = torch.rand(6, 3, 16, 16), torch.rand(6, 8, 8)
    classes = torch.tensor([0, 1, 2, 0, 1, 2])
    cpu = deletion_insertion_curves(model, images, maps, classes, steps=8)
    gpu = deletion_insertion_curves(model.cuda(), images, maps, classes, steps=8)
    np.testing.assert_allclose(gpu.deletion, cpu.deletion, atol=1e-5)
    np.testing.assert_allclose(gpu.insertion, cpu.insertion, atol=1e-5)
