"""`sample()`: any registered solver by name over a resolved grid, with the NFE counted, the
score's output checked, the final Tweedie step and a progress bar; with no solver named, the
configuration a pilot chose for this score function (`pilot.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._tensor import (
    check_batch,
    check_callable,
    check_choice,
    check_device,
    check_float_dtype,
    check_int,
    check_shape,
    describe,
)
from ..sde import SDE, ScoreFn, check_sde
from ._registry import (
    CheckedScore,
    NoiseSource,
    SolverSpec,
    check_seeds,
    generator_noise,
    get_solver,
    per_sample_noise,
)
from .grids import GRIDS, resolve_grid
from .pilot import (
    CANDIDATES,
    CONVERGED,
    FINAL_STEPS,
    PILOT_DRAWS,
    Candidate,
    PilotChoice,
    cached_choice,
    end_with,
    mean_log_snr_step,
    pilots,
)

__all__ = ["CORRECTOR_MAX_STEP", "DEFAULT_PARAMS", "SampleResult", "default_solver", "sample"]

#: what `sample()` runs when no solver is named and no pilot runs (pilot=0, or a grid tensor,
#: t_end, denoise or solver parameters given): the third-order multistep integrator of the noise
#: prediction, on steps equal in log-SNR from T to the schedule's t_min, at full order to the
#: grid's end and without a final Tweedie jump (README, "The default")
DEFAULT_PARAMS: dict[str, object] = {"order": 3, "prediction": "noise", "lower_order_final": False}
#: the largest mean log-SNR step at which the default adds UniPC's corrector
CORRECTOR_MAX_STEP = 0.5


def default_solver(sde: SDE, steps: int) -> str:
    """The default's solver for `steps` steps over [t_min, T]: "unipc" (the multistep predictor
    with the UniC corrector, one order more) when the mean log-SNR step is at most
    CORRECTOR_MAX_STEP, else "dpm_solver" (the predictor alone).

    The corrector's interpolant runs through four model outputs spanning three steps. A data
    scale v enters x0 and eps along the flow as a sigmoid in lambda of unit width centred at
    -log(v)/2, whose Taylor series converges within pi/2 of any point: three steps of at most 0.5
    stay inside it, while at h ~ 1 (10 steps on the usual schedules) the fourth-order
    interpolant overshoots and the third-order predictor alone is the better bet.
    """
    steps = check_int(steps, "steps")
    return "unipc" if mean_log_snr_step(sde, steps) <= CORRECTOR_MAX_STEP else "dpm_solver"


@dataclass
class SampleResult:
    """What `sample(..., return_info=True)` returns."""

    samples: Tensor
    nfe: int
    ts: Tensor
    trajectory: list[Tensor] = field(default_factory=list)
    #: the solver that ran, and for the default configuration the pilot's choice (None: no
    #: pilot ran for this call or an earlier one) and its cost in this call (0 when remembered)
    solver: str = ""
    pilot: PilotChoice | None = None
    pilot_evaluations: int = 0
    #: the default's configuration that ran: the pilot's choice, or `pilot.CONVERGED` where no
    #: pilot runs (None for a named solver and for the fixed configuration)
    configuration: Candidate | None = None


def sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape_or_x_T: Sequence[int] | Tensor,
    solver: str | SolverSpec | None = None,
    steps: int = 20,
    grid: str | Tensor | None = None,
    t_end: float | None = None,
    denoise: bool | str | None = None,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    return_info: bool = False,
    return_trajectory: bool = False,
    pilot: int = PILOT_DRAWS,
    **solver_params: object,
) -> Tensor | SampleResult:
    """Draw samples by integrating the reverse process from T down to t_end with `solver`.

    shape_or_x_T: the batch shape (x_T is drawn from the SDE's prior) or x_T itself.
    solver: a registered name (see SOLVERS) or a SolverSpec; solver_params go to it by name.
        None: the default. With `steps` (and optionally a grid kind) only, a pilot on `pilot`
        prior draws of the same shape picks, from `pilot.CANDIDATES` (the multistep
        integrator of order 2 or 3 with each grid, end and prediction, with and without UniPC's
        corrector), the configuration closest to the score's exact probability-flow map at
        NFE = steps, its mode switches included; the choice is remembered per score function
        (README, "The default"). Where the mean log-SNR step is at most
        `pilot.PILOT_MIN_STEP` (some 100 steps or more) no pilot runs: every candidate is then
        all but converged, and `pilot.CONVERGED` is the one that converges to the pilot's
        reference, the flow with the trapezoidal step to sigma = 0 from t_min.
        pilot=0, a grid tensor, t_end, denoise or solver_params: `default_solver(sde, steps)`
        with DEFAULT_PARAMS (which solver_params override) and no Tweedie step: NFE = steps.
    steps / grid: `steps` intervals of the grid kind `grid` (default: the solver's own), or
        `grid` as an explicit strictly decreasing tensor of times (then `steps` is ignored).
    t_end: where the grid stops. Default: sde.t_min, or with the Tweedie step (solvers whose
        grid sets their evaluations, all but the adaptive `ode`) `grids.final_time`: T / (2 steps
        + 1) while that is above t_min, so that the Tweedie jump to t = 0 is half a grid step.
    denoise: finish with a step to t = 0 (one more NFE): True or "tweedie", the Tweedie step
        x0 = (x + sigma^2 s(x, t_end)) / gamma; "trapezoid", the trapezoidal rule to sigma = 0
        (`pilot.trapezoid_step`, from the grid's end, by default t_min: where the data's density
        is smooth at the scale sigma / gamma there); False: none. Default: True for a named
        solver, the configuration's own for the default.
    generator / seeds: noise from one generator for the batch, or per-sample seeds so that each
        sample's trajectory depends on its own seed only (not both).
    return_info: return a SampleResult with the NFE (counted, never computed; a pilot's cost,
        in single-sample evaluations, is its `pilot_evaluations`), the grid and, with
        return_trajectory, the state after every step.
    """
    check_callable(score_fn, "score_fn")
    check_sde(sde)
    if seeds is not None and generator is not None:
        raise ValueError(
            "seeds and generator conflict: pass seeds (one generator per sample) or generator "
            "(one for the batch), not both"
        )
    noise = per_sample_noise(seeds) if seeds is not None else generator_noise(generator)
    x = initial_state(sde, shape_or_x_T, noise, device, dtype)
    if seeds is not None:
        check_seeds(seeds, x.shape[0])
    choice, pilot_evaluations, best = None, 0, None
    if solver is None:
        pilot = check_int(pilot, "pilot", 0)
        chosen_elsewhere = isinstance(grid, Tensor) or t_end is not None or denoise is not None
        if pilot and not (chosen_elsewhere or solver_params):
            steps = check_int(steps, "steps")
            if grid is not None:
                check_choice("grid", grid, GRIDS)
            if pilots(sde, steps):
                choice, fresh = _pilot(score_fn, sde, steps, x, pilot, grid, progress)
                pilot_evaluations = choice.evaluations if fresh else 0
                best = choice.candidate
            else:
                best = replace(CONVERGED, grid=grid or CONVERGED.grid)
            solver, solver_params, denoise = best.solver, best.params, best.denoise
            grid = best.grid_for(sde, steps)
        else:
            n = len(grid) - 1 if isinstance(grid, Tensor) else steps
            solver, solver_params = default_solver(sde, n), {**DEFAULT_PARAMS, **solver_params}
            denoise = False if denoise is None else denoise
    final = final_step(True if denoise is None else denoise)
    spec = get_solver(solver) if isinstance(solver, str) else solver
    if not isinstance(spec, SolverSpec):
        raise TypeError(f"solver must be a solver name or a SolverSpec, got {describe(solver)}")
    spec.check_params(solver_params)
    half_step_end = final == "tweedie" and spec.grid_sets_nfe
    ts = resolve_grid(sde, grid, steps, spec.default_grid, t_end, half_step_end)
    counted = CheckedScore(score_fn)
    trajectory: list[Tensor] = [x] if return_trajectory else []
    bar = tqdm(total=len(ts) - 1, desc=spec.name, disable=not progress, leave=False)

    def callback(i: int, t: Tensor, x_next: Tensor) -> None:
        counted.step = i + 1
        bar.update(1)
        if return_trajectory:
            trajectory.append(x_next)

    params = dict(solver_params, callback=callback)
    if spec.stochastic:
        params["noise"] = noise
    with bar:
        x = spec.run(counted, sde, x, ts.to(x.device, x.dtype), **params)
    if final:
        x = end_with(counted, sde, x, ts[-1], (final,))[:, 0]
        if return_trajectory:
            trajectory.append(x)
    if not return_info:
        return x
    return SampleResult(x, counted.nfe, ts, trajectory, spec.name, choice, pilot_evaluations, best)


def final_step(denoise: bool | str) -> str | None:
    """`sample()`'s denoise as the name of its last step (a key of FINAL_STEPS), or None."""
    if isinstance(denoise, bool):
        return "tweedie" if denoise else None
    if isinstance(denoise, str) and denoise in FINAL_STEPS:
        return denoise
    valid = ", ".join(["True", "False", *map(repr, FINAL_STEPS)])
    raise ValueError(f"unknown denoise {denoise!r}; valid choices: {valid}")


def _pilot(
    score_fn: ScoreFn,
    sde: SDE,
    steps: int,
    x: Tensor,
    draws: int,
    grid: str | None,
    progress: bool,
) -> tuple[PilotChoice, bool]:
    """The pilot's choice for sample(); `grid`, a kind, restricts the candidates to it."""
    candidates = CANDIDATES if grid is None else tuple(c for c in CANDIDATES if c.grid == grid)
    return cached_choice(score_fn, sde, steps, x, draws, candidates, progress)


def initial_state(
    sde: SDE,
    shape_or_x_T: Sequence[int] | Tensor,
    noise: NoiseSource,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    names: tuple[str, str] = ("shape", "x_T"),
) -> Tensor:
    """x_T as given (checked: a finite floating batch, and device / dtype, when given, must be
    its own), or drawn from the SDE's prior with `noise` in the given (checked) shape, device
    and dtype. names: what the caller calls a shape and a state, for the messages."""
    dev = None if device is None else check_device(device)
    dt = None if dtype is None else check_float_dtype(dtype)
    if not isinstance(shape_or_x_T, Tensor):
        shape = check_shape(shape_or_x_T, names[0])
        like = torch.empty(shape, device=dev, dtype=dt or torch.get_default_dtype())
        return sde.prior_std() * noise(like)
    x = check_batch(shape_or_x_T, names[1])
    if dev is not None and (dev.type, dev.index or 0) != (x.device.type, x.device.index or 0):
        raise ValueError(f"device {str(dev)!r} conflicts with {names[1]} on {x.device}: pass one")
    if dt is not None and dt != x.dtype:
        raise ValueError(f"dtype {dt} conflicts with {names[1]} of dtype {x.dtype}: pass one")
    return x
