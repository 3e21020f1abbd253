"""The default sampler's pilot: for one score function and budget, the configuration whose samples
come closest to the exact probability-flow map on a batch of prior draws.

At 5-20 evaluations a deterministic sampler's error is decided by a few choices: the grid (where the
steps go in log-SNR), the end (stop at t_min, take the polynomial's own step to sigma = 0, or stop
half a step, a full step or t_min above 0 and take the Tweedie jump or the trapezoidal step from
there), the interpolated output (x0 or eps), the order of the polynomial (2 or 3), whether UniPC's
corrector runs and how it weighs its first correction, and the weight of the third-order curvature
term. Which combination is best depends on the data, not on the schedule alone: on the problem suite
of benchmarks/steps_vs_quality.py no single one comes within 1.5x of the best peer setting on every
problem at NFE 5-20, while the best of them beats it on almost all. The error that matters is the
distance to the flow map x_T -> x_0 that every deterministic sampler approximates, and it can be
measured: solve the flow accurately (adaptive dopri5) from a few hundred prior draws once, run every
candidate from the same draws, keep the closest in mean squared distance. Candidates within TIE of
the closest, which that distance cannot tell apart, go to the one whose samples lie closest to the
flow's as a distribution: the sliced W2 between the two sample sets on the draws the distance keeps
(`TieDistance`). The paired distance charges each draw its own error, while what a user sees is
the law of the samples, in which an error that moves samples along the data costs nothing; the
sliced W2 is also the distance the benchmarks judge by. Replayed on 150 mixture cells at NFE 10 and
20 against the moments that decided ties before (Gaussian KL of mean and covariance in the flow's
leading directions, which see a law only through its first two moments), it moved the geometric
mean of the flow W2 by 0.85-1.00x and turned none of the default's wins over the best peer into a
loss (docs/default_sampler.md, "The sliced W2 decides the pilot's ties"). Where the flow is an
affine map of the draws (Gaussian data) the pilot ranks every candidate by the exact KL of its
Gaussian law to the flow's (`AffineLaw`).
That is the spirit of the optimised schedules of Watson et al. (2021), Sabour et al. ("Align Your
Steps", 2024) and Xue et al. (2024), restricted to a finite family so that it costs a fixed number
of evaluations and cannot overfit the pilot.

On a multimodal target the flow map jumps where x_T crosses a boundary between the basins of two
modes, and a sampler whose own boundary lies a little off sends the draws in between to the other
mode: rare (1 in 1000 on the 32-D mixture of benchmarks/steps_vs_quality.py), but each such draw
costs the squared distance between modes, so those draws decide the mean squared distance, and a
few hundred prior draws do not see them. `Boundaries` measures them directly: it bisects
great-circle arcs x(theta) = a cos(theta) + b sin(theta) between pairs of prior draws (every
x(theta) is itself a prior draw) to where the exact flow jumps, and times the signed angle by which
a candidate's own jump misses, over the arc's quarter turn, by the squared jump: the mass it moves
from one mode to the other, netted over the arcs that join the same two modes (draws that cross a
boundary both ways leave each mode its mass, which no distance between distributions charges). That
estimates what the candidate's switches add to the squared distance between its samples and the
flow's, per prior draw, and the pilot adds it to the distance on its draws. The draws themselves
estimate it badly: one of 256 that switches under one candidate weighs 1/256 where such draws are
rarer than 1 in 1000 (on a 5-D mixture of 6 under DDPM at 20 steps, one draw ranked first a
candidate 4x further from the flow than the closest). Where the flow jumps, the distance therefore
leaves out each candidate's TRIM farthest draws, and switches count through the arcs. So does a
draw that every candidate sends at least half the flow's smallest jump away (`shared_misses`): it
adds about the same to every distance, which changes no ranking but widens the tie margin (on the
16-D mixture under DDPM at 10 steps one such draw, with the TRIM, let the tie-break pick a candidate
1.5x farther from the flow than the closest). A tie (above) may not exceed the closest's switch
error by more than the tie margin: the tie-break, measured on the draws, cannot see switches.

The cost, `PilotChoice.evaluations` single-sample evaluations, is paid once per (score function,
SDE, steps, sample shape, dtype, device): `sample()` keeps the choice for as long as the score
function lives. The draws come from their own seeded generator, so a pilot never touches the
caller's random state and the same call always makes the same choice.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._tensor import check_choice
from ..metrics import gaussian_kl, sliced_w2_projected, unit_directions
from ..parametrize import tweedie_x0
from ..sde import SDE, ScoreFn
from ._registry import CheckedScore, get_solver
from .expint import FIRST_CORRECTORS
from .grids import GRIDS, final_time, time_grid

__all__ = [
    "AFFINE_TOL",
    "ARC_TOL",
    "BOUNDARY_ARCS",
    "CANDIDATES",
    "CONVERGED",
    "FINAL_STEPS",
    "PILOT_DRAWS",
    "PILOT_MIN_STEP",
    "TIE",
    "TIE_PROJECTIONS",
    "TIE_SEED",
    "TRIM",
    "AffineLaw",
    "Boundaries",
    "Candidate",
    "MomentError",
    "PilotChoice",
    "TieDistance",
    "choose",
    "counted",
    "decide",
    "end_with",
    "exact_flow",
    "mean_log_snr_step",
    "pilot_draws",
    "pilots",
    "run_candidate",
    "shared_misses",
    "ties",
    "trapezoid_step",
    "tweedie_step",
]

K = TypeVar("K")

#: prior draws the default's pilot runs on
PILOT_DRAWS = 256
#: the seed of the pilot's own generator (its arcs' ends: the next one). Not 0 or any other
#: seed a caller is likely to draw x_T from: on its own draws the default would be judged where
#: it was chosen
PILOT_SEED = 97_531
#: the pilot's exact flow: dopri5 at this relative and absolute tolerance. Its own squared
#: error must lie well below the distances it ranks: at 1e-5 it was 1.1e-5 per draw through the
#: pinwheel network, above the closest candidates' distances at 50 steps, and 7e-6 on the
#: held-out scale mixture of benchmarks/steps_vs_quality.py; at 1e-6, 5e-8 and 1.1e-7
#: (docs/default_sampler.md, "The reference's own error")
REFERENCE_TOL = 1e-6
#: the arcs' flow (`Boundaries.find`), which only has to tell on which side of a jump a draw
#: ends: dopri5 at this tolerance
ARC_TOL = 1e-5
#: candidates within this factor of the smallest squared distance to the flow are ties, decided
#: by `TieDistance`
TIE = 1.25
#: `TieDistance`: the sliced W2 over this many directions, drawn from this seed
TIE_PROJECTIONS = 256
TIE_SEED = 11
#: where the flow jumps, the pilot's distance leaves out each candidate's TRIM farthest draws:
#: the switches among them are the arcs' to estimate (module docstring)
TRIM = 2
#: great-circle arcs of prior draws on which the pilot looks for jumps of the flow map
BOUNDARY_ARCS = 32
#: bisections of an arc to its jump: to within a quarter turn / 2^14 = 9.6e-5 rad, LADDER[0]
HALVINGS = 14
#: an arc jumps where its last bracket's ends lie at least this share as far apart as those of
#: the bracket RECENT halvings wider (a smooth map leaves 2^-RECENT of it; a steep but resolved
#: slope shrinks the same way); arcs whose bracket shrinks faster than a third of that share per
#: RECENT halvings are dropped on the way
JUMP = 0.5
RECENT = 4
#: angles (rad) from a jump at which a sampler's side is tested: 1e-4 to 0.073 in factors of
#: sqrt(3) (in factors of 3 the misses left switch errors a factor sqrt(3) apart untold:
#: docs/default_sampler.md, "How close the choice comes")
LADDER = tuple(1e-4 * 3.0 ** (k / 2) for k in range(13))
#: the largest share of the draws that can be misses every candidate shares (`shared_misses`)
SHARED_MISSES = 1 / 16
#: how a candidate's samples end: "t_min" (the grid's end), "zero" (the eps polynomial's own
#: step to sigma = 0, no evaluation), "half" and "full" (one step fewer, to `grids.final_time`,
#: from where the last step to sigma = 0 spans half an equal step, or a full one), "sigma_min"
#: (one step fewer, to t_min); the last three then take the candidate's `final` step
ENDS = ("t_min", "zero", "half", "full", "sigma_min")
#: the share of an equal step that the last step of each such end spans (None: from t_min)
JUMP_SHARE = {"half": 0.5, "full": 1.0, "sigma_min": None}
#: the flow is affine in x_T where least squares on the pilot draws leaves at most this share of
#: its samples' variance: on the oracle's Gaussians 1e-28 (the batch's adaptive steps are shared,
#: so the solved map is exactly linear; 3e-12 in float32), on its mixtures 0.08-0.42 (`AffineLaw`)
AFFINE_TOL = 1e-8
#: the last steps to sigma = 0 that `sample(denoise=...)` names, each as its share of the
#: score in Tweedie's formula x0 = (x + sigma^2 share s(x, t)) / gamma: "tweedie" (also True),
#: the Tweedie jump (`tweedie_step`), and "trapezoid" (`trapezoid_step`)
FINAL_STEPS: dict[str, float] = {"tweedie": 1.0, "trapezoid": 0.5}


@dataclass(frozen=True)
class Candidate:
    """One configuration of the multistep exponential integrator (`expint`)."""

    solver: str  # "dpm_solver" (predictor) or "unipc" (with the UniC corrector)
    prediction: str  # "noise" or "data": what the multistep polynomial interpolates
    grid: str  # a kind of `grids.GRIDS`
    end: str  # one of ENDS
    order: int = 3  # of the predictor; UniC adds one
    d2_weight: float = 1.0  # of the predictor's curvature term (`expint._interpolant_step`)
    first_corrector: str = "exact"  # UniPC's, `expint.FIRST_CORRECTORS`
    final: str = "tweedie"  # the last step to sigma = 0 of the ends in JUMP_SHARE: FINAL_STEPS

    def __post_init__(self) -> None:
        """Refuse a name that is none of the choices (an end of another name would otherwise
        run as no end at all)."""
        check_choice("solver", self.solver, ("dpm_solver", "unipc"))
        check_choice("prediction", self.prediction, ("noise", "data"))
        check_choice("grid", self.grid, GRIDS)
        check_choice("end", self.end, ENDS)
        check_choice("first_corrector", self.first_corrector, FIRST_CORRECTORS)
        check_choice("final", self.final, FINAL_STEPS)

    @property
    def denoise(self) -> bool | str:
        """`sample()`'s denoise for it: False, or its last step (a key of FINAL_STEPS)."""
        return self.final if self.end in JUMP_SHARE else False

    @property
    def params(self) -> dict[str, object]:
        """The solver's parameters: x0 interpolation lowers the order over its last steps below
        15 (as DPM-Solver++ does for stability), its last step to sigma = 0 counted as the last
        one (as diffusers counts its Tweedie step), eps interpolation keeps it."""
        params: dict[str, object] = {"order": self.order, "prediction": self.prediction}
        params["lower_order_final"] = self.prediction == "data"
        if self.end == "zero":
            params["to_zero"] = True
        if self.denoise:  # its last step to sigma = 0 is one more step after the grid
            params["final_jump"] = True
        if self.d2_weight != 1:
            params["d2_weight"] = self.d2_weight
        if self.first_corrector != "exact":
            params["first_corrector"] = self.first_corrector
        return params

    @property
    def stem(self) -> Candidate:
        """The member it shares every evaluation with but its last step's: its twin that ends
        with the Tweedie jump (itself where it has no last step to choose)."""
        return replace(self, final="tweedie")

    def fits(self, steps: int) -> bool:
        """Whether `steps` evaluations leave this candidate at least one step."""
        return steps >= 1 + bool(self.denoise)

    def grid_for(self, sde: SDE, steps: int) -> Tensor:
        """Its grid for `steps` evaluations: its last step to sigma = 0 is one of them."""
        if self.denoise:
            share = JUMP_SHARE[self.end]
            t_end = None if share is None else final_time(sde, steps - 1, share)
            return time_grid(sde, steps - 1, self.grid, t_end=t_end)
        return time_grid(sde, steps, self.grid)

    @property
    def label(self) -> str:
        name = f"{self.solver} order {self.order}"
        if self.d2_weight != 1:
            name += f", D2 x{self.d2_weight:g}"
        if self.first_corrector != "exact":
            name += f", UniC-1 {self.first_corrector}"
        end = f"{self.end}, {self.final}" if self.denoise else self.end
        return f"{name} ({self.prediction}, {self.grid} grid, end {end})"


#: the family the pilot chooses from: predictor or predictor-corrector of order 2 or 3, on each
#: grid kind, interpolating eps to t_min (with or without its own step to sigma = 0) or x0, each
#: also with a last step to sigma = 0 from half or a full step above it (x0 with either last
#: step, eps with the trapezoidal one; eps with the jump there is not measured), and
#: with the trapezoidal step from t_min on the grids whose last step there is short in log-SNR
#: (on one uniform or quadratic in t, a step of many units of log-SNR is itself nearly the jump
#: from its start); the third-order predictor also with half its curvature term, the 3M of the
#: reference DPM-Solver, diffusers and k-diffusion; UniPC with x0 and the full step's end also
#: with the paper's first corrector: diffusers' UniPC, on each grid kind. Members that differ in
#: their last step alone share their evaluations on the pilot's draws (`choose`)
CANDIDATES = tuple(
    Candidate(solver, prediction, grid, end, order, d2_weight, first_corrector, final)
    for solver in ("dpm_solver", "unipc")
    for order, d2_weight in ((2, 1.0), (3, 1.0), (3, 0.5))
    if solver == "dpm_solver" or d2_weight == 1
    for prediction, end, finals in (
        ("noise", "t_min", ("tweedie",)),
        ("noise", "zero", ("tweedie",)),
        ("noise", "half", ("trapezoid",)),
        ("noise", "full", ("trapezoid",)),
        ("noise", "sigma_min", ("trapezoid",)),
        ("data", "half", ("tweedie", "trapezoid")),
        ("data", "full", ("tweedie", "trapezoid")),
        ("data", "sigma_min", ("trapezoid",)),
    )
    for first_corrector in ("exact", "bh2")
    if first_corrector == "exact" or (solver, prediction, end) == ("unipc", "data", "full")
    for grid in GRIDS
    if end != "sigma_min" or grid in ("log_snr", "edm")
    for final in finals
)

#: the smallest mean log-SNR step over [t_min, T] at which the default runs its pilot. With
#: smaller steps (from 96-99 steps on DDPM, VP and cosine, 63 on scaled-linear, 129 on VE, 142 on
#: sub-VP) every candidate has all but reached its own limit: the flow to t_min, that flow with
#: the Tweedie jump from t_min, or with the trapezoidal step from t_min, the pilot's reference
#: (`exact_flow`). Nothing is left to choose, at the pilot's full price, the cost of 38,000-69,000
#: samples at the same steps (docs/default_sampler.md, "Many steps")
PILOT_MIN_STEP = 0.1
#: what the default runs instead of a pilot at those steps: the family's member on log-SNR steps
#: that ends with the step from t_min, whose limit is the pilot's reference
CONVERGED = Candidate("unipc", "data", "log_snr", "sigma_min", final="trapezoid")


def mean_log_snr_step(sde: SDE, steps: int) -> float:
    """The mean step in log-SNR of `steps` steps from T to the schedule's t_min."""
    lam = sde.log_snr(torch.tensor([float(sde.T), float(sde.t_min)], dtype=torch.float64))
    return float(lam[1] - lam[0]) / steps


def pilots(sde: SDE, steps: int) -> bool:
    """Whether the default pilots `steps` steps on `sde`, or runs CONVERGED (PILOT_MIN_STEP)."""
    return mean_log_snr_step(sde, steps) > PILOT_MIN_STEP


@dataclass
class Boundaries:
    """Where the exact flow map jumps on `arcs` great-circle arcs of prior draws: for each arc
    with a jump, its ends a and b, the angle theta of the jump and the flow's samples just
    below and above it (module docstring)."""

    arcs: int
    a: Tensor
    b: Tensor
    theta: Tensor
    below: Tensor
    above: Tensor

    @classmethod
    def find(
        cls,
        flow: Callable[[Tensor], Tensor],
        sde: SDE,
        like: Tensor,
        arcs: int,
        seed: int = PILOT_SEED + 1,
    ) -> Boundaries:
        """Bisect `arcs` arcs (ends drawn from the pilot's generator with `seed`, by default
        the one after its draws') to the jumps of `flow`, a batch map x_T -> x_0; arcs whose
        bracket stops jumping are dropped as soon as it does."""
        ends = pilot_draws(sde, like, 2 * arcs, seed)
        a, b = ends[:arcs], ends[arcs:]
        lo = torch.zeros(arcs, dtype=torch.float64, device=like.device)
        hi = torch.full_like(lo, math.pi / 2)
        below, above = flow(a), flow(b)
        widths = [_distance(below, above)]  # the brackets' output distances, per halving
        for k in range(HALVINGS):
            if k >= RECENT:
                keep = widths[-1] > JUMP / 3 * widths[-1 - RECENT]
                a, b, lo, hi, below, above = (v[keep] for v in (a, b, lo, hi, below, above))
                widths = [w[keep] for w in widths]
            if not len(a):
                break
            mid = (lo + hi) / 2
            y = flow(_arc(a, b, mid))
            lower = _distance(below, y) >= _distance(y, above)  # the jump lies below mid
            hi, lo = torch.where(lower, mid, hi), torch.where(lower, lo, mid)
            pick = lower.reshape(-1, *[1] * (y.dim() - 1))
            above, below = torch.where(pick, y, above), torch.where(pick, below, y)
            widths.append(_distance(below, above))
        keep = widths[-1] >= JUMP * widths[-1 - RECENT] if len(a) else torch.zeros(0, dtype=bool)
        theta = (lo + hi) / 2
        return cls(arcs, a[keep], b[keep], theta[keep], below[keep], above[keep])

    def __len__(self) -> int:
        return len(self.theta)

    @property
    def smallest_jump(self) -> float:
        """The distance between the flow's samples either side of its smallest jump (inf where
        no arc jumps)."""
        return float(_distance(self.below, self.above).min()) if len(self) else math.inf

    @property
    def floor(self) -> float:
        """The switch error of a sampler that meets every jump within LADDER[0], where the
        flow's own jump is known to (HALVINGS), all on the same side: what the arcs cannot
        resolve, at most, for every candidate that close (`misses` below the first rung)."""
        return self._per_prior_draw(torch.full_like(self.theta, LADDER[0] / 2))

    def switch_error(self, run: Callable[[Tensor], Tensor]) -> float:
        """What the draws `run` (a batch map x_T -> x_0) sends across a jump of the flow add to
        the squared distance between its samples and the flow's as distributions, per prior
        draw: each arc's signed miss (`misses`) times its squared jump, over a quarter turn,
        summed per pair of modes (`pairs`) and counted by the size of that net. Draws that
        cross one boundary both ways leave each mode its mass, and no distribution distance
        (the W2, a KL) charges them the jump; draws moved one way are what it charges. 0 where
        no arc jumps."""
        if not len(self):
            return 0.0
        pair, sign = self.pairs
        return self._per_prior_draw(sign * self.misses(run), pair)

    @functools.cached_property
    def pairs(self) -> tuple[Tensor, Tensor]:
        """Per arc, the pair of modes its jump joins (an index) and its orientation (+1 where it
        runs from the pair's first mode to its second, -1 the other way). The flow's samples
        either side of the jumps are modes' members; two of them closer than half the smallest
        jump belong to the same mode (single linkage: a jump is at least that far). An arc whose
        ends fall in one mode is a pair of its own."""
        ends = torch.cat([self.below, self.above]).flatten(1).double()
        near = torch.cdist(ends, ends) < self.smallest_jump / 2
        mode = torch.arange(len(ends), device=ends.device)
        while True:  # each end takes the smallest label it is linked to, until none changes
            linked = torch.where(near, mode[None, :], len(ends)).min(1).values
            if bool((linked == mode).all()):
                break
            mode = linked[linked]
        lo, hi = mode[: len(self)], mode[len(self) :]
        first, second = torch.minimum(lo, hi), torch.maximum(lo, hi)
        own = -1 - torch.arange(len(self), device=ends.device)
        key = torch.where(lo == hi, own, first * len(ends) + second)
        pair = torch.unique(key, return_inverse=True)[1]
        return pair, torch.where(lo <= hi, 1.0, -1.0).to(ends)

    def misses(self, run: Callable[[Tensor], Tensor]) -> Tensor:
        """Per arc, the angle (rad) from the flow's jump to run's own, found on the LADDER by 4
        bisections after one run at the jump: positive where run's jump lies below the flow's,
        so that the draws in between go to the flow's upper side (`above`) instead of `below`."""
        ladder = torch.tensor(LADDER, dtype=torch.float64, device=self.theta.device)
        side = self._side(run(_arc(self.a, self.b, self.theta)))
        # run lands above at the jump: its own jump lies below it, wrong (above) from theta down
        # to it; so test downwards, and upwards when it lands below
        direction = 2.0 * side.double() - 1.0
        lo = torch.zeros(len(self), dtype=torch.long, device=ladder.device)
        hi = torch.full_like(lo, len(LADDER))
        for _ in range(len(LADDER).bit_length()):
            mid = ((lo + hi) // 2).clamp(max=len(LADDER) - 1)
            theta = self.theta - direction * ladder[mid]
            wrong = self._side(run(_arc(self.a, self.b, theta))) == side
            open_ = lo < hi  # 13 rungs: some brackets close a bisection early
            lo, hi = torch.where(open_ & wrong, mid + 1, lo), torch.where(open_ & ~wrong, mid, hi)
        # lo rungs are wrong: the miss lies between rung lo - 1 and rung lo
        upper = ladder[lo.clamp(max=len(LADDER) - 1)]
        lower = torch.where(lo > 0, ladder[(lo - 1).clamp(min=0)], upper / 4)
        miss = torch.where(lo < len(LADDER), (lower * upper).sqrt(), ladder[-1])
        return direction * miss

    def _per_prior_draw(self, miss: Tensor, pair: Tensor | None = None) -> float:
        """What misses of `miss` rad at the jumps add to the mean squared distance per prior
        draw: each times its squared jump, netted within each `pair` (an index per arc; each arc
        alone where None), over a quarter turn, averaged over all the arcs."""
        moved = miss * _distance(self.below, self.above) ** 2
        if pair is not None:
            moved = torch.zeros_like(moved).index_add(0, pair, moved)
        return float(moved.abs().sum()) / (math.pi / 2) / self.arcs

    def _side(self, y: Tensor) -> Tensor:
        """Whether each sample lies on the flow's upper side of its jump (nearer `above`)."""
        return _distance(y, self.below) > _distance(y, self.above)


def _arc(a: Tensor, b: Tensor, theta: Tensor) -> Tensor:
    theta = theta.reshape(-1, *[1] * (a.dim() - 1)).to(a)
    return a * torch.cos(theta) + b * torch.sin(theta)


def _distance(x: Tensor, y: Tensor) -> Tensor:
    return (x - y).flatten(1).double().norm(dim=1)


@dataclass(frozen=True)
class PilotChoice:
    """What `choose` returns: the chosen candidate, every candidate's error (mean
    squared distance per pilot sample to the exact flow, without the shared misses and the
    TRIM farthest where the flow jumps, plus its switch error across the jumps `boundaries`
    found; inf where it diverged), switch error (`Boundaries.switch_error`) and sliced W2 to the
    flow's samples (`TieDistance`, which decides ties), the score calls spent (nfe, on batches of
    draws) and the single-sample evaluations they made (evaluations), the reference flow's
    included. Where the flow is an
    affine map of the draws (a Gaussian target), `law` is its Gaussian law and each error is
    instead the KL of the candidate's law to it (`AffineLaw`), the least of which is chosen."""

    candidate: Candidate
    errors: dict[Candidate, float]
    sliced: dict[Candidate, float]
    nfe: int
    evaluations: int
    switches: dict[Candidate, float] = field(default_factory=dict)
    boundaries: Boundaries | None = None
    law: AffineLaw | None = None

    @property
    def error(self) -> float:
        return self.errors[self.candidate]


def pilot_draws(sde: SDE, like: Tensor, draws: int = PILOT_DRAWS, seed: int = PILOT_SEED) -> Tensor:
    """`draws` prior samples shaped like one sample of `like`, on its device and in its dtype,
    from the pilot's own seeded generator."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((draws, *like.shape[1:]), generator=g, dtype=like.dtype)
    return sde.prior_std() * z.to(like.device)


def run_candidate(
    score_fn: ScoreFn,
    sde: SDE,
    x_T: Tensor,
    candidate: Candidate,
    ts: Tensor,
    finals: Sequence[str] | None = None,
) -> Tensor:
    """A candidate's samples from x_T on the grid ts (its last step to sigma = 0 included);
    with `finals`, the samples that each of these last steps ends its run with instead, stacked
    on dim 1 (`end_with`: one evaluation for all)."""
    x = get_solver(candidate.solver).run(score_fn, sde, x_T, ts.to(x_T), **candidate.params)
    if not candidate.denoise:
        return x
    ended = end_with(score_fn, sde, x, ts[-1], finals or (candidate.final,))
    return ended if finals else ended[:, 0]


def exact_flow(score_fn: ScoreFn, sde: SDE, x_T: Tensor, tol: float = REFERENCE_TOL) -> Tensor:
    """The probability-flow map of x_T: dopri5 at relative and absolute tolerance `tol` to
    t_min, then the trapezoidal step to sigma = 0 (`trapezoid_step`)."""
    ts = torch.tensor([float(sde.T), float(sde.t_min)], dtype=x_T.dtype, device=x_T.device)
    x = get_solver("ode").run(score_fn, sde, x_T, ts, rtol=tol, atol=tol)
    return trapezoid_step(score_fn, sde, x, ts[-1])


def end_with(score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor, finals: Sequence[str]) -> Tensor:
    """x's last steps from the grid's last time t to sigma = 0, one for each name in `finals`
    (FINAL_STEPS), stacked on dim 1: Tweedie's formula with that step's share of the score,
    all from one evaluation."""
    t = t.to(x).expand(x.shape[0])
    score = score_fn(x, t)
    return torch.stack([tweedie_x0(x, t, FINAL_STEPS[f] * score, sde) for f in finals], 1)


def tweedie_step(score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor) -> Tensor:
    """The jump from the grid's last time t to E[x_0 | x_t] (one evaluation)."""
    return end_with(score_fn, sde, x, t, ("tweedie",))[:, 0]


def trapezoid_step(score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor) -> Tensor:
    """The step from t (t_min, or a candidate's "half" or "full" end) to sigma = 0 by the
    trapezoidal rule (one evaluation).

    In y = x / gamma and s = sigma / gamma the flow is dy/ds = (y - D(y, s)) / s with D the
    Tweedie x0 (Karras et al. 2022, eq. 4 with sigma = s); its slope -s grad log p_s(y) vanishes
    at s = 0 wherever the data's density is smooth at the scale s, so the trapezoidal rule over
    [0, s] gives y_0 = (y + D) / 2. The Tweedie jump y_0 = D is the Euler step, exact only for
    data far narrower than s. On a Gaussian direction of variance v, with r = v / (v + s^2), the
    flow scales y - mu by sqrt(r), the trapezoid by (1 + r) / 2 and the jump by r, which
    collapses directions of variance comparable to s^2: the trapezoid is the closer unless
    v < s^2 / 8 (docs/default_sampler.md, "The step below t_min"). In x that average is
    Tweedie's formula with half the score: (x + sigma^2 s(x, t) / 2) / gamma.
    """
    return end_with(score_fn, sde, x, t, ("trapezoid",))[:, 0]


def flow_error(x: Tensor, reference: Tensor, boundaries: Boundaries | None = None) -> float:
    """Mean squared distance per sample (inf when x is not finite); where `boundaries` found
    jumps of the flow, without the TRIM farthest samples, whose switches the arcs count."""
    d2 = _distance(x, reference) ** 2
    return _trimmed_mean(d2, torch.ones_like(d2, dtype=torch.bool), boundaries)


def counted(d2: Tensor, kept: Tensor, boundaries: Boundaries | None) -> Tensor:
    """The draws whose error the pilot's distance counts: the `kept` ones (not `shared_misses`)
    less, where the flow jumps, the TRIM farthest of them by the squared distances d2, whose
    switches the arcs count."""
    if not boundaries:
        return kept
    keep = kept.clone()
    keep[torch.where(kept, d2, -1.0).topk(TRIM).indices] = False
    return keep


class TieDistance:
    """The sliced W2 that decides the pilot's ties: between a candidate's samples and the flow's
    `reference`, on TIE_PROJECTIONS directions from TIE_SEED. Which draws it counts is known only
    once every candidate has run (`shared_misses`), so a candidate keeps its samples' projections
    (`project`: draws x TIE_PROJECTIONS numbers on the CPU, however large a sample) until then."""

    def __init__(self, reference: Tensor):
        flat = reference.flatten(1)
        dtype = torch.promote_types(flat.dtype, torch.float32)
        g = torch.Generator().manual_seed(TIE_SEED)
        self.directions = unit_directions(flat.shape[1], TIE_PROJECTIONS, g, dtype).to(flat.device)
        self.reference = self.project(reference)

    def project(self, x: Tensor) -> Tensor:
        return (x.flatten(1).to(self.directions.dtype) @ self.directions).cpu()

    def __call__(
        self, projected: Tensor, kept: Tensor, d2: Tensor, boundaries: Boundaries | None
    ) -> float:
        """The sliced W2 between the samples of these projections and the flow's, on the draws
        whose error the pilot's distance counts (`counted`; d2: the samples' squared distances
        to the flow). inf where the samples are not finite."""
        if not bool(torch.isfinite(projected).all()):
            return math.inf
        keep = counted(d2, kept, boundaries).cpu()
        return float(sliced_w2_projected(projected[keep], self.reference[keep]))


def _trimmed_mean(d2: Tensor, kept: Tensor, boundaries: Boundaries | None) -> float:
    """The mean of the squared distances d2 over the `counted` draws (inf where one is not
    finite)."""
    if not bool(torch.isfinite(d2).all()):
        return math.inf
    return float(d2[counted(d2, kept, boundaries)].mean())


def shared_misses(d2: Sequence[Tensor], boundaries: Boundaries | None) -> Tensor:
    """The draws that every candidate (of finite squared distances d2, one row per candidate)
    sends at least half the flow's smallest jump away: switches for all of them, which the arcs
    count and the distances leave out. None where the flow does not jump, where fewer than two
    candidates are finite (a miss of one is not shared), or where more than SHARED_MISSES of the
    draws would be misses: switches are the few draws near a boundary, and so many mean that the
    jumps are small against every candidate's ordinary error (a trained network's flow, whose
    arcs find jumps of 0.24 in 64 pixels, where every candidate at NFE 10 lies 0.1 away)."""
    none = torch.zeros(len(d2[0]), dtype=torch.bool, device=d2[0].device)
    finite = [d for d in d2 if bool(torch.isfinite(d).all())]
    if not (boundaries and len(finite) > 1):
        return none
    misses = torch.stack(finite).min(0).values >= (boundaries.smallest_jump / 2) ** 2
    return none if float(misses.float().mean()) > SHARED_MISSES else misses


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


class AffineLaw:
    """The Gaussian law of the flow where its samples are an affine map of the prior draws x_T,
    and the KL of a candidate's law to it: `AffineLaw.fit` returns None where they are not.

    The flow map is affine exactly where the score is linear in x, that is where the data are
    Gaussian, and then so is every deterministic candidate's map: its samples of the prior,
    N(0, std^2 I), are N(b, std^2 A^T A) for the map x_T A + b that least squares reads off
    the pilot's draws (exactly, from 2 (D + 1) draws on). Two such laws are compared by their
    KL, exact and free of the draws, where the squared distance weighs each direction by its
    absolute scale: on Gaussians whose variances span 50x and more it ranked first candidates
    that collapse or inflate the small directions (blur), up to 83x the family's least KL
    (docs/default_sampler.md, "Gaussian targets: the KL of the flow's law")."""

    def __init__(self, x_T: Tensor, std: float, reference: Tensor):
        z = x_T.flatten(1).double() / std
        self.design = torch.cat([z, z.new_ones(len(z), 1)], 1)
        self.map = self._map(reference)
        self.mean, self.cov = self._law(self.map)

    def _map(self, y: Tensor) -> Tensor:
        """(A; b): least squares of y on the design [x_T / std, 1]."""
        return torch.linalg.lstsq(self.design, y.flatten(1).double()).solution

    @staticmethod
    def _law(w: Tensor) -> tuple[Tensor, Tensor]:
        return w[-1], w[:-1].T @ w[:-1]

    @classmethod
    def fit(cls, x_T: Tensor, std: float, reference: Tensor) -> AffineLaw | None:
        """The law of `reference`, the flow of the prior draws x_T (prior std `std`), where it
        is an affine map of them (AFFINE_TOL) with a regular covariance; else None."""
        dim = reference[0].numel()
        if len(x_T) < 2 * (dim + 1) or not bool(torch.isfinite(reference).all()):
            return None
        law, y = cls(x_T, std, reference), reference.flatten(1).double()
        residual = float((y - law.design @ law.map).square().sum())
        if residual > AFFINE_TOL * float((y - y.mean(0)).square().sum()):
            return None
        return law if torch.linalg.cholesky_ex(law.cov).info == 0 else None

    def __call__(self, x: Tensor) -> float:
        """KL(law of x || the flow's law) for samples x of the same draws (inf where x is not
        finite or its law is degenerate)."""
        if not bool(torch.isfinite(x).all()):
            return math.inf
        mean, cov = self._law(self._map(x))
        if torch.linalg.cholesky_ex(cov).info != 0:
            return math.inf
        kl = float(gaussian_kl(mean, cov, self.mean, self.cov))
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
    arcs: int = BOUNDARY_ARCS,
) -> PilotChoice:
    """The candidate whose samples from the pilot draws x_T lie closest to their exact flow
    `reference` (by default solved here), at `steps` evaluations each, its switch error across
    the flow's jumps on `arcs` arcs added (`Boundaries`; none for arcs=0), ties within TIE
    decided by `TieDistance`; where the flow is an affine map of x_T, the candidate whose
    Gaussian law lies closest to the flow's in KL (`AffineLaw`; no arcs). `batch`: evaluate the
    score on batches of this many draws (all of them at once by default).

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

    def batched(run: Callable[..., Tensor], x: Tensor, **kwargs: object) -> Tensor:
        """run on chunks of `size` draws, the last padded to it when a batch size is given."""
        out = []
        for chunk in x.split(size):
            n = chunk.shape[0]
            if batch is not None and n < size:
                chunk = torch.cat([chunk, chunk[-1:].expand(size - n, *chunk.shape[1:])])
            out.append(run(counted, sde, chunk, **kwargs)[:n])
        return torch.cat(out)

    bar = tqdm(total=len(fitting) + 1 + (reference is None), desc="pilot", disable=not progress)
    with bar:
        if reference is None:
            reference = batched(exact_flow, x_T)
            bar.update(1)
        boundaries, law = None, AffineLaw.fit(x_T, sde.prior_std(), reference)
        if arcs and law is None:  # an affine flow has no jumps
            flow = functools.partial(batched, exact_flow, tol=ARC_TOL)
            boundaries = Boundaries.find(flow, sde, x_T, arcs)
        bar.update(1)
        d2, projected, switches, kl, tie = {}, {}, {}, {}, TieDistance(reference)
        twins: dict[Candidate, list[Candidate]] = {}  # by all but the last step
        for c in fitting:
            twins.setdefault(c.stem, []).append(c)
        for stem, members in twins.items():
            ts = stem.grid_for(sde, steps)
            finals = [c.final for c in members]
            ended = batched(run_candidate, x_T, candidate=stem, ts=ts, finals=finals)
            for k, c in enumerate(members):
                samples = ended[:, k] if c.denoise else ended
                run = functools.partial(batched, run_candidate, candidate=c, ts=ts)
                switches[c] = boundaries.switch_error(run) if boundaries else 0.0
                d2[c], projected[c] = _distance(samples, reference) ** 2, tie.project(samples)
                if law is not None:
                    kl[c] = law(samples)
                bar.update(1)
    kept = ~shared_misses(list(d2.values()), boundaries)
    sliced = {c: tie(projected[c], kept, d2[c], boundaries) for c in fitting}
    if law is not None:
        best = min(fitting, key=kl.__getitem__)
        return PilotChoice(best, kl, sliced, checked.nfe, evaluations, switches, law=law)
    errors = {c: _trimmed_mean(d2[c], kept, boundaries) + switches[c] for c in fitting}
    best = decide(errors, switches, sliced.__getitem__, boundaries.floor if boundaries else 0.0)
    return PilotChoice(best, errors, sliced, checked.nfe, evaluations, switches, boundaries)


def decide(
    errors: dict[K, float],
    switches: dict[K, float],
    tiebreak: Callable[[K], float],
    floor: float = 0.0,
    tie: float = TIE,
) -> K:
    """The key of the smallest error (distance plus switch error) or, among those within `tie`
    (TIE) of it, the one of the smallest `tiebreak` (asked of those only). The tie-break cannot
    see switches: a tie's switch error may not exceed the closest's by the tie margin. The margin
    leaves out the switch errors' `floor` (`Boundaries.floor`): on well separated modes every
    candidate may meet the flow's jumps that closely, and that floor, exact for none, can
    exceed the distances themselves and make every candidate a tie. (Misses that net out cost
    less than it: where the closest's error lies below the floor, nothing ties with it.)"""
    tied = ties(errors, switches, floor, tie)
    return tied[0] if len(tied) == 1 else min(tied, key=tiebreak)


def ties(errors: dict[K, float], switches: dict[K, float], floor: float, tie: float) -> list[K]:
    """The keys `decide` chooses among: an error within `tie` of the smallest, measured above
    the `floor`, and a switch error that exceeds the closest's by no more than that margin."""
    closest = min(errors, key=errors.__getitem__)
    margin = (tie - 1) * max(errors[closest] - floor, 0.0)
    return [
        k
        for k in errors
        if errors[k] <= errors[closest] + margin and switches[k] <= switches[closest] + margin
    ]


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
