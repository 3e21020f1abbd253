"""Time grids: decreasing tensors ts[0] = T > ts[1] > ... > ts[steps] = t_end.

Solvers step from ts[i] to ts[i+1] and never compute a time from a stride, so any grid here (or
any user-supplied decreasing tensor) drives any solver.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._tensor import check_choice, check_int, check_positive, describe, time_tolerance
from ..sde import SDE, check_sde

GRIDS = ("uniform", "log_snr", "edm", "quadratic")

__all__ = ["GRIDS", "check_grid", "final_time", "resolve_grid", "time_grid"]


def time_grid(
    sde: SDE,
    steps: int,
    kind: str = "uniform",
    t_end: float | None = None,
    t_start: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """A float64 grid of steps + 1 times from t_start (default T) down to t_end (default t_min).

    uniform:   equal steps in t.
    log_snr:   equal steps in lambda = log(gamma / sigma) (DPM-Solver's "logSNR" spacing).
    edm:       Karras et al. (2022) eq. 5 on the noise level sigma_t / gamma_t, exponent rho.
    quadratic: t spaced as squares, denser near t_end (DDIM's "quad" spacing).
    """
    check_sde(sde)
    check_choice("grid", kind, GRIDS)
    steps = check_int(steps, "steps")
    check_positive(rho, "rho")
    t0 = float(sde.T if t_start is None else t_start)
    t1 = float(sde.t_min if t_end is None else t_end)
    if not 0 < t1 < t0 <= sde.T:
        raise ValueError(f"need 0 < t_end < t_start <= T = {sde.T}, got t_end={t1}, t_start={t0}")
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if kind == "uniform":
        ts = t0 + (t1 - t0) * u
    elif kind == "quadratic":
        ts = t1 + (t0 - t1) * (1 - u) ** 2
    else:
        lam0, lam1 = sde.log_snr(torch.tensor([t0, t1], dtype=torch.float64))
        if kind == "log_snr":
            lam = lam0 + (lam1 - lam0) * u
        else:
            # EDM noise levels sigma_i = (s_max^(1/rho) + u (s_min^(1/rho) - s_max^(1/rho)))^rho,
            # with s = sigma_t / gamma_t = exp(-lambda)
            a, b = torch.exp(-lam0 / rho), torch.exp(-lam1 / rho)
            lam = -rho * torch.log(a + u * (b - a))
        ts = sde.t_from_log_snr(lam)
    ts[0], ts[-1] = t0, t1  # pin the ends against round-off in the inverse
    return ts


def check_grid(ts: Tensor, sde: SDE, name: str = "ts") -> Tensor:
    """Validate a time grid: a 1-D tensor of at least two points, finite, strictly decreasing,
    inside (0, T]; return it as float64 on the host.

    The one check of every grid a solver runs on, whether `sample` resolved it or the solver was
    called directly (an increasing grid would otherwise give NaN samples, not an error). It reads
    the grid on the host once per call, never per step.
    """
    if not isinstance(ts, Tensor):
        raise TypeError(f"{name} must be a 1-D torch.Tensor of times, got {describe(ts)}")
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 points, got shape {tuple(ts.shape)}")
    ts = ts.detach().to("cpu", torch.float64)
    times = ts.tolist()
    if not all(math.isfinite(t) for t in times):
        raise ValueError(f"{name} contains NaN or inf: {times}")
    k = next((k for k in range(len(times) - 1) if times[k + 1] >= times[k]), None)
    if k is not None:
        raise ValueError(
            f"{name} must strictly decrease (T -> t_min); {name}[{k}]={times[k]} "
            f"is followed by {name}[{k + 1}]={times[k + 1]}"
        )
    if times[-1] <= 0 or times[0] > sde.T + time_tolerance(sde.T):
        raise ValueError(
            f"{name} times must lie in (0, T = {sde.T}], got [{times[-1]}, {times[0]}]"
        )
    return ts


def final_time(sde: SDE, steps: int, share: float = 0.5) -> float:
    """Where a grid of `steps` intervals that ends with a Tweedie step should stop so that the
    jump to t = 0 is `share` of an equal step of [t_end, T]: T / (steps / share + 1), or t_min
    when that is larger. share = 0.5 (the default): T / (2 steps + 1); share = 1: T / (steps +
    1), the "trailing" timesteps of Lin et al. 2024, which end a full step above 0.

    The Tweedie step x0 = E[x_0 | x_t] is a jump from t_end to 0 that costs an evaluation like
    any step. Ending at t_min spends it on a negligible interval and leaves the steps before it
    to cover [t_min, T] alone. On Gaussian-ring oracles at 10 evaluations ending half a step
    above 0 cuts the distance to the exact flow of DPM-Solver++, UniPC and Heun to 0.36-0.52 of
    what ending at t_min gives, leaves DDIM's unchanged, and improves or keeps every stochastic
    sampler's sliced W2 (tests/test_solvers_expint.py, benchmarks/steps_vs_quality.py). On VP
    (t_min = 1e-3) it is t_min from 500 steps on.
    """
    check_positive(share, "share")
    return max(float(sde.t_min), float(sde.T) / (steps / share + 1))


def resolve_grid(
    sde: SDE,
    grid: str | Tensor | None,
    steps: int,
    default: str,
    t_end: float | None = None,
    denoise: bool = False,
) -> Tensor:
    """The grid a sampler runs on: an explicit tensor (checked), else `steps` intervals of the
    named kind (or `default`, the solver's own) down to t_end (default: t_min, or with
    `denoise`, `final_time(sde, steps)`)."""
    if isinstance(grid, Tensor):
        if t_end is not None:
            raise ValueError(
                f"t_end={t_end} ends a grid of a named kind; an explicit grid tensor ends at its "
                "own last time: pass one or the other"
            )
        return check_grid(grid, sde, "grid")
    steps = check_int(steps, "steps")
    if t_end is None and denoise:
        t_end = final_time(sde, steps)
    return time_grid(sde, steps, grid or default, t_end=t_end)
