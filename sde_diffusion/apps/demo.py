"""`make demo`: train a small MLP on the swiss roll on the CPU in about a minute, sample it, and
print how close the samples are to held-out data.

Quality is the sliced 2-Wasserstein distance between 2000 samples and 2000 held-out points,
printed beside the same distance from 2000 training points to the held-out points: two finite
samples of the *same* distribution are that far apart, so it is the scale to read the first
number against. That scale is the median over the 10 disjoint 2000-point subsets of the
training set, whose spread (printed) is the noise of any one comparison: a single subset reads
anywhere in 0.7-1.2x the median here (metrics.sliced_wasserstein_floor). The MLP is trained in
the default parametrisation (EDM's preconditioning, sde_diffusion.precondition). Writes
outputs/demo/demo.png (data beside samples) and prints its path.

    sde-diffusion demo [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..data import DataConfig, load_data
from ..figures import save_sample_figure
from ..losses import LossConfig
from ..metrics import SlicedW2, sliced_wasserstein_floor
from ..sde import VPSDE
from ..trainer import TrainConfig, Trainer

MLP = {"width": 128, "depth": 3, "time_embedding": "fourier", "embed_dim": 64}
#: the trained model sampled again with faster solvers, for the closing table ("default":
#: `sample()` with no solver named, the configuration its pilot picks for this network)
SOLVER_TABLE = (("pc", 250), ("ddim", 50), ("dpm_solver", 20), ("heun", 10), ("default", 10))


def run(
    steps: int = 3000, out: str | Path = "outputs/demo", progress: bool = True, seed: int = 0
) -> dict:
    """Train, sample (Euler–Maruyama, then faster solvers) and score; returns
    {'sw', 'sw_data' (the median floor), 'sw_data_range', 'train_s', 'figure', 'solvers'}."""
    data = load_data(DataConfig(name="swiss_roll", n=22000, holdout=2000 / 22000, seed=seed))
    cfg = TrainConfig(
        steps=steps, batch_size=512, lr=2e-3, warmup_steps=100, ema_decay=0.995, log_every=100,
        checkpoint_every=steps, keep_last=1, sample_every=-1, sample_steps=500, device="cpu",
        progress=progress, tensorboard=False, seed=seed,
    )  # fmt: skip
    trainer = Trainer("mlp", VPSDE(), data, cfg, LossConfig(), out_dir=out, model_kwargs=MLP)
    tic = time.perf_counter()
    trainer.fit()
    train_s = time.perf_counter() - tic
    n = data.test.shape[0]
    score = SlicedW2(data.test, 1000, torch.Generator().manual_seed(seed))
    floor = sliced_wasserstein_floor(
        data.train, data.test, n, 1000, torch.Generator().manual_seed(seed)
    )
    sw_data = floor.median().item()
    samples = trainer.sample(n, seed=seed + 1)
    sw = score(samples).item()
    title = f"swiss roll, {steps} steps: SW2 = {sw:.4f} (data vs data {sw_data:.4f})"
    figure = save_sample_figure(data.test, samples, Path(out) / "demo.png", title=title)
    solvers = {}
    for solver, solver_steps in SOLVER_TABLE:
        named = None if solver == "default" else solver
        x = trainer.sample(n, steps=solver_steps, seed=seed + 1, solver=named)
        solvers[f"{solver} ({solver_steps} steps)"] = score(x).item()
    return {
        "sw": sw,
        "sw_data": sw_data,
        "sw_data_range": (floor.min().item(), floor.max().item()),
        "train_s": train_s,
        "figure": str(figure),
        "solvers": solvers,
    }


def main() -> None:
    """`sde-diffusion demo`: train, sample and print the closing table."""
    p = argparse.ArgumentParser(
        prog="sde-diffusion demo",
        description="Train an MLP on the swiss roll (CPU, about a minute) and score it.",
    )
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--out", default="outputs/demo")
    a = p.parse_args()
    r = run(a.steps, a.out)
    print(f"trained {a.steps} steps in {r['train_s']:.0f} s")
    print(f"sliced W2 (samples vs held-out data): {r['sw']:.4f}")
    lo, hi = r["sw_data_range"]
    print(
        f"sliced W2 (training vs held-out data, for scale): {r['sw_data']:.4f}  "
        f"ratio {r['sw'] / r['sw_data']:.2f}\n  (the median of 10 disjoint training subsets; "
        f"they range {lo:.4f}-{hi:.4f}, {lo / r['sw_data']:.2f}-{hi / r['sw_data']:.2f}x)"
    )
    for name, value in r["solvers"].items():
        print(f"sliced W2 with {name}: {value:.4f}  ratio {value / r['sw_data']:.2f}")
    print(f"figure: {r['figure']}")
