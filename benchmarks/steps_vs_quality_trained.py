"""Steps against quality for a trained model (slow): every solver x step count on one checkpoint.

The oracle benchmark (steps_vs_quality.py) measures discretisation error alone; this one measures
what a user sees with a trained network, whose score error adds to it. Each run goes through the
sampling app exactly as `sde-diffusion sample model=ckpt ...` would (samples.npz,
metrics.json, figure per run: sliced W2 to held-out data for points, Fréchet distance / precision /
recall in the digits classifier's features for images), then the report app tabulates and plots.
Runs whose metrics.json is already in --out are skipped, so an interrupted sweep resumes and a
narrow one (--nfe 5 10 20) can be widened later. `--tuned unipc` adds that solver on grids fitted
to the checkpoint (`solver.grid=tuned`, at NFE <= 20, pilot of --pilot prior draws; the fit's cost
is in each run's metrics.json).

    sde-diffusion train hydra.run.dir=outputs/swiss                         # ~2 min CPU
    python benchmarks/steps_vs_quality_trained.py \\
        --ckpt outputs/swiss/checkpoints/step_00003000.safetensors --out outputs/bench_swiss
    sde-diffusion train model=unet data=digits train=digits model.class_cond=true \\
        hydra.run.dir=outputs/digits                                           # ~25 min CPU
    python benchmarks/steps_vs_quality_trained.py --ckpt <digits ckpt> --metric frechet_distance \\
        --samples 1000 --out outputs/bench_digits
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sde_diffusion.apps import report
from sde_diffusion.apps.hydra_app import compose_config
from sde_diffusion.apps.sample import run
from sde_diffusion.solvers import SOLVERS

NFE = (5, 10, 20, 50, 100, 250, 1000)
#: score evaluations per step, to match budgets (heun: 2 per step but 1 on the last; pc: 2)
EVALS_PER_STEP = {"heun": 2, "pc": 2}
TUNED_NFE = 20  # tuned grids at budgets up to this one


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a training checkpoint (.safetensors)")
    p.add_argument("--out", type=Path, default=Path("outputs/steps_vs_quality_trained"))
    p.add_argument("--solvers", nargs="*", default=sorted(set(SOLVERS) - {"ode"}))
    p.add_argument("--nfe", nargs="*", type=int, default=list(NFE))
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--metric", default="sliced_w2")
    p.add_argument("--tuned", nargs="*", default=[], help="solvers to run on tuned grids too")
    p.add_argument("--pilot", type=int, default=256, help="prior draws a tuned grid is fitted on")
    args = p.parse_args()
    if not Path(args.ckpt).is_file():
        p.error(f"checkpoint {args.ckpt} does not exist")
    runs = [(solver, nfe, "", []) for solver in args.solvers for nfe in args.nfe]
    tuned = ["solver.grid=tuned", f"tune.pilot={args.pilot}"]
    runs += [(s, n, "_tuned", tuned) for s in args.tuned for n in args.nfe if n <= TUNED_NFE]
    for solver, nfe, suffix, extra in runs:
        out = args.out / f"{solver}{suffix}_nfe{nfe}"
        if (out / "metrics.json").exists():
            continue  # done by an earlier, interrupted or narrower, run into the same --out
        # the final Tweedie step is one NFE of the budget
        steps = max(1, (nfe - 1) // EVALS_PER_STEP.get(solver, 1))
        common = ["model=ckpt", f"ckpt={args.ckpt}", f"solver={solver}", f"steps={steps}"]
        run(compose_config("sample", [*common, f"num_samples={args.samples}", *extra]), out)
    report.main([str(args.out), "--metric", args.metric])


if __name__ == "__main__":
    main()
