"""Which parametrisation to train: eps, x0, v or EDM's preconditioning, each trained the same way.

For every parametrisation in --params and data set in --data, trains the MLP (the demo's settings:
same steps, seed, data and network; only model.param differs), then samples 2000 points with every
solver at NFE 10, 20 and 50 from the same x_T and noise seeds, and prints sliced W2 to 2000
held-out points (data vs data for scale) and the largest sample radius over the data's largest
radius (a prior-tail start carried to a far outlier shows there). Writes the tables to --md.

    python benchmarks/parametrisations.py                                 # 4 x swiss roll, ~8 min
    python benchmarks/parametrisations.py --params edm --data two_moons checkerboard eight_gaussians
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sde_diffusion.config import MLPConfig, model_kwargs
from sde_diffusion.data import TOYS, DataConfig, load_data
from sde_diffusion.losses import LossConfig
from sde_diffusion.metrics import sliced_wasserstein
from sde_diffusion.precondition import PARAMS
from sde_diffusion.sde import SDE_NAMES, get_sde
from sde_diffusion.trainer import TrainConfig, Trainer

#: the demo's network and training settings (sde_diffusion/demo.py)
MLP = {"width": 128, "depth": 3, "time_embedding": "fourier", "embed_dim": 64}

SOLVERS = ("euler_maruyama", "ddpm", "pc", "ddim", "dpm_solver", "unipc", "heun")
NFE = (10, 20, 50)
#: score evaluations per step (heun: 2, but 1 on the last; pc: 2), as in
#: steps_vs_quality_trained.py: the final Tweedie step is one NFE of the budget
EVALS_PER_STEP = {"heun": 2, "pc": 2}


def steps_for(solver: str, nfe: int) -> int:
    """The step count whose evaluations fit the NFE budget."""
    return max(1, (nfe - 1) // EVALS_PER_STEP.get(solver, 1))


def settings(kind: str, steps: int | None, seed: int) -> tuple[TrainConfig, dict, DataConfig]:
    """(training config, MLP keyword arguments, data config minus its name) of the demo or of the
    training app's defaults (`python -m sde_diffusion.train data=<name>`); steps overrides."""
    quiet = {"device": "cpu", "progress": False, "tensorboard": False, "sample_every": -1}
    if kind == "demo":
        cfg = TrainConfig(
            steps=steps or 3000, batch_size=512, lr=2e-3, warmup_steps=100, ema_decay=0.995,
            checkpoint_every=steps or 3000, seed=seed, **quiet,
        )  # fmt: skip
        return cfg, MLP, DataConfig(n=22000, holdout=2000 / 22000, seed=seed)
    cfg = TrainConfig(seed=seed, **quiet)
    cfg.steps = cfg.checkpoint_every = steps or cfg.steps
    _, kwargs = model_kwargs(MLPConfig())
    kwargs.pop("param")
    return cfg, kwargs, DataConfig(seed=seed)


def evaluate(trainer: Trainer, test: torch.Tensor, seed: int) -> dict[tuple[str, int], tuple]:
    """{(solver, nfe): (sliced W2 to test, max radius / data's max radius)}."""
    n, radius = test.shape[0], float(test.norm(dim=1).max())
    out = {}
    runs = [(solver, nfe) for solver in SOLVERS for nfe in NFE] + [("ode", 0)]
    for solver, nfe in runs:
        steps = steps_for(solver, nfe) if nfe else None  # the adaptive ode sets its own
        x = trainer.sample(n, steps=steps, seed=seed + 1, solver=solver)
        g = torch.Generator().manual_seed(seed)
        sw = sliced_wasserstein(x, test, 1000, g).item()
        out[solver, nfe] = (sw, float(x.norm(dim=1).max()) / radius)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", nargs="*", default=list(PARAMS), choices=PARAMS)
    p.add_argument("--data", nargs="*", default=["swiss_roll"], choices=TOYS)
    p.add_argument("--settings", choices=("demo", "app"), default="demo")
    p.add_argument("--steps", type=int, default=None, help="default: the settings' own")
    p.add_argument("--sde", default="vp", choices=[s for s in SDE_NAMES if s != "ddpm"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/parametrisations"))
    p.add_argument("--md", type=Path, default=None, help="also write the tables here")
    a = p.parse_args()
    torch.set_num_threads(1)
    lines = []
    for name in a.data:
        cfg, mlp, data_cfg = settings(a.settings, a.steps, a.seed)
        data_cfg.name = name
        data = load_data(data_cfg)
        n = data.test.shape[0]
        g = torch.Generator().manual_seed(a.seed)
        floor = sliced_wasserstein(data.train[:n], data.test, 1000, g).item()
        head = " | ".join(f"{s} {k}" for s in SOLVERS for k in NFE) + " | ode (adaptive)"
        lines += [
            f"\n{name}, {a.sde}, {a.settings} settings, {cfg.steps} steps, "
            f"data vs data {floor:.4f}: "
            "sliced W2 (largest radius / data's)\n",
            f"| param | {head} |",
            "|---" * (2 + len(SOLVERS) * len(NFE)) + "|",
        ]
        for param in a.params:
            trainer = Trainer(
                "mlp", get_sde(a.sde), data, cfg, LossConfig(), out_dir=a.out / name / param,
                model_kwargs=mlp | {"param": param},
            )  # fmt: skip
            tic = time.perf_counter()
            trainer.fit()
            train_s = time.perf_counter() - tic
            res = evaluate(trainer, data.test, a.seed)
            cells = " | ".join(f"{res[k][0]:.3f} ({res[k][1]:.1f})" for k in res)
            lines.append(f"| {param} | {cells} |")
            print(f"{name} {param} trained in {train_s:.0f} s", flush=True)
            print("\n".join(lines[-1:]), flush=True)
    text = "\n".join(lines)
    print(text)
    if a.md is not None:
        a.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
