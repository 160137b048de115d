"""The background swap test (analysis/trust/background_swap.py, after Xiao et al. ICLR 2021): the typical
background and the swap by hand, the test on real torch modules whose dependence on the background is known
by construction, and the verdict it gives a spread cluster (analysis/explore/cluster_offline/verdicts.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from analysis.explore import cluster_offline as offline
from analysis.trust.background_swap import background_swap_test, swap_backgrounds, typical_background


def centre_mask(n: int, size: int = 6) -> torch.Tensor:
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    mask[:, 2:4, 2:4] = True
    return mask


def test_typical_background_is_the_per_pixel_median_of_the_backgrounds():
    images = torch.zeros(3, 1, 2, 2)
    images[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 9.0])     # always background: median 2
    images[:, 0, 0, 1] = torch.tensor([5.0, 7.0, 4.0])     # background only in images 1 and 2: median of 7, 4
    images[:, 0, 1, 1] = torch.tensor([8.0, 8.0, 8.0])     # never background: the median of all background pixels
    foreground = torch.zeros(3, 2, 2, dtype=torch.bool)
    foreground[0, 0, 1] = True
    foreground[:, 1, 1] = True
    typical = typical_background(images, foreground)
    assert typical[0, 0, 0] == 2.0
    assert typical[0, 0, 1] == pytest.approx(float(torch.tensor([7.0, 4.0]).median()))   # torch: the lower one
    background_values = torch.tensor([1.0, 2.0, 9.0, 7.0, 4.0, 0.0, 0.0, 0.0])         # (1, 0) is 0 everywhere
    assert typical[0, 1, 1] == float(background_values.median())


def test_swap_keeps_the_object_and_takes_the_rest():
    images = torch.full((2, 1, 6, 6), 3.0)
    backgrounds = torch.stack([torch.full((1, 6, 6), 1.0), torch.full((1, 6, 6), 2.0)])
    swapped = swap_backgrounds(images, centre_mask(2), backgrounds)
    assert (swapped[:, :, 2:4, 2:4] == 3.0).all()
    assert (swapped[0][~centre_mask(1)[0][None]] == 1.0).all() and (swapped[1][~centre_mask(1)[0][None]] == 2.0).all()
    with pytest.raises(ValueError):
        swap_backgrounds(images, centre_mask(3), backgrounds)


class Corner(nn.Module):
    """Class 0 when the top-left pixel (background) is bright, else class 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[:, 0, 0, 0]
        return torch.stack([corner, torch.full_like(corner, 0.5)], dim=1)


class Centre(nn.Module):
    """Class 0 when the object (the centre) is bright, else class 1: the background never matters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, 0, 2:4, 2:4].mean(dim=(1, 2))
        return torch.stack([centre, torch.full_like(centre, 0.5)], dim=1)


def members_with_a_bright_background(n: int = 10) -> torch.Tensor:
    images = torch.ones(n, 1, 6, 6)                      # a bright background and a bright object
    return images


def test_a_model_that_reads_the_background_changes_with_the_typical_one_only():
    members = members_with_a_bright_background()
    typical = torch.zeros(1, 6, 6)                       # the dataset's backgrounds are dark
    same = members.roll(1, dims=0)
    result = background_swap_test(Corner().eval(), members, centre_mask(10), typical, same, centre_mask(10))
    assert result.changed_typical.all() and not result.changed_same.any()
    assert offline.mcnemar_greater(result.changed_typical, result.changed_same) == pytest.approx(0.5 ** 10)
    # removal: |1 - 0| on every background pixel over the images' contrast (mean |x - mean x|, 0 here: NaN)
    assert np.isnan(result.removal)


def test_a_model_that_reads_the_object_keeps_its_predictions():
    members = members_with_a_bright_background()
    members[:, :, 0, :] = 0.5                              # some contrast
    typical = torch.zeros(1, 6, 6)
    result = background_swap_test(Centre().eval(), members, centre_mask(10), typical, members.roll(1, 0),
                                  centre_mask(10))
    assert not result.changed_typical.any() and not result.changed_same.any()
    contrast = float((members - members.mean(dim=(1, 2, 3), keepdim=True)).abs().mean())
    expected = float(members[:, :, ~centre_mask(1)[0]].abs().mean()) / contrast
    assert result.removal == pytest.approx(expected)


NAN = float("nan")


@pytest.mark.parametrize("changed, control, p, removal, expected", [
    (0.99, 0.01, 1e-9, 1.0, "shortcut"),            # the typical background changes them, the members' do not
    (0.45, 0.40, 0.3, 1.0, "undecided"),            # any background changes them: the swap itself, not theirs
    (0.02, 0.00, 0.5, 0.002, "undecided"),          # the backgrounds are alike: nothing could change
    (NAN, NAN, NAN, NAN, "undecided"),              # no masks: the swap did not run
])
def test_a_spread_cluster_is_judged_by_the_background_swap(changed, control, p, removal, expected):
    evidence = offline.Evidence(0.0, 0.0, 1.0, 0.6, 0.12, 0.5, 5.0, changed_background=changed,
                                changed_background_control=control, p_background=p, background_removal=removal)
    found, reason = offline.verdict(evidence, alpha=0.01)
    assert found == expected
    if np.isfinite(changed):
        assert f"{changed:.0%}" in reason and f"{control:.0%}" in reason    # its numbers
    if expected == "undecided":
        assert "decide" in reason
    if removal < 0.15:
        assert "alike" in reason
