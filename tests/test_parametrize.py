"""eps / x0 / v / score conversions (math.md section 2) and the model -> score_fn adapters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sde_diffusion import (
    VPSDE,
    DiscreteVPSDE,
    GaussianMixture,
    eps_to_prediction,
    get_sde,
    model_score_fn,
    prediction_to_eps,
    tweedie_x0,
)
from sde_diffusion.parametrize import PREDICTIONS

F64 = torch.float64


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(["vp", "vp_cosine", "subvp", "ve", "ddpm"]),
    u=st.floats(0.01, 1.0),
    kind=st.sampled_from(PREDICTIONS),
    seed=st.integers(0, 2**16),
)
def test_round_trips_through_eps(name, u, kind, seed):
    sde = get_sde(name)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(5, 3, generator=g, dtype=F64)
    eps = torch.randn(5, 3, generator=g, dtype=F64)
    t = torch.full((5,), u * sde.T, dtype=F64)
    gamma, sigma = sde.marginal(t)
    x = sde.perturb(x0, t, eps)
    pred = eps_to_prediction(eps, kind, x, gamma, sigma)
    torch.testing.assert_close(prediction_to_eps(pred, kind, x, gamma, sigma), eps)


def test_predictions_match_their_definitions():
    sde = VPSDE()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    x0, eps = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    gamma, sigma = sde.marginal(t)
    x = sde.perturb(x0, t, eps)
    g, s = gamma[:, None], sigma[:, None]
    torch.testing.assert_close(eps_to_prediction(eps, "x0", x, gamma, sigma), x0)
    torch.testing.assert_close(eps_to_prediction(eps, "v", x, gamma, sigma), g * eps - s * x0)
    torch.testing.assert_close(eps_to_prediction(eps, "score", x, gamma, sigma), -eps / s)
    # for VP (gamma^2 + sigma^2 = 1) the v-parametrisation's textbook inverse eps = sigma x + gamma v
    v = g * eps - s * x0
    torch.testing.assert_close(s * x + g * v, eps)


def test_tweedie_recovers_the_posterior_mean_of_a_gaussian():
    """For x0 ~ N(m, c) in 1-D, E[x0 | x_t] = m + gamma c (x - gamma m) / (gamma^2 c + sigma^2)."""
    sde = VPSDE()
    gm = GaussianMixture.gaussian([0.8], [[0.3]])
    t = torch.full((4,), 0.35, dtype=F64)
    x = torch.linspace(-2, 2, 4, dtype=F64)[:, None]
    gamma, sigma = sde.marginal(t[0])
    expected = 0.8 + gamma * 0.3 * (x - gamma * 0.8) / (gamma**2 * 0.3 + sigma**2)
    torch.testing.assert_close(tweedie_x0(x, t, gm.score(x, t, sde), sde), expected)


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_model_score_fn_with_the_oracle_in_every_parametrisation(kind):
    sde = VPSDE()
    gm = GaussianMixture.ring(k=4, radius=2.0)
    eps_fn = gm.eps_fn(sde)

    def model(x, t):
        gamma, sigma = sde.marginal(t)
        return eps_to_prediction(eps_fn(x, t), kind, x, gamma, sigma)

    x = torch.randn(6, 2, dtype=F64)
    t = torch.linspace(0.05, 0.95, 6, dtype=F64)
    torch.testing.assert_close(model_score_fn(model, sde, kind)(x, t), gm.score(x, t, sde))


def test_index_time_input_maps_t_i_to_index_i_minus_one():
    sde = DiscreteVPSDE.ddpm(N=1000)
    seen = []

    def model(x, k):
        seen.append(k.clone())
        return torch.zeros_like(x)

    fn = model_score_fn(model, sde, "eps", time_input="index")
    fn(torch.zeros(3, 2, dtype=F64), torch.tensor([1.0, 0.5, 0.001], dtype=F64))
    torch.testing.assert_close(seen[0], torch.tensor([999.0, 499.0, 0.0], dtype=F64))


def test_sigma_time_input_is_an_edm_denoiser_in_ve_coordinates():
    """D(x/gamma, sigma/gamma) = E[x0 | x] for data seen through the VE noise level sigma/gamma."""
    sde = VPSDE()
    gm = GaussianMixture.ring(k=3, radius=1.5)
    ve_like = get_sde("ve", sigma_min=1e-3, sigma_max=200.0)

    def denoiser(x_ve, s):
        # the exact x0-prediction for x_ve = x0 + s z: find the VE time with that noise level
        t_ve = ve_like.t_from_log_snr(-torch.log(s))
        return tweedie_x0(x_ve, t_ve, gm.score(x_ve, t_ve, ve_like), ve_like)

    x = torch.randn(5, 2, dtype=F64)
    t = torch.linspace(0.1, 0.9, 5, dtype=F64)
    fn = model_score_fn(denoiser, sde, "x0", time_input="sigma")
    torch.testing.assert_close(fn(x, t), gm.score(x, t, sde))


def test_adapter_bad_input():
    sde = VPSDE()
    with pytest.raises(ValueError, match="valid choices: eps, x0, v, score"):
        model_score_fn(lambda x, t: x, sde, "epsilon")
    with pytest.raises(ValueError, match="valid choices: t, index, sigma"):
        model_score_fn(lambda x, t: x, sde, "eps", time_input="step")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        model_score_fn(lambda x, t: x, sde, "eps", time_input="index")
