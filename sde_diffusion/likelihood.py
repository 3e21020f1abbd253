"""Likelihoods of score models: exact through the probability-flow ODE, and the DDPM bound.

PF-ODE (math.md section 5), a continuous normalising flow with velocity
f_tilde(x, t) = f(t) x - g(t)^2 s(x, t) / 2:

    log p_eps(x) = log p_T(x_T) + integral_eps^T div_x f_tilde(x_t, t) dt,

integrated forward from x_eps = x to x_T = z with the augmented state [x, delta_logp]; adaptive
methods integrate in the log-SNR instead (solvers/ode.py: smooth on discrete betas, where the form
in t is not), x_hat = x / gamma_t against lambda, whose density gains D log gamma_t:

    log p_eps(x) = log p_T(z) + D log(gamma_T / gamma_eps)
                   + integral_{lambda_eps}^{lambda_T} div_x_hat v dlambda.

With an exact score this is exact for log p at the start time t_eps (not at 0), and exact for
log p_T only when `prior_logp` is the true p_T: the SDE's prior N(0, prior_std^2 I) is an
approximation of p_T.

DDPM variational bound (Ho et al. 2020; math.md section 5), for the chain of `sde.discretize(N)`:

    -log p(x_0) <= L_T + sum_{i=2}^N L_{i-1} + L_0.

Everything is reported in nats per sample; `bits_per_dim` converts, with the data scaling explicit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torchdiffeq import odeint

from ._tensor import check_batch, check_callable, check_choice, check_int, check_positive
from .sde import SDE, DiscreteVPSDE, ScoreFn, VPFamilySDE, check_sde
from .solvers.ode import ADAPTIVE_METHODS, adaptive_options, flow_in

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
DECODERS = ("gaussian", "discretized")
VARIANCES = ("beta", "beta_tilde")

__all__ = [
    "DECODERS",
    "DIVERGENCES",
    "PROBES",
    "VARIANCES",
    "ODELikelihood",
    "VariationalBound",
    "bits_per_dim",
    "ddpm_bound",
    "dequantize",
    "discretized_gaussian_log_prob",
    "normal_kl",
    "ode_log_likelihood",
]


def normal_kl(mean1: Tensor, var1: Tensor | float, mean2: Tensor, var2: Tensor | float) -> Tensor:
    """Elementwise KL(N(mean1, var1) || N(mean2, var2)) between 1-D Gaussians (math.md section 5).

    log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2, written with variances; arguments
    broadcast. Sum over dimensions for isotropic multivariate Gaussians.
    """
    var1 = torch.as_tensor(var1, dtype=mean1.dtype, device=mean1.device)
    var2 = torch.as_tensor(var2, dtype=mean1.dtype, device=mean1.device)
    return (
        0.5 * (torch.log(var2) - torch.log(var1)) + (var1 + (mean1 - mean2) ** 2) / (2 * var2) - 0.5
    )


# ---- probability-flow ODE likelihood -------------------------------------------------------------


class ODELikelihood(NamedTuple):
    """Result of `ode_log_likelihood`, all per sample, in nats.

    logp = prior_logp + delta_logp is log p_{t_eps}(x); z is x_T; nfe counts score_fn calls
    (each call is one batched forward pass; the divergence's backward passes are not counted).
    """

    logp: Tensor
    z: Tensor
    nfe: int
    prior_logp: Tensor
    delta_logp: Tensor


def _probes(x: Tensor, num: int, kind: str, generator: torch.Generator | None) -> Tensor:
    """num Hutchinson probes of x's shape with E[v v^T] = I (Rademacher +-1 or standard normal)."""
    shape = (num, *x.shape)
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
    bits = torch.randint(0, 2, shape, generator=generator, device=x.device)
    return bits.to(x.dtype) * 2 - 1


def _drift_and_divergence(
    drift: Callable[[Tensor, Tensor], Tensor], t: Tensor, x: Tensor, probes: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The PF velocity drift(t, x) and its divergence in x: exact (probes None) or Hutchinson's
    v^T J v."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = drift(t, x)
        batch = x.shape[0]
        if probes is None:
            # the trace, one autograd pass per coordinate: d out_i / d x_i summed over i
            flat_out = out.reshape(batch, -1)
            div = x.new_zeros(batch)
            for i in range(flat_out.shape[1]):
                (grad,) = torch.autograd.grad(flat_out[:, i].sum(), x, retain_graph=True)
                div = div + grad.reshape(batch, -1)[:, i]
        else:
            div = x.new_zeros(batch)
            for v in probes:
                (vjp,) = torch.autograd.grad(out, x, grad_outputs=v, retain_graph=True)
                div = div + (vjp * v).reshape(batch, -1).sum(1)
            div = div / probes.shape[0]
    return out.detach(), div.detach()


def ode_log_likelihood(
    x: Tensor,
    sde: SDE,
    score_fn: ScoreFn,
    *,
    t_eps: float = 1e-5,
    divergence: str = "exact",
    num_probes: int = 1,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    options: dict | None = None,
    prior_logp: Callable[[Tensor], Tensor] | None = None,
    variable: str | None = None,
) -> ODELikelihood:
    """log p_{t_eps}(x) through the probability-flow ODE, integrated from t_eps to T by torchdiffeq.

    divergence: "exact" (one autograd pass per dimension; for small D) or "hutchinson"
    (num_probes probes of kind `probe`, rademacher or gaussian, drawn once from `generator` and
    held fixed along the path, so the ODE stays smooth and the estimate is unbiased).
    The exact divergence assumes each sample's output depends on that sample's input only.
    t_eps: start time (1e-5 as in score_sde; for a discrete-time model pass sde.t_min). The
    result is log p at t_eps; choose t_eps small for log p_0.
    method, rtol, atol, options: passed to torchdiffeq.odeint (options in the variable integrated).
    prior_logp: log p_T(z); by default the SDE's prior N(0, prior_std^2 I).
    variable: "log_snr" (the default for adaptive methods and t_eps > 0) or "t", as in the
    `ode` solver: on DDPM's betas dopri5 in t at 1e-7 spends 6000 evaluations and misses by 5e-3
    nats, in lambda 1e-5 (tests/test_likelihood.py).
    """
    check_batch(x, "x")
    check_sde(sde)
    check_callable(score_fn, "score_fn")
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("probe", probe, PROBES)
    check_int(num_probes, "num_probes")
    if not (0 <= t_eps < sde.T):
        raise ValueError(f"t_eps must lie in [0, T = {sde.T}), got {t_eps}")
    nfe = 0

    def counted_score(x_: Tensor, t_: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return score_fn(x_, t_)

    adaptive = method in ADAPTIVE_METHODS
    variable = variable or ("log_snr" if adaptive and t_eps > 0 else "t")
    if variable == "log_snr" and not t_eps > 0:
        raise ValueError("variable='log_snr' needs t_eps > 0 (lambda is infinite at t = 0)")
    ends = torch.tensor([t_eps, sde.T], dtype=x.dtype, device=x.device)
    times, scale, drift = flow_in(variable, sde, counted_score, ends)
    probes = None if divergence == "exact" else _probes(x, int(num_probes), probe, generator)

    def augmented(time: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return _drift_and_divergence(drift, time, state[0], probes)

    if adaptive:
        options = adaptive_options(times, options)
    with torch.no_grad():
        xs, deltas = odeint(
            augmented,
            (x.detach() / scale[0], x.new_zeros(x.shape[0])),
            times,
            method=method,
            rtol=rtol,
            atol=atol,
            options=options,
        )
    z = scale[1] * xs[-1]
    delta = deltas[-1] + x[0].numel() * torch.log(scale[1] / scale[0])
    prior = (prior_logp or sde.prior_logp)(z)
    return ODELikelihood(logp=prior + delta, z=z, nfe=nfe, prior_logp=prior, delta_logp=delta)


# ---- dequantisation and bits per dimension ------------------------------------------------------


def dequantize(
    k: Tensor,
    generator: torch.Generator | None = None,
    num_levels: int = 256,
    low: float = -1.0,
    high: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Uniform dequantisation x = low + (high - low) (k + u) / num_levels, u ~ U[0, 1)^D.

    Integer levels k in [0, num_levels) become continuous data in [low, high) (float32 rounding
    can land on high itself); each level owns a bin of width (high - low) / num_levels, the
    `bin_width` that `bits_per_dim` needs.
    """
    check_int(num_levels, "num_levels", 2)
    if not high > low:
        raise ValueError(f"high must be > low, got low={low}, high={high}")
    if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
        raise ValueError(f"levels must be an integer tensor, got dtype {k.dtype}")
    k = k.long()  # compare in int64: num_levels = 256 does not fit in uint8
    if bool((k < 0).any()) or bool((k >= num_levels).any()):
        raise ValueError(f"levels must lie in [0, {num_levels}), got [{k.min()}, {k.max()}]")
    u = torch.rand(k.shape, generator=generator, dtype=dtype, device=k.device)
    return low + (high - low) * (k.to(dtype) + u) / num_levels


def bits_per_dim(logp: Tensor, num_dims: int, bin_width: float | None = None) -> Tensor:
    """Negative log-likelihood in bits per dimension.

    For continuous data, bin_width=None: -log p / (D log 2). For data dequantised from integer
    levels (see `dequantize`), bin_width is the width of one level in the model's coordinates
    (2/256 for 8-bit data mapped to [-1, 1)); the density of the integer-grid variable v = k + u
    is p_x(x) bin_width^D, so the discrete NLL is bounded by -(log p_x + D log bin_width) (Jensen).
    """
    check_int(num_dims, "num_dims")
    nll = -logp
    if bin_width is not None:
        check_positive(bin_width, "bin_width")
        nll = nll - num_dims * math.log(bin_width)
    return nll / (num_dims * math.log(2))


# ---- DDPM variational bound -------------------------------------------------------------------


def _log_prob_between(a: Tensor, b: Tensor) -> Tensor:
    """log(Phi(b) - Phi(a)) for a <= b, computed in whichever tail keeps it accurate."""
    lower = torch.special.log_ndtr(b) + torch.log1p(
        -torch.exp(torch.special.log_ndtr(a) - torch.special.log_ndtr(b))
    )
    upper = torch.special.log_ndtr(-a) + torch.log1p(
        -torch.exp(torch.special.log_ndtr(-b) - torch.special.log_ndtr(-a))
    )
    return torch.where(a + b > 0, upper, lower)


def discretized_gaussian_log_prob(
    x: Tensor,
    mean: Tensor,
    var: Tensor | float,
    num_levels: int = 256,
    low: float = -1.0,
    high: float = 1.0,
) -> Tensor:
    """Elementwise log P(x) of the discretised Gaussian decoder of Ho et al. (2020).

    x lies on the grid low + k (high - low) / (num_levels - 1), k = 0..num_levels-1 (8-bit images
    as k / 127.5 - 1). Each level gets the Gaussian mass of its bin, x +- half a grid step, with
    the outermost bins extended to -inf and +inf so that the probabilities sum to 1.
    """
    check_int(num_levels, "num_levels", 2)
    std = torch.sqrt(torch.as_tensor(var, dtype=x.dtype, device=x.device))
    half = 0.5 * (high - low) / (num_levels - 1)
    inf = torch.full_like(x, math.inf)
    a = torch.where(x < low + half, -inf, (x - half - mean) / std)
    b = torch.where(x > high - half, inf, (x + half - mean) / std)
    return _log_prob_between(a, b)


class VariationalBound(NamedTuple):
    """The DDPM bound per sample, in nats: total = prior + diffusion + decoder.

    prior = L_T; diffusion = sum_{i=2}^N L_{i-1}; decoder = L_0; terms[:, j] = L_j for j = 0..N-1.
    """

    total: Tensor
    prior: Tensor
    diffusion: Tensor
    decoder: Tensor
    terms: Tensor


def ddpm_bound(
    x0: Tensor,
    sde: VPFamilySDE,
    score_fn: ScoreFn,
    num_steps: int | None = None,
    *,
    decoder: str = "gaussian",
    variance: str = "beta",
    generator: torch.Generator | None = None,
    num_levels: int = 256,
    low: float = -1.0,
    high: float = 1.0,
) -> VariationalBound:
    """The DDPM variational bound L_T + sum_{i>1} L_{i-1} + L_0 of x0 (Ho et al. 2020).

    The chain is `sde.discretize(num_steps)` (num_steps defaults to a DiscreteVPSDE's own N), so
    abar_i = gamma(t_i)^2 and step i is evaluated at t_i = i T / N. The model is any score_fn;
    its noise prediction is eps = -sigma_{t_i} score (wrap an eps network that takes step indices
    with `model_score_fn(..., time_input="index")`). One x_i ~ q(x_i | x0) is drawn per step from
    `generator`, so the result is an unbiased estimate of the bound.

    p_theta(x_{i-1} | x_i) = N(mu_theta, sigma_i^2 I) with
    mu_theta = (x_i - beta_i eps / sqrt(1 - abar_i)) / sqrt(alpha_i) (math.md section 4) and
    sigma_i^2 = beta_i ("beta") or beta_tilde_i ("beta_tilde"; then the decoder uses beta_tilde_2,
    as beta_tilde_1 = 0). decoder: "gaussian" is the density N(x0; mu_theta(x_1), sigma_1^2) for
    continuous data; "discretized" is Ho et al.'s decoder for data on the grid of
    `discretized_gaussian_log_prob` (num_levels, low, high).
    """
    check_batch(x0, "x0")
    check_callable(score_fn, "score_fn")
    check_choice("decoder", decoder, DECODERS)
    check_choice("variance", variance, VARIANCES)
    if not isinstance(check_sde(sde), VPFamilySDE):
        raise ValueError(
            f"sde must be a VP-family SDE (vp, vp_cosine, ddpm) for the DDPM bound, got {sde!r}"
        )
    if num_steps is None:
        if not isinstance(sde, DiscreteVPSDE):
            raise ValueError("num_steps is required unless the SDE is a DiscreteVPSDE")
        num_steps = sde.N
    check_int(num_steps, "num_steps", 2)
    sched = sde.discretize(int(num_steps))
    dt = dict(dtype=x0.dtype, device=x0.device)
    betas, abar, times = (a.to(**dt) for a in (sched.betas, sched.alphas_cumprod, sched.t))
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    beta_tilde = (1 - abar_prev) * betas / (1 - abar)
    model_var = betas if variance == "beta" else torch.cat([beta_tilde[1:2], beta_tilde[1:]])
    batch = x0.shape[0]
    flat = x0.reshape(batch, -1)

    prior = normal_kl(abar[-1].sqrt() * flat, 1 - abar[-1], torch.zeros_like(flat), 1.0).sum(1)
    terms = []
    for j in range(len(betas)):  # step i = j + 1
        noise = torch.randn(x0.shape, generator=generator, **dt)
        x_i = abar[j].sqrt() * x0 + (1 - abar[j]).sqrt() * noise
        eps = -(1 - abar[j]).sqrt() * score_fn(x_i, times[j].expand(batch))
        x_i, eps = x_i.reshape(batch, -1), eps.reshape(batch, -1)
        mu_theta = (x_i - betas[j] / (1 - abar[j]).sqrt() * eps) / (1 - betas[j]).sqrt()
        if j == 0:
            if decoder == "gaussian":
                log_dec = -0.5 * (
                    torch.log(2 * math.pi * model_var[0]) + (flat - mu_theta) ** 2 / model_var[0]
                )
            else:
                log_dec = discretized_gaussian_log_prob(
                    flat, mu_theta, model_var[0], num_levels, low, high
                )
            terms.append(-log_dec.sum(1))
            continue
        mu_tilde = (
            abar_prev[j].sqrt() * betas[j] * flat + (1 - betas[j]).sqrt() * (1 - abar_prev[j]) * x_i
        ) / (1 - abar[j])
        terms.append(normal_kl(mu_tilde, beta_tilde[j], mu_theta, model_var[j]).sum(1))
    terms_t = torch.stack(terms, dim=1)
    diffusion = terms_t[:, 1:].sum(1)
    decoder_nll = terms_t[:, 0]
    return VariationalBound(
        total=prior + diffusion + decoder_nll,
        prior=prior,
        diffusion=diffusion,
        decoder=decoder_nll,
        terms=terms_t,
    )
