"""Small helpers shared by every module: broadcasting per-sample scalars and checking arguments.

Kept private: users never need them, but every module that touches (batch, *dims) tensors or
takes a count, a shape, a device or a choice does, and one definition of each check keeps the
error messages consistent across the package: a ValueError (a TypeError for a wrong type) that
names the argument, the value it got and what is valid.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable, Sequence

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
        tol = time_tolerance(T)
        if lo < lower - tol or hi > T + tol:
            raise ValueError(f"{name} must lie in [{lower}, {T}], got values in [{lo}, {hi}]")
    return t


def time_tolerance(T: float) -> float:
    """How far past T (or below 0) a time may round and still count as inside [0, T]: float32
    grids and float32 copies of T land a few ulps off."""
    return 1e-6 * max(T, 1.0)


def check_finite(x: Tensor, what: str) -> None:
    """Raise ValueError when a CPU tensor holds NaN or inf (skipped on accelerators, see as_time)."""
    if x.device.type == "cpu" and not is_finite(x):
        raise ValueError(f"{what} contains NaN or inf")


def is_finite(x: Tensor) -> bool:
    """Whether every entry of x is finite, in one pass: a float64 sum is finite only if every
    entry is (NaN and inf propagate); only a non-finite sum, possibly a float64 overflow of
    finite entries, needs the entry-wise check."""
    return math.isfinite(x.sum(dtype=torch.float64).item()) or bool(torch.isfinite(x).all())


def check_batch(x: object, name: str, finite: bool = True) -> Tensor:
    """Check that x is a floating tensor of shape (batch, *dims) with batch >= 1 and, when
    `finite`, no NaN or inf (on the CPU, see `check_finite`)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, *dims), got {describe(x)}")
    check_float_dtype(x.dtype, f"{name}.dtype")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(
            f"{name} must have shape (batch, *dims) with batch >= 1, got {tuple(x.shape)}"
        )
    if finite:
        check_finite(x, name)
    return x


def check_float_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    """Check that dtype is a floating-point torch.dtype (samples and times are real numbers)."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f"{name} must be a floating-point torch.dtype (e.g. torch.float32, torch.float64), "
            f"got {dtype}"
        )
    return dtype


def check_shape(shape: object, name: str = "shape") -> tuple[int, ...]:
    """A batch shape (batch, *dims) of positive integers, as a tuple."""
    if isinstance(shape, Iterable) and not isinstance(shape, str | bytes):
        dims = tuple(shape)
        if dims and all(_is_int(n) and n >= 1 for n in dims):
            return tuple(int(n) for n in dims)
    raise ValueError(
        f"{name} must be a sequence of positive integers (batch, *dims), got {shape!r}"
    )


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """An integer >= minimum (a float with an integer value passes, as configs write 10.0)."""
    if not (_is_int(value) and value >= minimum):  # type: ignore[operator]
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_positive(value: object, name: str) -> float:
    """A finite real number > 0."""
    if not (_is_real(value) and math.isfinite(value) and value > 0):  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_choice(name: str, value: object, choices: Collection[str]) -> None:
    """Refuse a value that is not one of the named choices, listing them."""
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")


def check_keywords(what: str, given: Iterable[str], valid: Sequence[str]) -> None:
    """Refuse keyword arguments that `what` does not take, naming them and the valid ones
    (Python's own TypeError names the first bad key only)."""
    unknown = [k for k in given if k not in valid]
    if unknown:
        raise TypeError(
            f"{what} got unknown parameter(s) {', '.join(map(repr, unknown))}; "
            f"valid parameters: {', '.join(valid) or '(none)'}"
        )


def check_callable(fn: object, name: str) -> None:
    """Refuse a non-callable where a function (a score_fn, a model) is expected."""
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {describe(fn)}")


def check_device(device: object, name: str = "device") -> torch.device:
    """A torch.device that this torch build can use: cpu, an existing cuda:N, or mps."""
    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"{name} {device!r} is not a device; valid forms: cpu, cuda, cuda:N, mps "
            f"(available here: {', '.join(available_devices())})"
        ) from e
    if dev.type == "cuda":
        usable = (dev.index or 0) < torch.cuda.device_count()
    elif dev.type == "mps":
        usable = mps_available()
    else:
        usable = True  # cpu, and device types this package does not know (torch checks them)
    if not usable:
        raise ValueError(
            f"{name} {str(dev)!r} is not available; available: {', '.join(available_devices())}"
        )
    return dev


def available_devices() -> list[str]:
    """The devices this torch build and machine offer: cpu, cuda:0..N-1, mps."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu", *cuda, *(["mps"] if mps_available() else [])]


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return _is_real(value) and math.isfinite(value) and int(value) == value  # type: ignore[arg-type]


def describe(value: object) -> str:
    """A value for an error message: its type and (shortened) repr."""
    return "None" if value is None else f"{type(value).__name__} {value!r}"[:80]
