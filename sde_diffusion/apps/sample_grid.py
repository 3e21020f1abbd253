"""The sampling app's time grid: a named kind, a grid.json written by an earlier tuned run, or
`solver.grid=tuned`, fitted to the model here (`solvers.tune_grid`) and written to grid.json."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..solvers import GRIDS, tune_grid
from .sample_config import SampleAppConfig
from .sample_target import Target

__all__ = ["sampling_grid"]


def sampling_grid(
    cfg: SampleAppConfig, target: Target, device: torch.device, dtype: torch.dtype, out: Path
) -> tuple[str | torch.Tensor | None, dict[str, Any] | None]:
    """The grid to sample on and, for a tuned one, what tuning found and cost (also written,
    with the grid, to out/grid.json for later runs)."""
    grid = cfg.solver.grid
    if grid not in (None, "tuned", *GRIDS):
        return torch.tensor(json.loads(Path(grid).read_text())["ts"], dtype=torch.float64), None
    if grid != "tuned":
        return grid, None
    start = time.perf_counter()
    fit = tune_grid(
        target.score_fn,
        target.sde,
        cfg.solver.name,
        cfg.steps,
        (cfg.tune.pilot, *target.data_shape),
        trials=cfg.tune.trials,
        holdout=cfg.tune.holdout,
        generator=torch.Generator(device).manual_seed(cfg.tune.seed),
        device=device,
        dtype=dtype,
        progress=sys.stderr.isatty(),
        **cfg.solver.params,
    )
    info = {
        "solver": cfg.solver.name,
        "steps": cfg.steps,
        "pilot": cfg.tune.pilot,
        "trials": fit.trials,
        "nfe": fit.nfe,
        "seconds": time.perf_counter() - start,
        "error": fit.error,
        "initial_error": fit.initial_error,
        "switch_error": fit.switch_error,
        "initial_switch_error": fit.initial_switch_error,
    }
    for key in ("holdout_error", "initial_holdout_error"):  # NaN (none held out) is not JSON
        value = getattr(fit, key)
        info[key] = None if math.isnan(value) else value
    (out / "grid.json").write_text(json.dumps({**info, "ts": fit.ts.tolist()}, indent=2))
    return fit.ts, info
