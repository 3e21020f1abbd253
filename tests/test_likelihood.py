"""Likelihood: PF-ODE log p vs the oracle's exact log p_t; the DDPM bound vs closed forms.

Which comparison is exact: the PF-ODE started at t_eps returns log p_{t_eps}(x) (not log p_0), and
only when the prior term is the true log p_T; with the SDE's N(0, prior_std^2 I) prior there is an
extra error of a few 1e-2 nats for the mixtures here. So the exact check uses the oracle's log p_T
and compares with log p_{t_eps}; a second check with t_eps = 1e-5 compares with log p_0 itself
(|log p_{t_eps} - log p_0| is about 1e-5 there).
"""

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sde_diffusion import VESDE, VPSDE, DiscreteVPSDE, GaussianMixture, SubVPSDE
from sde_diffusion.likelihood import (
    bits_per_dim,
    ddpm_bound,
    dequantize,
    discretized_gaussian_log_prob,
    normal_kl,
    ode_log_likelihood,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the Gaussian KL helper ----------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    m1=st.floats(-5, 5),
    m2=st.floats(-5, 5),
    v1=st.floats(1e-4, 1e2),
    v2=st.floats(1e-4, 1e2),
)
def test_normal_kl_matches_torch_distributions(m1, m2, v1, v2):
    ours = normal_kl(torch.tensor(m1, dtype=F64), v1, torch.tensor(m2, dtype=F64), v2)
    p = torch.distributions.Normal(torch.tensor(m1, dtype=F64), math.sqrt(v1))
    q = torch.distributions.Normal(torch.tensor(m2, dtype=F64), math.sqrt(v2))
    ref = torch.distributions.kl_divergence(p, q)
    assert float(ours) == pytest.approx(float(ref), rel=1e-9, abs=1e-12)


def test_normal_kl_broadcasts_elementwise():
    m1 = torch.randn(5, 3, generator=_gen(0), dtype=F64)
    v2 = torch.rand(3, generator=_gen(1), dtype=F64) + 0.1
    ours = normal_kl(m1, 0.5, torch.zeros(3, dtype=F64), v2)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, math.sqrt(0.5)), torch.distributions.Normal(0.0, v2.sqrt())
    )
    assert torch.allclose(ours, ref, atol=1e-12)


# ---- PF-ODE likelihood with the exact score ---------------------------------------------


CASES = [
    ("vp", "gaussian"),
    ("vp", "mixture"),
    ("subvp", "mixture"),
    ("ve", "mixture"),
]


def _case(sde_name: str, data: str):
    sde = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_max=20.0)}[sde_name]
    k = 1 if data == "gaussian" else 3
    return sde, GaussianMixture.random(k, 2, generator=_gen(7))


@pytest.mark.parametrize(("sde_name", "data"), CASES)
def test_exact_divergence_recovers_exact_log_density(sde_name, data):
    sde, gm = _case(sde_name, data)
    x = gm.sample(32, generator=_gen(1))
    calls = 0

    def score_fn(x_, t_):
        nonlocal calls
        calls += 1
        return gm.score(x_, t_, sde)

    t_eps = 1e-5
    res = ode_log_likelihood(
        x,
        sde,
        score_fn,
        t_eps=t_eps,
        rtol=1e-7,
        atol=1e-7,
        prior_logp=lambda z: gm.log_prob(z, sde.T, sde),
    )
    assert res.nfe == calls > 0
    assert res.z.shape == x.shape
    # exact: the flow carries log p_{t_eps} to log p_T
    assert (res.logp - gm.log_prob(x, t_eps, sde)).abs().max() < 1e-4
    # and log p_{t_eps} is log p_0 to far better than 1e-3 nats at t_eps = 1e-5
    assert (res.logp - gm.log_prob(x, 0.0, sde)).abs().max() < 1e-3
    # the latent is where the exact flow sends x
    if data == "gaussian":
        assert torch.allclose(res.z, gm.pf_ode_solution(x, t_eps, sde.T, sde), atol=1e-4)


@pytest.mark.parametrize("schedule", ["ddpm", "scaled_linear"])
def test_on_discrete_betas_the_log_snr_form_is_exact_and_cheap(schedule):
    """DDPM's betas make beta(t) piecewise constant: dopri5 in t at 1e-7 spends about 6000
    evaluations on a 4-D mixture and misses log p by 5e-3 nats; the default (dopri5 in the
    log-SNR, with the D log gamma of x / gamma) meets the exact log p_{t_min} within a few hundred."""
    sde = getattr(DiscreteVPSDE, schedule)()
    gm = GaussianMixture.random(4, 4, generator=_gen(1))
    x = gm.sample(32, generator=_gen(2))
    res = ode_log_likelihood(
        x, sde, gm.score_fn(sde), t_eps=float(sde.t_min), rtol=1e-7, atol=1e-7,
        prior_logp=lambda z: gm.log_prob(z, sde.T, sde),
    )  # fmt: skip
    assert (res.logp - gm.log_prob(x, sde.t_min, sde)).abs().max() < 2e-5
    assert res.nfe <= 500, res.nfe


def test_log_snr_form_needs_a_start_after_zero():
    sde, gm = _case("vp", "mixture")
    with pytest.raises(ValueError, match="t_eps > 0"):
        ode_log_likelihood(gm.sample(2, generator=_gen(0)), sde, gm.score_fn(sde), t_eps=0.0,
                           variable="log_snr")  # fmt: skip


def test_default_prior_is_the_sdes_prior():
    sde, gm = _case("vp", "mixture")
    x = gm.sample(8, generator=_gen(2))
    res = ode_log_likelihood(x, sde, gm.score_fn(sde))
    assert torch.equal(res.prior_logp, sde.prior_logp(res.z))
    assert torch.allclose(res.logp, res.prior_logp + res.delta_logp)


def test_float32_runs_and_is_accurate():
    sde, gm = _case("vp", "mixture")
    x = gm.sample(16, generator=_gen(3)).float()
    res = ode_log_likelihood(
        x, sde, gm.score_fn(sde), prior_logp=lambda z: gm.log_prob(z, 1.0, sde)
    )
    assert res.logp.dtype == torch.float32
    assert (res.logp.double() - gm.log_prob(x.double(), 1e-5, sde)).abs().max() < 2e-2


def test_rademacher_hutchinson_is_exact_for_a_diagonal_jacobian():
    # a diagonal-covariance Gaussian has a diagonal PF Jacobian: v^T J v = tr J when v_i^2 = 1
    sde = VPSDE()
    gm = GaussianMixture.gaussian(
        torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([0.3, 2.0, 1.0, 0.7])
    )
    x = gm.sample(16, generator=_gen(4))
    kw = dict(rtol=1e-7, atol=1e-7, prior_logp=lambda z: gm.log_prob(z, 1.0, sde))
    exact = ode_log_likelihood(x, sde, gm.score_fn(sde), **kw)
    hutch = ode_log_likelihood(
        x, sde, gm.score_fn(sde), divergence="hutchinson", generator=_gen(5), **kw
    )
    assert torch.allclose(hutch.logp, exact.logp, atol=1e-6)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_within_its_standard_error(probe):
    sde = VPSDE()
    gm = GaussianMixture.random(3, 6, generator=_gen(8))
    x = gm.sample(256, generator=_gen(9))
    kw = dict(prior_logp=lambda z: gm.log_prob(z, 1.0, sde), rtol=1e-6, atol=1e-6)
    errors = []
    for num_probes in (1, 4):
        res = ode_log_likelihood(
            x,
            sde,
            gm.score_fn(sde),
            divergence="hutchinson",
            probe=probe,
            num_probes=num_probes,
            generator=_gen(10),
            **kw,
        )
        err = res.logp - gm.log_prob(x, 1e-5, sde)  # independent across samples
        se = err.std() / math.sqrt(len(err))
        assert err.std() > 1e-3  # a real estimator, not the exact trace in disguise
        assert abs(float(err.mean())) < 4 * float(se)
        errors.append(float(err.std()))
    assert errors[1] < 0.7 * errors[0]  # 4 probes: about half the spread of 1


def test_hutchinson_probes_come_from_the_generator():
    sde, gm = _case("vp", "mixture")
    x = gm.sample(8, generator=_gen(2))
    run = [
        ode_log_likelihood(x, sde, gm.score_fn(sde), divergence="hutchinson", generator=_gen(s))
        for s in (1, 1, 2)
    ]
    assert torch.equal(run[0].logp, run[1].logp)
    assert not torch.equal(run[0].logp, run[2].logp)


def test_bad_arguments():
    sde, gm = _case("vp", "gaussian")
    x = gm.sample(2, generator=_gen(0))
    with pytest.raises(ValueError, match="divergence"):
        ode_log_likelihood(x, sde, gm.score_fn(sde), divergence="trace")
    with pytest.raises(ValueError, match="probe"):
        ode_log_likelihood(x, sde, gm.score_fn(sde), divergence="hutchinson", probe="sphere")
    with pytest.raises(ValueError, match="num_probes"):
        ode_log_likelihood(x, sde, gm.score_fn(sde), divergence="hutchinson", num_probes=0)
    with pytest.raises(ValueError, match="t_eps"):
        ode_log_likelihood(x, sde, gm.score_fn(sde), t_eps=1.0)


# ---- dequantisation and bits per dimension ------------------------------------------------------


def test_uniform_model_on_dequantised_bytes_costs_eight_bits():
    k = torch.randint(0, 256, (10, 3, 4, 4), generator=_gen(0))
    x = dequantize(k, _gen(1), low=-1.0, high=1.0, dtype=F64)
    logp = torch.full((10,), -48 * math.log(2.0), dtype=F64)  # uniform density on [-1, 1)^48
    assert torch.allclose(bits_per_dim(logp, 48, bin_width=2 / 256), torch.full_like(logp, 8.0))
    assert bool((x >= -1).all()) and bool((x < 1).all())
    assert torch.equal(torch.floor((x + 1) / (2 / 256)).long(), k)


def test_piecewise_constant_model_gives_the_discrete_nll_in_any_scaling():
    # a density constant on each bin, P(k) / bin_width^D, has bits/dim = -log2 P(k) / D exactly,
    # whatever the affine data scaling
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    k = torch.tensor([[0, 3], [2, 2], [1, 0]])
    expected = -torch.log2(probs[k]).sum(1) / 2
    for low, high in [(-1.0, 1.0), (0.0, 1.0), (0.0, 255.0)]:
        width = (high - low) / 4
        x = dequantize(k, _gen(2), num_levels=4, low=low, high=high, dtype=F64)
        level = torch.floor((x - low) / width).long()
        logp = (torch.log(probs[level]) - math.log(width)).sum(1)
        assert torch.allclose(bits_per_dim(logp, 2, bin_width=width), expected)


def test_bits_per_dim_and_dequantize_validate():
    with pytest.raises(ValueError, match="bin_width"):
        bits_per_dim(torch.zeros(1), 4, bin_width=0.0)
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(torch.zeros(1), 0)
    with pytest.raises(ValueError, match="levels must lie"):
        dequantize(torch.tensor([256]))
    with pytest.raises(ValueError, match="integer tensor"):
        dequantize(torch.tensor([0.5]))
    bytes_ = torch.tensor([0, 255], dtype=torch.uint8)  # uint8 levels, compared without overflow
    x = dequantize(bytes_, _gen(3), dtype=F64)
    assert torch.equal(torch.floor((x + 1) * 128).long(), bytes_.long())


# ---- the discretised Gaussian decoder ------------------------------------------------------------


@pytest.mark.parametrize(("mean", "std"), [(0.0, 0.01), (0.9, 0.2), (-1.3, 0.05), (0.3, 1e-4)])
def test_discretized_decoder_is_a_distribution_over_levels(mean, std):
    levels = torch.arange(256, dtype=F64) / 127.5 - 1
    logp = discretized_gaussian_log_prob(levels, torch.tensor(mean, dtype=F64), std**2)
    assert bool(torch.isfinite(logp).all())
    assert float(torch.logsumexp(logp, 0).exp()) == pytest.approx(1.0, abs=1e-10)
    # bin masses in 50-digit arithmetic, including far tails where a float64 cdf difference is 0
    mpmath.mp.dps = 50
    for i in (0, 3, 100, 128, 200, 255):
        lo = -mpmath.inf if i == 0 else mpmath.mpf(i) / mpmath.mpf(127.5) - 1 - mpmath.mpf(1) / 255
        hi = mpmath.inf if i == 255 else mpmath.mpf(i) / mpmath.mpf(127.5) - 1 + mpmath.mpf(1) / 255
        if lo + hi > 2 * mean:  # mirror into the lower tail, where ncdf keeps relative precision
            lo, hi = 2 * mean - hi, 2 * mean - lo
        ref = mpmath.ncdf(hi, mean, std) - mpmath.ncdf(lo, mean, std)
        assert float(logp[i]) == pytest.approx(float(mpmath.log(ref)), rel=1e-9, abs=1e-9)


# ---- the DDPM variational bound ---------------------------------------------------------


def _gaussian_expected_terms(x0: float, m: float, s2: float, sde, N: int, variance: str):
    """E over x_i ~ q(x_i | x0) of each L_j (j = 0..N-1) for 1-D N(m, s2) data and the exact model.

    With Gaussian data the exact eps makes mu_theta(x_i) = E[x_{i-1} | x_i] = A E[x0 | x_i] + B x_i
    (mu_tilde = A x0 + B x_i), so mu_tilde - mu_theta = A (x0 - E[x0 | x_i]), a Gaussian in the
    noise whose mean and variance give each expected term in closed form.
    """
    sch = sde.discretize(N)
    b, ab = sch.betas, sch.alphas_cumprod
    ab_prev = torch.cat([torch.ones(1, dtype=F64), ab[:-1]])
    bt = (1 - ab_prev) * b / (1 - ab)
    var = b if variance == "beta" else torch.cat([bt[1:2], bt[1:]])
    A = ab_prev.sqrt() * b / (1 - ab)
    k = ab.sqrt() * s2 / (ab * s2 + 1 - ab)  # E[x0 | x_i] = m + k (x_i - sqrt(ab) m)
    # x0 - E[x0 | x_i] = (1 - k sqrt(ab)) (x0 - m) - k sqrt(1 - ab) e
    d2 = A**2 * ((1 - k * ab.sqrt()) ** 2 * (x0 - m) ** 2 + k**2 * (1 - ab))
    terms = 0.5 * torch.log(var / bt) + (bt + d2) / (2 * var) - 0.5
    terms[0] = 0.5 * math.log(2 * math.pi) + 0.5 * torch.log(var[0]) + d2[0] / (2 * var[0])
    prior = 0.5 * (-torch.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * x0**2 - 1)
    return terms, prior


@pytest.mark.parametrize(
    ("sde", "N", "variance"),
    [(VPSDE(), 40, "beta"), (VPSDE(), 40, "beta_tilde"), (DiscreteVPSDE.ddpm(200), None, "beta")],
)
def test_each_bound_term_matches_its_closed_form_expectation(sde, N, variance):
    m, s2 = 0.5, 0.8
    gm = GaussianMixture.gaussian([m], s2)
    x0_values = torch.tensor([-1.0, 0.5, 2.0], dtype=F64)
    reps = 1500
    x0 = x0_values.repeat_interleave(reps)[:, None]
    bound = ddpm_bound(x0, sde, gm.score_fn(sde), N, variance=variance, generator=_gen(0))
    n_steps = N or sde.N
    assert bound.terms.shape == (len(x0), n_steps)
    for idx, v in enumerate(x0_values.tolist()):
        rows = slice(idx * reps, (idx + 1) * reps)
        terms, prior = _gaussian_expected_terms(v, m, s2, sde, n_steps, variance)
        mc = bound.terms[rows]
        z = (mc.mean(0) - terms) / (mc.std(0) / math.sqrt(reps))
        assert float(z.abs().max()) < 5.0
        assert torch.allclose(bound.prior[rows], prior.expand(reps), rtol=1e-10, atol=1e-12)
    assert torch.allclose(bound.total, bound.prior + bound.diffusion + bound.decoder)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_bound_is_at_least_the_exact_nll_on_average(variance):
    # E_data[bound] >= E_data[-log p_theta] >= E_data[-log p_0] (Gibbs); a per-sample inequality
    # does not hold (the bound is for the model's density, not the data's). A coarse chain makes
    # the gap large against the Monte Carlo error.
    sde = VPSDE()
    gm = GaussianMixture.ring(k=4, radius=2.0, std=0.5)
    x0 = gm.sample(2000, generator=_gen(1))
    bound = ddpm_bound(x0, sde, gm.score_fn(sde), 10, variance=variance, generator=_gen(2))
    gap = bound.total - (-gm.log_prob(x0, 0.0, sde))
    se = gap.std() / math.sqrt(len(gap))
    assert float(gap.mean()) > 4 * float(se)


def test_discretized_decoder_bound_exceeds_the_discrete_entropy():
    # 1-D data quantised to 256 levels: its exact entropy H = -sum P log P from the cdf; the bound
    # in nats is a cross-entropy, so its mean over the data is at least H
    gm = GaussianMixture([0.4, 0.6], [[-0.4], [0.35]], [[[0.04]], [[0.01]]])
    levels = torch.arange(256, dtype=F64) / 127.5 - 1
    edges = torch.cat(
        [torch.tensor([-math.inf]), (levels[:-1] + levels[1:]) / 2, torch.tensor([math.inf])]
    )
    cdf = sum(
        w * torch.special.ndtr((edges - mu) / math.sqrt(c))
        for w, mu, c in zip(gm.weights, gm.means[:, 0], gm.covs[:, 0, 0], strict=True)
    )
    probs = cdf[1:] - cdf[:-1]
    entropy = float(-(probs * torch.log(probs)).sum())
    k = torch.multinomial(probs, 3000, replacement=True, generator=_gen(3))
    x0 = levels[k][:, None]
    sde = VPSDE()
    bound = ddpm_bound(x0, sde, gm.score_fn(sde), 100, decoder="discretized", generator=_gen(4))
    gap = bound.total.mean() - entropy
    assert float(gap) > 4 * float(bound.total.std() / math.sqrt(len(k)))
    bpd = bits_per_dim(-bound.total, 1)
    assert float(bpd.mean()) == pytest.approx(float(bound.total.mean()) / math.log(2))


def test_ddpm_bound_validates():
    gm = GaussianMixture.gaussian([0.0], 1.0)
    x0 = torch.zeros(2, 1, dtype=F64)
    with pytest.raises(ValueError, match="VP-family"):
        ddpm_bound(x0, VESDE(), gm.score_fn(VESDE()), 10)
    with pytest.raises(ValueError, match="num_steps is required"):
        ddpm_bound(x0, VPSDE(), gm.score_fn(VPSDE()))
    with pytest.raises(ValueError, match="decoder"):
        ddpm_bound(x0, VPSDE(), gm.score_fn(VPSDE()), 10, decoder="logistic")
    with pytest.raises(ValueError, match="variance"):
        ddpm_bound(x0, VPSDE(), gm.score_fn(VPSDE()), 10, variance="learned")


def test_image_shaped_data():
    # (batch, 1, 2, 2) images: the ODE, the divergence and the bound work on any data shape
    gm = GaussianMixture.random(2, 4, generator=_gen(30))
    gm = GaussianMixture(gm.weights, gm.means, gm.covs, dims=(1, 2, 2))
    sde = VPSDE()
    x = gm.sample(8, generator=_gen(31))
    assert x.shape == (8, 1, 2, 2)
    res = ode_log_likelihood(
        x,
        sde,
        gm.score_fn(sde),
        rtol=1e-7,
        atol=1e-7,
        prior_logp=lambda z: gm.log_prob(z, 1.0, sde),
    )
    assert res.z.shape == x.shape
    assert (res.logp - gm.log_prob(x, 1e-5, sde)).abs().max() < 1e-4
    bound = ddpm_bound(x, sde, gm.score_fn(sde), 20, generator=_gen(32))
    assert bound.total.shape == (8,)
