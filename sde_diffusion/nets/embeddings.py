"""Time embeddings: map a continuous time t in [0, T] (shape (batch,)) to a feature vector.

Two standard choices:
- `SinusoidalEmbedding` (Vaswani et al. 2017; DDPM): sin/cos of t * scale at geometric
  frequencies 1 / max_period^(k / half). `scale` maps t in [0, 1] to DDPM's 0..1000 step range,
  where these frequencies were tuned.
- `GaussianFourierEmbedding` (Tancik et al. 2020; score_sde's NCSN++): sin/cos of 2 pi W t with
  fixed random W ~ N(0, std^2), drawn from a seeded generator so that a model rebuilt from its
  config has the same features.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

TIME_EMBEDDINGS = ("sinusoidal", "fourier")

__all__ = [
    "TIME_EMBEDDINGS",
    "ConditionEmbedding",
    "GaussianFourierEmbedding",
    "LabelEmbedding",
    "SinusoidalEmbedding",
    "time_embedding",
]


def _check_dim(dim: int) -> None:
    if int(dim) != dim or dim < 2 or dim % 2:
        raise ValueError(f"embedding dim must be an even integer >= 2, got {dim}")


class SinusoidalEmbedding(nn.Module):
    """[sin(s t w_k), cos(s t w_k)] with w_k = max_period^(-k / (dim/2)), k = 0..dim/2 - 1."""

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        _check_dim(dim)
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs * scale, persistent=False)
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        arg = t.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class GaussianFourierEmbedding(nn.Module):
    """[sin(2 pi W t), cos(2 pi W t)] with fixed W ~ N(0, std^2) of size dim/2 (not trained)."""

    def __init__(self, dim: int, std: float = 16.0, seed: int = 0):
        super().__init__()
        _check_dim(dim)
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"fourier std must be a finite number > 0, got {std}")
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(dim // 2, generator=g) * std
        self.register_buffer("w", 2 * math.pi * w, persistent=False)
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        arg = t.to(self.w.dtype)[:, None] * self.w[None]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def time_embedding(kind: str, dim: int) -> nn.Module:
    """Build a time embedding by name: 'sinusoidal' or 'fourier' (Gaussian Fourier features)."""
    if kind == "sinusoidal":
        return SinusoidalEmbedding(dim)
    if kind == "fourier":
        return GaussianFourierEmbedding(dim)
    raise ValueError(
        f"unknown time embedding {kind!r}; valid choices: {', '.join(TIME_EMBEDDINGS)}"
    )


class LabelEmbedding(nn.Module):
    """A class-label table with one extra "null" label (index num_classes) for "no label".

    Classifier-free guidance trains one network on labelled and null-labelled inputs; y = None
    means every sample gets the null label.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
        self.num_classes = int(num_classes)
        self.table = nn.Embedding(self.num_classes + 1, dim)

    def forward(self, y: Tensor | None, batch: int) -> Tensor:
        if y is None:
            y = torch.full(
                (batch,), self.num_classes, dtype=torch.long, device=self.table.weight.device
            )
        return self.table(y)


class ConditionEmbedding(nn.Module):
    """The vector every block of a network is conditioned on: an MLP of the time embedding,
    plus a class-label embedding (with its null label) when num_classes > 0."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, num_classes: int = 0):
        super().__init__()
        self.time = nn.Sequential(
            time_embedding(kind, in_dim),
            nn.Linear(in_dim, out_dim),
            nn.SiLU(),
            nn.Linear(out_dim, out_dim),
        )
        self.label = LabelEmbedding(num_classes, out_dim) if num_classes else None

    def forward(self, t: Tensor, y: Tensor | None, batch: int) -> Tensor:
        emb = self.time(t.expand(batch) if t.ndim == 0 else t)
        if self.label is not None:
            return emb + self.label(y, batch)
        if y is not None:
            raise ValueError("labels y given to a model built with num_classes = 0")
        return emb
