"""How many score evaluations for which quality? Every registered solver against diffusers' schedulers.

    python benchmarks/steps_vs_quality.py              # the full run (8 minutes, 2 cores)
    python benchmarks/steps_vs_quality.py --quick      # a 1.5-minute smoke run

The data are Gaussian mixtures whose exact score (`GaussianMixture`) stands in for a perfectly
trained network, so what remains is each solver's own discretisation error. All samplers share
one eps-model on DDPM's linear schedule (1000 training steps): at discrete timestep k it returns
the oracle's exact eps at t = (k + 1) / 1000. Our solvers reach it through `model_score_fn(...,
time_input="index")`, which maps t back to k = 1000 t - 1, so both sides call the very same
function. Peers are diffusers' DDPM, DDIM, DPM-Solver++ (multistep), UniPC, Euler and Heun
schedulers on the same betas, with clip_sample and thresholding off and "trailing" timesteps
(every timestep an integer, the first one 999, as Lin et al. 2024 recommend). UniPC and
DPM-Solver++ also run on grids fitted by `tune_grid` at the budgets TUNED_BUDGETS, on pilot draws
independent of the benchmark's x_T; what each fit cost is printed with the tables, and the goals
are stated with our default grids alone and with the tuned ones.

Budgets: each sampler gets the largest number of steps whose NFE, counted by wrapping the
model, fits the budget (our NFE includes the final Tweedie denoise evaluation). Common random
numbers: every sampler starts from the same x_T noise, stochastic ones draw from equally seeded
generators, and every sample set is scored against the same reference set with the same
projections.

Quality, three ways:
- sliced W2 against a fresh sample of p_0 32 times the size of the sample sets, kept as its
  quantiles at the sample sets' size (`SlicedW2(levels=n)`: nearly the W2 to p_0 itself, so the
  reference adds little noise of its own), with the data-vs-data value (an independent sample of
  p_0 of the sample sets' size, scored the same way) printed as the floor. With a few thousand
  samples that floor is about as large as a good sampler's error at NFE 10;
- "flow W2": sliced W2 against the exact probability-flow ODE map of the very same x_T (an
  adaptive dopri5 solve at tight tolerance, itself an exact sample of p_0). Coupled through x_T,
  it is nearly free of sampling noise and goes to zero for every deterministic sampler as it
  converges, so it resolves the few-step differences the first one drowns; for stochastic
  samplers (not coupled to the flow) it stays at the sampling-noise floor;
- the mean exact log p_0 of the samples under the oracle, next to that of true data.

Goals, printed as ratios: at NFE 10 our best error is at most the best peer's (the aim is half
of it), in sliced W2 and in flow W2; at NFE 20 our best sliced W2 is within 1.5x of the
1000-step floor (the best sliced W2 any sampler reaches at NFE 1000).
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from sde_diffusion import DiscreteVPSDE, GaussianMixture, model_score_fn
from sde_diffusion.apps.report import markdown_table, plot_quality
from sde_diffusion.metrics import SlicedW2, mean_log_prob
from sde_diffusion.solvers import GRIDS, SOLVERS, TunedGrid, sample, tune_grid

NFES = (5, 10, 20, 50, 100, 250, 1000)
PEERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
)
#: settings under which a registered solver runs at a fixed budget; all others run with their
#: defaults. The PF-ODE defaults to adaptive dopri5, whose NFE is set by tolerances, not steps.
FIXED_BUDGET_PARAMS: dict[str, dict[str, object]] = {"ode": {"method": "rk4"}}
#: our solvers also run on grids fitted by `tune_grid` at these budgets (beyond them the default
#: grids are at the floor already, and a trial's cost grows with the steps)
TUNED, TUNED_BUDGETS, PILOT, TRIALS = ("unipc", "dpm_solver"), (5, 10, 20), 256, 300
METRIC, FLOW_METRIC = "sliced_w2", "flow_w2"
REFERENCE_FACTOR = 32  # the reference sample of p_0 is this many times the sample sets' size
#: the exact flow: dopri5 at this tolerance; first_step keeps torchdiffeq's initial-step probe
#: inside [t_min, T] (its default guess can overshoot t = 0 on the DDPM schedule)
FLOW_TOL, FLOW_FIRST_STEP = 1e-7, 1e-3
HERE = Path(__file__).resolve().parent


@dataclass
class Problem:
    """One oracle mixture with its common random numbers and reference values."""

    name: str
    mixture: GaussianMixture
    sde: DiscreteVPSDE
    eps_model: Callable[[Tensor, Tensor], Tensor]
    z: Tensor  # standard normal x_T noise shared by every sampler
    reference: Tensor  # fresh sample of p_0 every sample set is scored against
    projections: int
    flow: Tensor | None = None  # the exact probability-flow ODE map of z
    floor: float = math.nan  # sliced W2 of an independent sample of p_0
    data_log_p0: float = math.nan  # mean log p_0 of that sample
    flow_score: float = math.nan  # sliced W2 of the exact flow's samples: no solver error left
    _judges: dict[str, SlicedW2] = field(default_factory=dict, repr=False)

    def _judge(self, metric: str, y: Tensor) -> SlicedW2:
        """Sliced W2 to y's quantiles at the sample sets' size: the same directions for every
        sample set and reference."""
        if metric not in self._judges:
            g, n = torch.Generator().manual_seed(7), self.z.shape[0]
            self._judges[metric] = SlicedW2(y, self.projections, g, levels=n)
        return self._judges[metric]

    def score(self, x: Tensor) -> dict[str, float]:
        out = {METRIC: float(self._judge(METRIC, self.reference)(x))}
        if self.flow is not None:
            out[FLOW_METRIC] = float(self._judge(FLOW_METRIC, self.flow)(x))
        out["mean_log_p0"] = float(mean_log_prob(x, self.mixture))
        return out


def make_problem(dim: int, n: int, projections: int, flow_tol: float | None = FLOW_TOL) -> Problem:
    """The 2-D ring of eight Gaussians, or eight random full-covariance components in `dim`;
    with a flow_tol, also the exact flow of x_T at that tolerance (for the flow W2)."""
    g = torch.Generator().manual_seed(dim)
    if dim == 2:
        mixture, name = GaussianMixture.ring(k=8, radius=4.0, std=0.5), "2-D ring of 8"
    else:
        mixture, name = GaussianMixture.random(8, dim, generator=g), f"{dim}-D mixture of 8"
    sde = DiscreteVPSDE.ddpm()
    eps_t = mixture.eps_fn(sde)
    N = sde.N

    def eps_model(x: Tensor, k: Tensor | float) -> Tensor:
        """The eps-model at discrete timestep k (0..N-1): the oracle's exact eps at (k + 1) / N."""
        t = (torch.as_tensor(k, dtype=torch.float64) + 1) / N
        return eps_t(x, t.to(x.device).expand(x.shape[0]))

    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    reference = mixture.sample(REFERENCE_FACTOR * n, g)
    problem = Problem(name, mixture, sde, eps_model, z, reference, projections=projections)
    data = problem.score(mixture.sample(n, g))
    problem.floor, problem.data_log_p0 = data[METRIC], data["mean_log_p0"]
    if flow_tol is not None:
        score_fn = model_score_fn(eps_model, sde, "eps", time_input="index")
        opts = {"first_step": FLOW_FIRST_STEP}
        problem.flow = sample(
            score_fn, sde, z, "ode", 1, rtol=flow_tol, atol=flow_tol, options=opts
        )
        problem.flow_score = problem.score(problem.flow)[METRIC]
    return problem


# ---- our solvers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A sampler under test: run(problem, steps, seed) -> (samples, counted NFE); `steps_for`
    maps a budget to its steps where that is known without running (else they are counted)."""

    label: str
    run: Callable[[Problem, int, int], tuple[Tensor, int]]
    steps_for: Callable[[int], int] | None = None


def ours(solver: str, **settings: object) -> Method:
    """A registered solver through `sample()`, with FIXED_BUDGET_PARAMS and `settings` (grid,
    t_end, denoise or solver parameters)."""
    params = {**FIXED_BUDGET_PARAMS.get(solver, {}), **settings}

    def run(problem: Problem, steps: int, seed: int) -> tuple[Tensor, int]:
        score_fn = model_score_fn(problem.eps_model, problem.sde, "eps", time_input="index")
        x_T = problem.sde.prior_std() * problem.z
        g = torch.Generator().manual_seed(seed)
        res = sample(
            score_fn, problem.sde, x_T, solver, steps, generator=g, return_info=True, **params
        )
        return res.samples, res.nfe

    label = "ours: " + solver + "".join(f" {k}={v}" for k, v in settings.items())
    return Method(label, run)


def tuned(solver: str, log: dict[tuple[str, int], tuple[TunedGrid, float]]) -> Method:
    """A registered solver on the grid `tune_grid` fits for each problem and step count, on
    PILOT prior draws independent of the problem's x_T; each fit and its seconds go into
    `log` (one step per evaluation plus the Tweedie one, so budget b runs b - 1 steps)."""

    def run(problem: Problem, steps: int, seed: int) -> tuple[Tensor, int]:
        score_fn = model_score_fn(problem.eps_model, problem.sde, "eps", time_input="index")
        if (problem.name, steps) not in log:
            start, dim = time.perf_counter(), problem.z.shape[1]
            g = torch.Generator().manual_seed(1000 + dim)
            fit = tune_grid(
                score_fn,
                problem.sde,
                solver,
                steps,
                (PILOT, dim),
                trials=TRIALS,
                generator=g,
                dtype=problem.z.dtype,
            )
            log[problem.name, steps] = (fit, time.perf_counter() - start)
        x_T = problem.sde.prior_std() * problem.z
        res = sample(
            score_fn,
            problem.sde,
            x_T,
            solver,
            grid=log[problem.name, steps][0].ts,
            return_info=True,
        )
        return res.samples, res.nfe

    return Method(f"ours: {solver} grid=tuned", run, steps_for=lambda budget: budget - 1)


def tuning_note(problem: Problem, logs: dict[str, dict]) -> str:
    """What the tuned rows cost: pilot evaluations and seconds per fit."""
    parts = [
        f"{solver} {steps + 1} NFE: {fit.nfe} evaluations, {secs:.0f} s"
        for solver, log in logs.items()
        for (name, steps), (fit, secs) in sorted(log.items())
        if name == problem.name
    ]
    return (
        f"Tuned grids on {problem.name} (`tune_grid`: {TRIALS} trial grids on {PILOT} prior "
        f"draws independent of the benchmark's x_T, against their exact flow; a one-off cost per "
        f"model, solver and step count): " + "; ".join(parts) + "."
    )


# ---- diffusers' schedulers -----------------------------------------------------------------------


def peer(name: str) -> Method:
    """diffusers' scheduler `name` on DDPM's linear betas, driving the shared eps-model."""
    import diffusers

    cls = getattr(diffusers, name)
    accepted = inspect.signature(cls.__init__).parameters
    config = {
        "num_train_timesteps": 1000,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "timestep_spacing": "trailing",
        "clip_sample": False,
        "thresholding": False,
    }
    config = {k: v for k, v in config.items() if k in accepted}
    takes_generator = "generator" in inspect.signature(cls.step).parameters

    def run(problem: Problem, steps: int, seed: int) -> tuple[Tensor, int]:
        sched = cls(**config)
        sched.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed)
        x = problem.z * sched.init_noise_sigma
        nfe = 0
        for k in sched.timesteps:
            eps = problem.eps_model(sched.scale_model_input(x, k), k)
            nfe += 1
            extra = {"generator": g} if takes_generator else {}
            x = sched.step(eps, k, x, **extra).prev_sample
        return x, nfe

    return Method("diffusers: " + name.removesuffix("Scheduler"), run)


# ---- budgets, runs, tables ------------------------------------------------------------------------


def steps_for_budget(method: Method, budget: int, problem: Problem, cache: dict) -> int | None:
    """The largest step count whose counted NFE fits the budget (None if one step does not).

    The NFE is counted on a one-sample batch of the problem. It grows with the steps, about
    linearly, so a linear fit through 1 and 2 steps gives a guess that is then walked to the
    exact answer. Every step costs at least one evaluation, so no more than `budget` steps are
    ever tried (peers refuse more inference steps than training steps).
    """
    if method.steps_for is not None:
        steps = method.steps_for(budget)
        return steps if steps >= 1 else None
    one = replace(problem, z=problem.z[:1])

    def nfe(steps: int) -> int:
        if (method.label, steps) not in cache:
            cache[method.label, steps] = method.run(one, steps, 0)[1]
        return cache[method.label, steps]

    if nfe(1) > budget:
        return None
    if budget == 1:
        return 1
    per_step = max(nfe(2) - nfe(1), 1)
    steps = min(budget, max(1, (budget - nfe(1)) // per_step + 1))
    while steps > 1 and nfe(steps) > budget:
        steps -= 1
    while steps < budget and nfe(steps + 1) <= budget:
        steps += 1
    return steps


def run_method(problem: Problem, method: Method, budget: int, cache: dict, seed: int = 0) -> dict:
    """One cell of the table as a report record (status ok / invalid / error)."""
    record = {
        "model": "oracle",
        "sde": problem.name,
        "solver": method.label,
        "budget": budget,
        "steps": 0,
        "nfe": None,
        "seed": seed,
        "num_samples": problem.z.shape[0],
        "status": "ok",
        "error": None,
        "wall_time_s": 0.0,
        "metrics": {},
    }
    try:
        steps = steps_for_budget(method, budget, problem, cache)
        if steps is None:
            record.update(status="invalid", error=f"one step needs more than {budget} NFE")
            return record
        start = time.perf_counter()
        x, nfe = method.run(problem, steps, seed)
        record.update(steps=steps, nfe=nfe, wall_time_s=time.perf_counter() - start)
        if not bool(torch.isfinite(x).all()):
            record.update(status="error", error="non-finite samples")
            return record
        record["metrics"] = problem.score(x)
    except Exception as err:  # a failing sampler is a table entry, not the end of the benchmark
        record.update(status="error", error=f"{type(err).__name__}: {err}")
    return record


def _best(records: Sequence[dict], prefix: str, budget: int, metric: str) -> dict | None:
    ok = [
        r
        for r in records
        if r["budget"] == budget
        and r["status"] == "ok"
        and r["solver"].startswith(prefix)
        and metric in r["metrics"]
    ]
    return min(ok, key=lambda r: r["metrics"][metric], default=None)


def _vs_best_peer(
    records: Sequence[dict], metric: str, budget: int, scope: str, noise: float | None = None
) -> str:
    """One goal line; with `noise` (the sampling noise of this metric), a shortfall smaller than
    it is said to be one."""
    ours_best, peer_best = (
        _best(records, "ours", budget, metric),
        _best(records, "diffusers", budget, metric),
    )
    if not (ours_best and peer_best):
        return f"  NFE {budget} ({metric}): not measured (needs NFE {budget} and at least one peer)"
    a, b = ours_best["metrics"][metric], peer_best["metrics"][metric]
    ratio = a / b
    verdict = (
        "MET, and the aim (<= 0.5) too"
        if ratio <= 0.5
        else "MET (aim <= 0.5 not reached)"
        if ratio <= 1
        else "NOT MET: the best peer is better"
    )
    if ratio > 1 and noise is not None and a - b < noise:
        verdict += (
            f" by {a - b:.2g}, inside the sampling noise (two exact sample sets of p_0 score "
            f"{noise:.2g} apart here)"
        )
    return (
        f"  NFE {budget} ({metric}, {scope}): ours [{ours_best['solver']}] {a:.4g} / best peer "
        f"[{peer_best['solver']}] {b:.4g} = {ratio:.3f} (goal <= 1, aim <= 0.5): {verdict}"
    )


def _vs_floor(records: Sequence[dict], floor: dict | None, top: int, scope: str) -> str:
    """The NFE-20 goal line: our best sliced W2 at NFE 20 against the largest budget's best."""
    ours20 = _best(records, "ours", 20, METRIC)
    if not (ours20 and floor):
        return f"  NFE 20 ({METRIC}): not measured (needs NFE 20)"
    ratio = ours20["metrics"][METRIC] / floor["metrics"][METRIC]
    note = "" if top == 1000 else f" (largest budget run: {top}, not 1000)"
    return (
        f"  NFE 20 ({METRIC}, {scope}): ours [{ours20['solver']}] "
        f"{ours20['metrics'][METRIC]:.4g} / {top}-NFE floor {floor['metrics'][METRIC]:.4g} "
        f"[{floor['solver']}] = {ratio:.3f} (goal <= 1.5): {'MET' if ratio <= 1.5 else 'NOT MET'}"
        f"{note}"
    )


def goals(problem: Problem, records: Sequence[dict]) -> list[str]:
    """The issue's goals as ratios, each line saying plainly whether it is met: with our
    default grids alone, then with the tuned grids too (where they ran)."""
    lines = [
        f"Goals on {problem.name} (data-vs-data sliced W2 floor {problem.floor:.4g}; the exact "
        f"flow's samples score {problem.flow_score:.4g}, below which no deterministic sampler "
        f"from the same x_T gets but by chance, so the aim of half the best peer's sliced W2 is "
        f"out of reach whenever that peer is within twice of it):"
    ]
    noise = abs(problem.floor - problem.flow_score)
    top = max(r["budget"] for r in records)
    floor = _best(records, "", top, METRIC)
    scopes = [("default grids", [r for r in records if "grid=tuned" not in r["solver"]])]
    if len(scopes[0][1]) < len(records):
        scopes.append(("tuned grids included", list(records)))
    for scope, recs in scopes:
        lines += [
            _vs_best_peer(recs, METRIC, 10, scope, noise),
            _vs_best_peer(recs, FLOW_METRIC, 10, scope),
            _vs_floor(recs, floor, top, scope),
        ]
    return lines


def log_p0_table(records: Sequence[dict], problem: Problem) -> str:
    """Mean exact log p_0 of the samples, per method and budget (true data in the header)."""
    return f"mean log p_0 (true data: {problem.data_log_p0:.4f})\n\n" + markdown_table(
        records, "mean_log_p0", column="budget"
    )


def ablation(problem: Problem, budgets: Sequence[int], cache: dict) -> list[dict]:
    """Our deterministic few-step solvers over every grid, where the grid ends (t_end) and
    whether the final Tweedie step is taken: which general setting helps, at every budget."""
    t_ends = (None, problem.sde.t_min, 0.01, 0.05)  # None: the default, grids.final_time
    records = []
    for solver in [s for s in ("dpm_solver", "unipc", "heun", "ddim") if s in SOLVERS]:
        for grid in GRIDS:
            for t_end in t_ends:
                for denoise in (True, False):
                    m = ours(solver, grid=grid, t_end=t_end, denoise=denoise)
                    records += [run_method(problem, m, b, cache) for b in budgets]
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~1.5-minute smoke subset")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="default: 2 16")
    parser.add_argument("--nfe", type=int, nargs="+", default=None, help=f"default: {NFES}")
    parser.add_argument("--samples", type=int, nargs="+", default=None, help="per dim")
    parser.add_argument("--projections", type=int, default=None, help="sliced W2 directions")
    parser.add_argument(
        "--solvers", nargs="+", default=None, help=f"ours (default all: {', '.join(SOLVERS)})"
    )
    parser.add_argument(
        "--peers", nargs="*", default=None, help="diffusers schedulers ('--peers' alone: none)"
    )
    parser.add_argument(
        "--flow-tol", type=float, default=None, help=f"exact-flow tolerance (default {FLOW_TOL})"
    )
    parser.add_argument(
        "--no-tuned", action="store_true", help=f"skip the tuned-grid rows ({', '.join(TUNED)})"
    )
    parser.add_argument(
        "--ablation", action="store_true", help="also grids x t_end x denoise at NFE 10, 20"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (more only on an idle machine)"
    )
    parser.add_argument("--out", type=Path, default=HERE, help="where the .png and .md go")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    dims = args.dims or ([2] if args.quick else [2, 16])
    budgets = sorted(args.nfe or ((5, 10, 20, 100) if args.quick else NFES))
    samples = args.samples or ([2000] if args.quick else [4000, 2000])
    samples = samples + [samples[-1]] * (len(dims) - len(samples))
    projections = args.projections or (128 if args.quick else 512)
    flow_tol = args.flow_tol or (1e-5 if args.quick else FLOW_TOL)
    solvers = args.solvers or list(SOLVERS)
    unknown = sorted(set(solvers) - set(SOLVERS))
    if unknown:
        parser.error(f"unknown solvers {unknown}; valid choices: {', '.join(SOLVERS)}")
    methods = [ours(s) for s in solvers]
    tuning_logs: dict[str, dict] = {s: {} for s in TUNED if s in solvers and not args.no_tuned}
    tuned_methods = [tuned(s, log) for s, log in tuning_logs.items()]
    peers = PEERS if args.peers is None else args.peers
    try:
        methods += [peer(p) for p in peers]
    except ImportError:
        print("diffusers is not installed: running without peers")

    start = time.perf_counter()
    cache: dict = {}
    all_records, floors, text = [], {}, []
    for dim, n in zip(dims, samples, strict=True):
        problem = make_problem(dim, n, projections, flow_tol)
        records = [run_method(problem, m, b, cache) for m in methods for b in budgets]
        records += [
            run_method(problem, m, b, cache)
            for m in tuned_methods
            for b in budgets
            if b in TUNED_BUDGETS
        ]
        all_records += records
        floors[(problem.name,)] = problem.floor
        header = (
            f"## {problem.name}: {METRIC} of {n} samples against {REFERENCE_FACTOR * n} fresh "
            f"samples of p_0, {projections} "
            f"projections (data-vs-data floor {problem.floor:.4g}); cells: value (counted NFE)"
        )
        section = [
            header,
            markdown_table(records, METRIC, column="budget"),
            f"{FLOW_METRIC}: sliced W2 to the exact flow of the same x_T (dopri5, tol {flow_tol})",
            markdown_table(records, FLOW_METRIC, column="budget"),
            log_p0_table(records, problem),
            "\n".join(goals(problem, records)),
        ]
        if tuned_methods:
            section.insert(-1, tuning_note(problem, tuning_logs))
        if args.ablation:
            ab = ablation(problem, [b for b in budgets if b in (10, 20)] or budgets[:2], cache)
            section += [
                f"Ablation on {problem.name} ({FLOW_METRIC}): grid x t_end x final denoise",
                markdown_table(ab, FLOW_METRIC, column="budget"),
            ]
        for part in section:
            print(part + "\n", flush=True)
        text += section
    elapsed = time.perf_counter() - start
    failed = [r for r in all_records if r["status"] == "error"]
    for r in failed:
        print(f"ERROR {r['sde']} {r['solver']} NFE {r['budget']}: {r['error']}")
    command = "python benchmarks/steps_vs_quality.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    args.out.mkdir(parents=True, exist_ok=True)
    plot_quality(
        all_records,
        (METRIC, FLOW_METRIC),
        args.out / "steps_vs_quality.png",
        ("sde",),
        "solver",
        floors,
    )
    md = [
        "# Steps against quality: exact-score oracle, our solvers and diffusers' schedulers",
        f"Regenerate with `{command.strip()}` ({elapsed:.0f} s, {args.threads} torch thread(s)).",
        *text,
    ]
    (args.out / "steps_vs_quality.md").write_text("\n\n".join(md) + "\n")
    print(f"{elapsed:.0f} s; wrote {args.out / 'steps_vs_quality.png'} and .md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
