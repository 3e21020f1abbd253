"""DDPM ancestral sampling (Ho et al. 2020) and DDIM (Song, Meng & Ermon 2021), over any grid.

Both step from grid time t to the next grid time s < t using only the marginals
(gamma, sigma) of the two times, so they run on any grid and reduce exactly to the published
discrete algorithms when the grid is the discrete chain's (math.md sections 1 and 4).
The final "z = 0" step of DDPM and DDIM's last step to alpha_bar = 1 are both Tweedie's formula
at the last grid time, which `sample(denoise=True)` applies; the solvers themselves always step
between grid times.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._tensor import check_choice
from ..sde import SDE, SDE_NAMES, ScoreFn, VPFamilySDE
from ._registry import Callback, IncompatibleSDEError, NoiseSource, at, register, steps

VARIANCES = ("fixed_small", "fixed_large")

__all__ = ["VARIANCES", "ddim", "ddpm"]


def _check_vp(sde: SDE) -> None:
    if not sde.is_vp:
        valid = ", ".join(n for n, c in SDE_NAMES.items() if issubclass(c, VPFamilySDE))
        raise IncompatibleSDEError(
            f"ddpm needs a variance-preserving SDE (get_sde names {valid}), got {sde!r}; "
            "for other SDEs use ddim (eta=1 is the same ancestral sampler written with gamma/sigma)"
        )


@register("ddpm")
def ddpm(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    ts: Tensor,
    *,
    noise: NoiseSource,
    variance: str = "fixed_small",
    callback: Callback | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) on a VP schedule over the grid ts.

    From t to s < t, with alpha = alpha_bar_t / alpha_bar_s = gamma_t^2 / gamma_s^2, beta = 1 - alpha
    and eps = eps_theta(x_t, t) = -sigma_t score(x_t, t):

        x_s = (x_t - beta / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha) + sqrt(v) z,

    v = beta_tilde = (1 - alpha_bar_s) / (1 - alpha_bar_t) beta ("fixed_small", the posterior
    variance) or v = beta ("fixed_large"). On a DiscreteVPSDE of N betas with the grid t_N, ...,
    t_1 (`steps=N - 1` on the default uniform grid) this is the DDPM chain step for step; its
    last step x_1 -> x_0 (z = 0) is the Tweedie step of `sample(denoise=True)`. Coarser grids
    give DDPM with skipped steps (alpha from the alpha_bar ratio, as diffusers' DDPMScheduler
    does with fewer inference steps).
    """
    _check_vp(sde)
    check_choice("variance", variance, VARIANCES)
    gamma, sigma = sde.marginal(ts)
    alpha = (gamma[:-1] / gamma[1:]) ** 2
    beta = 1 - alpha
    var = beta if variance == "fixed_large" else beta * (sigma[1:] / sigma[:-1]) ** 2
    for i, (t, s) in steps(ts):
        eps = -sigma[i] * score_fn(x, at(t, x))
        x = (x - beta[i] / sigma[i] * eps) / alpha[i].sqrt() + var[i].sqrt() * noise(x)
        if callback is not None:
            callback(i, s, x)
    return x


@register("ddim")
def ddim(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    ts: Tensor,
    *,
    noise: NoiseSource,
    eta: float = 0.0,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) with stochasticity eta, on any SDE of the family.

    From t to s < t, with eps = -sigma_t score(x_t, t), x0 = (x_t - sigma_t eps) / gamma_t and
    h = lambda_s - lambda_t > 0:

        x_s = gamma_s x0 + sqrt(sigma_s^2 - sigma_eta^2) eps + sigma_eta z,
        sigma_eta = eta sigma_s sqrt(1 - exp(-2 h)).

    sigma_eta^2 is eta^2 times the variance of q(x_s | x_t, x_0) for the SDE's kernel (for VP,
    DDIM's eq. 16 (1 - abar_s)/(1 - abar_t) (1 - abar_t/abar_s)). eta = 0 is deterministic and
    equals the first-order exponential integrator of the probability-flow ODE in lambda,
    x_s = (gamma_s / gamma_t) x_t - sigma_s (e^h - 1) eps (math.md section 4); on a VP SDE,
    eta = 1 is DDPM ancestral sampling with the posterior variance beta_tilde.
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    lam = sde.log_snr(ts)
    gamma, sigma = sde.marginal(ts)
    c = eta * torch.sqrt(-torch.expm1(-2 * (lam[1:] - lam[:-1])))  # sigma_eta / sigma_s
    for i, (t, s) in steps(ts):
        eps = -sigma[i] * score_fn(x, at(t, x))
        x0 = (x - sigma[i] * eps) / gamma[i]
        x = gamma[i + 1] * x0 + sigma[i + 1] * torch.sqrt(1 - c[i] ** 2) * eps
        if eta > 0:
            x = x + sigma[i + 1] * c[i] * noise(x)
        if callback is not None:
            callback(i, s, x)
    return x
