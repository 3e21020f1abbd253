"""When a mixture's table cell is a lottery: the default and named peers on many draws of x_T,
their error split into the rare draws they send to another mode than the flow does and the rest,
and how often each wins on blocks of as many draws as the table's.

    python benchmarks/switch_rates.py --random-mixture 703 --schedule cosine --nfe 20 \\
        --peers "DEIS3 karras" "DPM++3M lu" --draws 20000
    python benchmarks/switch_rates.py --problem "16-D mixture" --schedule ddpm --nfe 20 \\
        --peers "DPM++3M lu"
    python benchmarks/switch_rates.py --random-mixture 702 --schedule scaled_linear --nfe 20 \\
        --peers "UniPC3 karras" --candidates "unipc order 2 (noise, edm grid, end zero)"

steps_vs_quality.py scores a mixture by the sliced W2 between 1000 samples and the exact flow of
the same x_T (and its best peer again on 4000 fresh draws). A sampler that sends one draw in 5000
across a boundary of the flow to another mode shows no such switch on most sets of 1000 draws and
one, costing several times its other error, on some: the cell is then decided by which sampler's
switches happened to be drawn. This measures both parts on `--draws` draws (seed FRESH_SEED + 1,
apart from the tables' x_T and fresh draws): a draw switches where it lands farther than half the
flow's smallest jump from the flow's own sample (the jump from the default's pilot,
`Boundaries.smallest_jump`; none where its arcs find no jump); the mean squared distance of the
other draws is the smooth part. The sliced W2 on each block of MIX_SAMPLES draws, as the table
measures it, gives how often each sampler wins, and exp(-rate * MIX_SAMPLES) the chance that a
block of the table's size holds none of its switches. The sliced W2 on all the draws is the table's
yardstick at `--draws`: a distance between distributions, it charges a switch only where no switch
the other way between the same two modes offsets it, so where the modes lie well apart the net
switches decide it (the switches tallied from the flow's mode to the sample's, each the most
probable component of p_0, and netted over each pair of modes; where components overlap, that mode
is a guess). `--candidates` adds members of the pilot's family (`pilot.CANDIDATES`, by label)
beside the default's choice, to see whether another would have won.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from sde_diffusion.metrics import SlicedW2
from sde_diffusion.solvers import sample
from sde_diffusion.solvers._registry import CheckedScore
from sde_diffusion.solvers.pilot import CANDIDATES, Candidate, run_candidate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steps_vs_quality import (
    MIX_SAMPLES,
    PROJECTIONS,
    SCHEDULES,
    Method,
    Problem,
    budget_steps,
    from_peer,
    holdout,
    md_table,
    ours,
    problems,
    random_mixture,
    third,
)
from steps_vs_quality_peers import FRESH_SEED, diffusers_peers, k_diffusion_peers


def member(c: Candidate) -> Method:
    """A member of the pilot's family, run on its own grid for the budget (its NFE counted)."""

    def run(problem: Problem, steps: int, x_T: torch.Tensor, seed: int) -> tuple[torch.Tensor, int]:
        score = CheckedScore(problem.score_fn)
        x = run_candidate(score, problem.sde, x_T, c, c.grid_for(problem.sde, steps))
        return x, score.nfe

    return Method("ours: " + c.label, run, fixed=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--problem", help="a named problem of the suite, held-out or third set")
    target.add_argument("--random-mixture", type=int, metavar="SEED", help="random_mixture(SEED)")
    parser.add_argument("--schedule", required=True, choices=list(SCHEDULES))
    parser.add_argument("--nfe", type=int, required=True)
    parser.add_argument("--peers", nargs="+", required=True, help="peer labels containing these")
    parser.add_argument("--candidates", nargs="+", default=[], help="labels of pilot.CANDIDATES")
    parser.add_argument("--draws", type=int, default=20 * MIX_SAMPLES)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    labels = {c.label: c for c in CANDIDATES}
    unknown = [c for c in args.candidates if c not in labels]
    if unknown:
        parser.error(f"--candidates {unknown} are none of pilot.CANDIDATES: {list(labels)}")
    if args.random_mixture is not None:
        name, mixture = random_mixture(args.random_mixture)
    else:
        named = problems(False) | holdout() | third()
        found = [k for k in named if args.problem in k]
        if len(found) != 1:
            parser.error(f"--problem {args.problem!r} names {found or 'none'} of {list(named)}")
        name, mixture = found[0], named[found[0]]()
    if mixture.num_components == 1:
        parser.error(f"{name} is a Gaussian: its error is an exact KL, no lottery")

    start = time.perf_counter()
    z = torch.randn(args.draws, mixture.dim, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(FRESH_SEED + 1))  # fmt: skip
    problem = Problem(name, args.schedule, mixture, SCHEDULES[args.schedule](), z)
    problem.solve_flow()
    x_T = problem.sde.prior_std() * problem.z
    pilot = sample(problem.score_fn, problem.sde, x_T[:1], steps=args.nfe, return_info=True).pilot
    jump = pilot.boundaries.smallest_jump if pilot and pilot.boundaries else math.inf
    peers = [from_peer(p) for p in diffusers_peers()]
    try:
        peers += [from_peer(p) for p in k_diffusion_peers()]
    except ImportError as e:
        print(f"running without k-diffusion: {e}")
    named = [p for p in peers if any(k in p.label for k in args.peers)]
    if not named:
        parser.error(f"--peers {args.peers} name none of {[p.label for p in peers]}")
    family = [member(labels[c]) for c in args.candidates]
    methods = [ours("default", fixed=True), *family, *named]

    blocks = args.draws // MIX_SAMPLES
    whole = SlicedW2(problem.flow, PROJECTIONS, torch.Generator().manual_seed(7))

    flow_modes = mixture.component_of(problem.flow)
    judges = [
        SlicedW2(flow, PROJECTIONS, torch.Generator().manual_seed(7))
        for flow in problem.flow[: blocks * MIX_SAMPLES].split(MIX_SAMPLES)
    ]
    rows, block_errors = [], []
    for method in methods:
        steps = budget_steps(method, args.nfe, problem, {})
        if steps is None:
            print(f"{method.label} does not fit NFE {args.nfe}")
            continue
        x, nfe = method.run(problem, steps, x_T, 0)
        d2 = (x - problem.flow).flatten(1).pow(2).sum(1)
        switched = d2 > (jump / 2) ** 2
        rate = float(switched.double().mean())
        moved = torch.zeros(mixture.num_components, mixture.num_components, dtype=torch.long)
        to = (flow_modes[switched], mixture.component_of(x)[switched])
        moved.index_put_(to, torch.ones_like(to[0]), accumulate=True)
        net = int((moved - moved.T).clamp(min=0).sum())
        x_blocks = x[: blocks * MIX_SAMPLES].split(MIX_SAMPLES)
        errors = torch.tensor([float(j(b)) for j, b in zip(judges, x_blocks, strict=True)])
        block_errors.append(errors)
        rows.append([method.label, str(nfe), f"{float(d2.mean()):.3g}",
                     f"{float(d2[~switched].mean()):.3g}", f"{int(switched.sum())}", str(net),
                     f"{math.exp(-rate * MIX_SAMPLES):.2f}", f"{float(errors.median()):.3g}",
                     f"{float(errors.min()):.3g}-{float(errors.max()):.3g}",
                     f"{float(whole(x)):.3g}"])  # fmt: skip
    best_peer = torch.stack(block_errors[1 + len(family) :]).min(0).values
    wins = int((block_errors[0] <= best_peer).sum())
    header = ["sampler", "NFE", "mean squared distance", "without switches",
              f"switches in {args.draws}", "net", f"P(none in {MIX_SAMPLES})",
              f"sliced W2 per {MIX_SAMPLES}: median", "range", f"on all {args.draws}"]  # fmt: skip
    jumps = f"the flow's smallest jump {jump:.3g}" if jump < math.inf else "the flow never jumps"
    print(f"{name}, {args.schedule} schedule, NFE {args.nfe}: {args.draws} draws, {jumps} "
          f"({time.perf_counter() - start:.0f} s)\n")  # fmt: skip
    print(md_table(header, rows))
    print(f"\nThe default at most the best of these peers on {wins} of {blocks} blocks of "
          f"{MIX_SAMPLES} draws.")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
