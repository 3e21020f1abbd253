"""Which yardstick should the default's pilot rank its candidates by? A replay on mixture cells: the
pilot's choice against the choices three other yardsticks make on the same draws, each measured as
the tables measure it.

    python benchmarks/pilot_yardsticks.py --nfe 5   # 90 cells under DDPM, VP and cosine, 16 min
    python benchmarks/pilot_yardsticks.py --nfe 10 --schedules ddpm --random 701 4

The pilot (`pilot.choose`) ranks candidates by the paired mean squared distance between their
samples and the exact flow of the same 256 prior draws, plus a switch error its arcs measure
(`pilot.Boundaries`). The tables judge a mixture by a distance between distributions, the sliced
W2 between the samples and the flow's, which does not charge a sample for landing elsewhere in the
flow's law than the flow sends its draw. The yardsticks replayed here rank by that judge on
the pilot's own draws instead (`SlicedW2` between each candidate's 256 samples and the flow's):

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

Each cell's choices run on the table's x_T (1000 draws, seed X_T_SEED) and on FRESH_SAMPLES
fresh ones (seed FRESH_SEED) and are scored by the table's own judge; the output is each
alternative's flow W2 over the pilot choice's, per cell and as geometric means over the cells it
changes. Cells: the random mixtures (`--random SEED COUNT`, default the twenty of the tables) and
the mixtures of the suite, held-out and third sets (`--no-sets` leaves those out). NFE 20 takes
29 minutes; benchmarks/pilot_yardsticks.md holds the three budgets.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sde_diffusion import GaussianMixture
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
from steps_vs_quality_peers import FRESH_SEED

YARDSTICKS = ("sliced", "sliced, capped switches", "trimmed, capped switches")


def choices(problem: Problem, nfe: int) -> dict[str, P.Candidate]:
    """The pilot's choice and each of YARDSTICKS' on the pilot's own draws and arcs."""
    x_T = P.pilot_draws(problem.sde, problem.z[:1])
    flow = P.exact_flow(problem.score_fn, problem.sde, x_T)
    pilot = P.choose(problem.score_fn, problem.sde, nfe, x_T, reference=flow)
    samples = {
        c: P.run_candidate(problem.score_fn, problem.sde, x_T, c, c.grid_for(problem.sde, nfe))
        for c in pilot.errors
    }
    finite = {c: x for c, x in samples.items() if bool(torch.isfinite(x).all())}
    d2 = {c: (x - flow).flatten(1).square().sum(1) for c, x in finite.items()}
    kept = ~P.shared_misses(list(d2.values()), pilot.boundaries)
    trim = P.TRIM if pilot.boundaries else 0

    def sliced(c: P.Candidate, trimmed: bool) -> float:
        keep = kept.clone() if trimmed else torch.ones_like(kept)
        if trimmed and trim:  # the pilot's trim: the candidate's farthest kept draws
            keep[torch.where(kept, d2[c], -1.0).topk(trim).indices] = False
        g = torch.Generator().manual_seed(11)
        return float(SlicedW2(flow[keep], 256, g)(finite[c][keep]))

    floor = pilot.boundaries.floor if pilot.boundaries else 0.0
    cap = P.TIE * pilot.switches.get(pilot.candidate, 0.0) + floor
    capped = [c for c in finite if pilot.switches.get(c, 0.0) <= cap]
    whole = {c: sliced(c, False) for c in finite}
    trimmed = {c: sliced(c, True) for c in capped}
    return {
        "pilot": pilot.candidate,
        YARDSTICKS[0]: min(whole, key=whole.__getitem__),
        YARDSTICKS[1]: min(capped, key=whole.__getitem__),
        YARDSTICKS[2]: min(capped, key=trimmed.__getitem__),
    }


def flow_w2(problem: Problem, nfe: int) -> Callable[[P.Candidate], float]:
    """A candidate's flow W2 on the problem's draws, as the tables score it (`Problem.error`)."""

    def score(c: P.Candidate) -> float:
        ts = c.grid_for(problem.sde, nfe)
        run = P.run_candidate
        return problem.error(lambda x_T: (run(problem.score_fn, problem.sde, x_T, c, ts), nfe),
                             stochastic=False)[0]  # fmt: skip

    return score


def cells(args: argparse.Namespace) -> list[tuple[str, GaussianMixture]]:
    seed, count = args.random
    out = [random_mixture(s) for s in range(seed, seed + count)]
    if args.sets:
        named = problems(False) | holdout() | third()
        out += [(k, build()) for k, build in named.items()]
    return [(name, mixture) for name, mixture in out if mixture.num_components > 1]


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nfe", type=int, required=True)
    parser.add_argument("--schedules", nargs="+", default=list(SUITE_SCHEDULES))
    parser.add_argument("--random", type=int, nargs=2, default=(701, 20), metavar=("SEED", "N"))
    parser.add_argument("--no-sets", dest="sets", action="store_false")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, rows, ratios = time.perf_counter(), [], {y: [] for y in YARDSTICKS}
    for name, mixture in cells(args):
        for schedule in args.schedules:
            problem = make_problem(name, mixture, schedule)
            picked = choices(problem, args.nfe)
            row = [f"{name}, {schedule}", picked["pilot"].label]
            if all(picked[y] == picked["pilot"] for y in YARDSTICKS):
                rows.append(row + ["same"] * len(YARDSTICKS))
                continue
            judges = (flow_w2(problem, args.nfe),
                      flow_w2(problem.redrawn(FRESH_SAMPLES, FRESH_SEED), args.nfe))  # fmt: skip
            scores = {c: tuple(judge(c) for judge in judges) for c in set(picked.values())}
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
