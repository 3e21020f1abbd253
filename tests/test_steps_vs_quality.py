"""The suite benchmark keeps running: a tiny subset end to end, its budget rule, and its peer
harness against our own samplers where the two are the same algorithm."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from sde_diffusion import VESDE, VPSDE, DiscreteVPSDE, GaussianMixture, SubVPSDE
from sde_diffusion.solvers import sample
from sde_diffusion.solvers.pilot import PILOT_SEED, pilot_draws

HERE = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load("steps_vs_quality")
peers = _load("steps_vs_quality_peers")


def test_budget_is_the_most_steps_whose_counted_nfe_fits():
    def fit(nfe_of_steps, budgets):
        return [peers.steps_for_budget(nfe_of_steps, b) for b in budgets]

    assert fit(lambda s: 2 * s + 1, (2, 3, 10, 11)) == [None, 1, 4, 5]  # predictor-corrector
    assert fit(lambda s: 2 * s - 1, (1, 5, 10, 20)) == [1, 3, 5, 10]  # Heun: none at the end
    assert fit(lambda s: s + 1 + s // 10, (100,)) == [90]  # not linear: the walk still finds it


def test_a_tiny_subset_runs_end_to_end(tmp_path, capsys):
    argv = ["--problems", "Gaussian 4-D", "--schedules", "ddpm", "--peers", "DPM++2M lu"]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    stem = tmp_path / "steps_vs_quality_gaussian_4_d_ddpm_peers_dpm_2m_lu"  # names the subset
    md = stem.with_suffix(".md").read_text()
    assert "| Gaussian 4-D (60x), ddpm | KL | " in md
    assert "vs" in md and "DPM++2M lu)" in md
    assert "| ours: default | " in md and "(10) |" in md
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_random_gaussians_are_drawn_from_their_seed_alone(tmp_path):
    """`--random SEED COUNT` replaces the problems by `random_gaussian(seed)`: the same seed
    gives the same target, its covariance's eigenvalues lie within its stated spread (10-5000x)
    and below 3.3, and the run names its file after the seeds."""
    for seed in range(601, 611):
        name, mix = bench.random_gaussian(seed)
        again = bench.random_gaussian(seed)[1]
        assert torch.equal(mix.means, again.means) and torch.equal(mix.covs, again.covs)
        ev = torch.linalg.eigvalsh(mix.covs[0])
        assert mix.dim in bench.RANDOM_DIMS and 0 < float(ev.min()) and float(ev.max()) <= 3.3
        spread = float(name.split()[-1].rstrip("x"))  # rounded to an integer in the name
        assert float(ev.max() / ev.min()) <= spread + 0.5 and 10 <= spread <= 5012
    argv = ["--random", "604", "1", "--schedules", "ddpm", "--peers", "DPM++2M lu"]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    md = (tmp_path / "steps_vs_quality_random_604_1_ddpm_peers_dpm_2m_lu.md").read_text()
    assert "exact-score random Gaussians" in md and "| random Gaussian 604: 3-D" in md


def test_random_mixtures_are_drawn_from_their_seed_alone(tmp_path):
    """`--random-mixtures SEED COUNT` replaces the problems by `random_mixture(seed)`: the same
    seed gives the same target; 2-12 components, weights summing to one, each component's
    eigenvalues within the stated spread and below 1.03, the components' largest eigenvalues
    within the stated ratio of scales; the run names its file after the seeds."""
    for seed in range(701, 711):
        name, mix = bench.random_mixture(seed)
        again = bench.random_mixture(seed)[1]
        assert torch.equal(mix.means, again.means) and torch.equal(mix.covs, again.covs)
        assert mix.dim in bench.MIXTURE_DIMS and 2 <= mix.num_components <= 12
        assert abs(float(mix.weights.sum()) - 1) < 1e-12 and bool((mix.weights > 0).all())
        ev = torch.linalg.eigvalsh(mix.covs)
        spread, scales = (float(w.rstrip("x,")) for w in name.split()[-2:])
        assert bool((ev > 0).all()) and float(ev.max()) <= 1.03
        assert float((ev[:, -1] / ev[:, 0]).max()) <= spread + 0.5 and spread <= 317
        assert float(ev[:, -1].max() / ev[:, -1].min()) <= scales + 0.5 and scales <= 1000.5
    argv = ["--random-mixtures", "718", "1", "--schedules", "ddpm", "--peers", "DPM++2M lu",
            "--mix-samples", "200", "--fresh-samples", "0"]  # fmt: skip
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    stem = "steps_vs_quality_random_mixtures_718_1_ddpm_peers_dpm_2m_lu_200_draws"
    md = (tmp_path / f"{stem}.md").read_text()
    assert "exact-score random mixtures" in md and "| random mixture 718: 2-D, 3 components" in md


def test_exact_kl_of_an_affine_sampler_is_its_output_law():
    """On a Gaussian the error is read off the sampler's affine map; for a map known in closed
    form (the exact flow) it is the KL of the exact flow's law, near zero."""
    problem = bench.make_problem("g", bench.anisotropic(4, 60.0, 5), "ddpm")
    t_min, T = problem.sde.t_min, problem.sde.T
    mix = problem.mixture

    def exact_flow(x_T):
        x = mix.pf_ode_solution(x_T, T, t_min, problem.sde)
        return x, 0

    kl, _ = problem.error(exact_flow, stochastic=False)
    assert 0 <= kl < 1e-4


def test_the_mixtures_judge_is_the_flow_to_the_data():
    """The mixtures' reference goes on from t_min to sigma = 0 (`flow_to_data`), which no
    sampler's score on [t_min, T] sees: on a Gaussian with a variance of 5e-4, as narrow as the
    noise at t_min under DDPM and Stable Diffusion's betas, it is the closed-form flow to t = 0
    to 1e-5, where x / gamma at t_min is 3e-3 to 3e-2 away; under VE, which ends at noise 1e-4,
    x at t_min is already within 1e-5 of it."""
    mix = bench.anisotropic(6, 4000.0, 3)
    for schedule, far, near in (("ddpm", 3e-3, 1.0), ("scaled_linear", 2e-2, 1.0), ("ve", 0, 1e-5)):
        sde = bench.SCHEDULES[schedule]()
        x_T = sde.prior_std() * bench._normal(32, 6, 1)
        x = mix.pf_ode_solution(x_T, sde.T, sde.t_min, sde)
        exact = mix.pf_ode_solution(x_T, sde.T, 0.0, sde)
        torch.testing.assert_close(bench.flow_to_data(mix, sde, x), exact, rtol=0, atol=1e-5)
        gamma = float(sde.marginal(torch.tensor(float(sde.t_min)))[0])
        assert far < float((x / gamma - exact).abs().max()) < near


def test_diffusers_ddim_on_trailing_timesteps_is_our_ddim():
    """diffusers' DDIM on "trailing" timesteps k = 999, 899, ..., 99 is our DDIM on the grid
    t = (k + 1) / 1000 followed by the Tweedie step: the harness feeds it the same score."""
    sde, mix = DiscreteVPSDE.ddpm(), GaussianMixture.ring(8, 4.0, 0.5)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ddim = next(p for p in peers.diffusers_peers() if p.label == "diffusers: DDIM trailing")
    x_peer, nfe_peer = ddim.run(mix.score_fn(sde), sde, x_T, 10, 0)
    grid = (torch.arange(999, 0, -100, dtype=torch.float64) + 1) / 1000
    res = sample(mix.score_fn(sde), sde, x_T, "ddim", grid=grid, return_info=True)
    assert nfe_peer == res.nfe == 10
    torch.testing.assert_close(res.samples, x_peer, rtol=1e-5, atol=1e-5)


def test_k_diffusion_dpmpp_2m_is_our_dpm_solver_2m():
    """k-diffusion's dpmpp_2m on its exponential grid (n noise levels from T's to t_min's, then
    0) is our DPM-Solver++(2M) on n - 1 log-SNR steps to t_min at full order, then Tweedie: the
    same algorithm, so the denoiser adapter must reproduce it up to k-diffusion's grid, which it
    builds in float32 (relative round-off 6e-8 in each noise level; measured difference 3e-7)."""
    sde, mix = DiscreteVPSDE.ddpm(), GaussianMixture.ring(8, 4.0, 0.5)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kd = next(p for p in peers.k_diffusion_peers() if p.label.endswith("dpmpp_2m exponential"))
    x_peer, nfe_peer = kd.run(mix.score_fn(sde), sde, x_T, 10, 0)
    res = sample(mix.score_fn(sde), sde, x_T, "dpm_solver", 9, t_end=sde.t_min,
                 lower_order_final=False, return_info=True)  # fmt: skip
    assert nfe_peer == res.nfe == 10
    torch.testing.assert_close(res.samples, x_peer, rtol=2e-6, atol=2e-6)


def test_diffusers_edm_dpmpp_2m_is_our_dpm_solver_2m_on_sdes_without_betas():
    """On VE and sub-VP, where diffusers' DDPM-beta schedulers cannot run, its EDM DPM-Solver++
    (2M) on exponential noise levels is our DPM-Solver++(2M) on log-SNR steps to t_min, then
    Tweedie: the eps preconditioning is inverted exactly, up to the scheduler's float32 noise
    levels (measured difference 4e-7)."""
    mix = GaussianMixture.ring(8, 4.0, 0.5)
    for sde in (VESDE(), SubVPSDE()):
        runnable = {p.label for p in peers.diffusers_peers() if p.applies(sde)}
        assert runnable and all("EDM" in label for label in runnable)
        z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        x_T = sde.prior_std() * z
        edm = next(
            p for p in peers.diffusers_peers() if p.label.endswith("EDM DPM++2M exponential")
        )
        x_peer, nfe_peer = edm.run(mix.score_fn(sde), sde, x_T, 10, 0)
        res = sample(mix.score_fn(sde), sde, x_T, "dpm_solver", 9, t_end=sde.t_min,
                     lower_order_final=False, return_info=True)  # fmt: skip
        assert nfe_peer == res.nfe == 10
        torch.testing.assert_close(res.samples, x_peer, rtol=2e-6, atol=2e-6)
    assert not any(
        "EDM" in p.label for p in peers.diffusers_peers() if p.applies(DiscreteVPSDE.ddpm())
    )


def test_more_mixture_draws_extend_the_default_ones():
    """--mix-samples N measures the same cells on more draws: its first MIX_SAMPLES x_T are the
    default run's, and so is their exact flow, up to the adaptive solver's global error (its
    steps follow the whole batch: about 2e-4 here, against flow W2 of 3e-3 and more at NFE 20)."""
    ring = GaussianMixture.ring(8, 4.0, 0.5)
    base = bench.make_problem("ring", ring, "ddpm")
    more = bench.make_problem("ring", ring, "ddpm", mix_samples=bench.MIX_SAMPLES + 200)
    n = bench.MIX_SAMPLES
    assert more.z.shape[0] == n + 200 and torch.equal(more.z[:n], base.z)
    torch.testing.assert_close(more.flow[:n], base.flow, rtol=0, atol=1e-3)


def test_fresh_draws_remeasure_each_budgets_best_peer_and_ours():
    """The re-measure runs, at each budget, the peer setting that was best on the problem's own
    draws and our method, on new draws of x_T with their own exact flow, through the same score
    function (so the default's pilot, cached on it, does not run again)."""
    problem = bench.make_problem("ring", GaussianMixture.ring(8, 4.0, 0.5), "ddpm")
    wanted = ("diffusers: DDIM trailing", "diffusers: DPM++2M lu")
    runs = [bench.from_peer(p) for p in peers.diffusers_peers() if p.label in wanted]
    mine = [bench.ours("unipc noise", solver="unipc", prediction="noise")]
    cache: dict = {}
    records = [bench.evaluate(problem, m, b, cache) for m in runs + mine for b in bench.NFES]
    fresh = problem.redrawn(300, seed=bench.FRESH_SEED)
    assert fresh.score_fn is problem.score_fn and fresh.sde is problem.sde
    assert fresh.z.shape == (300, 2) and not torch.equal(fresh.z[:300], problem.z[:300])
    # the judge is coupled to the fresh draws: their flow scores 0, the old draws' flow (the same
    # law, other draws) scores its sampling noise
    assert float(fresh._judge(fresh.flow)) < 1e-12 < 1e-3 < float(fresh._judge(problem.flow[:300]))
    again = bench.remeasure(fresh, records, mine, runs, cache)
    for b in bench.NFES:
        best = min((r for r in records if r["budget"] == b and r["solver"] in wanted),
                   key=lambda r: r["error"])  # fmt: skip
        cell = {r["solver"] for r in again if r["budget"] == b}
        assert cell == {best["solver"], mine[0].label}
        assert all(r["error"] is not None for r in again)


def test_trained_fresh_table_takes_the_best_peer_of_the_first_draw():
    """The trained benchmark's re-measure picks, per budget and metric, the peer that was least
    on the first draw (not on the fresh one), and runs it and ours (and the tuned default where
    it ran) on the steps found there."""
    trained = _load("steps_vs_quality_trained")
    level = {"ours: default": 1.0, "a": 2.0, "b": 3.0}
    runs = {
        k: (lambda x_T, steps, v=v: (x_T * 0 + v + steps / 1000, steps)) for k, v in level.items()
    }
    values = {("ours: default", 5): ([9.0], 5), ("a", 5): ([0.5], 4), ("b", 5): ([0.7], 5),
              ("ours: default", 10): ([9.0], 10), ("a", 10): ([0.9], 9), ("b", 10): ([0.2], 10)}  # fmt: skip
    (table,) = trained.remeasure(runs, values, [5, 10], ["m"], lambda x: [float(x.mean())],
                                 torch.zeros(4, 2))  # fmt: skip
    rows = table.splitlines()[2:]
    assert rows == ["| 5 | 1.005 | 2.004 (a) | 0.50 |", "| 10 | 1.01 | 3.01 (b) | 0.34 |"]
    # the tuned default, where it ran (budget 5 only), in a column of its own and a second ratio
    runs[trained.TUNED] = lambda x_T, steps: (x_T * 0 + 0.25, steps)
    values[trained.TUNED, 5] = ([0.1], 5)
    (table,) = trained.remeasure(runs, values, [5, 10], ["m"], lambda x: [float(x.mean())],
                                 torch.zeros(4, 2))  # fmt: skip
    assert table.splitlines()[0].startswith(f"| NFE | ours: default | {trained.TUNED} | best")
    rows = table.splitlines()[2:]
    assert rows == ["| 5 | 1.005 | 0.25 | 2.004 (a) | 0.50 / 0.12 |",
                    "| 10 | 1.01 |  | 3.01 (b) | 0.34 |"]  # fmt: skip


def test_trained_judge_measures_the_distance_to_the_networks_own_flow():
    """The trained benchmark's flow metrics score samples against the probability-flow map of
    their own x_T: an independent accurate solve of that flow (the oracle's score in place of a
    network) scores near 0 against the flow that ends with the Tweedie jump, as it does, and a
    coarse DDIM run far from both, while both stay about as far from the data as the flow itself
    is. The two ends differ by less than 1e-3 on this ring of std 0.2."""
    trained = _load("steps_vs_quality_trained")
    mixture = GaussianMixture.ring(4, radius=2.0, std=0.2)
    sde, g = VPSDE(), torch.Generator().manual_seed(3)
    score_fn = mixture.score_fn(sde)
    x_T = torch.randn(400, 2, generator=g, dtype=torch.float64)
    test = mixture.sample(4000, generator=g)
    metrics = trained.judge(score_fn, sde, test, x_T)
    flow = sample(score_fn, sde, x_T, "ode", 1, rtol=1e-8, atol=1e-8, variable="t")
    coarse = sample(score_fn, sde, x_T, "ddim", 4)
    (to_data, kept, to_flow, jumped), (coarse_data, _, coarse_flow, _) = (
        metrics(flow),
        metrics(coarse),
    )
    assert jumped < 1e-3 and to_flow < 2e-3 < 0.05 < coarse_flow
    assert to_data > 10 * to_flow and abs(kept - to_data) < 0.5 * to_data
    assert abs(coarse_data - to_data) < 0.1 * to_data


def test_benchmark_draws_are_not_the_pilots_nor_the_noise():
    """The default's pilot draws prior samples from its own seeds. Were the benchmark's x_T (or
    its fresh draws) those samples, the default would be judged on the draws it was chosen on;
    were they the stochastic samplers' first noise (seed 0), the two would be correlated."""
    dim, n = 16, 4000
    pilot = torch.cat([pilot_draws(VPSDE(), torch.zeros(1, dim, dtype=torch.float64), 256, s)
                       for s in (PILOT_SEED, PILOT_SEED + 1)])  # fmt: skip
    noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for seed in (bench.X_T_SEED, bench.FRESH_SEED):
        z = bench._normal(n, dim, seed)
        assert torch.cdist(z, pilot).min() > 0.1 and torch.cdist(z, noise).min() > 0.1


def test_tuned_rows_fit_the_flow_the_default_is_judged_by():
    """The benchmark's tuned grids fit tune_grid's own reference (`pilot.exact_flow`: dopri5,
    then the trapezoidal step to sigma = 0). Fitted to the flow ending with the Tweedie jump
    from t_min instead (which collapses directions of variance near sigma_min^2: 7e-4 here), the
    tuned default on the held-out 8-D Gaussian under scaled-linear betas reached at NFE 10 twice
    the untuned default's exact KL to the data (0.019 against 0.0099; the prior's own floor
    0.0092)."""
    name = "Gaussian 8-D (500x)"
    problem = bench.make_problem(name, bench.holdout()[name](), "scaled_linear")
    cells = [bench.evaluate(problem, m, 10, {}) for m in (bench.tuned({}), bench.ours("d", True))]
    tuned, default = (c["error"] for c in cells)
    assert tuned <= default < 0.011


def test_switch_rates_splits_a_mixture_cell_and_refuses_a_gaussian(capsys):
    """benchmarks/switch_rates.py on two narrow modes: the flow's jump found, a row per sampler
    with its switches and their net (fewer, nonzero where ten modes lie close), a member of the
    pilot's family by label, the blocks counted; a Gaussian (no jumps), an ambiguous problem
    name, peers that name no peer and a member the family lacks are refused by name."""
    switch_rates = _load("switch_rates")
    member = "unipc order 2 (noise, edm grid, end zero)"
    argv = ["--problem", "narrow modes", "--schedule", "ddpm", "--nfe", "5",
            "--peers", "DPM++2M lu", "--draws", "2000", "--candidates", member]  # fmt: skip
    assert switch_rates.main(argv) == 0
    out = capsys.readouterr().out
    assert "| ours: default | 5 |" in out and "| diffusers: DPM++2M lu | 5 |" in out
    assert f"| ours: {member} | 5 |" in out  # its evaluations counted
    assert "the flow's smallest jump 5.5" in out and "of 2 blocks of 1000 draws" in out
    assert "| switches in 2000 | net |" in out and "| on all 2000 |" in out
    # ten modes within 0.12 of each other in 2-D at NFE 5: many switches, netted by mode
    close = ["--random-mixture", "709", "--schedule", "scaled_linear", "--nfe", "5",
             "--peers", "DEIS3 karras", "--draws", "2000"]  # fmt: skip
    assert switch_rates.main(close) == 0
    rows = [r.split(" | ") for r in capsys.readouterr().out.splitlines() if r.startswith("| ")]
    assert [r[0] for r in rows[1:]] == ["| ours: default", "| diffusers: DEIS3 karras"]
    for row in rows[1:]:
        assert 0 < int(row[5]) < int(row[4])
    refused = [("Gaussian 4-D", "DPM++2M lu", "is a Gaussian"),
               ("mixture", "DPM++2M lu", "names ["),
               ("narrow modes", "no such peer", "name none of"),
               ("narrow modes", "DPM++2M lu", "none of pilot.CANDIDATES")]  # fmt: skip
    for problem, peer, said in refused:
        bad = ["--problem", problem, *argv[2:6], "--peers", peer, "--draws", "2000"]
        bad += ["--candidates", "no such member"] if "CANDIDATES" in said else []
        with pytest.raises(SystemExit):
            switch_rates.main(bad)
        assert said in capsys.readouterr().err


def test_pilot_yardsticks_replays_the_defaults_choice(capsys):
    """benchmarks/pilot_yardsticks.py on one random mixture at NFE 5: its 'pilot' is the choice
    `sample()` makes for the same score function and budget, and each yardstick that picks
    another candidate is reported as a ratio of flow W2 on both sets of draws."""
    yardsticks = _load("pilot_yardsticks")
    argv = ["--nfe", "5", "--schedules", "ddpm", "--random", "705", "1", "--no-sets"]
    assert yardsticks.main(argv) == 0
    out = capsys.readouterr().out
    name, mixture = bench.random_mixture(705)
    problem = bench.make_problem(name, mixture, "ddpm")
    x_T = problem.sde.prior_std() * problem.z[:1]
    chosen = sample(problem.score_fn, problem.sde, x_T, steps=5, return_info=True).pilot
    row = next(line for line in out.splitlines() if line.startswith(f"| {name}, ddpm |"))
    assert row.split(" | ")[1] == chosen.candidate.label
    assert "sliced: changes " in out and " of 1 choices" in out and "fresh (" in row


def test_pilot_yardsticks_replays_a_trained_networks_choice(tmp_path, tiny_checkpoint, capsys):
    """--ckpt: a trained network is a cell of its own, named by its checkpoint, whose 'pilot' is
    the choice `sample()` makes through that network; where a yardstick picks otherwise, it is
    scored on both draws of x_T."""
    yardsticks = _load("pilot_yardsticks")
    ckpt = tiny_checkpoint(tmp_path / "train", "two_moons", 500)
    assert yardsticks.main(["--nfe", "5", "--ckpt", str(ckpt)]) == 0
    out = capsys.readouterr().out
    network = yardsticks.Network(ckpt, n=4)
    x_T = network.sde.prior_std() * network.z[:1]
    chosen = sample(network.score_fn, network.sde, x_T, steps=5, return_info=True).pilot
    row = next(line for line in out.splitlines() if line.startswith(f"| {ckpt} |"))
    assert row.split(" | ")[1] == chosen.candidate.label
    assert out.count(" of 1 choices") == len(yardsticks.YARDSTICKS)
