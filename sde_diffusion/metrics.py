"""Sample-quality metrics."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sliced_wasserstein"]


def sliced_wasserstein(
    x: Tensor, y: Tensor, num_projections: int, generator: torch.Generator | None
) -> Tensor:
    """Sliced 2-Wasserstein distance between the empirical distributions of x and y.

    SW_2(x, y) = sqrt( E_theta[ W_2^2(theta^T x, theta^T y) ] ) over directions theta uniform on
    the unit sphere, estimated with num_projections random directions. In 1-D, W_2 is the L2
    distance between quantile functions: with equal sample sizes, between the sorted projections;
    otherwise both quantile functions are evaluated at the midpoints (i + 1/2) / m with
    m = max(n_x, n_y).
    x: (n_x, *dims), y: (n_y, *dims) with the same dims.
    """
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features per sample but y has {y.shape[1]}")
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=dtype).to(x.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px = torch.sort(x.to(dtype) @ theta, dim=0).values
    py = torch.sort(y.to(dtype) @ theta.to(y.device), dim=0).values.to(x.device)
    if px.shape[0] != py.shape[0]:
        m = max(px.shape[0], py.shape[0])
        q = (torch.arange(m, dtype=dtype, device=x.device) + 0.5) / m
        px, py = _quantile(px, q), _quantile(py, q)
    return (px - py).square().mean().sqrt()


def _quantile(sorted_x: Tensor, q: Tensor) -> Tensor:
    """The empirical quantile function (a step function) of each column of sorted_x at levels q."""
    n = sorted_x.shape[0]
    idx = torch.clamp(torch.ceil(q * n).long() - 1, 0, n - 1)
    return sorted_x[idx]
