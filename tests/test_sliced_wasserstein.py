"""sliced_wasserstein against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from sde_diffusion.metrics import SlicedW2, sliced_wasserstein


def test_shifted_copy_gives_the_projected_shift():
    # projections of x and x + m differ by theta.m exactly, so SW2^2 = E[(theta.m)^2] = |m|^2 / D
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g, dtype=torch.float64)
    m = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    sw = sliced_wasserstein(x, x + m, 20000, torch.Generator().manual_seed(1))
    assert sw.item() == pytest.approx(m.norm().item() / math.sqrt(4), rel=0.02)


def test_one_dimension_is_plain_w2_and_symmetric():
    x = torch.tensor([[0.0], [1.0], [3.0]])
    y = torch.tensor([[2.0], [0.5], [1.0]])
    # sorted: (0, 1, 3) vs (0.5, 1, 2): W2^2 = (0.25 + 0 + 1) / 3
    expected = math.sqrt(1.25 / 3)
    assert sliced_wasserstein(x, y, 3, None).item() == pytest.approx(expected, rel=1e-6)
    assert sliced_wasserstein(y, x, 3, None).item() == pytest.approx(expected, rel=1e-6)


def test_unequal_sizes_compare_quantile_functions():
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(x, x.repeat(2, 1), 50, None).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="features"):
        sliced_wasserstein(x, torch.zeros(4, 2), 5, None)


def test_quantile_levels_of_a_repeated_reference_are_the_reference_itself():
    """Each point of z repeated k times has its midpoint quantiles at z's sorted points, so
    scoring against its n levels equals the plain sliced W2 to z (same directions)."""
    g = torch.Generator().manual_seed(0)
    x, z = (torch.randn(300, 3, generator=g, dtype=torch.float64) for _ in range(2))
    judge = SlicedW2(z.repeat(7, 1), 256, torch.Generator().manual_seed(5), levels=300)
    plain = sliced_wasserstein(x, z, 256, torch.Generator().manual_seed(5))
    assert judge(x).item() == pytest.approx(plain.item(), rel=1e-12)
    with pytest.raises(ValueError, match="x has 299 samples; this reference scores 300"):
        judge(x[:-1])


def test_quantile_levels_of_a_large_reference_approach_the_population_distance():
    """N(0, I) points against the quantiles of a 50x larger N(m, I) sample: |m|/sqrt(D) within
    the sampling error of the 2000 points."""
    g = torch.Generator().manual_seed(1)
    m = torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    x = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    y = torch.randn(100_000, 4, generator=g, dtype=torch.float64) + m
    sw = SlicedW2(y, 512, torch.Generator().manual_seed(2), levels=2000)(x).item()
    assert sw == pytest.approx(m.norm().item() / 2, rel=0.03)
