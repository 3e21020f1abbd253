"""EDM's Heun sampler (Karras et al. 2022, "Elucidating the design space of diffusion-based
generative models", Algorithms 1 and 2) for every SDE of the family.

EDM works in the coordinates x_hat = x / gamma_t at noise level sigma_hat = sigma_t / gamma_t =
exp(-lambda_t), where x_hat = x_0 + sigma_hat eps for any of our SDEs and the probability-flow
ODE reads (EDM eq. 3 with sigma(t) = t)

    dx_hat / dsigma_hat = (x_hat - D(x_hat; sigma_hat)) / sigma_hat,

D = E[x_0 | x_t] being the denoiser, which Tweedie's formula gives from the score (math.md
section 2). A noise level maps back to a time through lambda: t = sde.t_from_log_snr(-log sigma_hat).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..sde import SDE, ScoreFn
from ._registry import Callback, NoiseSource, at, register, steps


def _check_churn(S_churn: float, S_tmin: float, S_tmax: float, S_noise: float) -> None:
    if not (math.isfinite(S_churn) and S_churn >= 0):
        raise ValueError(f"S_churn must be a finite number >= 0, got {S_churn}")
    if not (S_tmin >= 0 and S_tmax >= S_tmin):
        raise ValueError(f"need 0 <= S_tmin <= S_tmax, got S_tmin={S_tmin}, S_tmax={S_tmax}")
    if not (math.isfinite(S_noise) and S_noise >= 0):
        raise ValueError(f"S_noise must be a finite number >= 0, got {S_noise}")


@register("heun", default_grid="edm")
def edm_heun(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    ts: Tensor,
    *,
    noise: NoiseSource,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = math.inf,
    S_noise: float = 1.0,
    callback: Callback | None = None,
) -> Tensor:
    """EDM's stochastic sampler (Algorithm 2) over the grid ts; S_churn = 0 gives Algorithm 1,
    the deterministic second-order Heun method on the probability-flow ODE.

    Step i first raises the noise level sigma_hat_i by gamma_i = min(S_churn / N, sqrt(2) - 1)
    (N = len(ts) - 1) when S_tmin <= sigma_hat_i <= S_tmax, adding fresh noise of standard
    deviation S_noise sqrt(sigma_up^2 - sigma_hat_i^2); the raised level is capped at the SDE's
    level at T, beyond which there is no score. It then takes an Euler step to sigma_hat_{i+1}
    and corrects it with the trapezoidal rule, except on the last step, which stays Euler as in
    EDM: NFE = 2 N - 1. S_tmin / S_tmax are noise levels sigma_hat, as in the paper.
    """
    _check_churn(S_churn, S_tmin, S_tmax, S_noise)
    n = len(ts) - 1
    gamma, sigma = sde.marginal(ts)
    level = sigma / gamma
    churn = min(S_churn / n, math.sqrt(2) - 1)
    host_levels = level.tolist() if churn > 0 else []

    def slope(x_hat: Tensor, t: Tensor, g: Tensor, sig: Tensor) -> Tensor:
        """(x_hat - D(x_hat; sigma_hat_t)) / sigma_hat_t = -sigma_t s(x_t, t), x_t = gamma_t x_hat."""
        x_t = g * x_hat
        return -sig * score_fn(x_t, at(t, x_t))

    x_hat = x / gamma[0]
    for i, (t, s) in steps(ts):
        t_hat, g_hat, sig_hat, level_hat = t, gamma[i], sigma[i], level[i]
        if churn > 0 and S_tmin <= host_levels[i] <= S_tmax:
            lam_up = torch.tensor(-math.log(host_levels[i] * (1 + churn)), dtype=torch.float64)
            t_hat = torch.clamp(sde.t_from_log_snr(lam_up), max=sde.T).to(ts.device, ts.dtype)
            g_hat, sig_hat = sde.marginal(t_hat)
            level_hat = sig_hat / g_hat
            added = torch.sqrt((level_hat**2 - level[i] ** 2).clamp_min(0))
            x_hat = x_hat + S_noise * added * noise(x_hat)
        d = slope(x_hat, t_hat, g_hat, sig_hat)
        x_next = x_hat + (level[i + 1] - level_hat) * d
        if i < n - 1:
            d_next = slope(x_next, s, gamma[i + 1], sigma[i + 1])
            x_next = x_hat + (level[i + 1] - level_hat) * (0.5 * d + 0.5 * d_next)
        x_hat = x_next
        if callback is not None:
            callback(i, s, gamma[i + 1] * x_hat)
    return gamma[-1] * x_hat
