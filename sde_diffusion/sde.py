"""The SDE family: every formula of gamma_t, sigma_t, lambda_t, f and g lives here, once.

A linear SDE  dx = f(t) x dt + g(t) dw  has the Gaussian kernel
q(x_t | x_0) = N(gamma_t x_0, sigma_t^2 I) (math.md section 1). Each class below states its
schedule in closed form; the base class derives everything else (perturbation, prior, reverse
SDE and probability-flow drifts) from `marginal`, `f` and `g2`, so solvers and losses ask the
SDE and never re-derive it.

Times are continuous, t in [0, T]; t is a scalar or a tensor of shape (batch,) and x has shape
(batch, *dims). Every method follows the dtype and device of its inputs.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._tensor import (
    append_dims,
    as_time,
    check_choice,
    check_int,
    check_keywords,
    check_positive,
    describe,
)

ScoreFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "SDE",
    "SDE_NAMES",
    "VESDE",
    "VPSDE",
    "CosineVPSDE",
    "DiscreteSchedule",
    "DiscreteVPSDE",
    "ScoreFn",
    "SubVPSDE",
    "VPFamilySDE",
    "check_sde",
    "get_sde",
]


@dataclass(frozen=True)
class DiscreteSchedule:
    """A DDPM chain: betas_i, alphas_i = 1 - betas_i and alphas_cumprod_i for i = 1..N.

    `t[i-1]` is the continuous time of step i, i.e. t_i = i T / N.
    """

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    t: Tensor


class SDE(ABC):
    """A linear forward SDE dx = f(t) x dt + g(t) dw with closed-form Gaussian marginals."""

    #: terminal time; t runs from 0 (data) to T (noise)
    T: float = 1.0
    #: smallest time solvers integrate to (sigma_t -> 0 at t = 0 makes the score blow up)
    t_min: float = 1e-3

    # ---- the schedule: each subclass gives these in closed form -------------------------

    @abstractmethod
    def _log_gamma(self, t: Tensor) -> Tensor:
        """log gamma_t."""

    @abstractmethod
    def _sigma(self, t: Tensor) -> Tensor:
        """sigma_t, the kernel's standard deviation."""

    @abstractmethod
    def _f(self, t: Tensor) -> Tensor:
        """Drift coefficient f(t)."""

    @abstractmethod
    def _g2(self, t: Tensor) -> Tensor:
        """Squared diffusion coefficient g(t)^2."""

    @abstractmethod
    def _t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of lambda_t = log(gamma_t / sigma_t)."""

    @abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the prior N(0, prior_std^2 I) at t = T."""

    # ---- public API ----------------------------------------------------------------------

    def time(self, t: Tensor | float, x: Tensor | None = None) -> Tensor:
        """Check t against [0, T] and x's batch; return it as a tensor on x's device/dtype."""
        return as_time(t, self.T, x)

    def marginal(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(gamma_t, sigma_t) of the kernel q(x_t | x_0) = N(gamma_t x_0, sigma_t^2 I)."""
        t = self.time(t)
        return torch.exp(self._log_gamma(t)), self._sigma(t)

    def log_snr(self, t: Tensor | float) -> Tensor:
        """lambda_t = log(gamma_t / sigma_t), strictly decreasing in t (+inf at t = 0)."""
        t = self.time(t)
        return self._log_gamma(t) - torch.log(self._sigma(t))

    def t_from_log_snr(self, lam: Tensor | float) -> Tensor:
        """The time t with log_snr(t) = lam (closed form for every SDE here)."""
        lam = (
            torch.as_tensor(lam, dtype=torch.get_default_dtype())
            if not isinstance(lam, Tensor)
            else lam
        )
        if lam.device.type == "cpu" and bool(torch.isnan(lam).any()):
            raise ValueError("lambda must not be NaN")
        return self._t_from_log_snr(lam)

    def f(self, t: Tensor | float) -> Tensor:
        """The drift coefficient f(t) (the drift is f(t) x)."""
        return self._f(self.time(t))

    def g2(self, t: Tensor | float) -> Tensor:
        """g(t)^2, the squared diffusion coefficient."""
        return self._g2(self.time(t))

    def diffusion(self, t: Tensor | float) -> Tensor:
        """g(t)."""
        return torch.sqrt(self.g2(t))

    def drift(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The forward drift f(t) x."""
        t = self.time(t, x)
        return append_dims(self._f(t), x.ndim) * x

    def perturb(self, x0: Tensor, t: Tensor | float, noise: Tensor) -> Tensor:
        """x_t = gamma_t x_0 + sigma_t noise (reparametrised sample of the kernel)."""
        if noise.shape != x0.shape:
            raise ValueError(
                f"noise has shape {tuple(noise.shape)}, x0 has shape {tuple(x0.shape)}"
            )
        gamma, sigma = self.marginal(self.time(t, x0))
        return append_dims(gamma, x0.ndim) * x0 + append_dims(sigma, x0.ndim) * noise

    def transition(self, t: Tensor | float, s: Tensor | float) -> tuple[Tensor, Tensor]:
        """(a, b) of the forward transition q(x_t | x_s) = N(a x_s, b^2 I) for s <= t.

        a = gamma_t / gamma_s and b^2 = sigma_t^2 - a^2 sigma_s^2 (DDPM: a^2 = alpha_t, b^2 = beta_t).
        """
        (g_t, sig_t), (g_s, sig_s) = self.marginal(t), self.marginal(s)
        a = g_t / g_s
        return a, torch.sqrt((sig_t * sig_t - (a * sig_s) ** 2).clamp_min(0))

    def posterior(
        self, x_t: Tensor, x0: Tensor, t: Tensor | float, s: Tensor | float
    ) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of q(x_s | x_t, x_0) for s < t (math.md section 4).

        mean = (a sigma_s^2 x_t + gamma_s b^2 x_0) / sigma_t^2,  var = b^2 sigma_s^2 / sigma_t^2,
        with (a, b) the transition from s to t; for DDPM this is mu_tilde and beta_tilde.
        """
        t, s = self.time(t, x_t), self.time(s, x_t)
        a, b = self.transition(t, s)
        (_, sig_t), (g_s, sig_s) = self.marginal(t), self.marginal(s)
        var_t = sig_t * sig_t
        c_t = append_dims(a * sig_s * sig_s / var_t, x_t.ndim)
        c_0 = append_dims(g_s * b * b / var_t, x_t.ndim)
        return c_t * x_t + c_0 * x0, b * sig_s / sig_t

    def prior_sample(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw x_T from the prior N(0, prior_std^2 I)."""
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return self.prior_std() * z

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std^2 I), one value per sample (summed over all but the batch dim)."""
        s = self.prior_std()
        d = z[0].numel()
        sq = z.reshape(z.shape[0], -1).square().sum(dim=1)
        return -0.5 * d * math.log(2 * math.pi * s * s) - sq / (2 * s * s)

    def reverse_drift(self, x: Tensor, t: Tensor | float, score_fn: ScoreFn) -> Tensor:
        """Drift of the reverse-time SDE, f(t) x - g(t)^2 s(x, t) (Anderson 1982; math.md 4).

        A scalar t keeps the coefficients scalar; score_fn still receives t of shape (batch,).
        """
        t = self.time(t, x)
        score = score_fn(x, t.expand(x.shape[0]))
        return self.drift(x, t) - append_dims(self._g2(t), x.ndim) * score

    def probability_flow_drift(self, x: Tensor, t: Tensor | float, score_fn: ScoreFn) -> Tensor:
        """Velocity of the probability-flow ODE, f(t) x - g(t)^2 s(x, t) / 2 (t as in reverse_drift)."""
        t = self.time(t, x)
        score = score_fn(x, t.expand(x.shape[0]))
        return self.drift(x, t) - 0.5 * append_dims(self._g2(t), x.ndim) * score

    def probability_flow_log_snr(self, x_hat: Tensor, lam: Tensor, score_fn: ScoreFn) -> Tensor:
        """The same ODE for x_hat = x / gamma_t against lambda = log(gamma_t / sigma_t) (EDM's form,
        Karras et al. 2022 eq. 4, at noise level e^{-lambda}): since d(x / gamma)/dt = -g^2 s / (2
        gamma) and dlambda/dt = -g^2 / (2 sigma^2),

            d x_hat / d lambda = (sigma_t^2 / gamma_t) s(gamma_t x_hat, t(lambda)),

        which depends on the schedule only through the SNR: as smooth in lambda as the data's
        score, where the drift in t carries beta(t) (piecewise constant for discrete betas).
        lam: a scalar tensor; t(lambda) is clipped to [0, T], where an adaptive solver's first
        probe may ask past the end."""
        t = self.t_from_log_snr(lam).clamp(0, self.T)
        gamma, sigma = self.marginal(t)
        return (sigma * sigma / gamma) * score_fn(gamma * x_hat, t.expand(x_hat.shape[0]))

    @property
    def is_vp(self) -> bool:
        """True for schedules with gamma_t^2 + sigma_t^2 = 1 (the DDPM family)."""
        return False

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _check_T(T: float, upper: float = math.inf) -> float:
    if not (math.isfinite(T) and 0 < T < upper):
        raise ValueError(f"T must lie in (0, {upper}), got {T}")
    return float(T)


def _check_linear_betas(beta_min: float, beta_max: float) -> None:
    check_positive(beta_min, "beta_min")
    if not (math.isfinite(beta_max) and beta_max >= beta_min):
        raise ValueError(f"beta_max must be finite and >= beta_min = {beta_min}, got {beta_max}")


class _LinearBeta:
    """beta(t) = beta_min + t (beta_max - beta_min), its integral B(t) and gamma_t = exp(-B/2),
    shared by VP and sub-VP."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0):
        _check_linear_betas(beta_min, beta_max)
        self.beta_min, self.beta_max, self.T = float(beta_min), float(beta_max), _check_T(T)

    def _log_gamma(self, t: Tensor) -> Tensor:
        return -0.5 * self._B(t)

    def _B(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def _beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _t_from_B(self, B: Tensor) -> Tensor:
        # root of (d/2) t^2 + beta_min t - B = 0, written without cancellation (also for d = 0)
        d = self.beta_max - self.beta_min
        return 2 * B / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * B))


class VPFamilySDE(SDE):
    """VP SDEs: f = -beta(t)/2, g^2 = beta(t), gamma_t^2 + sigma_t^2 = 1.

    Subclasses give log gamma_t (= -B(t)/2), beta(t) and t from log gamma; the rest follows.
    """

    @abstractmethod
    def _beta(self, t: Tensor) -> Tensor:
        """beta(t) = -2 d/dt log gamma_t."""

    @abstractmethod
    def _t_from_log_gamma(self, log_gamma: Tensor) -> Tensor:
        """Inverse of t -> log gamma_t."""

    def _sigma(self, t: Tensor) -> Tensor:
        # sigma^2 = 1 - gamma^2 = -expm1(2 log gamma): exact near t = 0
        return torch.sqrt(-torch.expm1(2 * self._log_gamma(t)))

    def _f(self, t: Tensor) -> Tensor:
        return -0.5 * self._beta(t)

    def _g2(self, t: Tensor) -> Tensor:
        return self._beta(t)

    def _t_from_log_snr(self, lam: Tensor) -> Tensor:
        # gamma^2 = sigmoid(2 lambda) when gamma^2 + sigma^2 = 1
        return self._t_from_log_gamma(0.5 * torch.nn.functional.logsigmoid(2 * lam))

    def prior_std(self) -> float:
        return 1.0

    @property
    def is_vp(self) -> bool:
        return True

    def discretize(self, N: int) -> DiscreteSchedule:
        """DDPM betas on the grid t_i = i T / N with alphas_cumprod_i = gamma(t_i)^2 exactly.

        beta_i = 1 - abar(t_i) / abar(t_{i-1}); for a DiscreteVPSDE with N steps this returns its
        own betas, so DDPM is exactly the discrete special case of the continuous model.
        """
        N = check_int(N, "N")
        t = torch.arange(0, N + 1, dtype=torch.float64) * (self.T / N)
        log_abar = 2 * self._log_gamma(t)
        betas = -torch.expm1(log_abar[1:] - log_abar[:-1])
        return DiscreteSchedule(
            betas=betas, alphas=1 - betas, alphas_cumprod=torch.exp(log_abar[1:]), t=t[1:]
        )


class VPSDE(_LinearBeta, VPFamilySDE):
    """Variance-preserving SDE with a linear beta(t) (Song et al. 2021), the limit of DDPM."""

    t_min = 1e-3

    def _t_from_log_gamma(self, log_gamma: Tensor) -> Tensor:
        return self._t_from_B(-2 * log_gamma)


class CosineVPSDE(VPFamilySDE):
    """VP SDE with the cosine schedule of Nichol & Dhariwal (2021).

    abar(t) = cos^2(phi(t)) / cos^2(phi(0)),  phi(t) = (t + s)/(1 + s) pi/2.  beta(t) diverges at
    t = 1, so T must stay below 1; the default T = 0.9946 is DPM-Solver's choice for this schedule
    (it keeps beta(T) finite and lambda_T near that of the linear VP).
    """

    t_min = 1e-3

    def __init__(self, s: float = 0.008, T: float = 0.9946):
        check_positive(s, "s")
        self.s, self.T = float(s), _check_T(T, upper=1.0)
        self._cos_phi0 = math.cos(self.s / (1 + self.s) * math.pi / 2)

    def _phi(self, t: Tensor) -> Tensor:
        return (t + self.s) / (1 + self.s) * (math.pi / 2)

    def _half_sum_and_difference(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """((phi + phi0) / 2, (phi - phi0) / 2), the difference formed exactly from t."""
        c = math.pi / (4 * (1 + self.s))
        return (t + 2 * self.s) * c, t * c

    def _log_gamma(self, t: Tensor) -> Tensor:
        # cos(phi) - cos(phi0) = -2 sin((phi + phi0)/2) sin((phi - phi0)/2): exact as t -> 0
        half_sum, half_diff = self._half_sum_and_difference(t)
        return torch.log1p(-2 * torch.sin(half_sum) * torch.sin(half_diff) / self._cos_phi0)

    def _sigma(self, t: Tensor) -> Tensor:
        # 1 - cos^2(phi)/cos^2(phi0) = sin(phi - phi0) sin(phi + phi0) / cos^2(phi0)
        half_sum, half_diff = self._half_sum_and_difference(t)
        return torch.sqrt(torch.sin(2 * half_diff) * torch.sin(2 * half_sum)) / self._cos_phi0

    def _beta(self, t: Tensor) -> Tensor:
        return math.pi / (1 + self.s) * torch.tan(self._phi(t))

    def _t_from_log_gamma(self, log_gamma: Tensor) -> Tensor:
        phi = torch.arccos(torch.exp(log_gamma) * self._cos_phi0)
        return phi * (2 * (1 + self.s) / math.pi) - self.s


class DiscreteVPSDE(VPFamilySDE):
    """A VP SDE defined by a list of DDPM betas (any checkpoint's schedule).

    Step i = 1..N sits at t_i = i T / N; log abar is interpolated piecewise-linearly in t between
    (0, 0) and the points (t_i, log abar_i), so beta(t) is piecewise constant and the chain's
    abar_i are reproduced exactly at the grid points.
    """

    def __init__(self, betas: Sequence[float] | Tensor, T: float = 1.0):
        b = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if b.numel() < 1:
            raise ValueError("betas must contain at least one value")
        if not bool(torch.isfinite(b).all()) or bool((b <= 0).any()) or bool((b >= 1).any()):
            raise ValueError(
                f"betas must lie in the open interval (0, 1), got range [{b.min().item()}, {b.max().item()}]"
            )
        self.T = _check_T(T)
        self.betas = b
        self.N = b.numel()
        self.t_min = self.T / self.N
        self._log_abar = torch.cat([b.new_zeros(1), torch.cumsum(torch.log1p(-b), 0)])
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    @classmethod
    def ddpm(cls, N: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteVPSDE:
        """DDPM's linear schedule (Ho et al. 2020): betas linear from 1e-4 to 0.02 over N steps."""
        return cls(torch.linspace(beta_start, beta_end, check_int(N, "N"), dtype=torch.float64))

    @classmethod
    def scaled_linear(
        cls, N: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> DiscreteVPSDE:
        """Latent diffusion's schedule (Rombach et al. 2022, Stable Diffusion; diffusers'
        "scaled_linear"): sqrt(beta) linear from sqrt(beta_start) to sqrt(beta_end) over N steps.
        Its gamma_T = 0.068 (DDPM's: 0.0064) leaves the N(0, I) prior measurably off the true
        marginal at T."""
        root = torch.linspace(
            beta_start**0.5, beta_end**0.5, check_int(N, "N"), dtype=torch.float64
        )
        return cls(root * root)

    def _tables(self, t: Tensor) -> tuple[Tensor, Tensor]:
        key = (t.device, t.dtype)
        if key not in self._cache:
            rate = -torch.log1p(-self.betas) * (self.N / self.T)  # beta(t) on each interval
            self._cache[key] = (self._log_abar.to(t.device, t.dtype), rate.to(t.device, t.dtype))
        return self._cache[key]

    def _interval(self, t: Tensor) -> Tensor:
        return torch.clamp(torch.floor(t * (self.N / self.T)), 0, self.N - 1).long()

    def _log_gamma(self, t: Tensor) -> Tensor:
        log_abar, rate = self._tables(t)
        i = self._interval(t)
        return 0.5 * (log_abar[i] - rate[i] * (t - i.to(t.dtype) * (self.T / self.N)))

    def _beta(self, t: Tensor) -> Tensor:
        _, rate = self._tables(t)
        # beta(t) is piecewise constant; at a knot t_i take the interval to its left (i-1, i]
        i = torch.clamp(torch.ceil(t * (self.N / self.T)) - 1, 0, self.N - 1).long()
        return rate[i]

    def _t_from_log_gamma(self, log_gamma: Tensor) -> Tensor:
        log_abar, rate = self._tables(log_gamma)
        target = 2 * log_gamma
        # log_abar is decreasing: search the negated (increasing) table
        i = torch.searchsorted(-log_abar, -target.contiguous(), right=True) - 1
        i = torch.clamp(i, 0, self.N - 1)
        return i.to(target.dtype) * (self.T / self.N) + (log_abar[i] - target) / rate[i]


class SubVPSDE(_LinearBeta, SDE):
    """The sub-VP SDE (Song et al. 2021): f = -beta/2, g^2 = beta (1 - exp(-2 B(t))).

    gamma_t = exp(-B/2) as for VP, but sigma_t = 1 - exp(-B(t)) (sigma, not sigma^2).
    """

    t_min = 1e-3

    def _sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self._B(t))

    def _f(self, t: Tensor) -> Tensor:
        return -0.5 * self._beta(t)

    def _g2(self, t: Tensor) -> Tensor:
        return self._beta(t) * -torch.expm1(-2 * self._B(t))

    def _t_from_log_snr(self, lam: Tensor) -> Tensor:
        # u = exp(-B/2) solves e^lam u^2 + u - e^lam = 0; the positive root, cancellation-free
        u = 2 * torch.exp(lam) / (1 + torch.sqrt(1 + 4 * torch.exp(2 * lam)))
        return self._t_from_B(-2 * torch.log(u))

    def prior_std(self) -> float:
        return 1.0


class VESDE(SDE):
    """Variance-exploding SDE (SMLD / NCSN): sigma(t) = sigma_min (sigma_max / sigma_min)^t.

    f = 0, g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min)); the kernel variance is
    sigma(t)^2 - sigma_min^2 exactly (so sigma_0 = 0), and the prior is N(0, sigma_max^2 I).
    """

    t_min = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0):
        check_positive(sigma_min, "sigma_min")
        if not (math.isfinite(sigma_max) and sigma_max > sigma_min):
            raise ValueError(
                f"sigma_max must be finite and > sigma_min = {sigma_min}, got {sigma_max}"
            )
        self.sigma_min, self.sigma_max, self.T = float(sigma_min), float(sigma_max), _check_T(T)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _log_gamma(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.sqrt(torch.expm1(2 * self._log_ratio * t / self.T))

    def _f(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _g2(self, t: Tensor) -> Tensor:
        # d/dt sigma(t)^2 with sigma(t) = sigma_min r^(t/T)
        return (
            (2 * self._log_ratio / self.T)
            * (self.sigma_min**2)
            * torch.exp(2 * self._log_ratio * t / self.T)
        )

    def _t_from_log_snr(self, lam: Tensor) -> Tensor:
        return torch.log1p(torch.exp(-2 * lam) / self.sigma_min**2) * (
            self.T / (2 * self._log_ratio)
        )

    def prior_std(self) -> float:
        return self.sigma_max


SDE_NAMES: dict[str, type[SDE]] = {
    "vp": VPSDE,
    "vp_cosine": CosineVPSDE,
    "subvp": SubVPSDE,
    "ve": VESDE,
    "ddpm": DiscreteVPSDE,
}


#: the named beta schedules of get_sde("ddpm", schedule=...)
DDPM_SCHEDULES = {"linear": DiscreteVPSDE.ddpm, "scaled_linear": DiscreteVPSDE.scaled_linear}


def get_sde(name: str, **kwargs: object) -> SDE:
    """Build an SDE by name: one of vp, vp_cosine, subvp, ve, ddpm (discrete betas: given as
    `betas`, or a named `schedule` of DDPM_SCHEDULES, "linear" by default, and its N,
    beta_start, beta_end)."""
    check_choice("SDE", name, SDE_NAMES)
    build: Callable[..., SDE] = SDE_NAMES[name]
    if name == "ddpm" and "betas" not in kwargs:
        schedule = kwargs.pop("schedule", "linear")
        check_choice("ddpm schedule", schedule, DDPM_SCHEDULES)
        build = DDPM_SCHEDULES[schedule]  # type: ignore[index]
    check_keywords(f"get_sde({name!r})", kwargs, list(inspect.signature(build).parameters))
    return build(**kwargs)


def check_sde(sde: object, name: str = "sde") -> SDE:
    """Refuse anything but an SDE instance, naming the classes and `get_sde`'s names."""
    if not isinstance(sde, SDE):
        classes = ", ".join(c.__name__ for c in SDE_NAMES.values())
        raise TypeError(
            f"{name} must be an SDE instance ({classes}, or get_sde(name) with name one of "
            f"{', '.join(SDE_NAMES)}), got {describe(sde)}"
        )
    return sde
