"""The probability-flow ODE dx/dt = f(t) x - g(t)^2 s(x, t) / 2 (math.md section 4), integrated
by torchdiffeq with any of its methods."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from torchdiffeq import odeint

from ..sde import SDE, ScoreFn
from ._registry import Callback, register

ADAPTIVE_METHODS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")


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
    options: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Integrate the probability-flow ODE from ts[0] to ts[-1] with torchdiffeq.

    Fixed-step methods (euler, midpoint, rk4, ...) step exactly on the grid ts; adaptive ones
    (dopri5, bosh3, ...) choose their own steps under rtol/atol and only report at the grid
    points. The NFE is whatever the method spends; `sample` counts it.
    """

    def velocity(t: Tensor, x: Tensor) -> Tensor:
        return sde.probability_flow_drift(x, t, score_fn)

    opts = dict(options or {})
    if method in ADAPTIVE_METHODS:
        # adaptive steps may overshoot the last time and interpolate back, and torchdiffeq's
        # first-step guess can be far larger than [t_end, T] where the velocity is nearly zero;
        # times outside the score's domain are avoided by making the final time a point the
        # solver must step to and starting with the grid's first interval
        opts.setdefault("step_t", ts[-1:])
        opts.setdefault("first_step", float(ts[0] - ts[1]))
    path = odeint(velocity, x, ts, method=method, rtol=rtol, atol=atol, options=opts)
    if callback is not None:
        for i in range(1, len(ts)):
            callback(i - 1, ts[i], path[i])
    return path[-1]
