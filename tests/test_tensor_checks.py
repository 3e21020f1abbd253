"""The cheap finiteness and time checks solvers run every step (sde_diffusion._tensor)."""

from __future__ import annotations

import pytest
import torch

from sde_diffusion._tensor import as_time, check_finite, is_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_is_finite_agrees_with_the_entrywise_check(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    cases = [
        torch.zeros(0, dtype=dtype),
        torch.randn(50, 3).to(dtype),
        torch.full((1000,), big, dtype=dtype),  # the float64 sum overflows only for float64
        torch.tensor([big, -big, 1.0], dtype=dtype),
        torch.tensor([1.0, float("nan")], dtype=dtype),
        torch.tensor([float("inf"), 1.0], dtype=dtype),
        torch.tensor([float("inf"), -float("inf")], dtype=dtype),
    ]
    for x in cases:
        assert is_finite(x) == bool(torch.isfinite(x).all())


def test_check_finite_names_what_it_checked() -> None:
    check_finite(torch.ones(3), "x")
    with pytest.raises(ValueError, match="the thing contains NaN or inf"):
        check_finite(torch.tensor([0.0, float("nan")]), "the thing")


@pytest.mark.parametrize("t", [0.5, torch.tensor(0.5), torch.tensor([0.1, 1.0])])
def test_as_time_accepts_times_in_range(t) -> None:
    assert torch.equal(as_time(t, 1.0), torch.as_tensor(t, dtype=torch.get_default_dtype()))


@pytest.mark.parametrize(
    "t, message",
    [
        (torch.tensor(float("nan")), "t must be finite"),
        (torch.tensor([0.5, float("nan")]), "t must be finite"),
        (torch.tensor([0.5, float("inf")]), "t must be finite"),
        (torch.tensor(1.5), r"t must lie in \[0.0, 1.0\], got values in \[1.5, 1.5\]"),
        (torch.tensor([-0.5, 0.5]), r"t must lie in \[0.0, 1.0\], got values in \[-0.5, 0.5\]"),
    ],
)
def test_as_time_refuses_bad_times(t, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        as_time(t, 1.0)
