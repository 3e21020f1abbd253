"""Guidance, inpainting and likelihood on the class-conditional digits U-Net (CPU, ~10 minutes).

Needs a class-conditional digits checkpoint (VP, eps prediction, null label = num_classes), such as
the one benchmarks/digits_quality.py trains. Writes into --out:

- cfg_digits.png: classifier-free guidance at Ho & Salimans scales w (w = 0 is the conditional
  model), one row per digit 0..9; the accuracy table counts how often a digits classifier trained on
  real digits (sde_diffusion.metrics.digits_classifier) reads the requested label.
- classifier_guidance_digits.png: the *unconditional* model (null label) guided by a NoisyClassifier
  trained here on noisy digits (cached as safetensors, so reruns skip the training); same table.
- inpaint_digits.png: held-out digits with half, box and random masks; rows: masked input (unknown
  pixels in red), replacement, RePaint resampling, original. Known pixels are checked to be exact.
- bits_per_dim.md: the PF-ODE (Hutchinson) NLL with uniform dequantisation and the DDPM bound with
  the discretised decoder, on held-out digits.

    python benchmarks/guidance_digits.py --ckpt .ckpt/digits_cond.safetensors --out docs/
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from sde_diffusion.classifier import (
    NoisyClassifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from sde_diffusion.data import DataConfig, load_data
from sde_diffusion.figures import image_grid
from sde_diffusion.guidance import cfg_score_fn, classifier_guided_score_fn, inpaint, inpaint_mask
from sde_diffusion.likelihood import bits_per_dim, ddpm_bound, dequantize, ode_log_likelihood
from sde_diffusion.metrics import digits_classifier
from sde_diffusion.parametrize import model_score_fn
from sde_diffusion.solvers import sample
from sde_diffusion.trainer import load_model

# data.py maps sklearn's 17 intensity levels k = 0..16 to x = k / 8 - 1: a grid on [-1, 1] with
# spacing 2 / 16. Uniform dequantisation gives each level the bin of that width centred on it.
LEVELS = 17
LOW, HIGH = -1.0, 1.0
BIN = (HIGH - LOW) / (LEVELS - 1)
CLOCK = time.perf_counter()
DIGIT_ROWS = [f"digit {d}" for d in range(10)]


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - CLOCK:6.1f}s] {msg}", flush=True)


def accuracy(x: torch.Tensor, labels: torch.Tensor, judge: torch.nn.Module) -> float:
    with torch.no_grad():
        return float((judge(x.clamp(-1, 1)).argmax(1) == labels).float().mean())


def save_panels(
    panels: list[tuple[str, torch.Tensor, int]], path: Path, row_labels: list[str] | None = None
) -> None:
    """One titled image grid per panel (title, images (n, C, H, W) in [-1, 1], images per row);
    row_labels name the rows of the first panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = -(-len(panels[0][1]) // panels[0][2])
    height = 0.45 * n_rows * 8 / panels[0][2] + 0.8
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), max(2.0, height)))
    for k, (ax, (title, images, nrow)) in enumerate(zip(axes, panels, strict=True)):
        grid = image_grid(images, nrow)
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        if row_labels and k == 0:
            h = images.shape[-2] + 1
            ax.set_yticks([1 + h * r + h / 2 - 1 for r in range(len(row_labels))], row_labels)
            ax.tick_params(length=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    log(f"wrote {path}")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def labelled_sampling(score_for, scales, per_digit, args, judge, name) -> list:
    """Sample per_digit of each digit at each scale; return [(scale, images, accuracy)]."""
    labels = torch.arange(10).repeat_interleave(per_digit)
    out = []
    for w in scales:
        tic = time.perf_counter()
        x = sample(
            score_for(labels, w),
            args.sde,
            (len(labels), 1, 8, 8),
            solver=args.solver,
            steps=args.steps,
            generator=torch.Generator().manual_seed(args.seed),
        )
        acc = accuracy(x, labels, judge)
        out.append((w, x, acc))
        log(f"{name} w={w:g}: accuracy {acc:.3f} ({time.perf_counter() - tic:.0f}s)")
    return out


def cfg_part(model, meta, args, judge, out: Path) -> str:
    null = meta["model"]["num_classes"]

    def score_for(labels, w):
        return cfg_score_fn(model, args.sde, labels, null, w, "ho", meta["prediction"])

    res = labelled_sampling(score_for, args.cfg_scales, args.per_digit, args, judge, "cfg")
    return guidance_figure_and_table(
        res, "CFG w", out / "cfg_digits.png", "CFG scale w (Ho & Salimans)", args
    )


def guidance_figure_and_table(res, panel: str, path: Path, column: str, args) -> str:
    """One panel of digits per guidance scale, and the label-accuracy table."""
    save_panels([(f"{panel} = {w:g}", x, args.per_digit) for w, x, _ in res], path, DIGIT_ROWS)
    rows = [[f"{w:g}", f"{acc:.3f}"] for w, _, acc in res]
    return table([column, "label accuracy"], rows)


def noisy_classifier(data, args) -> NoisyClassifier:
    path = Path(args.classifier)
    if path.is_file():
        log(f"loading the noisy classifier from {path}")
        return load_classifier(path)
    log(f"training a noisy classifier ({args.classifier_steps} steps)")
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG untouched
        torch.manual_seed(args.seed)
        clf = NoisyClassifier(
            (1, 8, 8), 10, args.sde, width=32, depth=3, data_var=float(data.train.var())
        )
    tic = time.perf_counter()
    losses = train_classifier(
        clf,
        args.sde,
        data.train,
        data.train_labels,
        steps=args.classifier_steps,
        batch_size=128,
        generator=torch.Generator().manual_seed(args.seed),
    )
    log(
        f"classifier trained in {time.perf_counter() - tic:.0f}s, "
        f"final loss {sum(losses[-100:]) / len(losses[-100:]):.3f}"
    )
    save_classifier(clf, path)
    log(f"cached it at {path}")
    return clf.requires_grad_(False)


def classifier_part(model, meta, data, args, judge, out: Path) -> str:
    clf = noisy_classifier(data, args)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for t in (0.1, 0.5):
            tt = torch.full((len(data.test),), t)
            x_t = args.sde.perturb(data.test, tt, torch.randn(data.test.shape, generator=g))
            acc = float((clf(x_t, tt).argmax(1) == data.test_labels).float().mean())
            log(f"noisy classifier held-out accuracy at t={t}: {acc:.3f}")
    uncond = model_score_fn(model, args.sde, meta["prediction"], "t")

    def score_for(labels, w):
        return classifier_guided_score_fn(uncond, clf, labels, w)

    res = labelled_sampling(score_for, args.cg_scales, args.per_digit, args, judge, "classifier")
    return guidance_figure_and_table(
        res,
        "classifier guidance w",
        out / "classifier_guidance_digits.png",
        "classifier scale w",
        args,
    )


def inpaint_part(model, meta, data, args, out: Path) -> str:
    n = args.inpaint_digits
    x0 = data.test[:n]
    g = torch.Generator().manual_seed(args.seed)
    masks = {
        "half": inpaint_mask("half", (1, 8, 8)).expand(n, 1, 8, 8),
        "box": inpaint_mask("box", (1, 8, 8), fraction=0.5).expand(n, 1, 8, 8),
        "random": torch.stack([inpaint_mask("random", (1, 8, 8), 0.5, g) for _ in range(n)]),
    }
    x = x0.repeat(len(masks), 1, 1, 1)  # all masks in one batch
    mask = torch.cat(list(masks.values()))
    uncond = model_score_fn(model, args.sde, meta["prediction"], "t")
    results = {}
    for name, kw in (
        ("replacement", dict(steps=args.inpaint_steps)),
        ("RePaint", dict(steps=args.repaint_steps, resample=args.resample, jump=args.jump)),
    ):
        tic = time.perf_counter()
        y = inpaint(
            uncond,
            args.sde,
            x,
            mask,
            solver="euler_maruyama",
            generator=torch.Generator().manual_seed(args.seed),
            **kw,
        )
        known = mask.bool()
        exact = torch.equal(y[known], x[known])
        log(
            f"inpaint {name}: known pixels exactly preserved: {exact} "
            f"({time.perf_counter() - tic:.0f}s)"
        )
        assert exact, f"{name} changed known pixels"
        results[name] = y
    rows = []
    for k, kind in enumerate(masks):
        sl = slice(k * n, (k + 1) * n)
        unknown = ~mask[sl].bool()
        mse = [float(((y[sl] - x[sl])[unknown] ** 2).mean()) for y in results.values()]
        rows.append([kind, f"{float(unknown.float().mean()):.2f}", *(f"{m:.3f}" for m in mse)])
    shown = ((x + 1) / 2).repeat(1, 3, 1, 1) * mask
    shown[:, 0] += 1 - mask[:, 0]  # unknown pixels in red
    shown = shown * 2 - 1
    panels = []
    for k, name in enumerate(masks):
        sl = slice(k * n, k * n + args.inpaint_show)
        stack = [shown[sl], *(r[sl].repeat(1, 3, 1, 1) for r in results.values())]
        stack.append(x[sl].repeat(1, 3, 1, 1))
        panels.append((f"{name} mask", torch.cat(stack), args.inpaint_show))
    labels = ["masked input", *results, "original"]
    save_panels(panels, out / "inpaint_digits.png", labels)
    header = ["mask", "unknown fraction", *(f"MSE to the original, {r}" for r in results)]
    return table(header, rows)


def bits_part(model, meta, data, args, out: Path) -> str:
    uncond = model_score_fn(model, args.sde, meta["prediction"], "t")
    x = data.test[: args.nll_digits]
    levels = torch.round((x - LOW) / BIN).long()
    assert torch.equal(LOW + levels * BIN, x), "the digits are not on the 17-level grid"
    g = torch.Generator().manual_seed(args.seed)
    # bins centred on the levels: [level - BIN / 2, level + BIN / 2)
    xd = dequantize(levels, g, LEVELS, LOW - BIN / 2, HIGH + BIN / 2)
    dims = x[0].numel()
    rows = []

    def row(name, bpd, cost, secs):
        se = float(bpd.std() / math.sqrt(len(bpd)))
        rows.append([name, str(len(bpd)), f"{float(bpd.mean()):.3f} ± {se:.3f}", cost, secs])
        log(f"{name}: {rows[-1][2]} bits/dim")

    tic = time.perf_counter()
    ode = ode_log_likelihood(
        xd,
        args.sde,
        uncond,
        divergence="hutchinson",
        num_probes=1,
        generator=g,
        rtol=args.ode_tol,
        atol=args.ode_tol,
    )
    row(
        f"PF-ODE, Hutchinson (1 Rademacher probe), dopri5 tol {args.ode_tol:g}, "
        f"uniform dequantisation",
        bits_per_dim(ode.logp, dims, BIN),
        f"{ode.nfe} NFE",
        f"{time.perf_counter() - tic:.0f}",
    )
    for n_steps in args.ddpm_steps:
        tic = time.perf_counter()
        bound = ddpm_bound(
            x,
            args.sde,
            uncond,
            n_steps,
            decoder="discretized",
            generator=g,
            num_levels=LEVELS,
            low=LOW,
            high=HIGH,
        )
        row(
            f"DDPM bound, {n_steps} steps, discretised decoder",
            bits_per_dim(-bound.total, dims),
            f"{n_steps} NFE",
            f"{time.perf_counter() - tic:.0f}",
        )
    rows.append(["uniform over the 17 levels (reference)", "", f"{math.log2(LEVELS):.3f}", "", ""])
    return table(["method", "digits", "bits/dim", "cost", "CPU s"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", default=".ckpt/digits_cond.safetensors")
    p.add_argument("--out", default="docs/")
    p.add_argument("--classifier", default=".ckpt/digits_noisy_classifier.safetensors")
    p.add_argument("--classifier-steps", type=int, default=2000)
    p.add_argument("--solver", default="dpm_solver")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--per-digit", type=int, default=10)
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    p.add_argument("--cg-scales", type=float, nargs="+", default=[0.0, 1.0, 4.0])
    p.add_argument("--inpaint-digits", type=int, default=64, help="per mask, for the MSE table")
    p.add_argument("--inpaint-show", type=int, default=8, help="per mask, in the figure")
    p.add_argument("--inpaint-steps", type=int, default=100)
    p.add_argument("--repaint-steps", type=int, default=40)
    p.add_argument("--resample", type=int, default=4)
    p.add_argument("--jump", type=int, default=5)
    p.add_argument("--nll-digits", type=int, default=256)
    p.add_argument("--ode-tol", type=float, default=1e-3)
    p.add_argument("--ddpm-steps", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--holdout", type=float, default=0.2, help="the checkpoint's held-out split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parts", nargs="+", default=["cfg", "classifier", "inpaint", "bits"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model, args.sde, meta = load_model(args.ckpt, device="cpu")
    if not meta["model"]["num_classes"]:
        raise SystemExit(f"{args.ckpt} is not class-conditional")
    data = load_data(DataConfig(name="digits", holdout=args.holdout, seed=0))
    judge = digits_classifier()
    log(
        f"loaded {args.ckpt} (step {meta.get('step')}); digits classifier accuracy on the "
        f"real test digits: {accuracy(data.test, data.test_labels, judge):.3f}"
    )
    tables = {}
    if "cfg" in args.parts:
        tables["Classifier-free guidance"] = cfg_part(model, meta, args, judge, out)
    if "classifier" in args.parts:
        tables["Classifier guidance"] = classifier_part(model, meta, data, args, judge, out)
    if "inpaint" in args.parts:
        tables["Inpainting (unknown pixels only)"] = inpaint_part(model, meta, data, args, out)
    if "bits" in args.parts:
        md = bits_part(model, meta, data, args, out)
        (out / "bits_per_dim.md").write_text(md + "\n")
        log(f"wrote {out / 'bits_per_dim.md'}")
        tables["Bits per dimension (held-out digits)"] = md
    for title, md in tables.items():
        print(f"\n### {title}\n\n{md}")
    log("done")


if __name__ == "__main__":
    main()
