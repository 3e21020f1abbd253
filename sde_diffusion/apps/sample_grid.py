"""The sampling app's time grid: a named kind, a grid.json written by an earlier tuned run, or
`solver.grid=tuned`, fitted to the model here (`solvers.tune_grid`) and written to grid.json.

For solver=default a tuned grid belongs to a configuration (the pilot's choice or one of its
next closest candidates, whichever tuned closest to the flow): grid.json records it, and a run
of solver=default on that file samples it again."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..solvers import GRIDS, tune_grid
from .sample_config import DEFAULT_SOLVER, SampleAppConfig
from .sample_target import Target

__all__ = ["GridChoice", "sampling_grid"]


@dataclass
class GridChoice:
    """The grid to sample on and what samples on it: solver (None: `sample()`'s default, its
    pilot's choice), its last step and parameters (`sample()`'s denoise and solver_params),
    the configuration's label where a tuned or saved grid decided it for solver=default, and
    for a grid tuned here what tuning found and cost."""

    grid: str | torch.Tensor | None
    solver: str | None
    denoise: bool | str | None
    params: dict[str, Any] = field(default_factory=dict)
    configuration: str | None = None
    tuning: dict[str, Any] | None = None


def sampling_grid(
    cfg: SampleAppConfig, target: Target, device: torch.device, dtype: torch.dtype, out: Path
) -> GridChoice:
    """The grid and configuration to sample with; a tuned grid is also written, with what
    tuning found and cost, to out/grid.json for later runs."""
    default = cfg.solver.name == DEFAULT_SOLVER
    grid = cfg.solver.grid
    configured = GridChoice(
        grid, None if default else cfg.solver.name, cfg.denoise, dict(cfg.solver.params)
    )
    if grid not in (None, "tuned", *GRIDS):
        saved = json.loads(Path(grid).read_text())
        configured.grid = torch.tensor(saved["ts"], dtype=torch.float64)
        if default:  # the configuration the grid was tuned for (a named solver's: its own)
            configured.solver = saved["solver"]
            configured.denoise = saved.get("denoise")
            configured.params = saved.get("params", {})
            configured.configuration = saved.get("configuration") or saved["solver"]
        return configured
    if grid != "tuned":
        return configured
    start = time.perf_counter()
    fit = tune_grid(
        target.score_fn,
        target.sde,
        configured.solver,
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
    label = fit.configuration.label if fit.configuration is not None else None
    info = {
        "solver": fit.solver,
        "params": fit.params,
        "denoise": fit.denoise,
        "configuration": label,
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
    if default:
        return GridChoice(fit.ts, fit.solver, fit.denoise, fit.params, label, info)
    return GridChoice(fit.ts, configured.solver, configured.denoise, configured.params, None, info)
