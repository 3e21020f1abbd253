"""Which parametrisation to train: eps, x0, v or EDM's preconditioning, each trained the same way.

For every data set in --data and parametrisation in --params, trains a network (only model.param
differs: same steps, seed, data, network and noise draws), then samples it with every solver at
NFE 10, 20 and 50 from the same x_T and noise seeds. 2-D data: the MLP with the demo's settings
(or the training app's defaults, --settings app), 2000 samples, sliced W2 to 2000 held-out points
(data vs data for scale: the median over disjoint 2000-point subsets of the training set, and
their range, the noise of one comparison), and a star on every value whose samples reach
beyond 3x the held-out data's largest radius (prior-tail starts carried to far outliers).
digits: the U-Net of conf/model/unet.yaml with conf/train/digits.yaml (unconditional), 500
samples, Frechet distance, precision and recall in the digits classifier's features against
the 359 held-out digits.
Prints Markdown tables and writes them to --md.

    python benchmarks/parametrisations.py                                 # 4 x swiss roll, ~6 min
    python benchmarks/parametrisations.py --settings app --params edm \
        --data two_moons checkerboard eight_gaussians
    python benchmarks/parametrisations.py --data digits --steps 1500      # ~4 x 10 min
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sde_diffusion.apps.config import model_kwargs
from sde_diffusion.apps.train import compose_config
from sde_diffusion.data import TOYS, DataConfig, DataSplit, load_data
from sde_diffusion.losses import LossConfig
from sde_diffusion.metrics import image_metrics, sliced_wasserstein, sliced_wasserstein_floor
from sde_diffusion.precondition import PARAMS
from sde_diffusion.sde import SDE_NAMES, get_sde
from sde_diffusion.solvers import IncompatibleSDEError
from sde_diffusion.trainer import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steps_vs_quality_peers import solver_steps

#: the demo's network (sde_diffusion/demo.py) and conf/model/unet.yaml's
MLP = {"width": 128, "depth": 3, "time_embedding": "fourier", "embed_dim": 64}
UNET = {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4]}

#: "default" is sample()'s default (no solver named: its pilot's choice)
SOLVERS = ("euler_maruyama", "ddpm", "pc", "ddim", "dpm_solver", "unipc", "heun", "default")
NFE = (10, 20, 50)
#: a sample farther than this many times the data's largest radius counts as an outlier
OUTLIER = 3.0


def settings(
    name: str, kind: str, steps: int | None, seed: int
) -> tuple[str, dict, TrainConfig, DataConfig]:
    """(network, its keyword arguments, training config, data config) for data set `name`: the
    demo's or the training app's defaults (`sde-diffusion train data=<name>`) for 2-D
    data, conf/train/digits.yaml for digits; `steps` overrides the number of steps."""
    quiet = {"device": "cpu", "progress": False, "tensorboard": False, "sample_every": -1}
    if name == "digits":
        steps = steps or 6000
        cfg = TrainConfig(steps=steps, batch_size=128, checkpoint_every=steps, seed=seed, **quiet)
        return "unet", UNET, cfg, DataConfig(name=name, holdout=0.2, seed=seed)
    if kind == "demo":
        steps = steps or 3000
        cfg = TrainConfig(
            steps=steps, batch_size=512, lr=2e-3, warmup_steps=100, ema_decay=0.995,
            checkpoint_every=steps, seed=seed, **quiet,
        )  # fmt: skip
        return "mlp", MLP, cfg, DataConfig(name=name, n=22000, holdout=2000 / 22000, seed=seed)
    app = OmegaConf.to_object(compose_config([f"data={name}", f"train.seed={seed}"]))
    cfg = dataclasses.replace(app.train, **quiet)
    cfg.steps = cfg.checkpoint_every = steps or cfg.steps
    _, kwargs = model_kwargs(app.model)
    kwargs.pop("param")
    return "mlp", kwargs, cfg, app.data


def evaluate(trainer: Trainer, data: DataSplit, seed: int) -> dict[tuple[str, int], dict | None]:
    """{(solver, nfe): metrics} for every solver and NFE, and for 2-D data the adaptive ode as
    nfe 0 (on digits it takes hundreds of evaluations)."""
    images = len(data.shape) == 3
    n = 500 if images else data.test.shape[0]
    radius = float(data.test.flatten(1).norm(dim=1).max())
    out = {}
    runs = [(solver, nfe) for solver in SOLVERS for nfe in NFE] + [("ode", 0)] * (not images)
    for solver, nfe in runs:
        steps = nfe or None  # the adaptive ode sets its own
        try:
            if nfe and solver != "default":  # the counted NFE, the Tweedie step included
                steps = solver_steps(trainer.score_fn(), trainer.sde, data.shape, solver, nfe)
            named = None if solver == "default" else solver
            x = trainer.sample(n, steps=steps, seed=seed + 1, solver=named)
        except IncompatibleSDEError:  # ddpm on VE
            out[solver, nfe] = None
            continue
        if images:
            out[solver, nfe] = image_metrics(x, data.test)
        else:
            g = torch.Generator().manual_seed(seed)
            out[solver, nfe] = {
                "sliced_w2": sliced_wasserstein(x, data.test, 1000, g).item(),
                "radius": float(x.norm(dim=1).max()) / radius,
            }
    return out


def table(results: dict[str, dict], images: bool) -> list[str]:
    """Markdown rows: one per solver, one column per parametrisation, NFE 10 / 20 / 50 in a cell
    (2-D: sliced W2, starred beyond OUTLIER radii; digits: Frechet distance, then precision and
    recall)."""
    params = list(results)
    lines = [f"| solver | {' | '.join(params)} |", "|---" * (1 + len(params)) + "|"]

    def cell(m: dict | None) -> str:
        if m is None:
            return "n/a"
        if images:
            return f"{m['frechet_distance']:.1f} ({m['precision']:.2f}, {m['recall']:.2f})"
        return f"{m['sliced_w2']:.3f}" + ("*" if m["radius"] > OUTLIER else "")

    for solver in (*SOLVERS, *(("ode",) * (not images))):
        nfes = NFE if solver != "ode" else (0,)
        cells = [" / ".join(cell(results[p][solver, k]) for k in nfes) for p in params]
        lines.append(f"| {solver} | {' | '.join(cells)} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", nargs="*", default=list(PARAMS), choices=PARAMS)
    p.add_argument("--data", nargs="*", default=["swiss_roll"], choices=[*TOYS, "digits"])
    p.add_argument("--settings", choices=("demo", "app"), default="demo")
    p.add_argument("--steps", type=int, default=None, help="default: the settings' own")
    p.add_argument("--sde", default="vp", choices=[s for s in SDE_NAMES if s != "ddpm"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig fields to override"
    )
    p.add_argument("--out", type=Path, default=Path("outputs/parametrisations"))
    p.add_argument("--md", type=Path, default=None, help="also write the tables here")
    a = p.parse_args()
    torch.set_num_threads(1)
    lines = []
    for name in a.data:
        net, kwargs, cfg, data_cfg = settings(name, a.settings, a.steps, a.seed)
        for item in a.set:
            key, value = item.split("=", 1)
            setattr(cfg, key, type(getattr(cfg, key))(value))
        data = load_data(data_cfg)
        images = len(data.shape) == 3
        if images:
            g = torch.Generator().manual_seed(a.seed)
            pick = torch.randperm(data.train.shape[0], generator=g)[:500]
            floor = image_metrics(data.train[pick], data.test)
            scale = (
                f"500 training digits: Frechet distance {floor['frechet_distance']:.1f}, "
                f"precision {floor['precision']:.2f}, recall {floor['recall']:.2f}"
            )
        else:
            n = data.test.shape[0]
            g = torch.Generator().manual_seed(a.seed)
            floor = sliced_wasserstein_floor(data.train, data.test, n, 1000, g)
            scale = (
                f"data vs data {floor.median():.4f} (median of {len(floor)} disjoint training "
                f"subsets of {n}, range {floor.min():.4f}-{floor.max():.4f})"
            )
        results, seconds = {}, {}
        for param in a.params:
            trainer = Trainer(
                net, get_sde(a.sde), data, cfg, LossConfig(), out_dir=a.out / name / param,
                model_kwargs=kwargs | {"param": param},
            )  # fmt: skip
            tic = time.perf_counter()
            trainer.fit()
            seconds[param] = time.perf_counter() - tic
            results[param] = evaluate(trainer, data, a.seed)
            print(f"{name} {param}: trained in {seconds[param]:.0f} s", flush=True)
            print("\n".join(table({param: results[param]}, images)), flush=True)
        lines += [
            f"\n{name}, {a.sde} SDE, {net} ({a.settings if not images else 'digits'} settings), "
            f"{cfg.steps} steps; NFE 10 / 20 / 50 per cell, ode adaptive; {scale}\n",
            *table(results, images),
        ]
    text = "\n".join(lines)
    print(text)
    if a.md is not None:
        a.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
