"""The Gaussian-mixture oracle (math.md section 7) against autograd, quadrature, scipy and
Monte Carlo: every later test trusts it, so it is checked from several independent sides."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad
from scipy.stats import multivariate_normal

from sde_diffusion import VPSDE, GaussianMixture, get_sde

F64 = torch.float64


def _mixture(seed: int = 0, k: int = 3, dim: int = 2) -> GaussianMixture:
    return GaussianMixture.random(k, dim, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(["vp", "vp_cosine", "subvp", "ve", "ddpm"]),
    u=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_score_is_the_gradient_of_log_prob(name, u, seed):
    sde = get_sde(name)
    gm = _mixture(seed, k=3, dim=3)
    x = gm.sample_t(6, u * sde.T, sde, torch.Generator().manual_seed(seed)).requires_grad_(True)
    t = torch.full((6,), u * sde.T, dtype=F64)
    (grad,) = torch.autograd.grad(gm.log_prob(x, t, sde).sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), t, sde), grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.9])
def test_log_prob_matches_scipy(t):
    sde = VPSDE()
    gm = _mixture(3, k=4, dim=3)
    x = torch.randn(10, 3, dtype=F64) * 2
    gamma, sigma = (v.item() for v in sde.marginal(torch.tensor(t, dtype=F64)))
    dens = sum(
        w * multivariate_normal(gamma * m, gamma**2 * c + sigma**2 * np.eye(3)).pdf(x.numpy())
        for w, m, c in zip(gm.weights.numpy(), gm.means.numpy(), gm.covs.numpy(), strict=True)
    )
    np.testing.assert_allclose(gm.log_prob(x, t, sde).numpy(), np.log(dens), rtol=1e-10)


def test_density_integrates_to_one_in_1d_and_2d():
    sde = VPSDE()
    one = GaussianMixture([0.3, 0.7], [[-1.0], [2.0]], torch.tensor([[[0.2]], [[0.5]]]))
    for t in (0.0, 0.5):

        def p1(x, t=t):
            return gm_pdf(one, [x], t, sde)

        assert quad(p1, -15, 15, limit=200)[0] == pytest.approx(1.0, abs=1e-8)
    # 2-D: the trapezoid rule on a fine grid is spectrally accurate for well-resolved Gaussians
    two = _mixture(5, k=3, dim=2)
    u = torch.linspace(-20, 20, 801, dtype=F64)
    grid = torch.cartesian_prod(u, u)
    for t in (0.05, 0.7):
        dens = two.log_prob(grid, t, sde).exp().reshape(len(u), len(u))
        mass = torch.trapezoid(torch.trapezoid(dens, u, dim=1), u).item()
        assert mass == pytest.approx(1.0, abs=1e-6)


def gm_pdf(gm: GaussianMixture, point: list[float], t: float, sde) -> float:
    x = torch.tensor([point], dtype=F64)
    return gm.log_prob(x, t, sde).exp().item()


def test_responsibilities_are_bayes_rule():
    sde = VPSDE()
    gm = _mixture(7, k=3, dim=2)
    x = torch.randn(8, 2, dtype=F64) * 3
    t = 0.4
    r = gm.responsibilities(x, t, sde)
    torch.testing.assert_close(r.sum(1), torch.ones(8, dtype=F64))
    gamma, sigma = (v.item() for v in sde.marginal(torch.tensor(t, dtype=F64)))
    joint = np.stack(
        [
            w * multivariate_normal(gamma * m, gamma**2 * c + sigma**2 * np.eye(2)).pdf(x.numpy())
            for w, m, c in zip(gm.weights.numpy(), gm.means.numpy(), gm.covs.numpy(), strict=True)
        ],
        1,
    )
    np.testing.assert_allclose(r.numpy(), joint / joint.sum(1, keepdims=True), rtol=1e-9)


def test_data_law_methods_are_p0_by_scipy():
    """data_log_prob is log p_0 and component_of the argmax of w_k N(x; mu_k, Sigma_k), for
    samples near the boundaries between components as well as inside them."""
    gm = _mixture(11, k=4, dim=3)
    x = torch.randn(64, 3, dtype=F64) * 3
    comps = [
        w * multivariate_normal(m, c).pdf(x.numpy())
        for w, m, c in zip(gm.weights.numpy(), gm.means.numpy(), gm.covs.numpy(), strict=True)
    ]
    joint = np.stack(comps, 1)
    np.testing.assert_allclose(gm.data_log_prob(x).numpy(), np.log(joint.sum(1)), rtol=1e-9)
    np.testing.assert_array_equal(gm.component_of(x).numpy(), joint.argmax(1))
    assert len(set(joint.argmax(1))) > 1


def test_an_empty_batch_gives_empty_results():
    """No samples in, none out (a caller labelling only the draws that switched may have none),
    and a wrong feature count is still named on an empty batch."""
    gm, sde = _mixture(11, k=4, dim=3), VPSDE()
    empty = torch.zeros(0, 3, dtype=F64)
    assert gm.component_of(empty).shape == (0,)
    assert gm.data_log_prob(empty).shape == (0,)
    assert gm.score(empty, torch.zeros(0, dtype=F64) + 0.5, sde).shape == (0, 3)
    with pytest.raises(ValueError, match="2 features per sample, the mixture has D = 3"):
        gm.component_of(torch.zeros(0, 2, dtype=F64))


def test_component_score_is_the_score_of_that_component():
    sde = VPSDE()
    gm = _mixture(2, k=3, dim=2)
    single = GaussianMixture.gaussian(gm.means[1], gm.covs[1])
    x, t = torch.randn(5, 2, dtype=F64), torch.full((5,), 0.3, dtype=F64)
    torch.testing.assert_close(gm.score(x, t, sde, component=1), single.score(x, t, sde))


def test_samples_have_the_mixture_moments(gen):
    gm = _mixture(11, k=3, dim=2)
    x = gm.sample(400_000, gen)
    mean, cov = gm.marginal_moments(0.0, VPSDE())
    torch.testing.assert_close(x.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.05, rtol=0.01)
    xt = gm.sample_t(400_000, 0.5, VPSDE(), gen)
    mean_t, cov_t = gm.marginal_moments(0.5, VPSDE())
    torch.testing.assert_close(torch.cov(xt.T), cov_t, atol=0.02, rtol=0.01)
    torch.testing.assert_close(xt.mean(0), mean_t, atol=0.01, rtol=0)


def test_image_shaped_data_and_float32():
    gm = GaussianMixture.ring(k=4, radius=1.0, dim=16)
    gm16 = GaussianMixture(gm.weights, gm.means, gm.covs, dims=(1, 4, 4))
    x = gm16.sample(3, torch.Generator().manual_seed(0)).float()
    assert x.shape == (3, 1, 4, 4)
    s = gm16.score(x, torch.full((3,), 0.5), VPSDE())
    assert s.shape == x.shape and s.dtype == torch.float32
    torch.testing.assert_close(
        s.reshape(3, 16).double(),
        gm.score(x.reshape(3, 16).double(), 0.5, VPSDE()),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "vp_cosine"])
def test_pf_ode_solution_solves_the_probability_flow_ode(name):
    """d/dt of the exact map equals the PF-ODE velocity, and it pushes p_s onto p_t."""
    sde = get_sde(name)
    gm = GaussianMixture.gaussian([1.0, -0.5], [[1.0, 0.3], [0.3, 0.5]])
    x_s = torch.randn(4, 2, dtype=F64)
    s, t, h = 0.9 * sde.T, 0.4 * sde.T, 1e-5
    fwd = gm.pf_ode_solution(x_s, s, t + h, sde)
    bwd = gm.pf_ode_solution(x_s, s, t - h, sde)
    x_t = gm.pf_ode_solution(x_s, s, t, sde)
    velocity = sde.probability_flow_drift(x_t, torch.full((4,), t, dtype=F64), gm.score_fn(sde))
    torch.testing.assert_close((fwd - bwd) / (2 * h), velocity, rtol=1e-6, atol=1e-6)
    # the map is affine: it carries the moments of p_s to those of p_t
    m_s, c_s = gm.marginal_moments(s, sde)
    m_t, c_t = gm.marginal_moments(t, sde)
    centre = gm.pf_ode_solution(m_s[None], s, t, sde)
    A = gm.pf_ode_solution(torch.eye(2, dtype=F64) + m_s, s, t, sde) - centre
    torch.testing.assert_close(centre[0], m_t)
    torch.testing.assert_close(A.T @ c_s @ A, c_t)


def test_bad_input():
    with pytest.raises(ValueError, match="positive"):
        GaussianMixture([1.0, -1.0], [[0.0], [1.0]], 1.0)
    with pytest.raises(ValueError, match="means must have shape"):
        GaussianMixture([1.0], [0.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture([1.0], [[0.0, 0.0]], torch.tensor([[[1.0, 2.0], [2.0, 1.0]]]))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixture([1.0], [[0.0, 0.0]], torch.tensor([[[1.0, 0.5], [0.0, 1.0]]]))
    gm = GaussianMixture.ring()
    with pytest.raises(ValueError, match="features"):
        gm.score(torch.zeros(2, 3), 0.5, VPSDE())
    with pytest.raises(ValueError, match="single Gaussian"):
        gm.pf_ode_solution(torch.zeros(2, 2), 0.9, 0.1, VPSDE())


def test_log_responsibilities_stay_finite_where_responsibilities_underflow():
    gm = GaussianMixture.ring(k=8, radius=4.0, std=0.1)
    x = torch.tensor([[4.0, 0.0]], dtype=torch.float32)
    log_r = gm.log_responsibilities(x, 0.01, VPSDE())
    assert bool(torch.isfinite(log_r).all()) and gm.responsibilities(x, 0.01, VPSDE()).min() == 0
    torch.testing.assert_close(log_r.exp(), gm.responsibilities(x, 0.01, VPSDE()))
