"""The default's pilot (`solvers/pilot.py`): it picks, among its candidates, the one closest to
the exact probability-flow map, pays for that once per score function, and never touches the
caller's random state. Checked against the closed-form flow of a Gaussian target."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sde_diffusion import VESDE, VPSDE, DiscreteVPSDE, GaussianMixture, SubVPSDE
from sde_diffusion.metrics import gaussian_kl
from sde_diffusion.solvers import sample
from sde_diffusion.solvers.pilot import (
    CANDIDATES,
    CONVERGED,
    LADDER,
    PILOT_DRAWS,
    PILOT_MIN_STEP,
    SHARED_MISSES,
    TIE,
    TIE_PROJECTIONS,
    TIE_SEED,
    TRIM,
    AffineLaw,
    Boundaries,
    Candidate,
    MomentError,
    TieDistance,
    choose,
    decide,
    exact_flow,
    pilot_draws,
    pilots,
    run_candidate,
    shared_misses,
    ties,
    trapezoid_step,
    tweedie_step,
)


def _gaussian(dim: int = 4, spread: float = 60.0, seed: int = 5) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    d = torch.logspace(math.log10(2 / spread), math.log10(2), dim, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    return GaussianMixture.gaussian(0.5 * torch.randn(dim, generator=g, dtype=torch.float64),
                                    u @ torch.diag(d) @ u.T)  # fmt: skip


def _law(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian law of an affine map of N(0, I) from its values y at x = 0 and the unit
    vectors: N(y[0], A A^T), A's columns y[i] - y[0]."""
    a = (y[1:] - y[0]).T
    return y[0], a @ a.T


@pytest.mark.parametrize(("sde", "steps"), [(DiscreteVPSDE.ddpm(), 5), (SubVPSDE(), 10)])
def test_on_a_gaussian_the_choice_is_the_candidate_whose_law_is_closest_in_kl_to_the_flows(
    sde, steps
):
    """A Gaussian's flow is an affine map of x_T, and so is every candidate's: the pilot compares
    their Gaussian laws by KL (`AffineLaw`, each map read off its 256 random draws by least
    squares). Computed here independently: each candidate's law from its runs on x_T = 0 and the
    unit vectors, the flow's from the closed-form flow to t_min and then the trapezoidal step (as
    `exact_flow` ends). The pilot's KLs agree with these to 1% and it takes the least. The
    candidate closest in mean squared distance over the prior (|b - b'|^2 + |A - A'|_F^2, which
    weighs a direction by its absolute scale) lies 7x and 83x that KL from the flow's law here
    (the 3-D Gaussian's variances span 662x). A Gaussian's flow has no jump: no arcs."""
    if steps == 5:
        mix = _gaussian()
    else:  # variances 0.0043, 2.83 and 2.83
        g = torch.Generator().manual_seed(11)
        u = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
        d = torch.tensor([2.83 / 662, 2.83, 2.83], dtype=torch.float64)
        mix = GaussianMixture.gaussian(0.2 * torch.randn(3, generator=g, dtype=torch.float64),
                                       u @ torch.diag(d) @ u.T)  # fmt: skip
    score, dim = mix.score_fn(sde), mix.dim
    basis = torch.cat([torch.zeros(1, dim), torch.eye(dim)]).double()
    t_min = torch.tensor(float(sde.t_min), dtype=torch.float64)
    exact = trapezoid_step(score, sde, mix.pf_ode_solution(basis, sde.T, t_min, sde), t_min)
    choice = choose(score, sde, steps, pilot_draws(sde, basis[:1]))
    assert choice.law is not None and choice.boundaries is None
    closed, distance = {}, {}
    for c in (c for c in CANDIDATES if c.fits(steps)):
        y = run_candidate(score, sde, basis, c, c.grid_for(sde, steps))
        closed[c] = float(gaussian_kl(*_law(y), *_law(exact)))
        gap = y - exact  # the offset b at gap[0], A's columns at gap[i] - gap[0]
        distance[c] = float((gap[1:] - gap[0]).square().sum() + gap[0].square().sum())
    assert set(choice.errors) == set(closed)
    for c, kl in choice.errors.items():
        assert kl == pytest.approx(closed[c], rel=0.01, abs=1e-9), c.label
    assert choice.candidate == min(closed, key=closed.__getitem__)
    nearest = min(distance, key=distance.__getitem__)
    assert closed[nearest] > 5 * closed[choice.candidate]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.floats(0.5, 50.0), st.integers(0, 2**16))
def test_affine_law_is_the_closed_form_kl_of_two_affine_maps(dim, std, seed):
    """For maps x A + b of prior draws x ~ N(0, std^2 I), `AffineLaw` is KL(N(b1, std^2 A1^T
    A1) || N(b2, std^2 A2^T A2)) whatever draws it reads them off (2 (D + 1) of them or more);
    0 for the reference itself. A map that is not affine, or too few draws, give no law."""
    g = torch.Generator().manual_seed(seed)
    a1, a2 = (torch.randn(dim, dim, generator=g, dtype=torch.float64) + 2 * torch.eye(dim)
              for _ in range(2))  # fmt: skip
    b1, b2 = torch.randn(2, dim, generator=g, dtype=torch.float64)
    x = std * torch.randn(2 * (dim + 1) + 3, dim, generator=g, dtype=torch.float64)
    law = AffineLaw.fit(x, std, x @ a2 + b2)
    expected = gaussian_kl(b1, std**2 * a1.T @ a1, b2, std**2 * a2.T @ a2)
    assert law(x @ a1 + b1) == pytest.approx(float(expected), rel=1e-6, abs=1e-9)
    assert law(x @ a2 + b2) == pytest.approx(0.0, abs=1e-9)
    assert AffineLaw.fit(x, std, torch.tanh(x @ a2) + b2) is None
    assert AffineLaw.fit(x[: 2 * (dim + 1) - 1], std, x[: 2 * (dim + 1) - 1] @ a2) is None


def test_a_mixtures_flow_is_not_affine_and_keeps_the_squared_distance():
    """The mixtures' flows leave 8-42% of their variance to least squares on x_T (AFFINE_TOL
    is 1e-8; a Gaussian's, 1e-28, and 3e-12 in float32): the pilot ranks them by squared
    distance and switches."""
    sde = DiscreteVPSDE.ddpm()
    ring = GaussianMixture.ring(k=8, radius=4.0, std=0.5)
    x_T = pilot_draws(sde, torch.zeros(1, 2, dtype=torch.float64), 64)
    assert AffineLaw.fit(x_T, 1.0, exact_flow(ring.score_fn(sde), sde, x_T)) is None
    for dtype in (torch.float64, torch.float32):
        gauss = GaussianMixture.gaussian(_gaussian().means[0], _gaussian().covs[0], dtype=dtype)
        x_T = pilot_draws(sde, torch.zeros(1, 4, dtype=dtype), 64)
        assert AffineLaw.fit(x_T, 1.0, exact_flow(gauss.score_fn(sde), sde, x_T)) is not None


@pytest.mark.parametrize("sde", [DiscreteVPSDE.ddpm(), VPSDE()], ids=["ddpm", "vp"])
def test_the_sigma_min_end_steps_from_t_min_as_the_reference_does(sde):
    """The "sigma_min" end: x0 interpolation on a grid to the schedule's t_min, one evaluation
    fewer, then the trapezoidal step to sigma = 0 from there (`exact_flow`'s own end). On a
    Gaussian with a 1000x spread it converges to the closed-form flow to t_min followed by that
    step at third order or better in the step, while the half-step Tweedie jump keeps the
    collapse of the posterior mean at its start (first order in it)."""
    mix = _gaussian(spread=1000.0)
    score, t_min = mix.score_fn(sde), torch.tensor(float(sde.t_min), dtype=torch.float64)
    x_T = pilot_draws(sde, torch.zeros(1, 4, dtype=torch.float64), 64)
    exact = trapezoid_step(score, sde, mix.pf_ode_solution(x_T, sde.T, t_min, sde), t_min)

    def error(end: str, steps: int) -> float:
        final = "trapezoid" if end == "sigma_min" else "tweedie"
        c = Candidate("unipc", "data", "log_snr", end, final=final)
        ts = c.grid_for(sde, steps)
        assert len(ts) == steps and (float(ts[-1]) == sde.t_min) == (end == "sigma_min")
        return float((run_candidate(score, sde, x_T, c, ts) - exact).pow(2).sum(1).mean())

    assert error("sigma_min", 20) > 8 * error("sigma_min", 40)
    assert error("sigma_min", 40) < 1e-6 and error("half", 40) > 100 * error("sigma_min", 40)


@settings(max_examples=60, deadline=None)
@given(
    log_ratio=st.floats(-6.0, 6.0).filter(lambda u: abs(u + math.log(8)) > 0.05),
    schedule=st.sampled_from(["ddpm", "scaled_linear", "vp", "subvp"]),
)
def test_the_trapezoidal_step_is_the_flow_to_zero_but_for_data_narrower_than_the_noise(
    log_ratio, schedule
):
    """On a 1-D Gaussian N(mu, v), from its exact marginal at t_min (s = sigma / gamma there),
    the exact flow to t = 0 (closed form, `pf_ode_solution`) scales x / gamma - mu by sqrt(r),
    r = v / (v + s^2); the trapezoidal step scales it by (1 + r) / 2 and the Tweedie jump by r.
    So the trapezoid's error is (1 - sqrt(r)) / (2 sqrt(r)) times the jump's, and it is the
    closer of the two exactly where v > s^2 / 8."""
    sde = {"ddpm": DiscreteVPSDE.ddpm, "scaled_linear": DiscreteVPSDE.scaled_linear,
           "vp": VPSDE, "subvp": SubVPSDE}[schedule]()  # fmt: skip
    t_min = torch.tensor(float(sde.t_min), dtype=torch.float64)
    gamma, sigma = (float(v) for v in sde.marginal(t_min))
    s2 = (sigma / gamma) ** 2
    v, mu = s2 * math.exp(log_ratio), 0.3
    mix = GaussianMixture.gaussian(torch.tensor([mu]), torch.tensor([[v]]))
    z = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64)[:, None]
    x = gamma * mu + math.sqrt(gamma**2 * v + sigma**2) * z
    exact = mix.pf_ode_solution(x, t_min, 0.0, sde)
    trapezoid = trapezoid_step(mix.score_fn(sde), sde, x, t_min)
    jump = tweedie_step(mix.score_fn(sde), sde, x, t_min)
    r = v / (v + s2)
    torch.testing.assert_close(trapezoid, mu + (1 + r) / 2 * (x / gamma - mu))
    torch.testing.assert_close(exact, mu + math.sqrt(r) * (x / gamma - mu))
    far = (z.abs() > 0).squeeze(1)
    ratio = (trapezoid - exact)[far].abs() / (jump - exact)[far].abs()
    torch.testing.assert_close(ratio, torch.full_like(ratio, (1 - r**0.5) / (2 * r**0.5)))
    assert bool((ratio < 1).all()) == (v > s2 / 8)


def test_candidates_that_differ_in_their_last_step_alone_share_one_run_on_the_draws():
    """`choose` runs twins (the same candidate ending with the Tweedie jump and with the
    trapezoidal step, from half a step above 0) once on its draws and ends that run both ways
    from one evaluation: the pair costs what one of them does, and each twin's error is its
    own run's (on this Gaussian, the KL of that run's law to the flow's, `AffineLaw`)."""
    sde, mix = SubVPSDE(), _gaussian(spread=1000.0)
    score = mix.score_fn(sde)
    x_T = pilot_draws(sde, torch.zeros(1, 4, dtype=torch.float64), 32)
    jump = Candidate("unipc", "data", "quadratic", "half", 2, final="tweedie")
    twins = (jump, replace(jump, final="trapezoid"))
    assert twins[1].stem == jump.stem == jump != twins[1]
    reference = exact_flow(score, sde, x_T)
    both = choose(score, sde, 10, x_T, reference, twins, arcs=0)
    one = choose(score, sde, 10, x_T, reference, twins[:1], arcs=0)
    assert both.evaluations == one.evaluations == 10 * len(x_T)
    for c in twins:
        x = run_candidate(score, sde, x_T, c, c.grid_for(sde, 10))
        law = AffineLaw.fit(x_T, sde.prior_std(), reference)
        assert both.errors[c] == pytest.approx(law(x), rel=1e-9)
    assert both.errors[twins[1]] < both.errors[jump]


def test_a_named_solver_with_the_trapezoidal_step_ends_its_grid_at_t_min():
    """`sample(..., denoise="trapezoid")`: the solver on its grid to t_min (not to the half-step
    end of the Tweedie step), then `trapezoid_step` from there, one evaluation more."""
    sde, mix = VPSDE(), _gaussian()
    score = mix.score_fn(sde)
    x_T = pilot_draws(sde, torch.zeros(1, 4, dtype=torch.float64), 8)
    res = sample(score, sde, x_T, "unipc", 10, denoise="trapezoid", return_info=True)
    plain = sample(score, sde, x_T, "unipc", 10, denoise=False, return_info=True)
    assert float(res.ts[-1]) == sde.t_min and res.nfe == plain.nfe + 1
    torch.testing.assert_close(res.samples, trapezoid_step(score, sde, plain.samples, res.ts[-1]))


def _log_snr_range(sde: VPSDE | VESDE) -> float:
    """lambda(t_min) - lambda(T), lambda = log(gamma / sigma), from each SDE's closed form."""

    def lam(t: float) -> float:
        if isinstance(sde, VESDE):  # gamma = 1, sigma^2 = s_min^2 ((s_max / s_min)^(2t) - 1)
            ratio = sde.sigma_max / sde.sigma_min
            return -0.5 * math.log(sde.sigma_min**2 * (ratio ** (2 * t) - 1))
        log_gamma = -(sde.beta_min * t / 2 + (sde.beta_max - sde.beta_min) * t**2 / 4)
        return log_gamma - 0.5 * math.log(-math.expm1(2 * log_gamma))

    return lam(sde.t_min) - lam(sde.T)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_from_the_smallest_piloted_step_on_the_default_converges_to_the_reference_unpiloted(sde):
    """Where the mean log-SNR step is at most PILOT_MIN_STEP (96 steps on VP, 129 on VE) the
    default runs no pilot: CONVERGED, NFE = steps, its samples within 2e-5 (rms) of the
    closed-form flow to t_min followed by the trapezoidal step, the pilot's reference (on VP the
    noise left at t_min alone is 7e-4). One step fewer is piloted; a grid kind still applies."""
    steps = math.ceil(_log_snr_range(sde) / PILOT_MIN_STEP)
    assert pilots(sde, steps - 1) and not pilots(sde, steps)
    mix = _gaussian()
    score, t_min = mix.score_fn(sde), torch.tensor(float(sde.t_min), dtype=torch.float64)
    x_T = sde.prior_std() * torch.randn(64, 4, generator=torch.Generator().manual_seed(0),
                                        dtype=torch.float64)  # fmt: skip
    exact = trapezoid_step(score, sde, mix.pf_ode_solution(x_T, sde.T, t_min, sde), t_min)
    res = sample(score, sde, x_T, steps=steps, return_info=True)
    assert res.pilot is None and res.pilot_evaluations == 0 and res.nfe == steps
    assert res.solver == CONVERGED.solver and res.configuration == CONVERGED
    assert float((res.samples - exact).pow(2).sum(1).mean().sqrt()) < 2e-5
    on_edm = sample(score, sde, x_T, steps=steps, grid="edm", return_info=True)
    assert on_edm.pilot is None
    torch.testing.assert_close(on_edm.ts, replace(CONVERGED, grid="edm").grid_for(sde, steps))


def _sliced_w2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Sliced W2 between two sets of as many points, on TIE_PROJECTIONS directions from
    TIE_SEED: each direction's W2 pairs the sorted projections."""
    g = torch.Generator().manual_seed(TIE_SEED)
    theta = torch.randn(x.shape[1], TIE_PROJECTIONS, generator=g, dtype=x.dtype)
    theta = theta / theta.norm(dim=0)
    px, py = (torch.sort(z @ theta, dim=0).values for z in (x, y))
    return float((px - py).square().mean().sqrt())


def test_on_a_multimodal_target_the_error_adds_the_switch_error_and_ties_go_to_the_sliced_w2():
    """A ring of narrow modes: its flow jumps on most arcs. Each candidate's error is its mean
    squared distance to the flow on the draws (recomputed here) but the shared misses, those
    that every candidate sends at least half the flow's smallest jump away, and its TRIM
    farthest, plus its switch error; its tie-break is the sliced W2 between its samples and the
    flow's on those same draws. The choice is within TIE of the closest, switches at most the
    tie margin more, and is the tie of the least sliced W2."""
    mix, sde = GaussianMixture.ring(k=8, radius=4.0, std=0.3), VPSDE()
    score = mix.score_fn(sde)
    x_T = pilot_draws(sde, torch.zeros(1, 2, dtype=torch.float64), 64)
    choice = choose(score, sde, 10, x_T)
    assert len(choice.boundaries) >= 8
    reference = exact_flow(score, sde, x_T)
    outputs = {c: run_candidate(score, sde, x_T, c, c.grid_for(sde, 10)) for c in choice.errors}
    dist = {c: (x - reference).pow(2).sum(1) for c, x in outputs.items()}
    jumps = (choice.boundaries.above - choice.boundaries.below).pow(2).sum(1)
    shared = torch.stack(list(dist.values())).min(0).values >= jumps.min() / 4
    for c, err in choice.errors.items():
        d2 = sorted(dist[c][~shared].tolist())
        assert d2[-1] > d2[-TRIM - 1]  # so leaving out the farthest changes the mean
        on_draws = sum(d2[:-TRIM]) / (len(d2) - TRIM)
        assert err == pytest.approx(on_draws + choice.switches[c], rel=1e-9), c.label
        assert choice.switches[c] > 0
        keep = ~shared
        keep[torch.where(keep, dist[c], -1.0).topk(TRIM).indices] = False
        sliced = _sliced_w2(outputs[c][keep], reference[keep])
        assert choice.sliced[c] == pytest.approx(sliced, rel=1e-9), c.label
    closest = min(choice.errors, key=choice.errors.__getitem__)
    margin = (TIE - 1) * choice.errors[closest]
    assert choice.error <= TIE * choice.errors[closest]
    assert choice.switches[choice.candidate] <= choice.switches[closest] + margin
    tied = ties(choice.errors, choice.switches, choice.boundaries.floor, TIE)
    assert len(tied) > 1  # so the tie-break decides
    assert choice.candidate == min(tied, key=choice.sliced.__getitem__)


def test_the_tie_distance_sees_the_law_not_the_pairing():
    """Samples that are the flow's own, each sent to another draw's place, lie at sliced W2
    zero from the flow (the paired distance charges them); a sample gone far off counts unless
    the flow jumps, where it is one of the TRIM farthest and left out; NaN samples are inf."""
    g = torch.Generator().manual_seed(3)
    reference = torch.randn(64, 3, generator=g, dtype=torch.float64)
    tie, kept = TieDistance(reference), torch.ones(64, dtype=torch.bool)

    def distance(x: torch.Tensor, kept: torch.Tensor, jumps: bool) -> float:
        d2 = (x - reference).square().sum(1)
        return tie(tie.project(x), kept, d2, jumps)  # any true `boundaries` trims

    shuffled = reference[torch.randperm(64, generator=g)]
    assert float((shuffled - reference).square().sum(1).mean()) > 1.0
    assert distance(shuffled, kept, False) == pytest.approx(0.0, abs=1e-12)
    off = reference.clone()
    off[:TRIM] += 100.0
    assert distance(off, kept, False) > 1.0
    assert distance(off, kept, True) == pytest.approx(0.0, abs=1e-12)
    kept[:TRIM] = False  # shared misses are left out too
    assert distance(off, kept, False) == pytest.approx(0.0, abs=1e-12)
    assert distance(off * math.nan, kept, False) == math.inf
    every = torch.ones(64, dtype=torch.bool)
    assert distance(off, every, False) == pytest.approx(_sliced_w2(off, reference), rel=1e-12)


def _step(dim: int):
    """x -> sign(x_1 - shift) e_1: a map that jumps by 2 across the hyperplane x_1 = shift."""
    e1 = torch.zeros(dim, dtype=torch.float64)
    e1[0] = 1.0
    return lambda shift: lambda x: torch.sign(x[:, :1] - shift) * e1


@pytest.mark.parametrize("dim", [2, 8])
@pytest.mark.parametrize("shift", [0.003, 0.01, 0.03])
def test_switch_error_is_the_mass_between_two_boundaries_times_the_squared_jump(dim, shift):
    """The flow jumps by 2 at x_1 = 0, the sampler at x_1 = shift: the draws in between
    (prior N(0, I) on VP) switch, so the mean squared distance they add is exactly
    4 (Phi(shift) - 1/2). On 256 arcs the estimate is within 35% of it (the LADDER measures
    each arc's miss to a factor of 3^(1/4)); about half the arcs cross the hyperplane. Each
    arc's signed miss sends its draws towards -e_1 for a positive shift and towards +e_1 for a
    negative one, whichever way the arc runs."""
    sde, step = VPSDE(), _step(dim)
    boundaries = Boundaries.find(step(0.0), sde, torch.zeros(1, dim, dtype=torch.float64), 256)
    assert 96 <= len(boundaries) <= 160
    exact = 4 * (0.5 * math.erfc(-shift / math.sqrt(2)) - 0.5)
    assert boundaries.switch_error(step(shift)) == pytest.approx(exact, rel=0.35)
    assert boundaries.switch_error(step(-shift)) == pytest.approx(exact, rel=0.35)
    upwards = (boundaries.above - boundaries.below)[:, 0]  # +2 where the arc crosses to +e_1
    assert bool((boundaries.misses(step(shift)) * upwards < 0).all())
    assert bool((boundaries.misses(step(-shift)) * upwards > 0).all())
    assert shift / 3 > LADDER[0] and shift < LADDER[-1]


def test_each_arcs_miss_is_measured_to_a_rung_of_the_ladder():
    """The flow jumps at x_1 = 0, the sampler at x_1 = 0.02: on the arc a cos(t) + b sin(t),
    x_1 = r cos(t - phase) runs through 0 at slope r, so it crosses 0.02 at asin(0.02 / r) from
    there, r = |(a_1, b_1)|; each arc's miss comes within a factor 3^(1/4) of it (the geometric
    middle of two rungs sqrt(3) apart), up to the flow's own jump, known to 1e-4 rad; a ladder
    in factors of 3 misses by up to sqrt(3)."""
    step = _step(4)
    boundaries = Boundaries.find(step(0.0), VPSDE(), torch.zeros(1, 4, dtype=torch.float64), 256)
    exact = torch.asin(0.02 / torch.hypot(boundaries.a[:, 0], boundaries.b[:, 0]))
    found = boundaries.misses(step(0.02)).abs()
    ok = (exact > 1e-3) & (exact < LADDER[-1] / 3)
    assert int(ok.sum()) > 64
    ratio = found[ok] / exact[ok]
    assert float(ratio.max()) < 3**0.25 * 1.1 and float(ratio.min()) > 3**-0.25 / 1.1


@pytest.mark.parametrize("dim", [2, 8])
def test_a_boundary_turned_about_the_origin_moves_as_many_draws_each_way_and_costs_nothing(dim):
    """The sampler's boundary x_1 = 0.03 x_2 against the flow's x_1 = 0: the draws between the
    two hyperplanes switch both ways, each mode keeps its mass (net 0 exactly), so the switch
    error, what a distance between distributions charges, is a small part of what the same
    misses add to the paired distance (4 E|0.03 x_2| phi(0) = 0.038): on 256 arcs, whose
    signed misses sum to 0 only up to their sampling noise, 0.15-0.18 of it."""
    e1 = torch.zeros(dim, dtype=torch.float64)
    e1[0] = 1.0
    boundaries = Boundaries.find(_step(dim)(0.0), VPSDE(), torch.zeros(1, dim).double(), 256)
    turned = lambda x: torch.sign(x[:, :1] - 0.03 * x[:, 1:2]) * e1  # noqa: E731
    paired = 4 * 0.03 * math.sqrt(2 / math.pi) / math.sqrt(2 * math.pi)  # 4 E|0.03 x_2| phi(0)
    assert boundaries.misses(turned).abs().mean() > 0
    assert boundaries.switch_error(turned) < 0.3 * paired


def test_each_pair_of_modes_nets_its_own_misses():
    """Three modes -2 e_1, 0 and 2 e_1 (jumps at x_1 = -+0.5): the arcs' jumps fall into two
    pairs, and a sampler with both boundaries moved by +0.02 moves draws from the middle mode
    to the left and from the right to the middle: each pair's misses all point one way, so
    nothing nets out (the switch error is the sum of the misses), while a sampler that moves
    the two boundaries apart (-0.02 and +0.02) is charged the same."""
    dim = 3
    e1 = torch.zeros(dim, dtype=torch.float64)
    e1[0] = 2.0

    def modes(lo: float, hi: float):
        return lambda x: ((x[:, :1] > lo).double() + (x[:, :1] > hi).double() - 1) * e1

    boundaries = Boundaries.find(modes(-0.5, 0.5), VPSDE(), torch.zeros(1, dim).double(), 128)
    pair, _ = boundaries.pairs
    assert len(pair.unique()) == 2
    for run in (modes(-0.48, 0.52), modes(-0.52, 0.52)):
        paired = boundaries._per_prior_draw(boundaries.misses(run).abs())
        assert boundaries.switch_error(run) == pytest.approx(paired, rel=1e-9)


def test_the_tie_margin_leaves_out_the_switch_floor():
    """Two candidates 1.0 and 1.3 above a shared switch floor of 10: counted in the margin the
    floor would tie them (the second has the better tie-break); left out, the closer wins."""
    errors, switches = {"a": 11.0, "b": 11.3}, {"a": 10.0, "b": 10.0}
    tiebreak = {"a": 2.0, "b": 1.0}.__getitem__
    assert decide(errors, switches, tiebreak) == "b"
    assert decide(errors, switches, tiebreak, floor=10.0) == "a"


def test_on_two_narrow_modes_no_candidate_resolves_a_miss_and_the_floor_is_no_tie():
    """Modes at +-3 with std 0.05 (3-D, VP, 10 steps): most candidates, the closest among
    them, meet the flow's jump between them within the first rung on every arc, so they share
    one switch error, at most the arcs' floor, which exceeds the closest candidate's distance
    itself; the closest is chosen (with the floor in the tie margin every candidate was a tie,
    and the moments chose one 2.1x as far from the flow)."""
    means = torch.zeros(2, 3, dtype=torch.float64)
    means[:, 0] = torch.tensor([3.0, -3.0], dtype=torch.float64)
    mix = GaussianMixture(torch.full((2,), 0.5, dtype=torch.float64), means,
                          torch.full((2, 3), 0.0025, dtype=torch.float64))  # fmt: skip
    sde = VPSDE()
    choice = choose(mix.score_fn(sde), sde, 10, pilot_draws(sde, torch.zeros(1, 3).double(), 64))
    floor = choice.boundaries.floor
    closest = min(choice.errors, key=choice.errors.__getitem__)
    shared = {c for c, e in choice.switches.items() if e == choice.switches[closest]}
    assert len(choice.boundaries) >= 8 and len(shared) > len(choice.switches) / 2
    assert choice.switches[closest] <= floor
    assert choice.errors[closest] - choice.switches[closest] < floor
    assert choice.candidate == closest


def test_a_smooth_flow_has_no_boundaries_and_a_sampler_no_switch_error():
    sde = VPSDE()
    boundaries = Boundaries.find(lambda x: 2 * x + x**3, sde, torch.zeros(1, 3), 32)
    assert len(boundaries) == 0 and boundaries.switch_error(lambda x: x) == 0.0


def test_the_choice_is_remembered_per_score_function_and_leaves_the_random_state_alone():
    mix, sde = GaussianMixture.ring(4, radius=2.0, std=0.3), VPSDE()
    score_fn = mix.score_fn(sde)
    state = torch.get_rng_state()
    first = sample(score_fn, sde, (3, 2), steps=6, return_info=True, seeds=[1, 2, 3])
    assert torch.equal(torch.get_rng_state(), state)
    assert first.pilot is not None and first.nfe == 6
    assert first.pilot_evaluations == first.pilot.evaluations > 6 * PILOT_DRAWS * len(CANDIDATES)
    again = sample(score_fn, sde, (5, 2), steps=6, return_info=True, seeds=[1, 2, 3, 4, 5])
    assert again.pilot_evaluations == 0 and again.pilot is first.pilot
    torch.testing.assert_close(again.samples[:3], first.samples, rtol=0, atol=0)
    other = sample(mix.score_fn(sde), sde, (3, 2), steps=6, return_info=True, seeds=[1, 2, 3])
    assert other.pilot_evaluations > 0 and other.pilot.candidate == first.pilot.candidate
    assert sample(score_fn, sde, (3, 2), steps=7, return_info=True).pilot_evaluations > 0


def test_the_chosen_configuration_is_what_runs():
    """The samples are the chosen candidate's on its own grid: the solver named in the result,
    NFE = steps whether it ends at t_min or with a Tweedie step."""
    mix, sde = GaussianMixture.ring(8, radius=4.0, std=0.5), DiscreteVPSDE.ddpm()
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for steps in (4, 12):
        res = sample(mix.score_fn(sde), sde, x_T, steps=steps, return_info=True)
        best = res.pilot.candidate
        assert res.solver == best.solver and res.nfe == steps and res.configuration == best
        torch.testing.assert_close(res.ts, best.grid_for(sde, steps))
        direct = run_candidate(mix.score_fn(sde), sde, x_T, best, best.grid_for(sde, steps))
        torch.testing.assert_close(res.samples, direct)
        assert res.pilot.error <= TIE * min(res.pilot.errors.values())


def test_what_the_caller_fixes_is_not_piloted():
    """pilot=0, a grid tensor, t_end, denoise or solver parameters: the fixed default; a grid
    kind restricts the candidates to it."""
    mix, sde = GaussianMixture.ring(4, radius=2.0, std=0.3), VPSDE()
    score_fn = mix.score_fn(sde)
    for kw in ({"pilot": 0}, {"t_end": 0.01}, {"denoise": True}, {"order": 2}):
        res = sample(score_fn, sde, (4, 2), steps=6, return_info=True, **kw)
        assert res.pilot is None and res.pilot_evaluations == 0 and res.solver == "dpm_solver", kw
        assert res.configuration is None, kw
    res = sample(score_fn, sde, (4, 2), steps=6, grid="edm", return_info=True)
    assert res.pilot.candidate.grid == "edm" and {c.grid for c in res.pilot.errors} == {"edm"}


def test_bad_pilot_arguments_are_refused_with_the_valid_choices():
    mix, sde = GaussianMixture.ring(4, radius=2.0, std=0.3), VPSDE()
    with pytest.raises(ValueError, match="pilot must be an integer >= 0"):
        sample(mix.score_fn(sde), sde, (4, 2), steps=6, pilot=-1)
    with pytest.raises(ValueError, match=r"grid.*log_snr"):
        sample(mix.score_fn(sde), sde, (4, 2), steps=6, grid="cubic")


def test_a_bad_score_is_caught_by_the_pilot_as_by_sample():
    """The pilot evaluates the score first, through the same checks as `sample`."""
    sde = VPSDE()
    with pytest.raises(ValueError, match=r"pilot.*score_fn returned \(\d+, 1\) for x of shape"):
        sample(lambda x, t: x[:, :1], sde, (4, 2), steps=6)
    with pytest.raises(ValueError, match="NaN or inf"):
        sample(lambda x, t: x * float("nan"), sde, (4, 2), steps=6)


def test_a_score_tied_to_its_batch_is_piloted_on_batches_of_that_size():
    """Class-conditional guidance with one label per sample only takes batches of the caller's
    size: the pilot falls back to batches of that size (the caller's labels on each) and makes
    the same kind of choice; a score that fails on any batch gets an error naming pilot=0."""
    from sde_diffusion.guidance import classifier_guided_score_fn

    mix, sde = GaussianMixture.ring(4, radius=2.0, std=0.3), VPSDE()

    def classifier(x, t):  # logits of two classes by the sign of x_1
        return torch.stack([x[:, 1], -x[:, 1]], 1)

    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0])
    guided = classifier_guided_score_fn(mix.score_fn(sde), classifier, labels, scale=1.0)
    res = sample(guided, sde, (7, 2), steps=6, return_info=True, pilot=16)
    assert res.pilot is not None and res.pilot_evaluations > 0 and res.samples.shape == (7, 2)
    with pytest.raises(ValueError, match="pilot=0"):
        sample(lambda x, t: x[:1], sde, (3, 2), steps=6, pilot=16)


@pytest.mark.parametrize(("dim", "draws"), [(3, 64), (64, 128)])
def test_moment_error_is_the_gaussian_kl_of_a_scaling_in_the_leading_directions(dim, draws):
    """x = c * ref for a centred reference: the fitted covariance scales by c^2, so the KL is
    k/2 (c^2 - 1 - log c^2) in closed form, over k = min(D, draws // 4) leading directions."""
    ref = torch.randn(draws, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = ref - ref.mean(0)
    k, c = min(dim, draws // 4), 0.8
    assert MomentError(ref)(ref) == pytest.approx(0.0, abs=1e-9)
    expected = k / 2 * (c**2 - 1 - math.log(c**2))
    assert MomentError(ref)(c * ref) == pytest.approx(expected, rel=1e-6)
    assert MomentError(ref)(ref * float("nan")) == math.inf


def test_the_rule_sends_ties_to_the_tiebreak_unless_they_switch_more():
    """`decide`, the rule of the pilot and of tune_grid's stop: the smallest error wins unless
    another lies within TIE of it with a better tie-break and a switch error at most the tie
    margin (a quarter of the smallest error) above the closest's; the tie-break is asked of ties
    only, and not at all when the closest has none. `tie` widens or narrows TIE."""
    asked: list[str] = []

    def tiebreak(key: str) -> float:
        asked.append(key)
        return {"a": 3.0, "b": 1.0, "c": 0.5, "d": 0.1}[key]

    errors = {"a": 1.0, "b": 1.2, "c": 1.24, "d": 2.0}
    assert decide(errors, dict.fromkeys(errors, 0.0), tiebreak) == "c"
    assert sorted(asked) == ["a", "b", "c"]
    switches = {"a": 0.1, "b": 0.3, "c": 0.36, "d": 0.0}  # c's lies 0.26 above a's: over 0.25
    assert decide(errors, switches, tiebreak) == "b"
    asked.clear()
    assert decide({"a": 1.0, "b": 1.26}, {"a": 0.0, "b": 0.0}, tiebreak) == "a" and not asked
    wider = {"a": 1.0, "b": 1.26, "d": 2.0}  # a tie of 1.4 admits b and leaves out d
    assert decide(wider, dict.fromkeys(wider, 0.0), tiebreak, tie=1.4) == "b"
    assert ties(wider, dict.fromkeys(wider, 0.0), 0.0, 1.4) == ["a", "b"]
    assert ties(wider, dict.fromkeys(wider, 0.0), 0.9, 2.0) == ["a"]  # margin above the floor


def test_a_switch_on_one_pilot_draw_is_left_to_the_arcs():
    """A 5-D mixture of 6 under DDPM at 20 steps: UniPC of order 3 on the uniform grid lies
    4x closer to the flow than order 2 on 2000 fresh draws, but one of 256 pilot draws (those
    of seed 0) sits so near a boundary that order 3 alone sends it to the other mode, and that
    one draw (squared distance ~24, 1/256 of the mean) would rank order 2 first. Leaving the
    TRIM farthest draws to the arcs' switch error, the pilot picks order 3."""
    mix = GaussianMixture.random(6, 5, generator=torch.Generator().manual_seed(43))
    sde = DiscreteVPSDE.ddpm()
    score = mix.score_fn(sde)
    third, second = (Candidate("unipc", "data", "uniform", "full", k) for k in (3, 2))
    x_T = pilot_draws(sde, torch.zeros(1, 5, dtype=torch.float64), PILOT_DRAWS, seed=0)
    choice = choose(score, sde, 20, x_T, candidates=(second, third))
    fresh = pilot_draws(sde, x_T, 2000, seed=7)
    flow = exact_flow(score, sde, fresh)
    truth = {}
    for c in (second, third):
        x = run_candidate(score, sde, fresh, c, c.grid_for(sde, 20))
        truth[c] = float((x - flow).pow(2).sum(1).mean())
    assert truth[third] < truth[second] / 2
    assert choice.candidate == third
    reference = exact_flow(score, sde, x_T)
    untrimmed = {}
    for c in (second, third):
        x = run_candidate(score, sde, x_T, c, c.grid_for(sde, 20))
        untrimmed[c] = float((x - reference).pow(2).sum(1).mean()) + choice.switches[c]
    assert untrimmed[third] > TIE * untrimmed[second]  # the whole mean would choose order 2


def test_shared_misses_are_the_draws_every_finite_candidate_sends_half_the_smallest_jump_away():
    """Jumps of 4 and 6: a draw is a shared miss when each candidate's squared distance there is
    at least (4 / 2)^2 = 4; a diverged candidate has no say, and without jumps, with a single
    candidate, or where more than SHARED_MISSES of the draws would be, nothing is."""
    zero = torch.zeros(2, 3, dtype=torch.float64)
    above = torch.tensor([[4.0, 0, 0], [0, 6.0, 0]], dtype=torch.float64)
    jumps = Boundaries(2, zero, zero, torch.zeros(2, dtype=torch.float64), zero, above)
    d2 = [torch.tensor([4.0, 9.0, 0.1, 5.0]), torch.tensor([5.0, 3.9, 0.2, 4.0]),
          torch.tensor([float("inf"), 0.0, 0.0, 0.0])]  # fmt: skip
    d2 = [torch.cat([d, torch.zeros(28)]) for d in d2]  # 32 draws, the last 28 on the flow
    assert 2 / 32 <= SHARED_MISSES < 3 / 32
    assert shared_misses(d2, jumps).tolist() == [True, False, False, True] + [False] * 28
    assert not shared_misses(d2, None).any()
    assert not shared_misses(d2[:1], jumps).any()  # one candidate: its misses are its own
    many = [d + 4 * torch.eye(32)[2] for d in d2]  # 3 of 32: jumps too small to tell switches
    assert not shared_misses(many, jumps).any()


def test_the_reference_lies_far_below_the_distances_it_ranks():
    """The held-out 4-D scale mixture of benchmarks/steps_vs_quality.py (variances 1e-4 to 3)
    under DDPM, on the pilot's draws: the pilot's flow (dopri5 at REFERENCE_TOL) lies 1.1e-7
    per draw (mean squared) from one at 1e-10, while at 1e-5, the tolerance before, it lay 7e-6
    away, where 20 steps of CONVERGED lie a median 1.7e-5 from the flow: a reference that far
    off ranks candidates by its own error (docs/default_sampler.md, "The reference's own
    error")."""
    g = torch.Generator().manual_seed(21)
    means = torch.randn(4, 4, generator=g, dtype=torch.float64)
    variances = torch.tensor([1e-4, 3e-3, 0.1, 3.0], dtype=torch.float64)
    mix = GaussianMixture(torch.full((4,), 0.25), means, variances[:, None].expand(4, 4).clone())
    sde = DiscreteVPSDE.ddpm()
    score = mix.score_fn(sde)
    x_T = pilot_draws(sde, means[:1])
    truth = exact_flow(score, sde, x_T, tol=1e-10)

    def off(x: torch.Tensor) -> torch.Tensor:
        return (x - truth).pow(2).sum(1)

    error = float(off(exact_flow(score, sde, x_T)).mean())
    assert error < 5e-7
    assert float(off(exact_flow(score, sde, x_T, tol=1e-5)).mean()) > 10 * error
    converged = run_candidate(score, sde, x_T, CONVERGED, CONVERGED.grid_for(sde, 20))
    assert float(off(converged).median()) > 50 * error
