"""A residual MLP that predicts eps for low-dimensional data (2-D toys, Gaussian mixtures)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from .embeddings import ConditionEmbedding

__all__ = ["MLP"]


class _Block(nn.Module):
    """h + W2 silu(W1 silu(norm(h)) + E silu(emb)): a pre-norm residual block, time added."""

    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        u = self.act(self.fc1(self.act(self.norm(h))) + self.emb(self.act(emb)))
        return h + self.fc2(u)


class MLP(nn.Module):
    """eps_theta(x, t[, y]) for x of shape (batch, *data_shape), flattened inside.

    width/depth: hidden size and number of residual blocks; time_embedding: 'fourier' or
    'sinusoidal'; num_classes > 0 adds a label embedding with a "null" label used when y is None.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        width: int = 256,
        depth: int = 4,
        time_embedding: str = "fourier",
        embed_dim: int = 128,
        num_classes: int = 0,
    ):
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"MLP width and depth must be >= 1, got width={width}, depth={depth}")
        self.data_shape = tuple(data_shape)
        dim = math.prod(self.data_shape)
        self.cond = ConditionEmbedding(time_embedding, embed_dim, embed_dim, num_classes)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(_Block(width, embed_dim) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.cond(t, y, x.shape[0])
        h = self.inp(x.reshape(x.shape[0], -1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h).reshape(x.shape)
