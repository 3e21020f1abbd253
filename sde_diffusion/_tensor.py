"""Small tensor helpers shared by every module: broadcasting per-sample scalars and checking times.

Kept private: users never need them, but every module that touches (batch, *dims) tensors does,
and one definition keeps shapes and error messages consistent across the package.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """View a per-sample tensor of shape (batch,) or () as (batch, 1, ..., 1) with `ndim` dims."""
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def as_time(
    t: Tensor | float,
    T: float,
    x: Tensor | None = None,
    lower: float = 0.0,
    name: str = "t",
) -> Tensor:
    """Return `t` as a floating tensor on x's device/dtype, after checking it.

    `t` must be a scalar or of shape (batch,) matching x.shape[0], finite and inside [lower, T].
    Value checks need the values on the host, so they run only for CPU tensors: on an
    accelerator they would force a device synchronisation in every solver step.
    """
    if isinstance(t, Tensor):
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype() if x is None else x.dtype)
        if x is not None:
            t = t.to(device=x.device, dtype=x.dtype)
    else:
        t = torch.as_tensor(
            float(t),
            dtype=torch.get_default_dtype() if x is None else x.dtype,
            device=None if x is None else x.device,
        )
    if t.ndim > 1:
        raise ValueError(
            f"{name} must be a scalar or a 1-D tensor of shape (batch,), got shape {tuple(t.shape)}"
        )
    if x is not None and t.ndim == 1 and (x.ndim == 0 or t.shape[0] != x.shape[0]):
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but x has shape {tuple(x.shape)}: "
            f"{name} must be a scalar or have shape ({x.shape[0] if x.ndim else 1},)"
        )
    if t.device.type == "cpu" and t.numel() > 0:
        # min and max propagate NaN, so two host numbers check finiteness and range at once
        # (one for a scalar t: solvers call this every step, where tensor ops cost the most)
        lo, hi = (t.item(),) * 2 if t.ndim == 0 else (t.min().item(), t.max().item())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} must be finite, got {t.tolist()}")
        tol = 1e-6 * max(T, 1.0)
        if lo < lower - tol or hi > T + tol:
            raise ValueError(f"{name} must lie in [{lower}, {T}], got values in [{lo}, {hi}]")
    return t


def check_finite(x: Tensor, what: str) -> None:
    """Raise ValueError when a CPU tensor holds NaN or inf (skipped on accelerators, see as_time)."""
    if x.device.type == "cpu" and not is_finite(x):
        raise ValueError(f"{what} contains NaN or inf")


def is_finite(x: Tensor) -> bool:
    """Whether every entry of x is finite, in one pass: a float64 sum is finite only if every
    entry is (NaN and inf propagate); only a non-finite sum, possibly a float64 overflow of
    finite entries, needs the entry-wise check."""
    return math.isfinite(x.sum(dtype=torch.float64).item()) or bool(torch.isfinite(x).all())
