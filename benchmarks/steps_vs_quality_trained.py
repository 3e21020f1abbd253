"""Steps against quality for a trained model (slow): every solver x step count on one checkpoint.

The oracle benchmark (steps_vs_quality.py) measures discretisation error alone; this one measures
what a user sees with a trained network, whose score error adds to it. Each run goes through the
sampling app exactly as `sde-diffusion sample model=ckpt ...` would (samples.npz,
metrics.json, figure per run: sliced W2 to held-out data for points, Fréchet distance / precision /
recall in the digits classifier's features for images), then the report app tabulates and plots.
Runs whose metrics.json is already in --out are skipped, so an interrupted sweep resumes and a
narrow one (--nfe 5 10 20) can be widened later. `--tuned unipc` adds that solver on grids fitted
to the checkpoint (`solver.grid=tuned`, at NFE <= 20, pilot of --pilot prior draws; the fit's cost
is in each run's metrics.json); `--tuned default` tunes the default (`solver=default`).

    sde-diffusion train hydra.run.dir=outputs/swiss                         # ~2 min CPU
    python benchmarks/steps_vs_quality_trained.py \\
        --ckpt outputs/swiss/checkpoints/step_00003000.safetensors --out outputs/bench_swiss
    sde-diffusion train model=unet data=digits train=digits model.class_cond=true \\
        hydra.run.dir=outputs/digits                                           # ~25 min CPU
    python benchmarks/steps_vs_quality_trained.py --ckpt <digits ckpt> --metric frechet_distance \\
        --samples 1000 --out outputs/bench_digits

`--peers` instead compares, through the same network, our default (`sample(steps=n)`), our
named solvers with their Tweedie step, and every peer of steps_vs_quality_peers.py (diffusers'
schedulers and, if installed, k-diffusion's samplers) at NFE 5, 10, 20, 50 on common x_T, and
writes peers.md into --out: sliced W2 to held-out data for points, Frechet distance in the
digits classifier's features for images, and each also to the network's own probability-flow
map of the same x_T (solved accurately), which isolates the sampler's error. Budgets are
matched on counted evaluations. Each budget's best peer setting and our default are then run
once more from another draw of x_T: the least of some 37 values on one draw is biased low where
the draw moves them. `--peers --tuned` adds the default on grids `tune_grid(score_fn, sde, None,
...)` fits to the network at NFE 5, 10, 20 (on --pilot prior draws of their own seed; the fits'
choice and cost are in peers.md).

    python benchmarks/steps_vs_quality_trained.py --peers \\
        --ckpt outputs/swiss/checkpoints/step_00002000.safetensors --out outputs/bench_swiss
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from sde_diffusion import SDE, load_score_fn
from sde_diffusion.apps import report
from sde_diffusion.apps.hydra_app import compose_config
from sde_diffusion.apps.sample import run
from sde_diffusion.data import DataConfig, load_data
from sde_diffusion.metrics import SlicedW2, image_metrics, sliced_wasserstein_floor
from sde_diffusion.sde import ScoreFn
from sde_diffusion.solvers import SOLVERS, TunedGrid, sample, tune_grid
from sde_diffusion.solvers.pilot import end_with

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steps_vs_quality import FLOW_TOL
from steps_vs_quality_peers import (
    FRESH_SEED,
    X_T_SEED,
    diffusers_peers,
    k_diffusion_peers,
    solver_steps,
    steps_for_budget,
)

PEER_NFE = (5, 10, 20, 50)
TRIM = 0.99

NFE = (5, 10, 20, 50, 100, 250, 1000)
TUNED_NFE = 20  # tuned grids at budgets up to this one
#: --peers --tuned: the tuned default's row and its trials per start (steps_vs_quality.py's)
TUNED, TRIALS = "ours: default, grid=tune_grid", 200


Sampler = Callable[[Tensor, int], tuple[Tensor, int]]


def tuned_default(score_fn: ScoreFn, sde: SDE, pilot: tuple[int, ...], log: dict) -> Sampler:
    """The default on a grid `tune_grid(..., None, ...)` fits to the network per step count, on
    prior draws of shape `pilot` and their own seed (not x_T's); each fit and its seconds go
    into `log`."""

    def go(x_T: Tensor, steps: int) -> tuple[Tensor, int]:
        if steps not in log:
            start = time.perf_counter()
            g = torch.Generator().manual_seed(1000 + steps)
            fit = tune_grid(score_fn, sde, None, steps, pilot, trials=TRIALS,
                            generator=g, dtype=x_T.dtype)  # fmt: skip
            log[steps] = (fit, time.perf_counter() - start)
        res = sample(score_fn, sde, x_T, return_info=True, **log[steps][0].kwargs)
        return res.samples, res.nfe

    return go


def samplers(score_fn, sde) -> dict[str, Sampler]:
    """Ours and every peer as run(x_T, steps) -> (samples, counted NFE), on one network."""

    def ours(**kw: object) -> Sampler:
        def go(x_T: Tensor, steps: int) -> tuple[Tensor, int]:
            res = sample(score_fn, sde, x_T, steps=steps, return_info=True, **kw)
            return res.samples, res.nfe

        return go

    out = {"ours: default": ours()}
    out |= {f"ours: {s} (Tweedie)": ours(solver=s) for s in ("dpm_solver", "unipc")}
    peers = diffusers_peers()
    try:
        peers += k_diffusion_peers()
    except ImportError as e:
        print(f"running without k-diffusion: {e}")
    for p in filter(lambda p: p.applies(sde), peers):
        out[p.label] = lambda x_T, steps, p=p: p.run(score_fn, sde, x_T, steps, 0)
    return out


def judge(
    score_fn: ScoreFn, sde: SDE, test: Tensor, x_T: Tensor
) -> Callable[[Tensor], list[float]]:
    """The metrics of samples from x_T: to the held-out data `test`, and to the network's own
    probability-flow map of x_T, solved accurately (the sampler's discretisation error alone).
    No network is defined below t_min, so the flow takes a last step there: the trapezoidal
    step (`pilot.trapezoid_step`, which the default's pilot also ends its reference with) and,
    for points, the Tweedie jump too, which the peers end with. Points: sliced W2 to the data,
    to the data from the TRIM of x_T nearest the origin, to the flow and to the flow with the
    jump. Images: Frechet distance in the digits classifier's features to the data and to the
    flow."""
    x = sample(score_fn, sde, x_T, "ode", 1, rtol=FLOW_TOL, atol=FLOW_TOL, denoise=False)
    t_min = torch.tensor(float(sde.t_min))
    flow, jumped = end_with(score_fn, sde, x, t_min, ("trapezoid", "tweedie")).unbind(1)
    if x_T.ndim == 4:
        return lambda x: [
            image_metrics(x.float(), ref.float())["frechet_distance"] for ref in (test, flow)
        ]
    radius = x_T.flatten(1).norm(dim=1)
    kept = radius <= torch.quantile(radius, TRIM)
    to = [SlicedW2(y, 512, torch.Generator().manual_seed(7)) for y in (test, flow, jumped)]
    return lambda x: [float(to[0](x)), float(to[0](x[kept])), float(to[1](x)), float(to[2](x))]


@torch.no_grad()
def peer_table(ckpt: str, nfes: list[int], n: int, out: Path, tuned: int = 0) -> str:
    """Every sampler of `samplers` at each budget on the same x_T: Markdown tables of the metrics
    of `judge` with counted NFE, and for `tuned` > 0 the default on grids `tune_grid` fits to
    the network on `tuned` prior draws (budgets up to TUNED_NFE). Points are also scored on the
    samples of the 99% of x_T nearest the origin (TRIM): the far tail of the prior ends where
    the network saw no data (README), which swamps the sliced W2 of every sampler that follows
    the network's flow there."""
    score_fn, sde, meta = load_score_fn(ckpt)
    data = load_data(DataConfig(**meta["config"]["data"]))

    def prior(seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return sde.prior_std() * torch.randn(n, *data.shape, generator=g)

    x_T, fresh = prior(X_T_SEED), prior(FRESH_SEED)
    images = x_T.ndim == 4

    names = ["sliced W2", f"sliced W2, {TRIM:.0%} of x_T", "flow W2", "flow W2, Tweedie end"]
    names = ["Frechet distance", "Frechet distance to the flow"] if images else names
    metrics = judge(score_fn, sde, data.test, x_T)
    rows: list[list[str]] = [[] for _ in names]
    values: dict[tuple[str, int], tuple[list[float], int]] = {}  # (label, budget) -> (..., steps)
    start = time.perf_counter()
    runs = samplers(score_fn, sde)
    fits: dict[int, tuple[TunedGrid, float]] = {}
    if tuned:
        runs[TUNED] = tuned_default(score_fn, sde, (tuned, *data.shape), fits)
    for label, go in runs.items():
        counted: dict[int, int] = {}

        def nfe(steps: int, go=go, counted=counted, label=label) -> int:
            if label in ("ours: default", TUNED):  # one evaluation per step, by construction:
                return steps  # counting it would run a pilot (or a fit) for every count tried
            if steps not in counted:
                counted[steps] = go(x_T[:1], steps)[1]
            return counted[steps]

        cells: list[list[str]] = [[] for _ in names]
        for b in nfes:
            if label == TUNED and b > TUNED_NFE:
                for c in cells:
                    c.append("")
                continue
            try:
                steps = steps_for_budget(nfe, b)
                x, used = go(x_T, steps)
                values[label, b] = metrics(x), steps
                for c, value in zip(cells, values[label, b][0], strict=True):
                    c.append(f"{value:.4g} ({used})")
            except Exception as e:  # a failing sampler is a table entry
                for c in cells:
                    c.append(type(e).__name__)
        for r, c in zip(rows, cells, strict=True):
            r.append(f"| {label} | " + " | ".join(c) + " |")
        print(rows[-1][-1], flush=True)
    head = [
        "| sampler \\ NFE | " + " | ".join(map(str, nfes)) + " |",
        "|---" * (len(nfes) + 1) + "|",
    ]
    text = [f"{n} samples from common x_T, {time.perf_counter() - start:.0f} s; cells: value "
            "(counted NFE)"]  # fmt: skip
    if not images and data.train.shape[0] >= n:
        floor = sliced_wasserstein_floor(
            data.train, data.test, n, 512, torch.Generator().manual_seed(7)
        )
        text[0] += (
            f"; data vs data {floor.median():.4g}, the median of {len(floor)} disjoint training "
            f"subsets of {n} (range {floor.min():.4g}-{floor.max():.4g})"
        )
    text.append(
        f"The flow tables measure against the network's own probability-flow map of the same "
        f"x_T (dopri5 in the log-SNR at {FLOW_TOL:g} to t_min, then the trapezoidal step to "
        "sigma = 0; for points also with the Tweedie jump from t_min instead, the peers' end) "
        "instead of the data: each sampler's discretisation error alone, free of the network's "
        "own error and of the data's sampling noise, which at 20 evaluations and more are most "
        "of the distance to the data."
    )
    if fits:
        text.append(
            f"{TUNED}: `tune_grid(score_fn, sde, None, steps, ({tuned}, ...), trials={TRIALS})` "
            "on prior draws of their own seed, searched from the default's configuration and "
            "the pilot's next closest; what it picked and cost: "
            + "; ".join(
                f"NFE {k}: {f.configuration.label}, {f.nfe} evaluations, {sec:.0f} s"
                for k, (f, sec) in sorted(fits.items())
            )
        )
    for name, r in zip(names, rows, strict=True):
        text += [f"## {name}", "\n".join([*head, *r])]
    text += [
        f"## On fresh draws of x_T (seed {FRESH_SEED})",
        "Each budget's best peer setting above, the least of some 37 values on one draw of "
        "x_T, and our default, each on its steps above, run once more from a new draw: the "
        "least of many values that the draw moves is biased low, and a setting measured on a "
        "draw it was not chosen on is not.",
        *remeasure(runs, values, nfes, names, judge(score_fn, sde, data.test, fresh), fresh),
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.md").write_text(f"# Peers through {ckpt}\n\n" + "\n\n".join(text) + "\n")
    return "\n\n".join(text)


def remeasure(
    runs: dict[str, Sampler],
    values: dict[tuple[str, int], tuple[list[float], int]],
    nfes: list[int],
    names: list[str],
    metrics: Callable[[Tensor], list[float]],
    fresh: Tensor,
) -> list[str]:
    """Per metric, a table of our default (and its tuned grid, where run) against each budget's
    best peer on `fresh` x_T."""
    again: dict[tuple[str, int], list[float]] = {}

    def value(label: str, b: int) -> list[float]:
        if (label, b) not in again:
            again[label, b] = metrics(runs[label](fresh, values[label, b][1])[0])
        return again[label, b]

    ours = [label for label in ("ours: default", TUNED) if label in runs]
    out = []
    for i, name in enumerate(names):
        lines = [
            f"| NFE | {' | '.join(ours)} | best peer setting above | {name}: ratio |",
            "|---" * (len(ours) + 3) + "|",
        ]
        for b in nfes:
            peers = [k for k in values if k[1] == b and not k[0].startswith("ours")]
            if ("ours: default", b) not in values or not peers:
                continue
            best = min(peers, key=lambda k: values[k][0][i])[0]
            theirs = value(best, b)[i]
            mine = [value(label, b)[i] if (label, b) in values else None for label in ours]
            cells = " | ".join("" if m is None else f"{m:.4g}" for m in mine)
            ratios = " / ".join(f"{m / theirs:.2f}" for m in mine if m is not None)
            lines.append(f"| {b} | {cells} | {theirs:.4g} ({best}) | {ratios} |")
        out.append("\n".join(lines))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a training checkpoint (.safetensors)")
    p.add_argument("--out", type=Path, default=Path("outputs/steps_vs_quality_trained"))
    p.add_argument("--solvers", nargs="*", default=sorted(set(SOLVERS) - {"ode"}))
    p.add_argument("--nfe", nargs="*", type=int, default=list(NFE))
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--metric", default="sliced_w2")
    p.add_argument(
        "--tuned",
        nargs="*",
        default=None,
        help="solvers to run on tuned grids too; with --peers, no names: the default",
    )
    p.add_argument("--pilot", type=int, default=256, help="prior draws a tuned grid is fitted on")
    p.add_argument("--peers", action="store_true", help=f"ours vs peers at NFE {PEER_NFE}")
    args = p.parse_args()
    if not Path(args.ckpt).is_file():
        p.error(f"checkpoint {args.ckpt} does not exist")
    if args.peers:
        torch.set_num_threads(1)
        if args.tuned:
            p.error("--peers --tuned tunes the default: name no solvers")
        tuned = args.pilot if args.tuned is not None else 0
        print(peer_table(args.ckpt, list(PEER_NFE), args.samples, args.out, tuned))
        return
    score_fn, sde, meta = load_score_fn(args.ckpt)
    shape = tuple(meta["model"]["data_shape"])
    runs = [(solver, nfe, "", []) for solver in args.solvers for nfe in args.nfe]
    tuned = ["solver.grid=tuned", f"tune.pilot={args.pilot}"]
    runs += [(s, n, "_tuned", tuned) for s in args.tuned or [] for n in args.nfe if n <= TUNED_NFE]
    for solver, nfe, suffix, extra in runs:
        out = args.out / f"{solver}{suffix}_nfe{nfe}"
        if (out / "metrics.json").exists():
            continue  # done by an earlier, interrupted or narrower, run into the same --out
        steps = solver_steps(score_fn, sde, shape, solver, nfe) if solver != "default" else nfe
        common = ["model=ckpt", f"ckpt={args.ckpt}", f"solver={solver}", f"steps={steps}"]
        run(compose_config("sample", [*common, f"num_samples={args.samples}", *extra]), out)
    report.main([str(args.out), "--metric", args.metric])


if __name__ == "__main__":
    main()
