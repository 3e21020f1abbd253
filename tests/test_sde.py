"""The SDE family against independent references: numerical integration of the moment ODEs,
the formulas of math.md section 1 written out by hand, Monte Carlo, and Bayes' rule."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad, solve_ivp
from scipy.optimize import minimize_scalar

from sde_diffusion import (
    VESDE,
    VPSDE,
    CosineVPSDE,
    DiscreteVPSDE,
    GaussianMixture,
    SubVPSDE,
    get_sde,
)

F64 = torch.float64


def _tensor(t: float) -> torch.Tensor:
    return torch.tensor(t, dtype=F64)


def _integrate_moments(sde, t_end: float, knots: int = 1) -> tuple[float, float]:
    """gamma and sigma^2 at t_end from d gamma/dt = f gamma, d sigma^2/dt = 2 f sigma^2 + g^2,
    integrated piece by piece between `knots` equal intervals of [0, T] (where f may jump)."""

    def rhs(t, y):
        f, g2 = sde.f(_tensor(t)).item(), sde.g2(_tensor(t)).item()
        return [f * y[0], 2 * f * y[1] + g2]

    y = [1.0, 0.0]
    edges = [e for e in np.linspace(0, sde.T, knots + 1) if e < t_end] + [t_end]
    for a, b in itertools.pairwise(edges):
        y = solve_ivp(rhs, (a, b), y, rtol=1e-10, atol=1e-12).y[:, -1]
    return y[0], y[1]


beta_pair = st.tuples(st.floats(0.01, 2.0), st.floats(0.0, 25.0)).map(lambda p: (p[0], p[0] + p[1]))


@settings(max_examples=8, deadline=None)
@given(beta=beta_pair, t=st.floats(0.01, 1.0))
def test_vp_and_subvp_marginals_solve_the_moment_odes(beta, t):
    for cls in (VPSDE, SubVPSDE):
        sde = cls(*beta)
        gamma_ref, var_ref = _integrate_moments(sde, t)
        gamma, sigma = sde.marginal(_tensor(t))
        assert gamma.item() == pytest.approx(gamma_ref, rel=1e-7, abs=1e-10)
        assert (sigma**2).item() == pytest.approx(var_ref, rel=1e-6, abs=1e-10)


@settings(max_examples=8, deadline=None)
@given(
    smin=st.floats(1e-3, 0.5),
    ratio=st.floats(2.0, 5e3),
    t=st.floats(0.01, 1.0),
)
def test_ve_marginals_solve_the_moment_odes(smin, ratio, t):
    sde = VESDE(smin, smin * ratio)
    gamma_ref, var_ref = _integrate_moments(sde, t)
    gamma, sigma = sde.marginal(_tensor(t))
    assert gamma.item() == 1.0 == gamma_ref
    assert (sigma**2).item() == pytest.approx(var_ref, rel=1e-6)
    # the closed form of math.md: sigma(t)^2 - sigma_min^2 with sigma(t) = smin ratio^t
    assert (sigma**2).item() == pytest.approx((smin * ratio**t) ** 2 - smin**2, rel=1e-10)


@settings(max_examples=6, deadline=None)
@given(s=st.floats(1e-3, 0.05), t=st.floats(0.01, 0.98))
def test_cosine_marginals_solve_the_moment_odes(s, t):
    sde = CosineVPSDE(s=s, T=0.99)
    gamma_ref, var_ref = _integrate_moments(sde, t)
    gamma, sigma = sde.marginal(_tensor(t))
    assert gamma.item() == pytest.approx(gamma_ref, rel=1e-7)
    assert (sigma**2).item() == pytest.approx(var_ref, rel=1e-6, abs=1e-10)
    abar = math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    assert gamma.item() ** 2 == pytest.approx(abar, rel=1e-12)


def test_discrete_betas_marginals_solve_the_moment_odes(gen):
    betas = (torch.rand(40, generator=gen, dtype=F64) * 0.05 + 1e-3).tolist()
    sde = DiscreteVPSDE(betas)
    for t in (0.0125, 0.3, 0.51, 1.0):
        gamma_ref, var_ref = _integrate_moments(sde, t, knots=sde.N)
        gamma, sigma = sde.marginal(_tensor(t))
        assert gamma.item() == pytest.approx(gamma_ref, rel=1e-6)
        assert (sigma**2).item() == pytest.approx(var_ref, rel=1e-5)
    # the chain's abar_i exactly at the knots t_i = i / N
    abar = np.cumprod(1 - np.array(betas))
    t_knots = torch.arange(1, 41, dtype=F64) / 40
    np.testing.assert_allclose(sde.marginal(t_knots)[0].numpy() ** 2, abar, rtol=1e-12)


@pytest.mark.parametrize("name", ["vp", "vp_cosine", "subvp", "ve", "ddpm"])
def test_drift_and_diffusion_are_the_time_derivatives_of_the_marginals(name):
    """f = d log gamma / dt and g^2 = d sigma^2/dt - 2 f sigma^2, by autograd of the closed forms."""
    sde = get_sde(name)
    t = torch.linspace(0.05, 0.95 * sde.T, 13, dtype=F64)
    if name == "ddpm":
        t = t + 0.3 / sde.N  # keep off the knots, where beta(t) jumps
    t.requires_grad_(True)
    gamma, sigma = sde.marginal(t)
    # (+ 0 t keeps the graph connected for VE, whose gamma is constant)
    (dlog_gamma,) = torch.autograd.grad(torch.log(gamma).sum() + 0 * t.sum(), t, retain_graph=True)
    (dvar,) = torch.autograd.grad((sigma**2).sum(), t)
    f, g2 = sde.f(t.detach()), sde.g2(t.detach())
    torch.testing.assert_close(dlog_gamma, f, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dvar - 2 * f * sigma.detach() ** 2, g2, rtol=1e-8, atol=1e-9)


def test_coefficients_match_math_md_formulas():
    t = torch.linspace(0, 1, 11, dtype=F64)
    vp = VPSDE(0.1, 20.0)
    beta = 0.1 + t * 19.9
    B = 0.1 * t + 19.9 * t**2 / 2
    torch.testing.assert_close(vp.f(t), -beta / 2)
    torch.testing.assert_close(vp.g2(t), beta)
    torch.testing.assert_close(vp.marginal(t)[0], torch.exp(-B / 2))
    sub = SubVPSDE(0.1, 20.0)
    torch.testing.assert_close(sub.g2(t), beta * (1 - torch.exp(-2 * B)))
    torch.testing.assert_close(sub.marginal(t)[1], 1 - torch.exp(-B))
    ve = VESDE(0.01, 50.0)
    sig = 0.01 * 5000.0**t
    torch.testing.assert_close(ve.diffusion(t), sig * math.sqrt(2 * math.log(5000.0)))
    assert ve.prior_std() == 50.0


def test_small_t_is_accurate_in_float32():
    """expm1 keeps sigma_t exact where 1 - exp(-B) would cancel to zero in float32."""
    t = torch.tensor([1e-7, 1e-6, 1e-5], dtype=torch.float32)
    for sde in (VPSDE(), SubVPSDE(), VESDE(), CosineVPSDE()):
        ref = sde.marginal(t.double())[1]
        got = sde.marginal(t)[1]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)


def test_finite_and_positive_on_the_whole_range(any_sde, dtype):
    t = torch.linspace(0, any_sde.T, 2001, dtype=dtype)
    gamma, sigma = any_sde.marginal(t)
    for v in (gamma, sigma, any_sde.f(t), any_sde.g2(t)):
        assert v.dtype == dtype and bool(torch.isfinite(v).all())
    assert bool((sigma[1:] > 0).all()) and sigma[0] == 0 and gamma[0] == 1
    lam = any_sde.log_snr(t[1:])
    assert bool(torch.isfinite(lam).all())


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(["vp", "vp_cosine", "subvp", "ve", "ddpm"]), u=st.floats(0.0, 1.0))
def test_log_snr_is_strictly_decreasing_and_inverts(name, u):
    sde = get_sde(name)
    t = torch.linspace(1e-4, sde.T, 4001, dtype=F64)
    lam = sde.log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all())
    t0 = torch.tensor([1e-4 + u * (sde.T - 1e-4)], dtype=F64)
    back = sde.t_from_log_snr(sde.log_snr(t0))
    assert abs(back.item() - t0.item()) < 1e-6


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["vp", "vp_cosine", "subvp", "ve", "ddpm"]),
    u=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**16),
)
def test_probability_flow_in_log_snr_is_the_flow_in_t_rescaled(name, u, seed):
    """d(x / gamma)/dlambda = (d(x / gamma)/dt) / (dlambda/dt): the flow in t, minus the drift's
    f x (which only follows gamma), over gamma, divided by dlambda/dt = -g^2 / (2 sigma^2), here
    by a central difference of log_snr (inside one interval of DDPM's piecewise-constant beta)."""
    sde = get_sde(name)
    t = torch.tensor(u * sde.T, dtype=F64)
    if name == "ddpm":  # the middle of an interval, where beta(t) is constant
        t = (torch.floor(t * 1000) + 0.5) / 1000
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    mix = GaussianMixture.random(2, 3, generator=torch.Generator().manual_seed(seed + 1))
    score = mix.score_fn(sde)
    gamma, _ = sde.marginal(t)
    h = 1e-6 * sde.T
    dlam_dt = (sde.log_snr(t + h) - sde.log_snr(t - h)) / (2 * h)
    in_t = (sde.probability_flow_drift(x, t, score) - sde.f(t) * x) / gamma
    in_lam = sde.probability_flow_log_snr(x / gamma, sde.log_snr(t), score)
    torch.testing.assert_close(in_lam * dlam_dt, in_t, rtol=1e-6, atol=1e-8)


def test_log_snr_matches_its_definition(any_sde):
    t = torch.linspace(0.01, any_sde.T, 50, dtype=F64)
    gamma, sigma = any_sde.marginal(t)
    torch.testing.assert_close(any_sde.log_snr(t), torch.log(gamma / sigma))


def test_perturb_monte_carlo_moments(any_sde, gen):
    x0 = torch.tensor([[1.5, -0.5, 2.0]], dtype=F64).expand(200_000, 3)
    t = torch.tensor(0.4 * any_sde.T, dtype=F64)
    noise = torch.randn(x0.shape, generator=gen, dtype=F64)
    xt = any_sde.perturb(x0, t, noise)
    gamma, sigma = any_sde.marginal(t)
    se = sigma.item() / math.sqrt(x0.shape[0])
    torch.testing.assert_close(xt.mean(0), gamma * x0[0], atol=5 * se, rtol=0)
    torch.testing.assert_close(xt.var(0), (sigma**2).expand(3), rtol=0.02, atol=0)


def test_perturb_any_shape_and_per_sample_times(any_sde, dtype):
    x0 = torch.ones(3, 2, 4, 4, dtype=dtype)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=dtype) * any_sde.T
    out = any_sde.perturb(x0, t, torch.zeros_like(x0))
    gamma, _ = any_sde.marginal(t)
    assert out.shape == x0.shape and out.dtype == dtype
    for b in range(3):
        torch.testing.assert_close(out[b], gamma[b] * x0[b])


def test_ddpm_chain_converges_to_vp_like_one_over_n():
    """DDPM betas beta_i = beta(t_i)/N give abar_i -> exp(-B(t_i)) with error O(1/N)."""
    vp = VPSDE(0.1, 20.0)
    errors = []
    ns = [125, 250, 500, 1000, 2000]
    for n in ns:
        betas = torch.linspace(0.1 / n, 20.0 / n, n, dtype=F64)
        abar = torch.cumprod(1 - betas, 0)
        t = torch.arange(1, n + 1, dtype=F64) / n
        errors.append((abar - vp.marginal(t)[0] ** 2).abs().max().item())
    slope = np.polyfit(np.log(ns), np.log(errors), 1)[0]
    assert -1.15 < slope < -0.85, (errors, slope)


def test_discretize_reproduces_the_checkpoint_betas_and_the_continuous_abar():
    ddpm = DiscreteVPSDE.ddpm()
    sched = ddpm.discretize(1000)
    torch.testing.assert_close(sched.betas, torch.linspace(1e-4, 0.02, 1000, dtype=F64))
    torch.testing.assert_close(sched.alphas_cumprod, torch.cumprod(1 - sched.betas, 0))
    vp = VPSDE()
    s = vp.discretize(50)
    torch.testing.assert_close(s.alphas_cumprod, vp.marginal(s.t)[0] ** 2)
    torch.testing.assert_close(torch.cumprod(s.alphas, 0), s.alphas_cumprod)


def test_scaled_linear_is_stable_diffusions_schedule():
    """Against diffusers' own "scaled_linear" betas (computed in float32 there), and gamma_T as
    the docstring states it, from the reference betas' product."""
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).betas
    sde = DiscreteVPSDE.scaled_linear()
    torch.testing.assert_close(sde.betas, ref.double(), rtol=1e-5, atol=0)
    assert sde.betas[500] < (0.00085 + 0.012) / 2  # sqrt-linear, not linear
    gamma_T = float(sde.marginal(torch.tensor([sde.T], dtype=F64))[0][0])
    assert gamma_T == pytest.approx(math.sqrt(torch.prod(1 - ref.double()).item()), rel=1e-4)
    assert gamma_T == pytest.approx(0.068, abs=5e-4)
    ddpm_gamma_T = float(DiscreteVPSDE.ddpm().marginal(torch.tensor([1.0], dtype=F64))[0][0])
    assert ddpm_gamma_T == pytest.approx(0.0064, abs=5e-5)


@pytest.mark.parametrize("i", [2, 10, 500, 999])
def test_ddpm_posterior_matches_bayes_rule(i):
    """q(x_{i-1} | x_i, x_0) from the SDE against Bayes' rule by quadrature in 1-D."""
    sde = DiscreteVPSDE.ddpm()
    s = sde.discretize(1000)
    abar, beta = s.alphas_cumprod.numpy(), s.betas.numpy()
    a_prev, b_i = abar[i - 2], beta[i - 1]
    x0 = 0.7
    xi = math.sqrt(a_prev * (1 - b_i)) * x0 + math.sqrt(1 - a_prev * (1 - b_i)) * 0.8

    def log_joint(y):  # log q(x_{i-1} = y | x_0) + log q(x_i | x_{i-1} = y), up to a constant
        prior = -((y - math.sqrt(a_prev) * x0) ** 2) / (2 * (1 - a_prev))
        return prior - (xi - math.sqrt(1 - b_i) * y) ** 2 / (2 * b_i)

    # the posterior is narrower than either factor: integrate around its numerically found mode
    peak = minimize_scalar(lambda y: -log_joint(y), bracket=(-2, 0, 2), tol=1e-12).x
    width = 20 * min(math.sqrt(1 - a_prev), math.sqrt(b_i / (1 - b_i)))
    top = log_joint(peak)

    def moment(k: int, c: float = 0.0) -> float:
        return quad(
            lambda y: (y - c) ** k * math.exp(log_joint(y) - top),
            peak - width,
            peak + width,
            limit=400,
            epsabs=0,
            epsrel=1e-12,
        )[0]

    z = moment(0)
    mean = moment(1) / z
    var = moment(2, mean) / z
    t, t_prev = torch.tensor(i / 1000, dtype=F64), torch.tensor((i - 1) / 1000, dtype=F64)
    m, std = sde.posterior(torch.tensor([xi], dtype=F64), torch.tensor([x0], dtype=F64), t, t_prev)
    assert m.item() == pytest.approx(mean, rel=1e-6, abs=1e-9)
    assert std.item() ** 2 == pytest.approx(var, rel=1e-6)
    # and the closed forms of math.md section 4 (mu_tilde, beta_tilde)
    a_i = 1 - b_i
    abar_i = a_prev * a_i
    mu = (math.sqrt(a_prev) * b_i * x0 + math.sqrt(a_i) * (1 - a_prev) * xi) / (1 - abar_i)
    assert m.item() == pytest.approx(mu, rel=1e-9)
    assert std.item() ** 2 == pytest.approx((1 - a_prev) * b_i / (1 - abar_i), rel=1e-9)


def test_transition_composes_with_the_marginals(any_sde):
    t, s = torch.tensor(0.7 * any_sde.T, dtype=F64), torch.tensor(0.2 * any_sde.T, dtype=F64)
    a, b = any_sde.transition(t, s)
    (g_t, sig_t), (g_s, sig_s) = any_sde.marginal(t), any_sde.marginal(s)
    torch.testing.assert_close(a * g_s, g_t)
    torch.testing.assert_close(a**2 * sig_s**2 + b**2, sig_t**2)


def test_prior_sample_and_logp(any_sde, gen, dtype):
    z = any_sde.prior_sample((50_000, 2), generator=gen, dtype=dtype)
    assert z.dtype == dtype
    assert z.std().item() == pytest.approx(any_sde.prior_std(), rel=0.02)
    ref = torch.distributions.Normal(0.0, any_sde.prior_std()).log_prob(z[:10].double()).sum(1)
    torch.testing.assert_close(any_sde.prior_logp(z[:10].double()), ref)


def test_reverse_and_probability_flow_drifts(any_sde):
    x = torch.randn(4, 3, dtype=F64)
    t = torch.full((4,), 0.5 * any_sde.T, dtype=F64)

    def score(x, t):
        return -x

    f, g2 = any_sde.f(t)[:, None], any_sde.g2(t)[:, None]
    torch.testing.assert_close(any_sde.reverse_drift(x, t, score), f * x + g2 * x)
    torch.testing.assert_close(any_sde.probability_flow_drift(x, t, score), f * x + 0.5 * g2 * x)


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: VPSDE(beta_min=0.0), "beta_min"),
        (lambda: VPSDE(beta_min=-1.0), "beta_min"),
        (lambda: VPSDE(beta_min=5.0, beta_max=1.0), "beta_max"),
        (lambda: SubVPSDE(beta_min=float("nan")), "beta_min"),
        (lambda: VESDE(sigma_min=1.0, sigma_max=1.0), "sigma_max"),
        (lambda: VESDE(sigma_min=0.0), "sigma_min"),
        (lambda: DiscreteVPSDE([0.1, 1.0]), r"\(0, 1\)"),
        (lambda: DiscreteVPSDE([0.0, 0.1]), r"\(0, 1\)"),
        (lambda: DiscreteVPSDE([]), "at least one"),
        (lambda: CosineVPSDE(T=1.0), "T must lie"),
        (lambda: VPSDE(T=-1.0), "T must lie"),
        (lambda: get_sde("vpp"), "valid choices: vp, vp_cosine, subvp, ve, ddpm"),
    ],
)
def test_bad_parameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_times_raise(any_sde):
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"t must lie in \[0"):
        any_sde.marginal(torch.tensor([any_sde.T * 1.5]))
    with pytest.raises(ValueError, match=r"t must lie in \[0"):
        any_sde.perturb(x, -0.1, x)
    with pytest.raises(ValueError, match="finite"):
        any_sde.marginal(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="shape"):
        any_sde.drift(x, torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="scalar or a 1-D"):
        any_sde.drift(x, torch.full((3, 1), 0.5))
    with pytest.raises(ValueError, match="noise has shape"):
        any_sde.perturb(x, 0.5, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="NaN"):
        any_sde.t_from_log_snr(torch.tensor([float("nan")]))
