"""The headline benchmark keeps running: a tiny --quick subset end to end, and its budget rule."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from sde_diffusion import model_score_fn
from sde_diffusion.solvers import sample

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "steps_vs_quality.py"
spec = importlib.util.spec_from_file_location("steps_vs_quality", PATH)
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # dataclasses look their module up
spec.loader.exec_module(bench)


def _counting_method(nfe_of_steps):
    """A fake sampler whose counted NFE is nfe_of_steps(steps)."""

    def run(problem, steps, seed):
        return problem.z, nfe_of_steps(steps)

    return bench.Method(f"fake {id(nfe_of_steps)}", run)


def test_budget_is_the_most_steps_whose_counted_nfe_fits():
    problem = bench.make_problem(2, 8, projections=4, flow_tol=None)
    cache: dict = {}
    two_per_step = _counting_method(lambda s: 2 * s + 1)  # e.g. a predictor-corrector + denoise
    assert [bench.steps_for_budget(two_per_step, b, problem, cache) for b in (2, 3, 10, 11)] == [
        None,
        1,
        4,
        5,
    ]
    heun = _counting_method(lambda s: 2 * s)  # 2 per step, one saved at the end, + denoise
    assert bench.steps_for_budget(heun, 5, problem, cache) == 2
    stepped = _counting_method(lambda s: s + 1 + s // 10)  # not linear: the walk still finds it
    assert bench.steps_for_budget(stepped, 100, problem, cache) == 90


def test_quick_subset_runs_end_to_end(tmp_path, capsys):
    argv = ["--quick", "--dims", "2", "--nfe", "5", "20", "--samples", "256"]
    argv += ["--projections", "16", "--solvers", "euler_maruyama", "ode", "--peers"]
    threads = torch.get_num_threads()
    try:
        assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    md = (tmp_path / "steps_vs_quality.md").read_text()
    assert "| solver \\ budget | 5 | 20 |" in md
    # euler_maruyama: 4 steps + the final denoise = 5 NFE; rk4 ode: 1 step (4 NFE) + denoise
    assert "| ours: euler_maruyama | " in md and "(5) |" in md
    assert "| ours: ode | " in md
    assert "NFE 20 (sliced_w2, default grids): ours" in out
    assert "NFE 10 (flow_w2): not measured" in out
    assert (tmp_path / "steps_vs_quality.png").read_bytes()[:4] == b"\x89PNG"


def test_tuned_rows_spend_their_budget_on_a_grid_fitted_off_the_benchmark_draws():
    """Budget b runs b - 1 steps on the tuned grid (NFE b with the Tweedie step); the grid is
    fitted once per problem and step count, and logged with its cost."""
    problem = bench.make_problem(2, 64, projections=4, flow_tol=None)
    log: dict = {}
    method = bench.tuned("unipc", log)
    steps = bench.steps_for_budget(method, 5, problem, {})
    _, nfe = method.run(problem, steps, 0)
    method.run(problem, steps, 1)
    assert (steps, nfe) == (4, 5) and list(log) == [(problem.name, 4)]
    fit, seconds = log[problem.name, 4]
    assert fit.trials == bench.TRIALS and fit.error < fit.initial_error and seconds > 0
    assert "unipc 5 NFE:" in bench.tuning_note(problem, {"unipc": log})


@pytest.mark.slow
def test_the_peer_harness_keeps_diffusers_timestep_convention():
    """diffusers' DDIM on "trailing" timesteps k = 999, 899, ..., 99 is our DDIM on the grid
    t = (k + 1) / 1000 followed by the Tweedie step: the same eps-model at the same noise levels,
    so the two agree to diffusers' float32 schedule tables."""
    problem = bench.make_problem(2, 64, projections=4, flow_tol=None)
    x_peer, nfe_peer = bench.peer("DDIMScheduler").run(problem, 10, 0)
    grid = (torch.arange(999, 0, -100, dtype=torch.float64) + 1) / 1000
    score_fn = model_score_fn(problem.eps_model, problem.sde, "eps", time_input="index")
    res = sample(score_fn, problem.sde, problem.z, "ddim", grid=grid, return_info=True)
    assert nfe_peer == res.nfe == 10
    torch.testing.assert_close(res.samples, x_peer, rtol=1e-5, atol=1e-5)
