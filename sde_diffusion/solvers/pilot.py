"""The default sampler's pilot: for one score function and budget, the configuration whose samples
come closest to the exact probability-flow map on a batch of prior draws.

At 5-20 evaluations a deterministic sampler's error is decided by four choices: the grid (where
the steps go in log-SNR), the end (stop at t_min, take the polynomial's own step to sigma = 0, or
a Tweedie jump from half a step above 0), the interpolated output (x0 or eps) and whether UniPC's
corrector runs. Which combination is best depends on the data, not on the schedule alone: on the
problem suite of benchmarks/steps_vs_quality.py no single one comes within 1.5x of the best peer
setting on every problem at NFE 5-20, while the best of them beats it on almost all. The error
that matters is the distance to the flow map x_T -> x_0 that every deterministic sampler
approximates, and it can be measured: solve the flow accurately (adaptive dopri5) from a few
hundred prior draws once, run every candidate from the same draws, keep the closest in mean
squared distance. Candidates within TIE of the closest, which the pilot cannot tell apart, go to
the one whose samples' mean and covariance match the flow's best (Gaussian KL in the flow's
leading directions): squared distance weighs a direction by its absolute scale, so a collapsed
or inflated small-variance direction (blur, in an image) barely moves it, while the KL weighs it
relatively. That is the spirit of the optimised schedules of Watson et al. (2021), Sabour et al.
("Align Your Steps", 2024) and Xue et al. (2024), restricted to a finite family so that it costs
a fixed number of evaluations and cannot overfit the pilot.

The cost, `PilotChoice.evaluations` single-sample evaluations, is paid once per (score function,
SDE, steps, sample shape, dtype, device): `sample()` keeps the choice for as long as the score
function lives. The draws come from their own seeded generator, so a pilot never touches the
caller's random state and the same call always makes the same choice.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..metrics import gaussian_kl
from ..parametrize import tweedie_x0
from ..sde import SDE, ScoreFn
from ._registry import CheckedScore, get_solver
from .grids import GRIDS, final_time, time_grid

__all__ = [
    "CANDIDATES",
    "PILOT_DRAWS",
    "TIE",
    "Candidate",
    "MomentError",
    "PilotChoice",
    "choose",
    "exact_flow",
    "pilot_draws",
    "run_candidate",
]

#: prior draws the default's pilot runs on
PILOT_DRAWS = 256
#: the seed of the pilot's own generator
PILOT_SEED = 0
#: the pilot's exact flow: dopri5 at this relative and absolute tolerance
REFERENCE_TOL = 1e-5
#: candidates within this factor of the smallest squared distance to the flow are ties, decided
#: by their moments
TIE = 1.25
#: how a candidate's samples end: "t_min" (the grid's end), "zero" (the eps polynomial's own
#: step to sigma = 0, no evaluation), "tweedie" (one step fewer, then x0 = E[x_0 | x_t] from
#: `grids.final_time`)
ENDS = ("t_min", "zero", "tweedie")


@dataclass(frozen=True)
class Candidate:
    """One configuration of the third-order multistep exponential integrator (`expint`)."""

    solver: str  # "dpm_solver" (predictor) or "unipc" (with the UniC corrector)
    prediction: str  # "noise" or "data": what the multistep polynomial interpolates
    grid: str  # a kind of `grids.GRIDS`
    end: str  # one of ENDS

    @property
    def denoise(self) -> bool:
        return self.end == "tweedie"

    @property
    def params(self) -> dict[str, object]:
        """The solver's parameters: order 3; x0 interpolation lowers the order over its last
        steps below 15 (as DPM-Solver++ does for stability), eps interpolation keeps it."""
        params: dict[str, object] = {"order": 3, "prediction": self.prediction}
        params["lower_order_final"] = self.prediction == "data"
        if self.end == "zero":
            params["to_zero"] = True
        return params

    def fits(self, steps: int) -> bool:
        """Whether `steps` evaluations leave this candidate at least one step."""
        return steps >= 1 + self.denoise

    def grid_for(self, sde: SDE, steps: int) -> Tensor:
        """Its grid for `steps` evaluations: the Tweedie step is one of them."""
        if self.denoise:
            return time_grid(sde, steps - 1, self.grid, t_end=final_time(sde, steps - 1))
        return time_grid(sde, steps, self.grid)

    @property
    def label(self) -> str:
        return f"{self.solver} ({self.prediction}, {self.grid} grid, end {self.end})"


#: the family the pilot chooses from: predictor or predictor-corrector, on each grid kind, either
#: interpolating eps to t_min (with or without the step to sigma = 0) or x0 with a Tweedie end
CANDIDATES = tuple(
    Candidate(solver, prediction, grid, end)
    for solver in ("dpm_solver", "unipc")
    for prediction, end in (("noise", "t_min"), ("noise", "zero"), ("data", "tweedie"))
    for grid in GRIDS
)


@dataclass(frozen=True)
class PilotChoice:
    """What `choose` returns: the chosen candidate, every candidate's error (mean
    squared distance per pilot sample to the exact flow; inf where it diverged) and moment error
    (`MomentError`), the score calls spent (nfe, on batches of draws) and the single-sample
    evaluations they made (evaluations), the reference flow's included."""

    candidate: Candidate
    errors: dict[Candidate, float]
    moments: dict[Candidate, float]
    nfe: int
    evaluations: int

    @property
    def error(self) -> float:
        return self.errors[self.candidate]


def pilot_draws(sde: SDE, like: Tensor, draws: int = PILOT_DRAWS) -> Tensor:
    """`draws` prior samples shaped like one sample of `like`, on its device and in its dtype,
    from the pilot's own seeded generator."""
    g = torch.Generator().manual_seed(PILOT_SEED)
    z = torch.randn((draws, *like.shape[1:]), generator=g, dtype=like.dtype)
    return sde.prior_std() * z.to(like.device)


def run_candidate(
    score_fn: ScoreFn, sde: SDE, x_T: Tensor, candidate: Candidate, ts: Tensor
) -> Tensor:
    """A candidate's samples from x_T on the grid ts (its Tweedie step included)."""
    x = get_solver(candidate.solver).run(score_fn, sde, x_T, ts.to(x_T), **candidate.params)
    return tweedie_step(score_fn, sde, x, ts[-1]) if candidate.denoise else x


def exact_flow(score_fn: ScoreFn, sde: SDE, x_T: Tensor) -> Tensor:
    """The probability-flow map of x_T: dopri5 at REFERENCE_TOL to t_min, then Tweedie."""
    ts = torch.tensor([float(sde.T), float(sde.t_min)], dtype=x_T.dtype, device=x_T.device)
    tol = {"rtol": REFERENCE_TOL, "atol": REFERENCE_TOL}
    x = get_solver("ode").run(score_fn, sde, x_T, ts, **tol)
    return tweedie_step(score_fn, sde, x, ts[-1])


def tweedie_step(score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor) -> Tensor:
    """The jump from the grid's last time t to E[x_0 | x_t] (one evaluation)."""
    t = t.to(x).expand(x.shape[0])
    return tweedie_x0(x, t, score_fn(x, t), sde)


def flow_error(x: Tensor, reference: Tensor) -> float:
    """Mean squared distance per sample (inf when x is not finite)."""
    err = float((x - reference).flatten(1).double().pow(2).sum(1).mean())
    return err if math.isfinite(err) else math.inf


class MomentError:
    """x -> KL(N(mean, cov) of x || N(mean, cov) of the reference), both restricted to the
    reference's k leading principal directions, k = min(D, draws // 4) so that both covariances
    are well estimated (inf when x is not finite). The reference's directions and moments are
    computed once, for every candidate compared with it."""

    def __init__(self, reference: Tensor):
        ref = reference.flatten(1).double()
        self.center = ref.mean(0)
        self.k = min(ref.shape[1], max(1, ref.shape[0] // 4))
        self.basis = None
        if self.k < ref.shape[1]:
            self.basis = torch.linalg.svd(ref - self.center, full_matrices=False).Vh[: self.k].T
        self.mean, cov = self._moments(ref)
        self.jitter = 1e-9 * float(torch.trace(cov)) / self.k * torch.eye(self.k).to(cov)
        self.cov = cov + self.jitter

    def _moments(self, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.basis is not None:
            y = (y - self.center) @ self.basis
        return y.mean(0), torch.atleast_2d(torch.cov(y.T))

    def __call__(self, x: Tensor) -> float:
        x = x.flatten(1).double()
        if not bool(torch.isfinite(x).all()):
            return math.inf
        mean, cov = self._moments(x)
        kl = float(gaussian_kl(mean, cov + self.jitter, self.mean, self.cov))
        return kl if math.isfinite(kl) else math.inf


def choose(
    score_fn: ScoreFn,
    sde: SDE,
    steps: int,
    x_T: Tensor,
    reference: Tensor | None = None,
    candidates: Sequence[Candidate] = CANDIDATES,
    progress: bool = False,
    batch: int | None = None,
) -> PilotChoice:
    """The candidate whose samples from the pilot draws x_T lie closest to their exact flow
    `reference` (by default solved here), at `steps` evaluations each, ties within TIE decided
    by `MomentError`; `batch`: evaluate the score on batches of this many draws (all of them
    at once by default).

    Every candidate runs on every draw: screening all of them on the first 32 draws and running
    the 6 closest there on all 256 costs 0.38 of the evaluations, but on the multimodal problems
    of benchmarks/steps_vs_quality.py it dropped the right candidate (1.1-2.3x the best peer
    where the full pilot is at most 1.06x), since there a few draws that switch modes decide."""
    checked, evaluations = CheckedScore(score_fn), 0

    def counted(x: Tensor, t: Tensor) -> Tensor:
        nonlocal evaluations
        evaluations += x.shape[0]
        return checked(x, t)

    fitting = [c for c in candidates if c.fits(steps)]
    if not fitting:
        raise ValueError(f"no pilot candidate fits {steps} steps")
    size = batch or x_T.shape[0]

    def batched(run: Callable[..., Tensor], *args: object) -> Tensor:
        return torch.cat([run(counted, sde, x, *args) for x in x_T.split(size)])

    bar = tqdm(total=len(fitting) + (reference is None), desc="pilot", disable=not progress)
    with bar:
        if reference is None:
            reference = batched(exact_flow)
            bar.update(1)
        errors, moments, moment_error = {}, {}, MomentError(reference)
        for c in fitting:
            samples = batched(run_candidate, c, c.grid_for(sde, steps))
            errors[c], moments[c] = flow_error(samples, reference), moment_error(samples)
            bar.update(1)
    closest = min(errors.values())
    ties = [c for c in fitting if errors[c] <= TIE * closest]
    best = min(ties, key=moments.__getitem__)
    return PilotChoice(best, errors, moments, checked.nfe, evaluations)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_choice(
    score_fn: ScoreFn,
    sde: SDE,
    steps: int,
    like: Tensor,
    draws: int,
    candidates: Sequence[Candidate],
    progress: bool,
) -> tuple[PilotChoice, bool]:
    """`choose` on `pilot_draws(sde, like, draws)`, remembered for as long as score_fn lives;
    also whether it was computed now (False: from the cache). A score function that cannot be
    weakly referenced or hashed is piloted on every call.

    A score function that only takes batches of the caller's size (one label per sample, say)
    fails on the pilot's batch; it is then piloted on batches of that size, the caller's own
    conditioning applied to each, and if that fails too the error says how to skip the pilot."""
    key = (sde, steps, tuple(like.shape[1:]), like.dtype, like.device, draws, tuple(candidates))
    try:
        per_fn: dict = _CACHE.setdefault(score_fn, {})
    except TypeError:
        per_fn = {}
    if key in per_fn:
        return per_fn[key], False
    x_T, batch = pilot_draws(sde, like, draws), like.shape[0]
    try:
        choice = choose(score_fn, sde, steps, x_T, None, candidates, progress)
    except Exception as whole:
        if batch >= draws:
            raise _pilot_failed(draws, whole) from whole
        tiled = pilot_draws(sde, like, batch * math.ceil(draws / batch))
        try:
            choice = choose(score_fn, sde, steps, tiled, None, candidates, progress, batch)
        except Exception as chunked:
            raise _pilot_failed(draws, chunked) from chunked
    per_fn[key] = choice
    return choice, True


def _pilot_failed(draws: int, error: Exception) -> ValueError:
    return ValueError(
        f"the default's pilot (score_fn on {draws} prior draws, see README 'The default') "
        f"failed: {error}; sample(..., pilot=0) or a named solver runs without it"
    )
