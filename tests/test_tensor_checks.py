"""The cheap finiteness and time checks solvers run every step, and the argument checks every
module shares (sde_diffusion._tensor): what they accept as well as what they refuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sde_diffusion._tensor import (
    as_time,
    check_device,
    check_finite,
    check_int,
    check_shape,
    is_finite,
)


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


@pytest.mark.parametrize("value", [1, 10, 10.0, np.int64(3), np.float32(2.0)], ids=repr)
def test_check_int_accepts_integer_values_of_any_number_type(value) -> None:
    assert check_int(value, "n") == int(value)


@pytest.mark.parametrize("value", [0, -1, 2.5, float("nan"), float("inf"), True, "3", None])
def test_check_int_refuses_everything_else(value) -> None:
    with pytest.raises(ValueError, match=f"n must be a positive integer, got {value!r}"):
        check_int(value, "n")


@pytest.mark.parametrize("shape", [(2, 3), [4], torch.Size([1, 3, 8, 8]), (np.int64(2), 2)])
def test_check_shape_accepts_shapes_of_positive_integers(shape) -> None:
    assert check_shape(shape) == tuple(int(n) for n in shape)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta"])
def test_check_device_accepts_devices_this_machine_has(device) -> None:
    assert check_device(device) == torch.device(device)
