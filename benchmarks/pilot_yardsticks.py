"""Which yardstick should the default's pilot rank its candidates by? A replay on mixture cells and
trained networks: the pilot's choice against the choices eight other yardsticks make on the same
draws, each measured as the tables measure it.

    python benchmarks/pilot_yardsticks.py --nfe 5   # 90 cells under DDPM, VP and cosine, 10 min
    python benchmarks/pilot_yardsticks.py --nfe 10 --schedules ddpm --random 701 4

The pilot (`pilot.choose`) ranks candidates by the paired mean squared distance between their
samples and the exact flow of the same 256 prior draws, plus a switch error its arcs measure
(`pilot.Boundaries`), and decides its ties by the trimmed sliced W2 (`pilot.TieDistance`). The
tables judge a mixture by a distance between distributions, the sliced W2 between the samples and
the flow's, which does not charge a sample for landing elsewhere in the flow's law than the flow
sends its draw. The yardsticks replayed here rank by that judge on the pilot's own draws instead
(`SlicedW2` between each candidate's 256 samples and the flow's), alone or in the pilot's rule:

- sliced: the least sliced W2, alone;
- sliced, capped switches: the least sliced W2 among the candidates whose switch error is at most
  TIE times the pilot's choice's plus the arcs' floor (`Boundaries.floor`). 256 draws see a
  switch as rare as 1 in 1000 by chance or not at all, and the arcs see it; as in `pilot.decide`,
  a yardstick that cannot see switches may not pick more of them than the pilot's rule;
- trimmed, capped switches: the same, the sliced W2 taken without the draws the pilot's distance
  leaves out (`pilot.shared_misses` and each candidate's TRIM farthest), whose switches the arcs
  count. Where the candidates' samples lie closer to the flow's than those samples lie to each
  other, sorting the projections pairs each sample with its own draw's, and this is the pilot's
  trimmed distance (over D): it differs where the steps are few and a candidate's samples land
  elsewhere in the flow's law than their draws' flow, which the paired distance charges and no
  distance between distributions does.
- sliced in the pilot's distance: the pilot's own rule (`pilot.decide`: the least error, ties
  within TIE by moments, as before) with its trimmed paired distance replaced by D times the
  trimmed sliced W2 squared, plus the switch error as before. The two distances share units (the
  mean squared distance per draw; a small error that keeps each sample by its draw's flow gives
  both the same value), so the switch error, which 256 draws cannot see, weighs the same against
  either, and where it dominates (many steps, modes far apart) the pilot's choice stands;
- moments break the pilot's ties: the pilot's rule as it is, its ties (errors and switch errors
  within TIE of the closest's) decided by `MomentError` instead of the least trimmed sliced W2
  (`pilot.TieDistance`). This was the pilot's rule until the replays of
  benchmarks/pilot_yardsticks.md, made with it, found the sliced W2 the better judge of ties
  ("sliced breaks the pilot's ties" there); the yardsticks below, and "sliced in the pilot's
  distance", keep the moments as the pilot's tie-break was then;
- ties switch no more: the pilot's rule, its ties limited to the candidates whose switch error
  is at most the closest's (`pilot.decide` lets a tie exceed it by the tie margin). The moments
  that decide a tie cannot see switches: on 704 under VE at NFE 20 the tie they chose moved more
  mass between modes, net, than the closest on 200,000 draws (`switch_rates.py --candidates`),
  and on 709 under scaled-linear betas at NFE 10, whose components overlap, the closest won too;
- ties within 1.4: the pilot's rule with a wider tie, WIDE_TIE instead of TIE. On 716 under
  cosine at NFE 20 the choice's trapezoidal twin lies 10% past the tie margin with better
  moments, and reads 0.68x the choice's flow W2 on 20,000 draws (`switch_rates.py`);
- twins tie within 1.4: the pilot's ties, each joined by its twins (members that differ from it
  in their last step to sigma = 0 alone, Tweedie jump or trapezoid: `Candidate.stem`) that lie
  within WIDE_TIE, decided by the moments. The last step is where the Tweedie jump collapses the
  directions whose data variance is below sigma^2, which the moments see and the paired
  distance barely charges; twins differ there alone, so the wider tie is asked of them only.

Each cell's choices run on the table's x_T (1000 draws, seed X_T_SEED) and on FRESH_SAMPLES
fresh ones (seed FRESH_SEED) and are scored by the table's own judge; the output is each
alternative's flow W2 over the pilot choice's, per cell and as geometric means over the cells it
changes. Cells: the random mixtures (`--random SEED COUNT`, default the twenty of the tables) and
the mixtures of the suite, held-out and third sets (`--no-sets` leaves those out). NFE 20 takes
17 minutes; benchmarks/pilot_yardsticks.md holds the three budgets, replayed while the pilot's
ties went to the moments (before commit db4e5f0).

`--ckpt` replays trained networks instead, each scored as its peer table scores it
(steps_vs_quality_trained.py): the distance to the network's own flow (flow W2 for points, Frechet
distance for images) of the table's --samples draws of x_T, and of as many fresh ones.

    python benchmarks/pilot_yardsticks.py --nfe 10 \\
        --ckpt outputs/swiss/checkpoints/step_00003000.safetensors
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from sde_diffusion import GaussianMixture, load_score_fn
from sde_diffusion.data import DataConfig, load_data
from sde_diffusion.metrics import SlicedW2
from sde_diffusion.solvers import pilot as P

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steps_vs_quality import (
    FRESH_SAMPLES,
    SUITE_SCHEDULES,
    Problem,
    holdout,
    make_problem,
    md_table,
    problems,
    random_mixture,
    third,
)
from steps_vs_quality_peers import FRESH_SEED, X_T_SEED
from steps_vs_quality_trained import judge

#: the wider tie of the last yardstick
WIDE_TIE = 1.4
YARDSTICKS = (
    "sliced",
    "sliced, capped switches",
    "trimmed, capped switches",
    "sliced in the pilot's distance",
    "moments break the pilot's ties",
    "ties switch no more",
    f"ties within {WIDE_TIE}",
    f"twins tie within {WIDE_TIE}",
)


class Network:
    """A trained network as a cell, scored as its peer table scores it on `n` draws of x_T from
    `seed` (the table's own by default): by `judge`'s distance to the network's own flow, the
    flow W2 for points and the Frechet distance to the flow for images."""

    def __init__(self, ckpt: Path, n: int = 2000, seed: int = X_T_SEED, loaded=None) -> None:
        self.ckpt, self.loaded = ckpt, loaded or load_score_fn(ckpt)
        self.score_fn, self.sde, meta = self.loaded
        data = load_data(DataConfig(**meta["config"]["data"]))
        self.z = torch.randn(n, *data.shape, generator=torch.Generator().manual_seed(seed))
        self._metrics = judge(self.score_fn, self.sde, data.test, self.sde.prior_std() * self.z)

    def error(self, run: Callable[[Tensor], tuple[Tensor, int]], stochastic: bool) -> tuple:
        """(distance to the flow, counted NFE) of a sampler run(x_T) -> (samples, nfe), as
        `Problem.error`."""
        x, nfe = run(self.sde.prior_std() * self.z)
        return self._metrics(x)[1 if x.ndim == 4 else 2], nfe

    def redrawn(self, n: int, seed: int) -> Network:
        return Network(self.ckpt, n, seed, self.loaded)


def fresh(problem: Problem | Network) -> Problem | Network:
    """The cell on fresh draws of x_T (FRESH_SEED), as many as its tables remeasure on."""
    n = FRESH_SAMPLES if isinstance(problem, Problem) else len(problem.z)
    return problem.redrawn(n, FRESH_SEED)


def choices(problem: Problem | Network, nfe: int) -> dict[str, P.Candidate]:
    """The pilot's choice and each of YARDSTICKS' on the pilot's own draws and arcs."""
    x_T = P.pilot_draws(problem.sde, problem.z[:1])
    flow = P.exact_flow(problem.score_fn, problem.sde, x_T)
    pilot = P.choose(problem.score_fn, problem.sde, nfe, x_T, reference=flow)
    samples = {
        c: P.run_candidate(problem.score_fn, problem.sde, x_T, c, c.grid_for(problem.sde, nfe))
        for c in pilot.errors
    }
    finite = {c: x for c, x in samples.items() if bool(torch.isfinite(x).all())}
    sliced = SlicedW2(flow, P.TIE_PROJECTIONS, torch.Generator().manual_seed(P.TIE_SEED))
    floor = pilot.boundaries.floor if pilot.boundaries else 0.0
    switches = {c: pilot.switches.get(c, 0.0) for c in finite}
    capped = [c for c in finite if switches[c] <= P.TIE * switches[pilot.candidate] + floor]
    whole = {c: float(sliced(x)) for c, x in finite.items()}
    trimmed = {c: pilot.sliced[c] for c in finite}
    moment_error = P.MomentError(flow)
    moments = {c: moment_error(x) for c, x in finite.items()}
    errors = {c: flow[0].numel() * trimmed[c] ** 2 + switches[c] for c in finite}
    paired = {c: pilot.errors[c] for c in finite}
    closest = min(paired, key=paired.__getitem__)
    no_more = {c: e for c, e in paired.items() if switches[c] <= switches[closest]}
    stems = {c.stem for c in P.ties(paired, switches, floor, P.TIE)}
    twins = [c for c in P.ties(paired, switches, floor, WIDE_TIE) if c.stem in stems]
    return {
        "pilot": pilot.candidate,
        YARDSTICKS[0]: min(whole, key=whole.__getitem__),
        YARDSTICKS[1]: min(capped, key=whole.__getitem__),
        YARDSTICKS[2]: min(capped, key=trimmed.__getitem__),
        YARDSTICKS[3]: P.decide(errors, switches, moments.__getitem__, floor),
        YARDSTICKS[4]: P.decide(paired, switches, moments.__getitem__, floor),
        YARDSTICKS[5]: P.decide(no_more, switches, moments.__getitem__, floor),
        YARDSTICKS[6]: P.decide(paired, switches, moments.__getitem__, floor, WIDE_TIE),
        YARDSTICKS[7]: min(twins, key=moments.__getitem__),
    }


def flow_w2(problem: Problem | Network, nfe: int) -> Callable[[P.Candidate], float]:
    """A candidate's flow W2 (a network's distance to its flow) on the problem's draws, as the
    tables score it (`Problem.error`)."""

    def score(c: P.Candidate) -> float:
        ts = c.grid_for(problem.sde, nfe)
        run = P.run_candidate
        return problem.error(lambda x_T: (run(problem.score_fn, problem.sde, x_T, c, ts), nfe),
                             stochastic=False)[0]  # fmt: skip

    return score


def cells(args: argparse.Namespace) -> Iterator[tuple[str, Problem | Network]]:
    """(label, cell) of the networks `--ckpt` names, else of every mixture under each schedule,
    each built when its turn comes."""
    if args.ckpt:
        yield from ((str(ckpt), Network(ckpt, args.samples)) for ckpt in args.ckpt)
        return
    seed, count = args.random
    out: list[tuple[str, GaussianMixture]] = [random_mixture(s) for s in range(seed, seed + count)]
    if args.sets:
        named = problems(False) | holdout() | third()
        out += [(k, build()) for k, build in named.items()]
    for name, mixture in out:
        if mixture.num_components > 1:
            for schedule in args.schedules:
                yield f"{name}, {schedule}", make_problem(name, mixture, schedule)


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nfe", type=int, required=True)
    parser.add_argument("--schedules", nargs="+", default=list(SUITE_SCHEDULES))
    parser.add_argument("--random", type=int, nargs=2, default=(701, 20), metavar=("SEED", "N"))
    parser.add_argument("--no-sets", dest="sets", action="store_false")
    parser.add_argument("--ckpt", type=Path, nargs="+", help="trained networks instead")
    parser.add_argument("--samples", type=int, default=2000, help="draws of x_T per network")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, rows, ratios = time.perf_counter(), [], {y: [] for y in YARDSTICKS}
    for label, problem in cells(args):
        picked = choices(problem, args.nfe)
        row = [label, picked["pilot"].label]
        if all(picked[y] == picked["pilot"] for y in YARDSTICKS):
            rows.append(row + ["same"] * len(YARDSTICKS))
            continue
        judges = flow_w2(problem, args.nfe), flow_w2(fresh(problem), args.nfe)
        scores = {c: tuple(score(c) for score in judges) for c in set(picked.values())}
        base = scores[picked["pilot"]]
        for y in YARDSTICKS:
            if picked[y] == picked["pilot"]:
                row.append("same")
                continue
            r = tuple(s / b for s, b in zip(scores[picked[y]], base, strict=True))
            ratios[y].append(r)
            row.append(f"{r[0]:.2f}, {r[1]:.2f} fresh ({picked[y].label})")
        rows.append(row)
        print(" | ".join(row), flush=True)
    header = ["cell", "pilot's choice", *(f"{y}: flow W2 / pilot's" for y in YARDSTICKS)]
    print(f"\nNFE {args.nfe}, {len(rows)} cells ({time.perf_counter() - start:.0f} s)\n")
    print(md_table(header, rows))
    for y in YARDSTICKS:
        r = ratios[y]
        print(f"\n{y}: changes {len(r)} of {len(rows)} choices; flow W2 over the pilot's, "
              f"geometric mean {geomean([a for a, _ in r]):.3f} on the table's draws "
              f"({sum(a < 1 for a, _ in r)} lower, {sum(a > 1 for a, _ in r)} higher), "
              f"{geomean([b for _, b in r]):.3f} on fresh ones "
              f"({sum(b < 1 for _, b in r)} lower, {sum(b > 1 for _, b in r)} higher)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
