"""GaussianMixture.condition: the exact conditional of unknown coordinates vs brute-force Bayes."""

import math

import pytest
import torch

from sde_diffusion import VPSDE, GaussianMixture

SDE0 = VPSDE()  # at t = 0 every SDE's kernel is the identity, so log_prob(x, 0) = log p_0(x)


def _mixture(dim: int, seed: int) -> GaussianMixture:
    return GaussianMixture.random(3, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conditional_density_matches_quadrature_in_2d(seed):
    gm = _mixture(2, seed)
    a = float(gm.means[1, 0]) + 0.7  # observe x_0 near a component, off its mean
    cond = gm.condition(torch.tensor([True, False]), torch.tensor([a]))
    grid = torch.linspace(-40.0, 40.0, 40001, dtype=torch.float64)
    joint = torch.stack([torch.full_like(grid, a), grid], dim=1)
    log_joint = gm.log_prob(joint, 0.0, SDE0)
    density = torch.exp(log_joint - log_joint.max())
    density = density / torch.trapezoid(density, grid)  # Bayes: p(x1 | x0 = a) by quadrature
    ours = torch.exp(cond.log_prob(grid[:, None], 0.0, SDE0))
    assert torch.allclose(ours, density, atol=1e-9, rtol=1e-7)


def test_conditional_moments_match_quadrature_in_2d_unknown():
    gm = _mixture(3, 5)
    x_obs = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    mask = torch.tensor([False, True, False])
    cond = gm.condition(mask, x_obs)  # full-length x_known: only the masked entry is read
    g = torch.linspace(-25.0, 25.0, 601, dtype=torch.float64)
    u0, u2 = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([u0.flatten(), torch.full_like(u0.flatten(), -1.0), u2.flatten()], dim=1)
    logp = gm.log_prob(pts, 0.0, SDE0)
    w = torch.exp(logp - logp.max())
    w = w / w.sum()
    u = pts[:, [0, 2]]
    mean = (w[:, None] * u).sum(0)
    cov = (w[:, None, None] * (u - mean)[:, :, None] * (u - mean)[:, None, :]).sum(0)
    m_ours, c_ours = cond.marginal_moments(0.0, SDE0)
    assert cond.dims == (2,)
    assert torch.allclose(m_ours, mean, atol=1e-6)
    assert torch.allclose(c_ours, cov, atol=1e-6)


def test_single_gaussian_matches_schur_complement_with_explicit_inverse():
    # 4-D, two known: an independent form of the same conditional (explicit inverse, no Cholesky)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.5 * torch.eye(4, dtype=torch.float64)
    mean = torch.randn(4, generator=g, dtype=torch.float64)
    gm = GaussianMixture.gaussian(mean, cov)
    mask = torch.tensor([True, False, True, False])
    xo = torch.tensor([0.5, -0.2], dtype=torch.float64)
    cond = gm.condition(mask, xo)
    o, u = mask, ~mask
    s_oo_inv = torch.linalg.inv(cov[o][:, o])
    ref_mean = mean[u] + cov[u][:, o] @ s_oo_inv @ (xo - mean[o])
    ref_cov = cov[u][:, u] - cov[u][:, o] @ s_oo_inv @ cov[o][:, u]
    assert torch.allclose(cond.means[0], ref_mean, atol=1e-12)
    assert torch.allclose(cond.covs[0], ref_cov, atol=1e-12)
    assert float(cond.weights[0]) == 1.0


def test_component_weights_follow_bayes_rule():
    gm = GaussianMixture([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], 1.0)
    cond = gm.condition(torch.tensor([True, False]), torch.tensor([0.5]))
    lik = torch.tensor([math.exp(-0.5 * 2.5**2), math.exp(-0.5 * 1.5**2)], dtype=torch.float64)
    post = gm.weights * lik
    assert torch.allclose(cond.weights, post / post.sum(), atol=1e-14)


def test_image_shaped_mask_and_far_component():
    gm = GaussianMixture([0.5, 0.5], [[0.0] * 4, [1e3] * 4], 1.0, dims=(2, 2))
    mask = torch.tensor([[True, False], [False, True]])
    cond = gm.condition(mask, torch.zeros(2, 2))
    assert cond.num_components == 2 and cond.dim == 2
    assert float(cond.weights[0]) == pytest.approx(1.0)  # the far component underflows, stays valid


def test_bad_inputs():
    gm = _mixture(3, 0)
    with pytest.raises(ValueError, match="known_mask has 2 entries; need D = 3"):
        gm.condition(torch.tensor([True, False]), torch.zeros(1))
    with pytest.raises(ValueError, match="every coordinate"):
        gm.condition(torch.ones(3, dtype=torch.bool), torch.zeros(3))
    with pytest.raises(ValueError, match="x_known must have"):
        gm.condition(torch.tensor([True, False, False]), torch.zeros(2))
