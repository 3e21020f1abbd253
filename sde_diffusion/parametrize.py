"""Network parametrisations (math.md section 2) and adapters from any model to `score_fn(x, t)`.

With x = gamma x0 + sigma eps, a network may predict eps, x0, v = gamma eps - sigma x0, or the
score s = -eps / sigma. All conversions go through eps:

    eps = (x - gamma x0) / sigma
    eps = (gamma v + sigma x) / (gamma^2 + sigma^2)      (reduces to sigma x + gamma v for VP)
    eps = -sigma s

`model_score_fn` wraps a model trained elsewhere, whatever it predicts and whatever time input it
takes (continuous t, a DDPM timestep index, or an EDM / k-diffusion noise level sigma), into the
one contract every solver accepts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._tensor import append_dims, check_callable, check_choice, check_int, describe
from .sde import SDE, DiscreteVPSDE, ScoreFn, check_sde

PREDICTIONS = ("eps", "x0", "v", "score")
TIME_INPUTS = ("t", "index", "sigma")

__all__ = [
    "PREDICTIONS",
    "TIME_INPUTS",
    "eps_to_prediction",
    "model_score_fn",
    "prediction_to_eps",
    "sde_from_scheduler_config",
    "tweedie_x0",
]


def _check_kind(kind: str) -> None:
    check_choice("prediction", kind, PREDICTIONS)


def prediction_to_eps(pred: Tensor, kind: str, x: Tensor, gamma: Tensor, sigma: Tensor) -> Tensor:
    """Convert a network output of the given kind (eps, x0, v or score) at x_t to eps."""
    _check_kind(kind)
    g, s = append_dims(gamma, x.ndim), append_dims(sigma, x.ndim)
    if kind == "eps":
        return pred
    if kind == "x0":
        return (x - g * pred) / s
    if kind == "v":
        return (g * pred + s * x) / (g * g + s * s)
    return -s * pred


def eps_to_prediction(eps: Tensor, kind: str, x: Tensor, gamma: Tensor, sigma: Tensor) -> Tensor:
    """Convert eps at x_t to the given kind (eps, x0, v or score); inverse of prediction_to_eps."""
    _check_kind(kind)
    g, s = append_dims(gamma, x.ndim), append_dims(sigma, x.ndim)
    if kind == "eps":
        return eps
    x0 = (x - s * eps) / g
    if kind == "x0":
        return x0
    if kind == "v":
        return g * eps - s * x0
    return -eps / s


def tweedie_x0(x: Tensor, t: Tensor, score: Tensor, sde: SDE) -> Tensor:
    """E[x_0 | x_t] = (x_t + sigma_t^2 grad log p_t(x_t)) / gamma_t (Tweedie's formula)."""
    gamma, sigma = check_sde(sde).marginal(sde.time(t, x))
    return (x + append_dims(sigma * sigma, x.ndim) * score) / append_dims(gamma, x.ndim)


def model_score_fn(
    model: Callable[..., Tensor],
    sde: SDE,
    prediction: str = "eps",
    time_input: str = "t",
    num_train_timesteps: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> ScoreFn:
    """Wrap `model` into score_fn(x, t) for continuous t in [0, T].

    prediction: what the model outputs, one of eps, x0, v, score.
    time_input: what it takes as its second argument:
      - "t": the continuous time itself;
      - "index": a DDPM timestep index 0..N-1, where index i-1 is step i at t_i = i T / N
        (N = num_train_timesteps, or the SDE's own N for a DiscreteVPSDE); fractional indices
        are passed through, so grids that fall on t_i give exact integers;
      - "sigma": an EDM / k-diffusion denoiser D(x / gamma, sigma / gamma) in the variance-
        exploding coordinates x / gamma, where the noise level is sigma_t / gamma_t.
    model_kwargs are passed on every call (class labels, for instance).
    """
    check_callable(model, "model")
    check_sde(sde)
    _check_kind(prediction)
    check_choice("time_input", time_input, TIME_INPUTS)
    if time_input == "index":
        if num_train_timesteps is None:
            if not isinstance(sde, DiscreteVPSDE):
                raise ValueError(
                    "time_input='index' needs num_train_timesteps unless the SDE is a DiscreteVPSDE"
                )
            num_train_timesteps = sde.N
        steps_per_unit = check_int(num_train_timesteps, "num_train_timesteps") / sde.T
    kwargs = dict(model_kwargs or {})

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        t = sde.time(t, x)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        gamma, sigma = sde.marginal(t)
        if time_input == "sigma":
            x_in, g_in, s_in = x / append_dims(gamma, x.ndim), torch.ones_like(gamma), sigma / gamma
            pred = model(x_in, s_in, **kwargs)
            eps = prediction_to_eps(pred, prediction, x_in, g_in, s_in)
        else:
            c = t * steps_per_unit - 1 if time_input == "index" else t
            eps = prediction_to_eps(model(x, c, **kwargs), prediction, x, gamma, sigma)
        return -eps / append_dims(sigma, x.ndim)

    return score_fn


def _cosine_betas(N: int, max_beta: float = 0.999, s: float = 0.008) -> Tensor:
    def abar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - abar((i + 1) / N) / abar(i / N), max_beta) for i in range(N)], dtype=torch.float64
    )


def sde_from_scheduler_config(config: Mapping[str, Any]) -> DiscreteVPSDE:
    """Build the DiscreteVPSDE of a diffusers-style scheduler config.

    Reads num_train_timesteps and either trained_betas or beta_schedule (linear, scaled_linear,
    squaredcos_cap_v2) with beta_start / beta_end, using diffusers' definitions.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (a scheduler config), got {describe(config)}")
    N = check_int(config.get("num_train_timesteps", 1000), "num_train_timesteps")
    if config.get("trained_betas") is not None:
        return DiscreteVPSDE(config["trained_betas"])
    schedule = config.get("beta_schedule", "linear")
    check_choice("beta_schedule", schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    if schedule == "linear":
        betas = torch.linspace(start, end, N, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, N, dtype=torch.float64) ** 2
    else:
        betas = _cosine_betas(N)
    return DiscreteVPSDE(betas)
