"""Figures of data beside samples: scatter plots for points, grids for images (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["image_grid", "save_sample_figure"]


def image_grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """Tile (n, C, H, W) images in [-1, 1] into one (H', W', C) array in [0, 1], 1-pixel gaps."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.ones(c, ncol * (h + 1) + 1, nrow * (w + 1) + 1)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).to(grid.dtype)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = x[i]
    return grid.permute(1, 2, 0)


def save_sample_figure(
    data: Tensor, samples: Tensor, path: str | Path, title: str = "", nrow: int | None = None
) -> Path:
    """Write a PNG with held-out data on the left and model samples on the right.

    Images (n, C, H, W) are shown as grids; anything else as a scatter of its first two coordinates.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, x, name in zip(axes, (data, samples), ("data (held out)", "samples"), strict=True):
        x = x.detach().float().cpu()
        if x.ndim == 4:
            grid = image_grid(x, nrow)
            ax.imshow(
                grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1
            )
            ax.axis("off")
        else:
            x = x.reshape(x.shape[0], -1)
            ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
            ax.set_aspect("equal")
            lim = float(data.reshape(data.shape[0], -1)[:, :2].abs().max()) * 1.2
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
