"""Per-step overhead of our solver loops against a bare score evaluation and against diffusers'
scheduler loops (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler), on one score network and batch.

The score is a 2-D MLP (x, t) -> R^2 with three hidden layers of 128 SiLU units, evaluated on a
batch of 10k points. Overhead is what a loop spends besides the network: each loop is timed with
the MLP and with a null score that returns a precomputed tensor (best of several runs), and the null run's
time per network evaluation (NFE) is the overhead, reported as a fraction of one MLP evaluation
and against diffusers' deterministic (DDIM) and noise-drawing (DDPM) loops: compare the
deterministic solvers (ode, heun, ddim, dpm_solver) with the first, the stochastic ones with the
second. Goals (issue 4): at most 5% of an MLP evaluation, and below diffusers' loops.

    python benchmarks/solver_overhead.py                 # CPU
    python benchmarks/solver_overhead.py --device cuda   # GPU

Prints a markdown table and writes benchmarks/solver_overhead_<device>.png.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import Tensor, nn

from sde_diffusion import VPSDE
from sde_diffusion.solvers import SOLVERS, sample

# solver parameters for the benchmark: the ODE on its fixed-step Euler method, so that each
# grid step is one network evaluation like everywhere else
OUR_PARAMS: dict[str, dict[str, object]] = {"ode": {"method": "euler"}}


def mlp(width: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
        nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2),
    )  # fmt: skip


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Least wall time of fn() over `repeats` calls in seconds, after one warm-up call: on a
    shared machine other load only ever adds time, so the minimum is the cleanest estimate."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def our_loop(
    name: str, score: Callable, x_T: Tensor, steps: int
) -> tuple[Callable[[], Tensor], int]:
    """A run of our solver `name` and its NFE."""
    sde = VPSDE()
    kw = dict(OUR_PARAMS.get(name, {}), solver=name, steps=steps, denoise=False)
    nfe = sample(
        score,
        sde,
        x_T,
        return_info=True,
        generator=torch.Generator(x_T.device).manual_seed(0),
        **kw,
    ).nfe

    def run() -> Tensor:
        return sample(score, sde, x_T, generator=torch.Generator(x_T.device).manual_seed(0), **kw)

    return run, nfe


def diffusers_loop(scheduler, eps_model: Callable, x_T: Tensor, steps: int) -> Callable[[], Tensor]:
    """The standard diffusers sampling loop: model call, scheduler.step, per timestep."""

    def run() -> Tensor:
        generator = torch.Generator(x_T.device).manual_seed(0)
        scheduler.set_timesteps(steps, device=x_T.device)
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(eps_model(x, t), t, x, generator=generator).prev_sample
        return x

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--out", default=str(Path(__file__).with_name("solver_overhead")))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = mlp().to(device).eval()
    x_T = torch.randn(args.batch, 2, device=device)
    null_out = torch.zeros_like(x_T)

    def score(x: Tensor, t: Tensor) -> Tensor:
        return net(torch.cat([x, t[:, None]], dim=1))

    def null_score(x: Tensor, t: Tensor) -> Tensor:
        return null_out

    def eps_model(x: Tensor, t: Tensor) -> Tensor:
        return net(torch.cat([x, (t / 1000).to(x.dtype).expand(x.shape[0])[:, None]], dim=1))

    def null_eps(x: Tensor, t: Tensor) -> Tensor:
        return null_out

    t_batch = torch.full((args.batch,), 0.5, device=device)
    rows: list[
        tuple[str, float, float, int]
    ] = []  # name, s/step with MLP, s/NFE overhead, NFE/step
    with torch.inference_mode():
        bare = timed(lambda: score(x_T, t_batch), device, 4 * args.repeats)
        for name in sorted(SOLVERS):
            run, nfe = our_loop(name, score, x_T, args.steps)
            null_run, _ = our_loop(name, null_score, x_T, args.steps)
            rows.append(
                (
                    f"ours: {name}",
                    timed(run, device, args.repeats) / args.steps,
                    timed(null_run, device, 10 * args.repeats) / nfe,
                    nfe / args.steps,
                )
            )
        config = dict(num_train_timesteps=1000, beta_schedule="linear")
        for label, sched in [
            ("diffusers: DDPMScheduler", DDPMScheduler(**config, clip_sample=False)),
            ("diffusers: DDIMScheduler", DDIMScheduler(**config, clip_sample=False)),
            (
                "diffusers: DPMSolverMultistepScheduler",
                DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2),
            ),
        ]:
            run = diffusers_loop(sched, eps_model, x_T, args.steps)
            null_run = diffusers_loop(sched, null_eps, x_T, args.steps)
            rows.append(
                (
                    label,
                    timed(run, device, args.repeats) / args.steps,
                    timed(null_run, device, 10 * args.repeats) / args.steps,
                    1,
                )
            )

    ddpm, ddim = (
        next(r[2] for r in rows if r[0].endswith(k)) for k in ("DDPMScheduler", "DDIMScheduler")
    )
    print(
        f"\ndevice {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
        f"steps {args.steps}; bare MLP evaluation: {bare * 1e3:.3f} ms\n"
    )
    print("| loop | NFE/step | ms/step with MLP | overhead µs/NFE | overhead / MLP eval | "
          "overhead / DDIM loop's | overhead / DDPM loop's |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, per_step, overhead, nfe_per_step in rows:
        print(
            f"| {name} | {nfe_per_step:.2f} | {per_step * 1e3:.3f} | {overhead * 1e6:.0f} | "
            f"{overhead / bare:.2%} | {overhead / ddim:.2f} | {overhead / ddpm:.2f} |"
        )
    plot(rows, bare, f"{args.out}_{device.type}.png", f"{device}, batch {args.batch}")


def plot(rows: list[tuple[str, float, float, float]], bare: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r[0] for r in rows]
    pct = [100 * r[2] / bare for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    colors = ["tab:blue" if n.startswith("ours") else "tab:gray" for n in names]
    ax.barh(names, pct, color=colors)
    ax.axvline(5, color="tab:red", linestyle="--", label="goal: 5% of an MLP evaluation")
    ax.invert_yaxis()
    ax.set_xlabel("loop overhead per NFE, % of one MLP evaluation")
    ax.set_title(f"Solver loop overhead ({title})")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
