"""A U-Net that predicts eps for images (DDPM / score_sde layout, kept small for 8x8 to 64x64).

Residual blocks with GroupNorm; the time (and optional class) embedding enters every block by
scale-and-shift, h <- norm(h) (1 + scale) + shift (the "AdaGN" of Dhariwal & Nichol 2021);
multi-head self-attention at the resolutions listed in attn_resolutions. The last layer of every
residual branch starts at zero, so each block starts as the identity and training is stable
without warm-up tricks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import ConditionEmbedding

__all__ = ["UNet"]


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _norm(cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class _Attention(nn.Module):
    def __init__(self, ch: int, heads: int):
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention channels {ch} are not divisible by num_heads = {heads}")
        self.heads = heads
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class _Level(nn.Module):
    """Residual blocks of one resolution, each followed by attention where asked."""

    def __init__(
        self, chans: Sequence[tuple[int, int]], emb_dim: int, dropout: float, heads: int, attn: bool
    ):
        super().__init__()
        self.res = nn.ModuleList(_ResBlock(a, b, emb_dim, dropout) for a, b in chans)
        self.attn = nn.ModuleList(_Attention(b, heads) if attn else nn.Identity() for _, b in chans)


class UNet(nn.Module):
    """eps_theta(x, t[, y]) for images x of shape (batch, C, H, W).

    base_channels * channel_mult[i] channels at level i (resolution H / 2^i), num_res_blocks per
    level on the way down (one more on the way up, for the extra skip), self-attention at every
    resolution in attn_resolutions. num_classes > 0 adds class conditioning with a null label.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (4,),
        num_heads: int = 4,
        dropout: float = 0.0,
        time_embedding: str = "sinusoidal",
        num_classes: int = 0,
    ):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(
                f"UNet needs images of shape (C, H, W), got data shape {tuple(data_shape)}"
            )
        cin, height, width = (int(d) for d in data_shape)
        levels = len(channel_mult)
        if levels < 1 or num_res_blocks < 1 or base_channels < 1:
            raise ValueError(
                "UNet needs channel_mult non-empty, num_res_blocks >= 1 and base_channels >= 1, "
                "got "
                f"{list(channel_mult)}, {num_res_blocks}, {base_channels}"
            )
        if height % 2 ** (levels - 1) or width % 2 ** (levels - 1):
            raise ValueError(
                f"image size {height}x{width} is not divisible by 2^{levels - 1} "
                f"(channel_mult has {levels} levels)"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.data_shape = (cin, height, width)
        emb_dim = 4 * base_channels
        self.cond = ConditionEmbedding(time_embedding, base_channels, emb_dim, num_classes)
        self.inp = nn.Conv2d(cin, base_channels, 3, padding=1)

        chans = [base_channels * m for m in channel_mult]
        res = [height // 2**i for i in range(levels)]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, ch = [base_channels], base_channels
        for i in range(levels):
            pairs = [(ch if j == 0 else chans[i], chans[i]) for j in range(num_res_blocks)]
            self.down.append(_Level(pairs, emb_dim, dropout, num_heads, res[i] in attn_resolutions))
            ch = chans[i]
            skips += [ch] * num_res_blocks
            if i < levels - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = _Level([(ch, ch), (ch, ch)], emb_dim, dropout, num_heads, True)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(levels)):
            pairs = []
            for _ in range(num_res_blocks + 1):
                pairs.append((ch + skips.pop(), chans[i]))
                ch = chans[i]
            self.up.append(_Level(pairs, emb_dim, dropout, num_heads, res[i] in attn_resolutions))
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, cin, 3, padding=1)))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.cond(t, y, x.shape[0])
        h = self.inp(x)
        hs = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.res, level.attn, strict=True):
                h = attn(block(h, emb))
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        for block, attn in zip(self.mid.res, self.mid.attn, strict=True):
            h = attn(block(h, emb))
        for i, level in enumerate(self.up):
            for block, attn in zip(level.res, level.attn, strict=True):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)
