"""DDPM, DDIM and DPM-Solver++ against the exact-score oracle: the discrete special cases,
identities between the samplers, exact output distributions on a Gaussian target, sliced W2 on a
mixture, convergence orders, NFE and bad input; and the sigma (EDM / k-diffusion) adapter."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.integrate import quad, solve_ivp

from sde_diffusion import (
    VESDE,
    VPSDE,
    CosineVPSDE,
    DiscreteVPSDE,
    GaussianMixture,
    SubVPSDE,
    model_score_fn,
    tweedie_x0,
)
from sde_diffusion.solvers import (
    IncompatibleSDEError,
    SolverSpec,
    ddim,
    ddpm,
    dpm_solver_pp,
    get_solver,
    sample,
    time_grid,
)
from sde_diffusion.solvers.expint import _interpolant_weights
from sde_diffusion.solvers.grids import final_time

SDES = {
    "vp": VPSDE,
    "vp_cosine": CosineVPSDE,
    "subvp": SubVPSDE,
    "ve": VESDE,
    "ddpm": DiscreteVPSDE.ddpm,
}
VP_SDES = ["vp", "vp_cosine", "ddpm"]
GAUSS = GaussianMixture.gaussian([1.0, -0.5], torch.tensor([[1.0, 0.6], [0.6, 0.8]]))
RING = GaussianMixture.ring(4, radius=2.0, std=0.5)


def _x_T(sde, n: int = 16, seed: int = 1, dim: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sde.prior_std() * torch.randn(n, dim, generator=g, dtype=torch.float64)


# ---- the discrete special cases and identities between the samplers ------------------------


@pytest.mark.parametrize("name", ["vp", "vp_cosine"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_on_the_chain_grid_is_ho_algorithm_2(name, variance):
    """On the grid t_N, ..., t_1 of sde.discretize(N), ddpm + the final Tweedie step is Ho et al.'s
    Algorithm 2 with that chain's betas, written here from the paper (z = 0 at i = 1)."""
    sde, n_steps = SDES[name](), 50
    chain = sde.discretize(n_steps)
    b, a, abar = chain.betas, chain.alphas, chain.alphas_cumprod
    eps_fn, x_T = GAUSS.eps_fn(sde), _x_T(sde)
    x, gen = x_T.clone(), torch.Generator().manual_seed(5)
    for i in range(n_steps, 0, -1):
        j = i - 1
        var = (
            b[j]
            if variance == "fixed_large" or i == 1
            else (1 - abar[j - 1]) / (1 - abar[j]) * b[j]
        )
        z = torch.randn(x.shape, generator=gen, dtype=x.dtype) if i > 1 else 0
        eps = eps_fn(x, chain.t[j].expand(x.shape[0]))
        x = (x - b[j] / torch.sqrt(1 - abar[j]) * eps) / torch.sqrt(a[j]) + torch.sqrt(var) * z
    ours = sample(
        GAUSS.score_fn(sde),
        sde,
        x_T,
        solver="ddpm",
        grid=chain.t.flip(0),
        variance=variance,
        generator=torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-10)


def test_ddpm_default_grid_with_n_minus_1_steps_is_the_chain():
    sde = DiscreteVPSDE.ddpm()
    chain = sde.discretize(sde.N)
    torch.testing.assert_close(time_grid(sde, sde.N - 1), chain.t.flip(0), rtol=0, atol=1e-12)
    assert get_solver("ddpm").default_grid == "uniform"


@pytest.mark.parametrize("name", VP_SDES)
def test_ddim_eta_one_is_ddpm_with_posterior_variance(name):
    sde = SDES[name]()
    ts, x_T = time_grid(sde, 12), _x_T(sde)
    score_fn = RING.score_fn(sde)
    a = ddim(score_fn, sde, x_T, ts, eta=1.0, noise=_seeded_noise(3))
    b = ddpm(score_fn, sde, x_T, ts, variance="fixed_small", noise=_seeded_noise(3))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("method", ["multistep", "singlestep"])
def test_dpm_solver_order_one_is_ddim(name, method):
    """DPM-Solver++-1 is DDIM (eta = 0) on every SDE of the family: two different formulas."""
    sde = SDES[name]()
    ts, x_T = time_grid(sde, 9, "log_snr"), _x_T(sde)
    score_fn = RING.score_fn(sde)
    a = dpm_solver_pp(score_fn, sde, x_T, ts, order=1, method=method)
    b = ddim(score_fn, sde, x_T, ts, noise=_seeded_noise(0))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(list(SDES)),
    t=st.floats(0.01, 1.0),
    frac=st.floats(0.05, 0.95),
)
def test_ddim_eta_zero_is_the_exponential_integrator_of_math_md(name, t, frac):
    """x_s = (gamma_s / gamma_t) x_t - sigma_s (e^h - 1) eps_hat (math.md section 4), any s < t."""
    sde = SDES[name]()
    t = torch.tensor(t * sde.T, dtype=torch.float64)
    s = t * frac
    x = _x_T(sde, n=4)
    (g_t, _), (g_s, sig_s) = sde.marginal(t), sde.marginal(s)
    eps = GAUSS.eps_fn(sde)(x, t.expand(x.shape[0]))
    h = sde.log_snr(s) - sde.log_snr(t)
    expected = g_s / g_t * x - sig_s * torch.expm1(h) * eps
    got = ddim(GAUSS.score_fn(sde), sde, x, torch.stack([t, s]), noise=_seeded_noise(0))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def _seeded_noise(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda like: torch.randn(like.shape, generator=gen, dtype=like.dtype)


# ---- the reported NFE, per-sample seeds, dtypes and bad input --------------------------------


@pytest.mark.parametrize(
    ("solver", "params", "nfe_per_step"),
    [
        ("ddpm", {}, 1),
        ("ddim", {"eta": 0.5}, 1),
        ("dpm_solver", {"order": 2}, 1),
        ("dpm_solver", {"order": 3}, 1),
        ("dpm_solver", {"order": 2, "method": "singlestep"}, 2),
        ("dpm_solver", {"order": 3, "method": "singlestep"}, 3),
    ],
)
def test_nfe_is_what_the_solver_spends(solver, params, nfe_per_step):
    sde = VPSDE()
    calls = []

    def score_fn(x, t):
        calls.append(t)
        return GAUSS.score(x, t, sde)

    res = sample(score_fn, sde, (4, 2), solver=solver, steps=7, return_info=True, **params)
    assert res.nfe == len(calls) == 7 * nfe_per_step + 1  # + the final denoising step


@pytest.mark.parametrize(
    ("solver", "kw"),
    [
        ("ddpm", {}),
        ("ddim", {"eta": 1.0}),
        ("dpm_solver", {"order": 3}),
        ("dpm_solver", {"order": 3, "method": "singlestep"}),
    ],
)
def test_per_sample_seeds_and_float32(solver, kw):
    sde = VPSDE()
    run = functools.partial(
        sample, RING.score_fn(sde), sde, solver=solver, steps=6, dtype=torch.float32, **kw
    )
    both, alone = run((2, 2), seeds=[11, 12]), run((1, 2), seeds=[12])
    assert both.dtype == torch.float32 and bool(torch.isfinite(both).all())
    torch.testing.assert_close(both[1:], alone)


@pytest.mark.parametrize("name", ["subvp", "ve"])
def test_ddpm_rejects_non_vp_sdes(name):
    with pytest.raises(IncompatibleSDEError, match=r"variance-preserving.*vp, vp_cosine, ddpm"):
        sample(GAUSS.score_fn(SDES[name]()), SDES[name](), (2, 2), solver="ddpm", steps=3)


@pytest.mark.parametrize(
    ("solver", "params", "match"),
    [
        ("ddpm", {"variance": "learned"}, "fixed_small, fixed_large"),
        ("ddim", {"eta": 1.5}, r"eta must lie in \[0, 1\]"),
        ("ddim", {"eta": -0.1}, r"eta must lie in \[0, 1\]"),
        ("dpm_solver", {"order": 4}, r"order must be one of \(1, 2, 3\)"),
        ("dpm_solver", {"method": "adaptive"}, "multistep, singlestep"),
        ("dpm_solver", {"to_zero": True}, "to_zero needs prediction='noise'"),
        ("unipc", {"prediction": "noise", "to_zero": True, "final_jump": True}, "pass one"),
        ("dpm_solver", {"method": "singlestep", "final_jump": True}, "without to_zero, final_"),
        ("dpm_solver", {"method": "singlestep", "d2_weight": 0.5}, "final_jump or d2_weight"),
        ("dpm_solver", {"d2_weight": 1.5}, r"d2_weight must lie in \[0, 1\]"),
        ("dpm_solver", {"d2_weight": float("nan")}, r"d2_weight must lie in \[0, 1\].*nan"),
        ("unipc", {"first_corrector": "bh1"}, r"first_corrector 'bh1'.*exact, bh2"),
        ("unipc", {"first_corrector": "bh2", "prediction": "noise"}, "bh2' needs prediction='data"),
    ],
)
def test_bad_parameters(solver, params, match):
    sde = VPSDE()
    with pytest.raises(ValueError, match=match):
        sample(GAUSS.score_fn(sde), sde, (2, 2), solver=solver, steps=3, **params)


# ---- where the defaults land: exact KL on a Gaussian, sliced W2 on a mixture ---------------


def _output_gaussian(solver: str, sde, target: GaussianMixture, **params):
    """Exact mean and covariance of sample(...)'s output for x_T from the prior.

    With a Gaussian target the score is affine in x, so every solver here (with the final
    Tweedie step) is affine in x_T and in each noise draw z_k: out = b + A x_T + sum_k B_k z_k.
    One batch holds the zero input, each x_T basis vector and each z_k basis vector, fed
    through the real solver by a noise source that returns the basis draws in order.
    """
    spec, d = get_solver(solver), target.dim
    draws = []

    def count(like):
        draws.append(1)
        return torch.zeros_like(like)

    run = functools.partial(sample, target.score_fn(sde), sde, **params)
    zero = torch.zeros(1, d, dtype=torch.float64)
    if spec.stochastic:
        counting = functools.partial(spec.fn, noise=count)
        run(zero, solver=SolverSpec(spec.name, counting, spec.default_grid, False))
    k = len(draws)
    n = 1 + d + k * d
    x_T = torch.zeros(n, d, dtype=torch.float64)
    x_T[1 : 1 + d] = sde.prior_std() * torch.eye(d, dtype=torch.float64)
    draw = iter(range(k))

    def basis(like):
        z = torch.zeros_like(like)
        i = next(draw)
        z[1 + d + i * d : 1 + d + (i + 1) * d] = torch.eye(d, dtype=like.dtype)
        return z

    fn = functools.partial(spec.fn, noise=basis) if spec.stochastic else spec.fn
    out = run(x_T, solver=SolverSpec(spec.name, fn, spec.default_grid, False))
    cols = out[1:] - out[0]
    return out[0], cols.T @ cols


def _gaussian_kl(m1, c1, m2, c2) -> float:
    """KL(N(m1, c1) || N(m2, c2))."""
    c2_inv = torch.linalg.inv(c2)
    dm = m2 - m1
    d = m1.numel()
    return 0.5 * float(
        torch.trace(c2_inv @ c1) + dm @ c2_inv @ dm - d + torch.logdet(c2) - torch.logdet(c1)
    )


def _flow_then_tweedie_kl(sde, steps: int) -> float:
    """KL to the target of the exact flow from x_T ~ N(0, I) to the default t_end of `steps`
    steps, then Tweedie: what a sampler with no discretisation error returns. x_T is not exactly
    p_T (KL 2.7e-5 here), and Tweedie at t_end > 0 gives E[x_0 | x_t], narrower than p_0."""
    t_end = final_time(sde, steps)
    basis = torch.cat([torch.zeros(1, 2), torch.eye(2)]).double()
    exact = GAUSS.pf_ode_solution(basis, sde.T, t_end, sde)
    t = torch.full((3,), t_end, dtype=torch.float64)
    exact = tweedie_x0(exact, t, GAUSS.score(exact, t, sde), sde)
    dev = exact[1:] - exact[0]
    return _gaussian_kl(exact[0], dev.T @ dev, GAUSS.means[0], GAUSS.covs[0])


# measured |excess| at 20 steps: ddpm 0.066, ddpm fixed_large 0.0038, ddim 0.020, ddim eta=1
# 0.066 (= ddpm), dpm_solver 2M 1.1e-4, 3M 8.8e-5, 2S 3.8e-4, unipc 1.1e-4 (the exact flow's own
# KL is 2.3e-4 at 20 steps, 2.9e-5 at 100; errors of either sign move the output's KL)
@pytest.mark.parametrize(
    ("solver", "params", "max_excess"),
    [
        ("ddpm", {}, 0.1),
        ("ddpm", {"variance": "fixed_large"}, 0.01),
        ("ddim", {}, 0.04),
        ("ddim", {"eta": 1.0}, 0.1),
        ("dpm_solver", {}, 6e-4),
        ("dpm_solver", {"order": 3}, 2e-4),
        ("dpm_solver", {"method": "singlestep"}, 6e-4),
        ("unipc", {}, 2e-4),
    ],
)
def test_default_settings_land_on_a_gaussian_target(solver, params, max_excess):
    """sample() defaults (20 steps, the solver's own grid, Tweedie at final_time) on VP: the
    exact KL of the output to the target differs from that of the exact flow to the same t_end
    (then Tweedie) by less than max_excess, and 100 steps shrink that gap at least fivefold."""
    sde = VPSDE()
    target = (GAUSS.means[0], GAUSS.covs[0])
    excess = [
        _gaussian_kl(*_output_gaussian(solver, sde, GAUSS, steps=n, **params), *target)
        - _flow_then_tweedie_kl(sde, n)
        for n in (20, 100)
    ]
    assert abs(excess[0]) < max_excess, excess
    assert abs(excess[1]) < abs(excess[0]) / 5, excess


@pytest.mark.parametrize("name", ["ve", "subvp"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_noise_on_non_vp_sdes(name, eta):
    """The posterior variance of DDIM written with gamma/sigma is right beyond VP: 20 -> 100
    steps take the exact KL from 0.03-0.08 to 1e-3-5e-3, as first-order convergence should."""
    sde, target = SDES[name](), (GAUSS.means[0], GAUSS.covs[0])
    kl_20 = _gaussian_kl(*_output_gaussian("ddim", sde, GAUSS, eta=eta), *target)
    kl_100 = _gaussian_kl(*_output_gaussian("ddim", sde, GAUSS, steps=100, eta=eta), *target)
    assert kl_100 < 6e-3 and kl_100 < kl_20 / 10


def _sliced_w2(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256) -> float:
    dirs = torch.randn(
        n_proj, a.shape[1], generator=torch.Generator().manual_seed(0), dtype=a.dtype
    )
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    pa, pb = (torch.sort(v @ dirs.T, dim=0).values for v in (a, b))
    return float(((pa - pb) ** 2).mean().sqrt())


@pytest.mark.parametrize(
    ("solver", "params", "excess"),
    [("ddpm", {}, 0.1), ("ddim", {}, 0.05), ("ddim", {"eta": 1.0}, 0.1), ("dpm_solver", {}, 0.02)],
)
def test_default_settings_on_a_mixture_sliced_w2(solver, params, excess):
    """Sliced W2 to fresh data, at most `excess` above the distance between two fresh data
    sets (0.068 at n = 4000). Measured excess: ddpm and ddim eta=1 0.05, ddim 0.01 at 20 steps."""
    sde, n = VPSDE(), 4000
    x = sample(
        RING.score_fn(sde),
        sde,
        (n, 2),
        solver=solver,
        seeds=None,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(2),
        **params,
    )
    data = RING.sample(n, torch.Generator().manual_seed(3))
    floor = _sliced_w2(RING.sample(n, torch.Generator().manual_seed(4)), data)
    assert _sliced_w2(x, data) < floor + excess


# ---- convergence orders ----------------------------------------------------------------------


def _slope(ns, errs) -> float:
    """Least-squares slope of log(error) against log(step size) = -log(steps)."""
    return float(np.polyfit(-np.log(ns), np.log(errs), 1)[0])


ORDER_CASES = [
    ("ddim", {}, 1),
    ("dpm_solver", {"order": 2}, 2),
    ("dpm_solver", {"order": 3}, 3),
    ("dpm_solver", {"order": 2, "method": "singlestep"}, 2),
    ("dpm_solver", {"order": 3, "method": "singlestep"}, 3),
    ("unipc", {"order": 1}, 2),
    ("unipc", {"order": 2}, 3),
    ("unipc", {"order": 3}, 4),
    ("unipc", {"order": 2, "first_corrector": "bh2"}, 3),  # its O(h^3) error, once
    ("dpm_solver", {"order": 2, "prediction": "noise"}, 2),
    ("dpm_solver", {"order": 3, "prediction": "noise"}, 3),
    ("unipc", {"order": 2, "prediction": "noise"}, 3),
]
SINGLESTEP_SLOW = [
    pytest.param(*case, marks=pytest.mark.slow) if case[1].get("method") else case
    for case in ORDER_CASES
]


def _solve(solver, score_fn, sde, x_T, ts, params):
    if solver == "ddim":
        return ddim(score_fn, sde, x_T, ts, noise=_seeded_noise(0), **params)
    return get_solver(solver).fn(score_fn, sde, x_T, ts, **params)


@pytest.mark.parametrize(
    "name", ["vp", *(pytest.param(n, marks=pytest.mark.slow) for n in ("ve", "subvp"))]
)
@pytest.mark.parametrize(("solver", "params", "order"), ORDER_CASES)
def test_order_on_a_gaussian_against_the_exact_flow(name, solver, params, order):
    """Error at t_min against the exact PF-ODE map from the same x_T (float64). EDM's grid is
    non-uniform in lambda, so the multistep ratios r vary (and the uniform-lambda grid's
    superconvergence of 3M on a Gaussian does not flatter the slope); 40..160 steps lie
    between the pre-asymptotic regime and the round-off floor."""
    sde, ns = SDES[name](), [40, 80, 160]
    x_T, score_fn = _x_T(sde), GAUSS.score_fn(sde)
    errs = []
    for n in ns:
        ts = time_grid(sde, n, "edm")
        exact = GAUSS.pf_ode_solution(x_T, ts[0].item(), ts[-1].item(), sde)
        errs.append(float((_solve(solver, score_fn, sde, x_T, ts, params) - exact).abs().max()))
    assert abs(_slope(ns, errs) - order) < 0.3, errs


@pytest.fixture(scope="module")
def ring_reference():
    """The PF-ODE map of the ring mixture from T to the EDM grid's end, by scipy's DOP853 at
    rtol = atol = 1e-12 (an independent integrator; agrees with 1e-10 to 3e-11)."""
    sde = VPSDE()
    x_T, score_fn = _x_T(sde), RING.score_fn(sde)
    ts = time_grid(sde, 1, "edm")

    def velocity(t, y):
        x = torch.from_numpy(y).reshape(x_T.shape)
        return sde.probability_flow_drift(x, torch.tensor(t, dtype=torch.float64), score_fn)

    sol = solve_ivp(
        lambda t, y: velocity(t, y).reshape(-1).numpy(),
        (ts[0].item(), ts[-1].item()),
        x_T.reshape(-1).numpy(),
        method="DOP853",
        rtol=1e-12,
        atol=1e-12,
    )
    assert sol.success
    return sde, x_T, torch.from_numpy(sol.y[:, -1]).reshape(x_T.shape)


@pytest.mark.parametrize(("solver", "params", "order"), SINGLESTEP_SLOW)
def test_order_on_a_mixture_against_a_fine_reference(ring_reference, solver, params, order):
    """As on the Gaussian, against the DOP853 reference. Fourth order (UniPC-3) reaches its
    asymptotic slope later on the mixture (measured local slopes 4.0, 3.3, 3.7, 3.9 from 40 to
    640 steps), so it is measured on 160..640 steps."""
    sde, x_T, ref = ring_reference
    ns, errs = ([160, 320, 640] if order == 4 else [40, 80, 160]), []
    for n in ns:
        x = _solve(solver, RING.score_fn(sde), sde, x_T, time_grid(sde, n, "edm"), params)
        errs.append(float((x - ref).abs().max()))
    assert abs(_slope(ns, errs) - order) < 0.3, errs


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-3.0, -0.05), min_size=0, max_size=2, unique=True),
    st.booleans(),
    st.floats(0.01, 3.0),
    st.sampled_from(["data", "noise"]),
)
def test_interpolant_weights_integrate_the_lagrange_polynomial(past, with_t, h, prediction):
    """The weights of `_interpolant_step` against scipy's quadrature of the kernel (e^{-(h-u)}
    for data prediction, e^{h-u} for noise prediction) times each Lagrange basis polynomial:
    past nodes (multiples of h before lambda_s), lambda_s itself and, for a corrector,
    lambda_t = lambda_s + h."""
    u = sorted({0.0, *(p * h for p in past), *([h] if with_t else [])})
    assume(all(b - a > 1e-2 * h for a, b in itertools.pairwise(u)))
    weights = _interpolant_weights(u, h, prediction)
    sign = -1.0 if prediction == "data" else 1.0
    for i, u_i in enumerate(u):
        others = [u_j for u_j in u if u_j != u_i]

        def basis(v, u_i=u_i, others=others):
            return np.prod([(v - u_j) / (u_i - u_j) for u_j in others])

        def integrand(v, basis=basis):
            return np.exp(sign * (h - v)) * basis(v)

        exact = quad(integrand, 0, h, epsabs=1e-13)[0]
        assert abs(float(weights[i]) - exact) < 1e-9 * max(1.0, abs(exact)), (u, h, i)


@pytest.mark.parametrize("solver", ["dpm_solver", "unipc", "heun", "ddim"])
def test_final_time_takes_the_last_evaluation_where_it_helps(solver):
    """With 9 steps + Tweedie (10 evaluations; heun 18) on the ring of 8, ending the grid at
    final_time = T/19 rather than t_min cuts the mean distance to the exact flow's sample
    (dopri5 at 1e-10, then Tweedie at t_min) by more than 40% for the higher-order solvers
    (measured 0.36-0.52 of it) and leaves first-order DDIM where it was (measured 1.00)."""
    sde, mix = VPSDE(), GaussianMixture.ring(8, radius=4.0, std=0.5)
    x_T, score_fn = _x_T(sde, n=512, seed=0), mix.score_fn(sde)
    ref = sample(score_fn, sde, x_T, "ode", 1, rtol=1e-10, atol=1e-10)
    err = [
        float((sample(score_fn, sde, x_T, solver, 9, **kw) - ref).norm(dim=1).mean())
        for kw in ({}, {"t_end": sde.t_min})
    ]
    assert err[0] / err[1] < (1.05 if solver == "ddim" else 0.6), err


# ---- the sigma (EDM / k-diffusion denoiser) adapter --------------------------------------------


@pytest.mark.parametrize("name", ["vp", "vp_cosine", "subvp", "ve"])
def test_sigma_adapter_gives_back_the_exact_score(name):
    """D(y, s) = E[x_0 | x_0 + s z = y], the exact denoiser in variance-exploding coordinates,
    taken from the oracle on a VE SDE at the time where its noise level is s; wrapped with
    time_input='sigma' for any SDE it must give the oracle's score of that SDE."""
    sde, ve = SDES[name](), VESDE(sigma_min=1e-3, sigma_max=1e4)
    mix = GaussianMixture.random(3, 2, torch.Generator().manual_seed(0))

    def denoiser(y, s):
        t_ve = ve.t_from_log_snr(-torch.log(s))
        return y + (s * s)[:, None] * mix.score(y, t_ve, ve)

    score_fn = model_score_fn(denoiser, sde, prediction="x0", time_input="sigma")
    t = torch.linspace(0.02, 1.0, 16, dtype=torch.float64) * sde.T
    x = mix.sample_t(16, 0.5 * sde.T, sde, torch.Generator().manual_seed(1))
    torch.testing.assert_close(score_fn(x, t), mix.score(x, t, sde), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("steps", "first_order_last"), [(8, True), (15, False)])
def test_lower_order_final_makes_the_last_multistep_step_ddim(steps, first_order_last):
    """With lower_order_final, grids of fewer than 15 steps end with a first-order (DDIM) step:
    the last step then depends on x at ts[-2] alone."""
    sde = VPSDE()
    ts, x_T, score_fn = time_grid(sde, steps, "log_snr"), _x_T(sde), RING.score_fn(sde)
    states = []
    out = dpm_solver_pp(score_fn, sde, x_T, ts, order=3, callback=lambda i, t, x: states.append(x))
    last = ddim(score_fn, sde, states[-2], ts[-2:], noise=_seeded_noise(0))
    assert torch.allclose(out, last, rtol=0, atol=1e-12) == first_order_last


GPU_CASES = [
    ("ddpm", "ddpm", {}),
    *(
        (name, solver, kw)
        for name in ("ddpm", "ve")
        for solver, kw in [
            ("ddim", {"eta": 0.5}),
            ("dpm_solver", {"order": 2}),
            ("dpm_solver", {"order": 3}),
            ("dpm_solver", {"order": 3, "method": "singlestep"}),
            ("unipc", {}),
        ]
    ),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "solver", "kw"), GPU_CASES)
def test_cuda_matches_cpu(name, solver, kw):
    """Per-sample seeds draw the same noise on either device, so the results agree."""
    sde = SDES[name]()
    run = functools.partial(
        sample,
        RING.score_fn(sde),
        sde,
        (8, 2),
        solver=solver,
        steps=10,
        seeds=range(8),
        dtype=torch.float64,
        **kw,
    )
    cpu, gpu = run(device="cpu"), run(device="cuda")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-9)
