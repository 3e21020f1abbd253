"""What a trained network predicts: eps, x0, v, or EDM's preconditioned denoiser (Karras et al.
2022, "Elucidating the design space of diffusion-based generative models", section 5, App. B.6).

Every parametrisation is one denoiser D(x, t) ~ E[x_0 | x_t = x] built from a raw network F:

    D(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t))

with x = gamma_t x_0 + sigma_t eps (the SDE's marginal). The four kinds, in x's coordinates:

    eps   c_skip = 1/gamma            c_out = -sigma/gamma          c_in = 1   c_noise = t
    x0    c_skip = 0                  c_out = 1                     c_in = 1   c_noise = t
    v     c_skip = gamma/(g2 + s2)    c_out = -sigma/(g2 + s2)      c_in = 1   c_noise = t
    edm   c_skip = sd^2 gamma / V     c_out = sigma sd / sqrt(V)    c_in = 1/sqrt(V)
          c_noise = log(sigma/gamma)/4 = -lambda_t / 4

(g2 = gamma^2, s2 = sigma^2, sd = sigma_data, V = sigma^2 + gamma^2 sd^2 the variance of x_t when
the data has second moment sd^2.) The edm row is EDM's Table 1 applied in the scaled coordinates
x / gamma = x_0 + s eps, whose noise level is s = sigma / gamma: there c_skip = sd^2/(s^2 + sd^2),
c_out = s sd / sqrt(s^2 + sd^2), c_in = 1/sqrt(s^2 + sd^2), and going back to x divides c_skip and
c_in by gamma. For VE (gamma = 1) it is the paper's formula verbatim.

Training regresses F on its target F* = (x_0 - c_skip x_t) / c_out = a x_0 + b eps:

    eps  F* = eps        x0  F* = x_0        v  F* = gamma eps - sigma x_0
    edm  F* = (sigma x_0 / sd - gamma sd eps) / sqrt(V)

With EDM's weighting lambda = 1/c_out^2 the loss lambda ||D - x_0||^2 is ||F - F*||^2, and F* has
unit variance at every noise level (Var = (sigma^2 + gamma^2 sd^2) / V = 1): no noise level
dominates the loss, and the network's input c_in x and output target are both unit-scale. At high
noise c_skip -> 0 and c_out -> sd, so D is sd F: bounded, where the eps-network must reproduce
x / sigma (an identity it has to extrapolate for prior-tail starts).

Every kind is turned back into eps = eps_x x + eps_f F (eps_x = (1 - gamma c_skip)/sigma,
eps_f = -gamma c_out/sigma, both in closed form below, free of cancellation), so a `Preconditioned`
module is an eps-model like any other: `model_score_fn(module, sde, "eps")`, classifier-free
guidance, inpainting and likelihood take it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._tensor import append_dims, check_choice
from .sde import SDE

PARAMS = ("eps", "x0", "v", "edm")
#: the parametrisation new models are trained in (measured in the README's training section)
DEFAULT_PARAM = "edm"

__all__ = [
    "DEFAULT_PARAM",
    "PARAMS",
    "Coefficients",
    "Preconditioned",
    "coefficients",
    "estimate_sigma_data",
]


@dataclass(frozen=True)
class Coefficients:
    """Per-sample coefficients (shape (batch,)) of one parametrisation at times t.

    D = c_skip x + c_out F(c_in x, c_noise); training target F* = target_x0 x_0 + target_eps eps;
    eps = eps_x x + eps_f F (so ||eps_theta - eps||^2 = eps_f^2 ||F - F*||^2).
    """

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor
    target_x0: Tensor
    target_eps: Tensor
    eps_x: Tensor
    eps_f: Tensor


def coefficients(sde: SDE, t: Tensor, param: str, sigma_data: float = 1.0) -> Coefficients:
    """The closed forms of the module docstring at times t (shape (batch,)), in t's dtype."""
    check_choice("model.param", param, PARAMS)
    gamma, sigma = sde.marginal(t)
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    if param == "eps":
        return Coefficients(1 / gamma, -sigma / gamma, one, t, zero, one, zero, one)
    if param == "x0":
        return Coefficients(zero, one, one, t, one, zero, 1 / sigma, -gamma / sigma)
    if param == "v":
        norm = gamma * gamma + sigma * sigma  # 1 for VP; v = gamma eps - sigma x_0 in general
        return Coefficients(
            gamma / norm, -sigma / norm, one, t, -sigma, gamma, sigma / norm, gamma / norm
        )
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
    sd = sigma_data
    var = sigma * sigma + (gamma * sd) ** 2  # V: the variance of x_t for data of second moment sd^2
    root = torch.sqrt(var)
    return Coefficients(
        c_skip=sd * sd * gamma / var,
        c_out=sigma * sd / root,
        c_in=1 / root,
        c_noise=-sde.log_snr(t) / 4,  # EDM's log(s)/4 with s = sigma/gamma
        target_x0=sigma / (sd * root),
        target_eps=-gamma * sd / root,
        eps_x=sigma / var,  # (1 - gamma c_skip)/sigma with 1 - gamma c_skip = sigma^2 / V
        eps_f=-gamma * sd / root,
    )


def estimate_sigma_data(x: Tensor) -> float:
    """sigma_data for EDM: the data's root mean square sqrt(E[x^2]) over samples and dimensions.

    The second moment about zero, not the variance: the target F* has unit variance when
    E[x_0^2] = sd^2, since the denoiser shrinks towards 0 at high noise.
    """
    return float(x.detach().double().square().mean().sqrt())


class Preconditioned(nn.Module):
    """A raw network F(x_in, c_noise[, y]) in one parametrisation, as an eps-model (x, t[, y]).

    net: the network (any module taking (input, time-like, **kwargs)); param: eps, x0, v or edm;
    sigma_data: the data's scale (edm only; see estimate_sigma_data). For param = eps the module
    is the network itself: forward(x, t) = net(x, t).
    """

    def __init__(
        self, net: nn.Module, sde: SDE, param: str = DEFAULT_PARAM, sigma_data: float = 1.0
    ):
        super().__init__()
        check_choice("model.param", param, PARAMS)
        self.net, self.sde, self.param, self.sigma_data = net, sde, param, float(sigma_data)

    def coefficients(self, t: Tensor) -> Coefficients:
        """This parametrisation's coefficients at times t (shape (batch,))."""
        return coefficients(self.sde, t, self.param, self.sigma_data)

    def _time(self, x: Tensor, t: Tensor) -> Tensor:
        t = self.sde.time(t, x)
        return t.expand(x.shape[0]) if t.ndim == 0 else t

    def raw(
        self, x: Tensor, t: Tensor, *args: Any, coeffs: Coefficients | None = None, **kwargs: Any
    ) -> Tensor:
        """F(c_in x, c_noise, *args, **kwargs) (labels, for instance): the network's own output,
        the quantity the loss regresses. coeffs: this t's coefficients, if already computed."""
        c = coeffs or self.coefficients(self._time(x, t))
        if self.param == "eps":
            return self.net(x, c.c_noise, *args, **kwargs)  # exactly the old eps-networks
        return self.net(append_dims(c.c_in, x.ndim) * x, c.c_noise, *args, **kwargs)

    def target(
        self, x0: Tensor, noise: Tensor, t: Tensor, coeffs: Coefficients | None = None
    ) -> Tensor:
        """F*, what F should output at x_t = gamma_t x0 + sigma_t noise: a x0 + b noise."""
        c = coeffs or self.coefficients(self._time(x0, t))
        return append_dims(c.target_x0, x0.ndim) * x0 + append_dims(c.target_eps, x0.ndim) * noise

    def denoise(self, x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """D(x, t) = c_skip x + c_out F, the network's estimate of E[x_0 | x_t = x]."""
        c = self.coefficients(self._time(x, t))
        f = self.raw(x, t, *args, coeffs=c, **kwargs).to(x.dtype)
        return append_dims(c.c_skip, x.ndim) * x + append_dims(c.c_out, x.ndim) * f

    def forward(self, x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """eps_theta(x, t) = eps_x x + eps_f F; score = -eps/sigma_t = (gamma D - x)/sigma^2."""
        c = self.coefficients(self._time(x, t))
        f = self.raw(x, t, *args, coeffs=c, **kwargs)
        if self.param == "eps":
            return f
        f = f.to(x.dtype)
        return append_dims(c.eps_x, x.ndim) * x + append_dims(c.eps_f, x.ndim) * f
