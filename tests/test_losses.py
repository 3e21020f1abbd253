"""DSM loss: hand-computed values, the closed-form minimum with the oracle, importance sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from sde_diffusion import GaussianMixture, get_sde
from sde_diffusion.losses import LossConfig, dsm_loss, loss_weight, sample_time


def _linear_model(a: float, b: float):
    def model(x, t):
        return a * x + b * t[:, None]

    return model


@pytest.mark.parametrize("weighting", ["simple", "likelihood", "score"])
def test_loss_equals_hand_computed_value(weighting):
    # VP, beta(t) = 0.1 + 19.9 t, B(t) = 0.1 t + 9.95 t^2, written out with math only
    sde = get_sde("vp")
    x0 = [[1.0, -2.0], [0.5, 3.0]]
    noise = [[0.3, -0.1], [-1.2, 0.7]]
    ts = [0.3, 0.7]
    a, b = 0.5, -0.25
    expected = 0.0
    for x, e, t in zip(x0, noise, ts, strict=True):
        B = 0.1 * t + 9.95 * t * t
        gamma, sigma2 = math.exp(-B / 2), 1 - math.exp(-B)
        xt = [gamma * xi + math.sqrt(sigma2) * ei for xi, ei in zip(x, e, strict=True)]
        mse = sum((a * xi + b * t - ei) ** 2 for xi, ei in zip(xt, e, strict=True)) / 2
        w = {"simple": 1.0, "likelihood": (0.1 + 19.9 * t) / sigma2, "score": 1 / sigma2}[weighting]
        expected += w * mse / 2
    d = torch.float64
    loss = dsm_loss(
        _linear_model(a, b),
        sde,
        torch.tensor(x0, dtype=d),
        LossConfig(weighting=weighting),
        t=torch.tensor(ts, dtype=d),
        noise=torch.tensor(noise, dtype=d),
    )
    assert loss.dtype == d
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def _residual(gmm: GaussianMixture, sde, t: np.ndarray) -> np.ndarray:
    """min E||eps - eps*(x_t)||^2 / D for a Gaussian: (1/D) sum_i g2d_i / (g2d_i + sigma^2),
    g2d_i = gamma^2 d_i.

    eps and x_t = gamma x0 + sigma eps are jointly Gaussian with Cov(eps, x_t) = sigma I and
    Cov(x_t) = C = gamma^2 Sigma + sigma^2 I, so Var(eps | x_t) = I - sigma^2 C^{-1}, whose trace in
    Sigma's eigenbasis is sum_i gamma^2 d_i / (gamma^2 d_i + sigma^2).
    """
    d = torch.linalg.eigvalsh(gmm.covs[0]).numpy()
    gamma, sigma = (v.numpy() for v in sde.marginal(torch.as_tensor(t, dtype=torch.float64)))
    g2d = np.multiply.outer(gamma**2, d)
    return (g2d / (g2d + np.asarray(sigma)[..., None] ** 2)).mean(-1)


GAUSS = GaussianMixture.gaussian(
    [1.0, -0.5, 2.0], [[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 2.0]]
)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_oracle_eps_sits_at_closed_form_minimum_at_fixed_t(name):
    sde = get_sde(name)
    g = torch.Generator().manual_seed(0)
    n = 8000
    x0 = GAUSS.sample(n, g)
    eps_fn = GAUSS.eps_fn(sde)

    def shifted_fn(x, t):
        return eps_fn(x, t) + 0.1

    for t in (0.05, 0.6):
        tt = torch.full((n,), t, dtype=torch.float64)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        loss = dsm_loss(eps_fn, sde, x0, LossConfig(), t=tt, noise=noise).item()
        per = (eps_fn(sde.perturb(x0, tt, noise), tt) - noise).square().mean(1)
        se = per.std().item() / math.sqrt(n)
        assert abs(loss - _residual(GAUSS, sde, np.array(t))) < 4 * se
        # any other prediction eps* + delta scores min + |delta|^2 / D on average
        shifted = dsm_loss(shifted_fn, sde, x0, LossConfig(), t=tt, noise=noise)
        assert shifted.item() == pytest.approx(loss + 0.01, abs=4 * se)


@pytest.mark.parametrize(
    "cfg", [LossConfig("simple"), LossConfig("likelihood", importance_sampling=True)]
)
def test_full_dsm_loss_of_oracle_matches_quadrature(cfg):
    sde = get_sde("vp")
    # E_t[w(t) m(t)], t ~ U(t_min, T), integrated in u = log t (w ~ 1/t near 0 for likelihood)
    u = np.linspace(math.log(cfg.t_min), 0.0, 4001)
    t = np.exp(u)
    w = loss_weight(sde, torch.from_numpy(t), cfg.weighting).numpy()
    exact = integrate.simpson(w * _residual(GAUSS, sde, t) * t, x=u) / (sde.T - cfg.t_min)
    g = torch.Generator().manual_seed(1)
    losses = [
        dsm_loss(GAUSS.eps_fn(sde), sde, GAUSS.sample(4000, g), cfg, generator=g).item()
        for _ in range(8)
    ]
    se = np.std(losses) / math.sqrt(len(losses))
    assert abs(np.mean(losses) - exact) < 4 * se + 1e-3 * exact


@pytest.mark.parametrize("name", ["vp", "vp_cosine", "subvp", "ve"])
def test_likelihood_weight_is_minus_twice_log_snr_derivative(name):
    # the identity behind importance sampling: g^2 / sigma^2 = -2 d lambda / dt
    sde = get_sde(name)
    t = torch.linspace(0.05, 0.95 * sde.T, 7, dtype=torch.float64).requires_grad_(True)
    (dlam,) = torch.autograd.grad(sde.log_snr(t).sum(), t)
    w = loss_weight(sde, t.detach(), "likelihood")
    torch.testing.assert_close(w, -2 * dlam, rtol=1e-9, atol=0)


def test_importance_sampled_times_follow_likelihood_density():
    sde = get_sde("vp")
    cfg = LossConfig("likelihood", importance_sampling=True, t_min=1e-3)
    t, _ = sample_time(
        sde, cfg, 20000, torch.Generator().manual_seed(0), torch.zeros((), dtype=torch.float64)
    )
    assert float(t.min()) >= cfg.t_min and float(t.max()) <= sde.T
    # P(t <= s) = int_{t_min}^s g^2/sigma^2 / Z, integrated numerically (in log s), not via log_snr
    u = np.linspace(math.log(cfg.t_min), 0.0, 4001)
    s = np.exp(u)
    cum = integrate.cumulative_simpson(
        loss_weight(sde, torch.from_numpy(s), "likelihood").numpy() * s, x=u, initial=0
    )
    for q in (0.01, 0.1, 0.5):
        cdf = np.interp(math.log(q), u, cum / cum[-1])
        assert float((t <= q).double().mean()) == pytest.approx(cdf, abs=0.015)


@settings(max_examples=12, deadline=None)
@given(
    name=st.sampled_from(["vp", "vp_cosine", "subvp", "ve"]),
    p_mean=st.floats(-3.0, 1.0),
    p_std=st.floats(0.3, 2.0),
)
def test_lognormal_times_follow_edm_p_train(name, p_mean, p_std):
    # ln(sigma_t / gamma_t) of the drawn times against the normal truncated to the SDE's range,
    # whose CDF is written with scipy from the closed-form noise levels at the ends
    sde = get_sde(name)
    cfg = LossConfig(time="lognormal", p_mean=p_mean, p_std=p_std, t_min=1e-4)
    t, w = sample_time(
        sde, cfg, 20000, torch.Generator().manual_seed(0), torch.zeros((), dtype=torch.float64)
    )
    assert float(t.min()) >= cfg.t_min and float(t.max()) <= sde.T and bool((w == 1).all())
    gamma, sigma = sde.marginal(t)
    level = torch.log(sigma / gamma).numpy()
    ends = sde.marginal(torch.tensor([cfg.t_min, sde.T], dtype=torch.float64))
    a, b = (np.log((ends[1] / ends[0]).numpy()) - p_mean) / p_std
    law = stats.truncnorm(a, b, loc=p_mean, scale=p_std)
    assert stats.kstest(level, law.cdf).statistic < 0.015


def test_label_dropout_uses_null_label():
    seen = {}

    def model(x, t, y):
        seen["y"] = y
        return torch.zeros_like(x)

    x0 = torch.zeros(1000, 2)
    labels = torch.randint(0, 3, (1000,), generator=torch.Generator().manual_seed(0))
    dsm_loss(
        model,
        get_sde("vp"),
        x0,
        LossConfig(p_uncond=0.25),
        torch.Generator().manual_seed(1),
        labels,
        3,
    )
    dropped = seen["y"] == 3
    assert 0.2 < float(dropped.double().mean()) < 0.3
    assert torch.equal(seen["y"][~dropped], labels[~dropped])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weighting": "l2"}, "valid choices: simple, likelihood, score"),
        ({"weighting": "simple", "importance_sampling": True}, "likelihood weighting only"),
        ({"t_min": 0.0}, "t_min"),
        ({"p_uncond": 1.5}, r"\[0, 1\]"),
        ({"time": "beta"}, "valid choices: uniform, lognormal"),
        ({"time": "lognormal", "p_std": 0.0}, "p_std"),
        ({"time": "lognormal", "weighting": "likelihood"}, "time=uniform"),
    ],
)
def test_bad_loss_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)
