"""Bad input to sample() and the solvers: a ValueError that names the value and what is valid."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor

from sde_diffusion import VPSDE, GaussianMixture
from sde_diffusion.solvers import GRIDS, SOLVERS, sample
from sde_diffusion.solvers.grids import resolve_grid

SDE_ = VPSDE()
TARGET = GaussianMixture.gaussian([0.5, -0.5], 0.5)
SCORE = TARGET.score_fn(SDE_)
SHAPE = (3, 2)
FIXED_STEP = {"ode": {"method": "euler"}}  # so that the ODE evaluates on the grid times


def run(solver: str = "euler_maruyama", score=SCORE, **kw: object) -> Tensor:
    kw.setdefault("steps", 4)
    return sample(
        score, SDE_, SHAPE, solver=solver, generator=torch.Generator().manual_seed(0), **kw
    )


def test_unknown_solver_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="'rk45'") as err:
        run("rk45")
    assert all(name in str(err.value) for name in SOLVERS)


@pytest.mark.parametrize("steps", [0, -1, 2.5])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_steps_must_be_a_positive_integer(solver: str, steps: float) -> None:
    with pytest.raises(ValueError, match=re.escape(f"got {steps}")):
        run(solver, steps=steps)


def test_unknown_grid_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="'linear'") as err:
        run(grid="linear")
    assert all(kind in str(err.value) for kind in GRIDS)


@pytest.mark.parametrize(
    "grid, message",
    [
        ([1.0, 0.5, 0.7, 0.1], r"strictly decrease.*grid\[1\]=0.5 is followed by grid\[2\]=0.7"),
        ([1.0, 0.5, 0.5, 0.1], r"strictly decrease.*grid\[1\]=0.5"),
        ([0.1, 0.5, 1.0], r"strictly decrease.*grid\[0\]=0.1"),
        ([1.0], "at least 2 points"),
        ([[1.0, 0.5]], "1-D"),
        ([1.0, float("nan"), 0.1], "NaN"),
        ([1.5, 0.5, 0.1], r"\(0, T = 1.0\]"),
        ([1.0, 0.5, 0.0], r"\(0, T = 1.0\]"),
    ],
)
def test_a_bad_explicit_grid_is_refused(grid: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run(grid=torch.tensor(grid, dtype=torch.float64))


@pytest.mark.parametrize("t_end", [0.0, -0.1, 1.0, 2.0])
def test_t_end_must_lie_below_T(t_end: float) -> None:
    with pytest.raises(ValueError, match=re.escape(f"t_end={t_end}")):
        run(t_end=t_end)


def wrong_shape(x: Tensor, t: Tensor) -> Tensor:
    return SCORE(x, t)[:, :1]


def nan_below_half(x: Tensor, t: Tensor) -> Tensor:
    s = SCORE(x, t)
    return s * float("nan") if bool((t < 0.6).any()) else s


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_score_of_the_wrong_shape_names_step_and_t(solver: str) -> None:
    with pytest.raises(ValueError, match=r"\(3, 1\) for x of shape \(3, 2\) at step 0 \(t=1.0\)"):
        run(solver, score=wrong_shape)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_non_finite_score_names_step_and_t(solver: str) -> None:
    """The first grid time below 0.6 is ts[2]: evaluated at the end of step 1 (a corrector) or
    at the start of step 2, and the error must name that step and time."""
    with pytest.raises(ValueError, match=r"step (\d+) \(t=([0-9.e-]+)\) contains NaN") as err:
        run(solver, score=nan_below_half, grid="uniform", **FIXED_STEP.get(solver, {}))
    step, t = re.search(r"step (\d+) \(t=([0-9.e-]+)\)", str(err.value)).groups()
    ts = resolve_grid(SDE_, "uniform", 4, "uniform", denoise=SOLVERS[solver].grid_sets_nfe)
    assert float(t) == pytest.approx(float(ts[2]), rel=1e-6)
    if solver != "ode":  # torchdiffeq reports the grid steps only once it has finished
        assert int(step) in (1, 2)


def test_non_finite_x_T_is_refused() -> None:
    x_T = torch.full(SHAPE, float("inf"))
    with pytest.raises(ValueError, match="x_T contains NaN or inf"):
        sample(SCORE, SDE_, x_T, solver="heun")


def test_seeds_must_match_the_batch() -> None:
    with pytest.raises(ValueError, match="got 2 seeds for a batch of 3"):
        sample(SCORE, SDE_, SHAPE, solver="heun", seeds=[1, 2])


@pytest.mark.parametrize(
    "solver, params, message",
    [
        ("pc", {"predictor": "ancestral"}, r"'ancestral'; valid choices: euler_maruyama, reverse"),
        ("pc", {"snr": 0.0}, "snr must be a finite number > 0, got 0.0"),
        ("pc", {"snr": -0.1}, "snr must be a finite number > 0, got -0.1"),
        ("pc", {"n_corrector": -1}, "n_corrector must be an integer >= 0, got -1"),
        ("pc", {"n_corrector": 1.5}, "n_corrector must be an integer >= 0, got 1.5"),
        ("heun", {"S_churn": -1.0}, "S_churn must be a finite number >= 0, got -1.0"),
        ("heun", {"S_noise": -0.5}, "S_noise must be a finite number >= 0, got -0.5"),
        ("heun", {"S_tmin": 2.0, "S_tmax": 1.0}, "S_tmin <= S_tmax, got S_tmin=2.0, S_tmax=1.0"),
        ("ode", {"method": "rk45"}, r'Invalid method "rk45". Must be one of .*"dopri5"'),
    ],
)
def test_bad_solver_parameters(solver: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run(solver, **params)


def test_unknown_solver_parameter_is_refused() -> None:
    with pytest.raises(TypeError, match="S_churn"):
        run("euler_maruyama", S_churn=1.0)
