"""Inpainting in the sampling app (`inpaint.mask=...`): held-out data with part hidden, filled in
by the solver, and how the known and the unknown entries came out."""

from __future__ import annotations

from typing import Any

import torch

from ..guidance import inpaint, inpaint_mask
from .sample_config import SampleAppConfig
from .sample_target import Target

__all__ = ["inpaint_batch", "inpaint_metrics", "inpaint_problem"]


def inpaint_problem(
    obj: SampleAppConfig, target: Target, first: int, n: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(observations, mask) for samples first..first+n: held-out data (or the oracle's samples,
    drawn once from the seed) and one mask of the configured kind."""
    pool = target.reference
    if pool is None:
        pool = target.oracle.sample(obj.num_samples, torch.Generator().manual_seed(obj.seed))
    idx = torch.arange(first, first + n) % len(pool)
    mask_gen = torch.Generator().manual_seed(obj.seed)
    mask = inpaint_mask(obj.inpaint.mask, target.data_shape, generator=mask_gen)
    return pool[idx].to(dtype), mask.to(dtype)


def inpaint_batch(
    obj: SampleAppConfig,
    target: Target,
    first: int,
    n: int,
    device: torch.device,
    dtype: torch.dtype,
    common: dict[str, Any],
) -> tuple[torch.Tensor, int]:
    """Fill in a batch of masked observations; returns the result and the counted NFE."""
    x_known, mask = inpaint_problem(obj, target, first, n, dtype)
    calls = 0

    def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return target.score_fn(x, t)

    denoise = common["denoise"] is not False  # None: the solver's own, the Tweedie step
    x = inpaint(
        counted,
        target.sde,
        x_known.to(device),
        mask.to(device),
        solver=obj.solver.name,
        resample=obj.inpaint.resample,
        jump=obj.inpaint.jump,
        **{**common, "denoise": denoise},
    )
    return x, calls


def inpaint_metrics(
    x: torch.Tensor, target: Target, obj: SampleAppConfig, dtype: torch.dtype
) -> dict[str, float]:
    """How the known entries came out (exactly 0 error is the contract) and the error on the
    unknown ones against the hidden originals."""
    x_known, mask = inpaint_problem(obj, target, 0, len(x), dtype)
    known = mask.expand_as(x).bool()
    return {
        "known_max_abs_error": float((x - x_known)[known].abs().max()),
        "unknown_mse": float((x - x_known)[~known].square().mean()),
    }
