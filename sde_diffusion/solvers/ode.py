"""The probability-flow ODE dx/dt = f(t) x - g(t)^2 s(x, t) / 2 (math.md section 4), integrated
by torchdiffeq with any of its methods, in t or in the log-SNR lambda."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint

from .._tensor import check_choice
from ..sde import SDE, ScoreFn
from ._registry import Callback, register

ADAPTIVE_METHODS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")
#: what the ODE is integrated in: t (the form above) or lambda = log(gamma / sigma)
VARIABLES = ("t", "log_snr")


@register("ode", grid_sets_nfe=False)
def probability_flow_ode(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    ts: Tensor,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    variable: str | None = None,
    options: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Integrate the probability-flow ODE from ts[0] to ts[-1] with torchdiffeq.

    Fixed-step methods (euler, midpoint, rk4, ...) step exactly on the grid ts; adaptive ones
    (dopri5, bosh3, ...) choose their own steps under rtol/atol and only report at the grid
    points. The NFE is whatever the method spends; `sample` counts it.

    variable="log_snr" (the default for adaptive methods) integrates x / gamma_t in lambda =
    log(gamma_t / sigma_t) (`SDE.probability_flow_log_snr`), where the right-hand side depends on
    the schedule only through the SNR and is as smooth as the data's score on every SDE. In t it
    carries beta(t), which for a discrete schedule (`DiscreteVPSDE`: piecewise constant over its
    1000 intervals) jumps at every interval, and an adaptive step-size control crossing those
    jumps spends thousands of evaluations and still misses (tests/test_solvers_verify.py).
    variable="t" (the default for fixed-step methods, whose steps then fall on ts) integrates the
    form above. torchdiffeq's `options` (first_step, ...) are in the variable integrated.
    """
    adaptive = method in ADAPTIVE_METHODS
    times, scale, velocity = flow_in(
        variable or ("log_snr" if adaptive else "t"), sde, score_fn, ts
    )
    opts = adaptive_options(times, options) if adaptive else dict(options or {})
    path = odeint(velocity, x / scale[0], times, method=method, rtol=rtol, atol=atol, options=opts)
    if callback is not None:
        for i in range(1, len(ts)):
            callback(i - 1, ts[i], scale[i] * path[i])
    return scale[-1] * path[-1]


def flow_in(
    variable: str, sde: SDE, score_fn: ScoreFn, ts: Tensor
) -> tuple[Tensor, Tensor, Callable[[Tensor, Tensor], Tensor]]:
    """The probability-flow ODE in `variable` over the grid ts: its times there, the scale with
    y = x / scale (1 in t, gamma_t in lambda) and the velocity dy / dtime (time, y)."""
    check_choice("variable", variable, VARIABLES)
    if variable == "t":
        return ts, torch.ones_like(ts), lambda t, y: sde.probability_flow_drift(y, t, score_fn)
    return (
        sde.log_snr(ts),
        sde.marginal(ts)[0],
        lambda lam, y: sde.probability_flow_log_snr(y, lam, score_fn),
    )


def adaptive_options(times: Tensor, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """torchdiffeq options for an adaptive method over `times` (the caller's take precedence):
    adaptive steps may overshoot the last time and interpolate back, and torchdiffeq's first-step
    guess probes beyond the interval where the velocity is nearly zero; times outside the score's
    domain are avoided by making the last time a point the solver must step to and starting with
    the first interval."""
    first = {"step_t": times[-1:], "first_step": float(abs(times[1] - times[0]))}
    return {**first, **(options or {})}
