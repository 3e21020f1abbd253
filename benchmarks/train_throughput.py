"""Trainer throughput against a minimal hand-written PyTorch loop, side by side.

Same model (the demo's MLP, or --model unet on digits), same data, batch size and optimizer
(AdamW, foreach). Two baselines: the bare loop (loss, backward, AdamW step) and the bare loop
plus what the Trainer also does every step (gradient clipping and an EMA of the weights). The
Trainer runs as a user would run it: progress bar, metrics every 100 steps, one checkpoint at
the end. Rounds alternate between the three so that load from other processes hits all alike;
the best round of each is reported, with the ratio Trainer / loop (goal: >= 0.95).

    python benchmarks/train_throughput.py [--steps 1000] [--rounds 3] [--model mlp|unet]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sde_diffusion import get_sde
from sde_diffusion.data import DataConfig, batches, load_data
from sde_diffusion.losses import LossConfig, dsm_loss
from sde_diffusion.nets import build_model
from sde_diffusion.trainer import TrainConfig, Trainer, resolve_device

SETUPS = {
    "mlp": (
        "swiss_roll",
        512,
        {"width": 128, "depth": 3, "time_embedding": "fourier", "embed_dim": 64},
    ),
    "unet": (
        "digits",
        128,
        {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4]},
    ),
}


def hand_loop(
    name: str, data, batch: int, kwargs: dict, steps: int, device: torch.device, extras: bool
) -> float:
    """steps/s of the loop a person writes by hand (extras: + grad clipping and EMA)."""
    sde = get_sde("vp")
    torch.manual_seed(0)
    model = build_model(name, data.shape, **kwargs).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    ema = [p.detach().clone() for p in model.parameters()] if extras else []
    params = list(model.parameters())
    g = torch.Generator(device).manual_seed(0)
    stream = batches(data.train, None, batch, seed=0)
    cfg = LossConfig()
    tic = time.perf_counter()
    for _ in range(steps):
        x = next(stream)[0].to(device)
        loss = dsm_loss(model, sde, x, cfg, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if extras:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        if extras:
            torch._foreach_lerp_(ema, params, 0.001)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - tic)


def trainer_run(
    name: str, data, batch: int, kwargs: dict, steps: int, device: torch.device
) -> float:
    """steps/s of Trainer.fit for the same work (one checkpoint at the end, no figures)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            steps=steps, batch_size=batch, lr=1e-3, log_every=100, checkpoint_every=steps,
            keep_last=1,
            sample_every=-1, device=str(device), tensorboard=False,
        )  # fmt: skip
        # the hand loop trains an eps-network: the Trainer does the same work
        tr = Trainer(
            name, get_sde("vp"), data, cfg, out_dir=out, model_kwargs=kwargs | {"param": "eps"}
        )
        tic = time.perf_counter()
        tr.fit()
        return steps / (time.perf_counter() - tic)


def main() -> None:
    p = argparse.ArgumentParser(description="Trainer steps/s vs a hand-written loop.")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", choices=list(SETUPS), default="mlp")
    p.add_argument("--device", default="auto")
    p.add_argument("--plot", default=str(Path(__file__).with_name("train_throughput.png")))
    a = p.parse_args()
    device = resolve_device(a.device)
    dname, batch, kwargs = SETUPS[a.model]
    data = load_data(DataConfig(name=dname))
    runs = {
        "hand loop": lambda: hand_loop(a.model, data, batch, kwargs, a.steps, device, False),
        "hand loop + clip + EMA": lambda: hand_loop(
            a.model, data, batch, kwargs, a.steps, device, True
        ),
        "Trainer": lambda: trainer_run(a.model, data, batch, kwargs, a.steps, device),
    }
    for f in runs.values():  # warm-up round (allocator, lazy imports), not counted
        f()
    best = {k: 0.0 for k in runs}
    for _ in range(a.rounds):
        for k, f in runs.items():
            best[k] = max(best[k], f())
    print(f"{a.model} on {dname}, batch {batch}, {a.steps} steps x {a.rounds} rounds, {device}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    for k, v in best.items():
        print(f"  {k:<24s} {v:9.1f} steps/s")
    for k in ("hand loop", "hand loop + clip + EMA"):
        print(f"  Trainer / {k:<22s} {best['Trainer'] / best[k]:.3f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(best), list(best.values()))
    ax.set_xlabel("steps/s (higher is better)")
    ax.set_title(f"{a.model}, batch {batch}, {device}")
    fig.tight_layout()
    fig.savefig(a.plot, dpi=100)
    print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
