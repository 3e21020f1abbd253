"""What a sampling run measures and leaves behind: metrics against the oracle or held-out data,
samples.npz, a figure, metrics.json (the record `sde-diffusion report` collects) and a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..figures import save_sample_figure
from ..metrics import image_metrics, oracle_metrics, sliced_wasserstein
from .sample_target import Target

__all__ = ["measure", "summary", "write_record", "write_samples"]


def measure(x: torch.Tensor, target: Target, generator: torch.Generator) -> dict[str, float]:
    """The oracle's metrics (exact log p_0, mode coverage, distances to its own samples), or
    distances to the held-out data: Frechet distance, precision and recall in a digits
    classifier's features for images, sliced W2 otherwise."""
    if target.oracle is not None:
        return oracle_metrics(x.double(), target.oracle, generator=generator)
    ref = target.reference.to(x.device, x.dtype)
    if x.ndim == 4:
        return image_metrics(x.float(), ref.float())
    return {"sliced_w2": float(sliced_wasserstein(x, ref, generator=generator))}


def write_samples(x: torch.Tensor, target: Target, record: dict[str, Any], out: Path) -> Path:
    """samples.npz and a figure of the samples beside the reference; returns the figure's path."""
    np.savez(out / "samples.npz", samples=x.numpy(), nfe=record["nfe"])
    ref = target.reference if target.oracle is None else target.oracle.sample(len(x))
    return save_sample_figure(ref, x, out / "samples.png", title=_title(record))


def write_record(record: dict[str, Any], out: Path) -> None:
    """metrics.json: the run's record, whatever its status."""
    (out / "metrics.json").write_text(json.dumps(record, indent=2))


def _title(record: dict[str, Any]) -> str:
    return f"{record['sde']} / {record['solver']} / NFE {record['nfe']}"


def summary(record: dict[str, Any]) -> str:
    """One line: model, SDE, solver, NFE, status and the metrics (or the reason it failed)."""
    head = f"{record['model']} | {_title(record)} | {record['status']}"
    if record["status"] != "ok":
        return f"{head}: {record['error']}"
    return head + "".join(f" | {k} {v:.4g}" for k, v in record["metrics"].items())
