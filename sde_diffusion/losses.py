"""Denoising score matching (math.md section 3) with the standard weightings.

    L(theta) = E_{t ~ U(t_min, T)} E_{x_0, eps}[lambda(t) ||s_theta(x_t, t) + eps/sigma_t||^2] / D

with x_t = gamma_t x_0 + sigma_t eps and D the number of dimensions of one sample (we average
over dimensions, so the scale of the loss does not grow with image size). The networks predict
eps and s_theta = -eps_theta / sigma_t, so the integrand is
lambda(t) / sigma_t^2 ||eps - eps_theta||^2:

    simple      lambda = sigma_t^2   -> ||eps - eps_theta||^2          (DDPM's eps-MSE)
    likelihood  lambda = g(t)^2      -> g^2 / sigma^2 ||eps - eps_theta||^2  (Song et al. 2021b)
    score       lambda = 1           -> ||eps - eps_theta||^2 / sigma_t^2

Importance sampling for the likelihood weighting: for every linear SDE, d(sigma^2)/dt =
2 f sigma^2 + g^2 and d(log gamma^2)/dt = 2 f, so g^2 / sigma^2 = d/dt log(sigma^2 / gamma^2)
= -2 d(lambda_t)/dt with lambda_t the log-SNR. Drawing t with density proportional to
g^2 / sigma^2 on [t_min, T] is therefore drawing lambda uniformly on [lambda_T, lambda_{t_min}],
and the unbiased estimate of the same objective is

    2 (lambda_{t_min} - lambda_T) / (T - t_min) * ||eps - eps_theta||^2 / D.

EDM's noise-level distribution (Karras et al. 2022, section 5 and table 1, "p_train"): with
time="lognormal", ln(sigma_t / gamma_t) ~ N(p_mean, p_std^2), truncated to the SDE's [t_min, T]
and drawn by inverting the truncated normal's CDF, so no time piles up at an end. It changes
only the density of t, not the per-t weight: with the simple weighting and the edm
parametrisation the objective is EDM's, E_{sigma ~ p_train}[lambda(sigma) ||D - x_0||^2].
Uniform t spends less of training at low noise (on the linear VP SDE sigma_t / gamma_t < 0.2
for 6% of t ~ U(0, 1), against 37% under EDM's p_train), yet on the 2-D toys with the edm
parametrisation p_train left the flow's error as it was or worse (README, "Parametrisation"),
so uniform stays the default.

Other parametrisations (precondition.py: x0, v, EDM's preconditioned denoiser) regress their raw
output F on its target F*, with eps_theta - eps = eps_f(t) (F - F*). The simple weighting is each
parametrisation's own unweighted MSE ||F - F*||^2 (DDPM's eps-MSE, the x0- or v-MSE, and for
EDM its weighting lambda = 1/c_out^2, under which the target has unit variance at every t); the
likelihood and score weightings keep their meaning on the score, w eps_f^2 ||F - F*||^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .precondition import Preconditioned
from .sde import SDE

WEIGHTINGS = ("simple", "likelihood", "score")
TIME_DISTRIBUTIONS = ("uniform", "lognormal")

__all__ = [
    "TIME_DISTRIBUTIONS",
    "WEIGHTINGS",
    "LossConfig",
    "dsm_loss",
    "loss_weight",
    "sample_time",
]


@dataclass
class LossConfig:
    """weighting: simple, likelihood or score. time: how training times are drawn, "uniform" in
    [t_min, T] or "lognormal" (EDM's p_train: ln(sigma_t / gamma_t) ~ N(p_mean, p_std^2)).
    importance_sampling: draw t uniformly in log-SNR (only with the likelihood weighting, whose
    variance it cuts). t_min: smallest training time (1e-5, as in Song et al. 2021: sigma_t -> 0
    at t = 0). p_uncond: probability of replacing a label by the null label, for
    classifier-free guidance (0 with unlabelled data)."""

    weighting: str = "simple"
    time: str = "uniform"
    p_mean: float = -1.2
    p_std: float = 1.2
    importance_sampling: bool = False
    t_min: float = 1e-5
    p_uncond: float = 0.1

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"unknown loss weighting {self.weighting!r}; valid choices: {', '.join(WEIGHTINGS)}"
            )
        if self.time not in TIME_DISTRIBUTIONS:
            raise ValueError(
                f"unknown loss.time {self.time!r}; valid choices: {', '.join(TIME_DISTRIBUTIONS)}"
            )
        if not (math.isfinite(self.p_mean) and math.isfinite(self.p_std) and self.p_std > 0):
            raise ValueError(
                f"loss.p_mean must be finite and loss.p_std finite and > 0, got "
                f"p_mean={self.p_mean}, p_std={self.p_std}"
            )
        if self.time != "uniform" and (self.importance_sampling or self.weighting == "likelihood"):
            raise ValueError(
                f"loss.time={self.time!r} changes the density of t, which the likelihood "
                "weighting (and its importance sampling) fixes: use time=uniform with it"
            )
        if self.importance_sampling and self.weighting != "likelihood":
            raise ValueError(
                "importance_sampling applies to the likelihood weighting only, "
                f"got weighting={self.weighting!r}"
            )
        if not (math.isfinite(self.t_min) and self.t_min > 0):
            raise ValueError(f"loss.t_min must be a finite number > 0, got {self.t_min}")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"loss.p_uncond must lie in [0, 1], got {self.p_uncond}")


def sample_time(
    sde: SDE, cfg: LossConfig, n: int, generator: torch.Generator | None, like: Tensor
) -> tuple[Tensor, Tensor]:
    """Draw n training times and the factor w(t) in front of ||eps - eps_theta||^2 for each.

    t ~ U(t_min, T) with w = lambda(t) / sigma_t^2; with time="lognormal", EDM's truncated
    log-normal noise levels and the same w; with importance sampling, lambda is uniform in
    log-SNR and w is the constant of the module docstring.
    """
    if not cfg.t_min < sde.T:
        raise ValueError(f"loss.t_min = {cfg.t_min} must be below the SDE's T = {sde.T}")
    u = torch.rand(n, generator=generator, device=like.device, dtype=like.dtype)
    if not cfg.importance_sampling and cfg.time == "uniform":
        t = cfg.t_min + (sde.T - cfg.t_min) * u
        return t, loss_weight(sde, t, cfg.weighting)
    lam_hi, lam_lo = sde.log_snr(torch.tensor([cfg.t_min, sde.T], dtype=torch.float64))
    if cfg.importance_sampling:
        t = sde.t_from_log_snr(lam_hi - (lam_hi - lam_lo) * u).clamp(cfg.t_min, sde.T)
        return t, torch.full_like(u, float(2 * (lam_hi - lam_lo) / (sde.T - cfg.t_min)))
    # ln(sigma/gamma) = -lambda ~ N(p_mean, p_std^2) on [-lam_hi, -lam_lo]: invert its CDF
    lo, hi = torch.special.ndtr((torch.stack([-lam_hi, -lam_lo]) - cfg.p_mean) / cfg.p_std)
    z = torch.special.ndtri(lo + (hi - lo) * u.to(torch.float64))
    t = sde.t_from_log_snr(-(cfg.p_mean + cfg.p_std * z)).clamp(cfg.t_min, sde.T).to(u.dtype)
    return t, loss_weight(sde, t, cfg.weighting)


def loss_weight(sde: SDE, t: Tensor, weighting: str) -> Tensor:
    """lambda(t) / sigma_t^2, the factor in front of ||eps - eps_theta||^2 for each weighting."""
    if weighting not in WEIGHTINGS:
        raise ValueError(
            f"unknown loss weighting {weighting!r}; valid choices: {', '.join(WEIGHTINGS)}"
        )
    if weighting == "simple":
        return torch.ones_like(t)
    sigma2 = sde.marginal(t)[1].square()
    if weighting == "likelihood":
        return sde.g2(t) / sigma2
    return 1.0 / sigma2


def dsm_loss(
    model: Callable[..., Tensor],
    sde: SDE,
    x0: Tensor,
    cfg: LossConfig | None = None,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
    num_classes: int = 0,
    t: Tensor | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """The DSM loss of `model` on the batch x0 (a scalar).

    model: an eps-predicting model(x, t[, y]), or a Preconditioned network, whose raw output is
    regressed on its own target (module docstring).

    t and noise are drawn with `generator` unless given (tests fix them; a given t is weighted
    as under uniform sampling). With labels, each is replaced by the null label num_classes with
    probability cfg.p_uncond.
    """
    cfg = cfg or LossConfig()
    if t is None:
        t, w = sample_time(sde, cfg, x0.shape[0], generator, x0)
    else:
        t = sde.time(t, x0).expand(x0.shape[0])
        w = loss_weight(sde, t, cfg.weighting)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    xt = sde.perturb(x0, t, noise)
    kwargs = {}
    if labels is not None:
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < cfg.p_uncond
        kwargs["y"] = torch.where(drop, torch.full_like(labels, num_classes), labels)
    net = model if isinstance(model, Preconditioned) else Preconditioned(model, sde, "eps")
    c = net.coefficients(t)
    if cfg.weighting != "simple":
        w = w * c.eps_f.square()  # ||eps_theta - eps||^2 = eps_f^2 ||F - F*||^2
    # bf16 autocast outputs: reduce in x0's dtype
    pred = net.raw(xt, t, coeffs=c, **kwargs).to(noise.dtype)
    target = net.target(x0, noise, t, coeffs=c)
    per_sample = (pred - target).square().reshape(x0.shape[0], -1).mean(dim=1)
    return (w * per_sample).mean()
