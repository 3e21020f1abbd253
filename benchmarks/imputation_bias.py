"""How far inpainting's imputations are from the exact conditional, on Gaussian-mixture oracles.

For each problem (a mixture, the known coordinates and their observed value) the exact conditional
of the unknown coordinates is a mixture of conditional Gaussians with reweighted components. The
replacement method (score_sde) and RePaint with 2, 5, 10 resamplings impute the unknown
coordinates with the oracle's exact score, so every error below is the method's own. Printed per
problem: the network evaluations per sample (NFE), the error of the conditional mean (Euclidean
norm), of the covariance (Frobenius norm), the sliced W2 distance to exact conditional samples,
and the sliced W2 between two exact samples of the same size (the floor set by sampling noise).

    python benchmarks/imputation_bias.py [--n 2000] [--steps 100] [--out benchmarks/imputation_bias.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _imputation import (
    conditional_mixture,
    correlated_pair,
    equicorrelated_4d,
    imputation_errors,
    separated_4d,
)

RESAMPLES = (1, 2, 5, 10)
PROBLEMS = {
    "2-D correlated pair": correlated_pair,
    "4-D equicorrelated": equicorrelated_4d,
    "4-D separated modes": separated_4d,
}


def run(n: int, steps: int) -> list[dict]:
    rows = []
    for name, problem in PROBLEMS.items():
        gm, known, a = problem()
        w = conditional_mixture(gm, known, a)[0]
        print(f"\n{name}: exact conditional weights {np.round(w, 4).tolist()}")
        head = f"{'method':<14}{'NFE':>6}{'mean err':>10}{'cov err':>10}{'SW2':>8}{'floor':>8}"
        print(head + f"{'s':>7}")
        for r in RESAMPLES:
            start = time.perf_counter()
            g = torch.Generator().manual_seed(0)
            row = imputation_errors(gm, known, a, n, steps=steps, resample=r, generator=g)
            row.update(problem=name, resample=r, seconds=time.perf_counter() - start)
            rows.append(row)
            label = "replacement" if r == 1 else f"RePaint x{r}"
            print(
                f"{label:<14}{row['nfe']:>6}{row['mean']:>10.3f}{row['cov']:>10.3f}"
                f"{row['sw2']:>8.3f}{row['floor']:>8.3f}{row['seconds']:>7.1f}"
            )
    return rows


def plot(rows: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["problem"] for r in rows):
        sel = [r for r in rows if r["problem"] == name]
        (line,) = ax.plot([r["resample"] for r in sel], [r["sw2"] for r in sel], "o-", label=name)
        ax.axhline(sel[0]["floor"], color=line.get_color(), ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(RESAMPLES, [str(r) for r in RESAMPLES])
    ax.set_xlabel("resamplings per step (1 = replacement)")
    ax.set_ylabel("sliced W2 to the exact conditional")
    ax.set_title("Imputation bias with the exact score (dotted: sampling floor)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"\nwrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="imputations per problem")
    parser.add_argument("--steps", type=int, default=100, help="Euler–Maruyama steps")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/imputation_bias.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    plot(run(args.n, args.steps), args.out)


if __name__ == "__main__":
    main()
