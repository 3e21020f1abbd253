"""A time grid tuned to one score function: the few-step grid that brings a deterministic solver
closest to that score's own probability-flow ODE.

At 5-20 evaluations the grid decides most of a solver's error, and which grid is best depends on
the data: on two oracle mixtures a grid quadratic in t halved the 10-step error of DPM-Solver++
and UniPC against uniform log-SNR steps in 2-D and doubled it in 16-D
(benchmarks/steps_vs_quality_ablation.md, the benchmark before issue 11), and on the suite of
benchmarks/steps_vs_quality.py the best peer grid changes with the problem. `tune_grid`
therefore measures instead of guessing, in the spirit of the learned and optimised schedules
of Watson et al. (2021), Sabour et al. ("Align Your Steps", 2024) and Xue et al. (2024): on a
pilot batch of prior draws it solves the probability-flow ODE accurately once (adaptive
dopri5), then moves the grid's log-SNRs to minimise the mean squared distance between the
solver's samples and those exact flow samples, by Nelder-Mead over a parametrisation that keeps
every grid valid. The cost is paid once per (score function, SDE, solver, steps); the grid then
serves any number of samples, from x_T drawn independently of the pilot.

On multimodal targets that distance is carried by the few draws whose flow ends near a boundary
between modes: rarer than 1 in 100, so a few hundred draws show none or one, and a search on
them alone fits those draws and loses elsewhere. Both the search and its stopping therefore add
each grid's switch error across the flow's jumps (`pilot.Boundaries`, the pilot's estimate of
what switches add to the mean squared distance over all prior draws) to its distance on the
draws (its distance, like the pilot's, without the `pilot.TRIM` farthest draws, whose switches
are the arcs' to count): the search minimises the quantity the pilot chose by. A share of the
pilot (a quarter by default) is held out of the search, and so are the arcs: the held-out check
counts switches on HELD_ARCS arcs of its own, since a grid fitted to the search's few jumps
(a dozen or so of 32 arcs on the mixtures) can look better there than it is. Of the start grid
and the best grid found after 10, 20, 40, ... trials the pilot's rule (`pilot.decide`) picks
one: the closest to the flow on those held-out draws, plus its switch error on the held-out
arcs, or among those within `pilot.TIE` of it the one whose samples of the whole pilot match the
flow's mean and covariance best, of those no further from it than the start. Early stopping,
which never returns a grid that those measures rank below the start (README, "Tuned grids").

For `sample`'s default (solver=None) the search runs from several starts: the pilot's choice and
its next closest candidates, each on its own grid. The pilot ranks untuned grids, and which
configuration tunes best is another question: where mode switches carry the error, one
configuration's grid may move its jumps onto the flow's while another's barely can (on the 16-D
mixture of benchmarks/steps_vs_quality.py under VP at 10 evaluations, the benchmark's 256 tuning
draws, 200 trials: the pilot's choice, then picked among ties by its moments, found no grid
closer than its start on the held-out draws and arcs, 0.29; the candidate closest to the flow on
the pilot's own draws one at 0.050, and half the flow W2 on the benchmark's x_T). Each start's
snapshots give one pick by the rule above, and another start's pick replaces the default's only
where the two are no tie: among near-equals the moments, asked of more grids, picked a grid 2.3x
the default's flow W2 (2-D ring in R^16, DDPM, 20 evaluations).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor
from tqdm.auto import tqdm

from .._tensor import check_callable, check_int
from ..sde import SDE, ScoreFn, check_sde
from ._registry import SOLVERS, CheckedScore, generator_noise, get_solver
from .grids import resolve_grid
from .pilot import (
    ARC_TOL,
    BOUNDARY_ARCS,
    CANDIDATES,
    CONVERGED,
    PILOT_DRAWS,
    PILOT_SEED,
    AffineLaw,
    Boundaries,
    Candidate,
    MomentError,
    cached_choice,
    decide,
    exact_flow,
    flow_error,
    pilots,
)
from .sampling import initial_state, sample

#: the first simplex around a pinned start: each log step ratio moved by this much
SIMPLEX = 0.3
#: the share of the pilot held out of the search, to choose when to stop it
HOLDOUT = 0.25
#: the first trial count at which the best grid so far is kept for the held-out check; then
#: every doubling of it, and the last trial
FIRST_SNAPSHOT = 10
#: tune_grid(None) searches from the default's choice and the pilot's STARTS - 1 next closest
#: candidates (README, "Tuned grids")
STARTS = 4
#: arcs of the held-out check's switch errors, apart from the search's (module docstring), and
#: the seed of their ends
HELD_ARCS, HELD_ARCS_SEED = 64, PILOT_SEED + 2

__all__ = ["TunedGrid", "UntunableSolverError", "tunable_solvers", "tune_grid"]


class UntunableSolverError(ValueError):
    """A grid asked to be tuned for a solver that has no flow to be brought close to."""


def tunable_solvers() -> tuple[str, ...]:
    """The registered solvers a grid can be tuned for: deterministic, stepping on the grid."""
    return tuple(n for n, s in SOLVERS.items() if not s.stochastic and s.grid_sets_nfe)


@dataclass
class TunedGrid:
    """What `tune_grid` returns: the grid (float64, T first) and what tuning found and cost.

    error / initial_error: mean squared distance per sample between the solver's samples and the
    exact flow on the draws the search saw (without the `pilot.TRIM` farthest where the flow
    jumps) plus the switch error on the search's arcs (`pilot.Boundaries.switch_error`), which
    the search minimised, on the returned grid and on the start grid (the default's own, where
    several starts were searched); holdout_error / initial_holdout_error: the same on the
    held-out draws and arcs, by which (ties to the moments) the returned grid was chosen among
    the searches' snapshots (module docstring); switch_error / initial_switch_error: that
    held-out switch error alone (0 where the flow has no jump on those arcs, or nothing is held
    out). Where the flow is an affine map of the draws (a Gaussian target), error and
    initial_error are instead the KL of the grid's Gaussian law to the flow's
    (`pilot.AffineLaw`), and nothing is held out. trials: grids tried by all searches. nfe:
    every score evaluation this call spent, the reference flow's included (and for solver=None
    the pilot's, unless `sample` already paid it for this score function).
    solver / params / denoise: what the grid was tuned for (for solver=None, `sample`'s choice
    or one of the pilot's next closest candidates); `kwargs` passes all of it to `sample`.
    configuration: for solver=None, that candidate of the pilot (None for a named solver).
    """

    ts: Tensor
    error: float
    initial_error: float
    trials: int
    nfe: int
    holdout_error: float = float("nan")
    initial_holdout_error: float = float("nan")
    switch_error: float = 0.0
    initial_switch_error: float = 0.0
    solver: str = "unipc"
    params: dict = field(default_factory=dict)
    denoise: bool | str = True
    configuration: Candidate | None = None

    @property
    def kwargs(self) -> dict[str, object]:
        """`sample(score_fn, sde, x, **fit.kwargs)` runs the tuned configuration."""
        return {"solver": self.solver, "grid": self.ts, "denoise": self.denoise, **self.params}


@dataclass(frozen=True)
class _Start:
    """Where a search starts: a solver, its parameters, its last step, its grid and, for the
    default's starts, the pilot's candidate."""

    solver: str
    params: dict
    denoise: bool | str
    grid: Tensor
    candidate: Candidate | None = None


def _fractions_to_grid(
    theta: np.ndarray, lam_T: float, lam_max: float, sde: SDE, pinned: bool = False
) -> Tensor:
    """Softmax(theta, 0) splits [lambda_T, lambda_max] into len(theta) + 1 parts: the first
    len(theta) are the grid's steps, the last what is left above its end (theta_i = log of step
    i over that remainder). Every theta gives a strictly decreasing grid from T to a time above
    t_min; `pinned`: the last part is the grid's last step too, so that it ends at t_min."""
    theta = np.append(theta, 0.0)
    w = np.exp(theta - theta.max())
    lam = lam_T + (lam_max - lam_T) * np.concatenate([[0.0], np.cumsum(w / w.sum())])
    ts = sde.t_from_log_snr(torch.as_tensor(lam if pinned else lam[:-1], dtype=torch.float64))
    ts[0] = float(sde.T)
    if pinned:
        ts[-1] = float(sde.t_min)
    return ts


def tune_grid(
    score_fn: ScoreFn,
    sde: SDE,
    solver: str | None = "unipc",
    steps: int = 10,
    pilot: Sequence[int] | Tensor = (256, 2),
    *,
    trials: int = 300,
    starts: int = STARTS,
    holdout: float = HOLDOUT,
    reference: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    **solver_params: object,
) -> TunedGrid:
    """A grid of `steps` intervals for `solver` on `score_fn`, to pass as `sample(..., grid=ts)`
    (or everything, `sample(..., **fit.kwargs)`).

    solver: a registered name (its samples end with the Tweedie step, as `sample`'s for a named
        solver), or None for `sample`'s default: the configuration `sample(score_fn, sde, x,
        steps=steps)` runs (its own pilot's choice, on its own draws, remembered for
        score_fn, or `pilot.CONVERGED` at steps where it runs no pilot), so that the tuned grid
        can only improve on what the default does; the tuning moves its grid's inner points (a
        grid that ends at t_min keeps that end; one that ends in a Tweedie step tunes it).
    starts: for solver=None with a pilot, the configurations searched: the pilot's choice and
        its `starts` - 1 next closest candidates on the pilot's draws (module docstring); each
        costs `trials` grids.

    pilot: the shape of the batch of prior draws to tune on (drawn with `generator` on `device`
        in `dtype`), or the draws x_T themselves; 256 draws tuned the oracle mixtures of 2 and
        16 dimensions as well as 1024.
    holdout: the share of the pilot (its last draws; at least one of two or more, none for 0)
        held out of the search to decide where it stops; with it, every grid's switch error
        counts (`pilot.Boundaries`: on 32 arcs in the search, on HELD_ARCS = 64 others in the
        check; none for holdout=0). Draws whose flow switches modes are rarer than 1 in 100:
        on the 16-D oracle mixture at 20 evaluations, 64 held-out draws alone let through a
        grid that fresh draws put 1.7x behind the start (README, "Tuned grids"). Where the
        flow is an affine map of the draws (a Gaussian target) nothing is held out: the search
        minimises the KL of the grid's Gaussian law to the flow's (`pilot.AffineLaw`, as the
        pilot chooses there), which is the same on any draws.
    trials: grids tried from each start (each costs `steps` + 1 evaluations on the searched
        draws, and 5 runs on the arcs' jumps where the flow has any).
    reference: the pilot's exact probability-flow samples, if known; by default dopri5 at
        tolerance `pilot.REFERENCE_TOL` from the same draws.
    The search starts from the solver's default grid (ending at `grids.final_time`), or the
    default's (and its rivals'); the grid returned is never worse than the solver's or the
    default's start on the held-out draws. Only
    deterministic solvers that step on the grid can be tuned (`tunable_solvers()`): a stochastic
    one has no flow to be brought close to.
    """
    check_callable(score_fn, "score_fn")
    check_sde(sde)
    if solver is not None and solver not in tunable_solvers():
        raise UntunableSolverError(
            f"cannot tune a grid for solver {solver!r}; valid choices (deterministic, stepping "
            f"on the grid): {', '.join(tunable_solvers())}"
        )
    steps, trials = check_int(steps, "steps", 1 + (solver is None)), check_int(trials, "trials")
    starts = check_int(starts, "starts")
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout is the held-out share of the pilot, in [0, 1); got {holdout}")
    if solver is not None:
        get_solver(solver).check_params(solver_params)
    x_T = initial_state(sde, pilot, generator_noise(generator), device, dtype, ("pilot", "pilot"))
    nfe = 0
    if reference is None:
        counted = CheckedScore(score_fn)
        reference = exact_flow(counted, sde, x_T)
        nfe = counted.nfe
    if reference.shape != x_T.shape:
        raise ValueError(
            f"reference has shape {tuple(reference.shape)}, the pilot {tuple(x_T.shape)}"
        )
    n, law = x_T.shape[0], AffineLaw.fit(x_T, sde.prior_std(), reference)
    kept = n - (max(1, int(holdout * n)) if n > 1 and holdout > 0 and law is None else 0)
    chosen, boundaries = [], None
    if solver is None and pilots(sde, steps):  # sample()'s pilot: its draws, kept for score_fn
        choice, fresh = cached_choice(score_fn, sde, steps, x_T, PILOT_DRAWS, CANDIDATES, progress)
        nfe += choice.nfe if fresh else 0
        boundaries = choice.boundaries
        others = [c for c, e in choice.errors.items() if c != choice.candidate and e < math.inf]
        chosen = [choice.candidate, *sorted(others, key=choice.errors.__getitem__)[: starts - 1]]
    elif solver is None:
        chosen = [CONVERGED]
    begin = [
        _Start(c.solver, {**c.params, **solver_params}, c.denoise, c.grid_for(sde, steps), c)
        for c in chosen
    ] or [
        _Start(solver, dict(solver_params), True,
               resolve_grid(sde, None, steps, get_solver(solver).default_grid, denoise=True))
    ]  # fmt: skip
    held_arcs = None
    if kept == n:
        boundaries = None
    else:
        counted = CheckedScore(score_fn)
        flow = functools.partial(exact_flow, counted, sde, tol=ARC_TOL)
        if boundaries is None:
            boundaries = Boundaries.find(flow, sde, x_T, BOUNDARY_ARCS)
        held_arcs = Boundaries.find(flow, sde, x_T, HELD_ARCS, HELD_ARCS_SEED)
        nfe += counted.nfe
    fit_x, fit_ref, held_x, held_ref = x_T[:kept], reference[:kept], x_T[kept:], reference[kept:]
    lam_T = float(sde.log_snr(torch.tensor([float(sde.T)], dtype=torch.float64))[0])
    lam_max = float(sde.log_snr(torch.tensor([float(sde.t_min)], dtype=torch.float64))[0])
    # a grid to t_min, with or without a Tweedie step after it, keeps that end; one of a single
    # step there would leave nothing to move, so it keeps a sliver above its end instead
    pinned = [float(s.grid[-1]) == float(sde.t_min) and len(s.grid) > 2 for s in begin]

    def grid(k: int, theta: np.ndarray) -> Tensor:
        return _fractions_to_grid(theta, lam_T, lam_max, sde, pinned[k])

    def samples(k: int, theta: np.ndarray, x: Tensor) -> Tensor:
        nonlocal nfe
        s = begin[k]
        res = sample(score_fn, sde, x, s.solver, grid=grid(k, theta), denoise=s.denoise,
                     return_info=True, **s.params)  # fmt: skip
        nfe += res.nfe
        return res.samples

    def run(k: int, theta: np.ndarray, x: Tensor, ref: Tensor) -> float:
        y = samples(k, theta, x)
        return flow_error(y, ref, boundaries) if law is None else law(y)

    switch_errors: dict[tuple, float] = {}

    def switch_error(k: int, theta: np.ndarray, arcs: Boundaries | None) -> float:
        key = (arcs is held_arcs, k, *theta)
        if key not in switch_errors:
            run_on = functools.partial(samples, k, theta)
            switch_errors[key] = arcs.switch_error(run_on) if arcs else 0.0
        return switch_errors[key]

    errors: list[float] = []  # errors[0] is the default start's: Nelder-Mead evaluates x0 first
    # (search error, start, theta) of each search's best grid after 1 trial (its start), 10, 20,
    # 40, ... trials and its last
    snapshots: list[tuple[float, int, np.ndarray]] = []
    marks = {1, trials, *(FIRST_SNAPSHOT * 2**k for k in range(trials.bit_length()))}
    bar = tqdm(total=trials * len(begin), desc="tuning", disable=not progress, leave=False)
    with bar:
        for k, s in enumerate(begin):
            lam = sde.log_snr(s.grid)
            h = lam.diff()
            if pinned[k]:  # the last step is the reference part
                theta0 = torch.log(h[:-1] / h[-1]).numpy()
            else:
                rest = max(lam_max - float(lam[-1]), 1e-6 * (lam_max - lam_T))
                theta0 = torch.log(h / rest).numpy()
            leader, tried = (np.inf, theta0), 0

            def error(theta: np.ndarray, k: int = k) -> float:
                nonlocal leader, tried
                bar.update(1)
                tried += 1
                errors.append(run(k, theta, fit_x, fit_ref) + switch_error(k, theta, boundaries))
                if errors[-1] < leader[0]:
                    leader = (errors[-1], np.array(theta))
                if tried in marks:
                    snapshots.append((leader[0], k, leader[1]))
                return errors[-1]

            options = {"maxfev": trials, "xatol": 1e-4, "fatol": 1e-10, "adaptive": True}
            if pinned[k]:  # theta0 = 0 on a uniform start: scipy's default simplex is 2.5e-4 wide
                simplex = np.vstack([theta0, theta0 + SIMPLEX * np.eye(len(theta0))])
                options["initial_simplex"] = simplex
            found = minimize(error, theta0, method="Nelder-Mead", options=options)
            snapshots.append((float(found.fun), k, found.x))
    unique: dict[tuple, tuple[float, int, np.ndarray]] = {}
    for e, k, th in snapshots:  # in order: the default's start first
        unique.setdefault((k, *th), (e, k, th))
    grids = list(unique.values())
    if kept < n:  # the pilot's rule on the held-out draws and the jumps; ties keep the earlier
        held, jumps = {}, {}
        for i, (_, k, th) in enumerate(grids):
            jumps[i] = switch_error(k, th, held_arcs)
            held[i] = run(k, th, held_x, held_ref) + jumps[i]
        moment_error, floor = MomentError(reference), held_arcs.floor

        @functools.cache
        def moments(i: int) -> float:
            return moment_error(samples(*grids[i][1:], x_T))

        picks = []  # each start's own pick among its grids no further than the default's start
        for k in range(len(begin)):
            no_worse = {i: e for i, e in held.items() if e <= held[0] and grids[i][1] == k}
            if no_worse:
                picks.append(decide(no_worse, jumps, moments, floor))
        # another start's pick replaces the default's only where the two are no tie
        first = picks[0]
        i = decide({j: held[j] for j in picks}, jumps,
                   lambda j: -math.inf if j == first else moments(j), floor)  # fmt: skip
        held_error, switches, start_held, start_switches = held[i], jumps[i], held[0], jumps[0]
    else:
        i = min(range(len(grids)), key=lambda i: grids[i][0])
        held_error = start_held = float("nan")
        switches = start_switches = 0.0
    fit_error, k, theta = grids[i]
    s = begin[k]
    return TunedGrid(
        grid(k, theta), float(fit_error), errors[0], len(errors), nfe, float(held_error),
        float(start_held), switches, start_switches, s.solver, s.params, s.denoise, s.candidate,
    )  # fmt: skip
