"""Stochastic samplers of the reverse-time SDE (math.md section 4): Euler–Maruyama and
predictor–corrector (Song et al. 2021, "Score-based generative modeling through SDEs")."""

from __future__ import annotations

import torch
from torch import Tensor

from .._tensor import check_choice, check_int, check_positive
from ..sde import SDE, ScoreFn
from ._registry import Callback, NoiseSource, at, register, steps

PREDICTORS = ("euler_maruyama", "reverse_diffusion")


def _euler_maruyama_step(
    score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor, s: Tensor, z: Tensor | None
) -> Tensor:
    """x <- x - [f(t) x - g(t)^2 s(x, t)] h + g(t) sqrt(h) z, with h = t - s > 0."""
    h = t - s
    x = x - sde.reverse_drift(x, t, score_fn) * h
    return x if z is None else x + torch.sqrt(sde.g2(t) * h) * z


def _reverse_diffusion_step(
    score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor, s: Tensor, z: Tensor | None
) -> Tensor:
    """score_sde's reverse-diffusion predictor on the exact discretisation of [s, t].

    The forward transition x_t = a x_s + b z (SDE.transition) has discrete drift (a - 1) x and
    diffusion b; reversing them gives x_s = (2 - a) x_t + b^2 s + b z.
    """
    a, b = sde.transition(t, s)
    b2 = b * b
    x = (2 - a) * x + b2 * score_fn(x, at(t, x))
    return x if z is None else x + b * z


@register("euler_maruyama")
def euler_maruyama(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    ts: Tensor,
    *,
    noise: NoiseSource,
    noise_last: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """Euler–Maruyama on the reverse SDE over the grid ts (strong order 1/2, weak order 1).

    The last step adds no noise (it returns the step's mean), as in score_sde, unless
    `noise_last` (for callers that run the solver one interval at a time, like inpainting).
    """
    last = len(ts) - 2 if not noise_last else -1
    for i, (t, s) in steps(ts):
        x = _euler_maruyama_step(score_fn, sde, x, t, s, None if i == last else noise(x))
        if callback is not None:
            callback(i, s, x)
    return x


def langevin_step(score_fn: ScoreFn, x: Tensor, t: Tensor, snr: float, z: Tensor) -> Tensor:
    """One Langevin corrector move x <- x + e s + sqrt(2 e) z with score_sde's step-size rule
    e = 2 (snr ||z|| / ||s||)^2, where ||.|| is the per-sample norm averaged over the batch.

    The batch average is score_sde's choice and is what keeps e bounded: a per-sample ratio
    explodes wherever the score nearly vanishes (at every mode, in low dimension). It makes the
    corrector's step size, and only it, a statistic of the whole batch.
    """
    score = score_fn(x, at(t, x))
    e = 2 * (snr * z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean()) ** 2
    return x + e * score + torch.sqrt(2 * e) * z


@register("pc")
def predictor_corrector(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    ts: Tensor,
    *,
    noise: NoiseSource,
    predictor: str = "reverse_diffusion",
    snr: float = 0.16,
    n_corrector: int = 1,
    noise_last: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """Predictor–corrector sampling: after each predictor step t -> s, `n_corrector` Langevin
    steps at s with signal-to-noise ratio `snr` (Song et al. 2021, Algorithms 2 and 3).

    predictor: "reverse_diffusion" (default, as in score_sde) or "euler_maruyama"; as for
    Euler–Maruyama, the last predictor step adds no noise unless `noise_last`.
    """
    check_choice("predictor", predictor, PREDICTORS)
    check_int(n_corrector, "n_corrector", 0)
    check_positive(snr, "snr")
    step = _euler_maruyama_step if predictor == "euler_maruyama" else _reverse_diffusion_step
    last = len(ts) - 2 if not noise_last else -1
    for i, (t, s) in steps(ts):
        x = step(score_fn, sde, x, t, s, None if i == last else noise(x))
        for _ in range(n_corrector):
            x = langevin_step(score_fn, x, s, snr, noise(x))
        if callback is not None:
            callback(i, s, x)
    return x
