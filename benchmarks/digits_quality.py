"""Digits quality: a class-conditional U-Net trained on scikit-learn's 8x8 digits on CPU.

Trains (6000 steps or 17 minutes, whichever comes first, on the CPU), draws 10 samples of each digit
with Euler-Maruyama, writes the grid to docs/digits_samples.png (one row per digit), and scores
the samples with a logistic-regression classifier trained on the real training digits: the
fraction classified as the digit they were conditioned on, beside the classifier's accuracy on
real held-out digits for scale.

    python benchmarks/digits_quality.py [--steps 6000] [--minutes 17] [--out outputs/digits]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sde_diffusion import get_sde
from sde_diffusion.data import DataConfig, load_data
from sde_diffusion.figures import image_grid
from sde_diffusion.losses import LossConfig
from sde_diffusion.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
UNET = {
    "base_channels": 32,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [4],
    "class_cond": True,
    # the README's numbers and docs/ figures (this checkpoint feeds guidance_digits.py) were
    # measured on an eps-network; benchmarks/parametrisations.py compares the parametrisations
    "param": "eps",
}


def run(
    steps: int = 6000,
    out: str | Path = "outputs/digits",
    grid: str | Path = ROOT / "docs/digits_samples.png",
    max_minutes: float = 17.0,
) -> dict:
    """Train (at most `steps` and `max_minutes`), sample, write the grid; return
    {'steps', 'train_s', 'sample_accuracy', 'real_accuracy', 'grid'}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.linear_model import LogisticRegression

    data = load_data(DataConfig(name="digits", holdout=0.2))
    cfg = TrainConfig(
        steps=steps, batch_size=128, lr=1e-3, warmup_steps=100, ema_decay=0.999, log_every=100,
        checkpoint_every=500, sample_every=-1, sample_steps=500, device="cpu", tensorboard=False,
        max_minutes=max_minutes,
    )  # fmt: skip
    trainer = Trainer(
        "unet", get_sde("vp"), data, cfg, LossConfig(), out_dir=out, model_kwargs=UNET
    )
    tic = time.perf_counter()
    trainer.fit()
    train_s = time.perf_counter() - tic
    labels = torch.arange(100) // 10
    x = trainer.sample(100, labels=labels, seed=1).clamp(-1, 1)
    grid = Path(grid)
    grid.parent.mkdir(parents=True, exist_ok=True)
    big = image_grid(x, nrow=10).squeeze(-1).repeat_interleave(5, 0).repeat_interleave(5, 1)
    plt.imsave(grid, big.numpy(), cmap="gray", vmin=0, vmax=1)  # 5x nearest-neighbour upscale
    clf = LogisticRegression(max_iter=2000).fit(
        data.train.flatten(1).numpy(), data.train_labels.numpy()
    )
    sample_acc = float((clf.predict(x.flatten(1).numpy()) == labels.numpy()).mean())
    real_acc = float(clf.score(data.test.flatten(1).numpy(), data.test_labels.numpy()))
    return {
        "steps": trainer.step,
        "train_s": train_s,
        "sample_accuracy": sample_acc,
        "real_accuracy": real_acc,
        "grid": str(grid),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--minutes", type=float, default=17.0)
    p.add_argument("--out", default="outputs/digits")
    a = p.parse_args()
    r = run(a.steps, a.out, max_minutes=a.minutes)
    print(
        f"trained {r['steps']} steps in {r['train_s'] / 60:.1f} min; a classifier reads the "
        f"requested digit in {r['sample_accuracy']:.0%} of samples (real held-out digits: "
        f"{r['real_accuracy']:.0%}); grid: {r['grid']}"
    )
