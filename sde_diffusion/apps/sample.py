"""The sampling app: `sde-diffusion sample [group=option ...] [key=value ...]`.

Draws samples from a training checkpoint (`model=ckpt ckpt=...`) or from the exact score of a
Gaussian mixture (`model=oracle`, any SDE, no training), with any solver, and writes into Hydra's
run directory: samples.npz, metrics.json (the record `sde-diffusion report` collects) and a
figure (a scatter plot for 2-D data, an image grid for images).

    sde-diffusion sample model=oracle solver=heun steps=10
    sde-diffusion sample model=ckpt ckpt=outputs/train/.../checkpoints/step_00002000.safetensors
    sde-diffusion sample model=ckpt ckpt=... guidance.label=3 guidance.scale=1
    sde-diffusion sample model=ckpt ckpt=... guidance.label=3 guidance.scale=4 \\
        guidance.kind=classifier guidance.classifier=noisy_classifier.safetensors
    sde-diffusion sample model=oracle solver=unipc steps=9 solver.grid=tuned
    sde-diffusion sample model=oracle solver=unipc solver.grid=<run dir>/grid.json seed=1
    sde-diffusion sample model=oracle solver=default steps=10 solver.grid=tuned
    sde-diffusion sample -m model=oracle sde=vp,subvp,ve \\
        solver=euler_maruyama,pc,ode,ddpm,ddim,dpm_solver,heun steps=5,10,20,50,100,250,1000

`solver.grid=tuned` fits the grid to the model first (`solvers.tune_grid` on `tune.pilot` prior
draws, `tune.trials` trial grids) and writes it to grid.json; `solver.grid=<grid.json>` reuses it.
With solver=default the tuning searches from the pilot's choice and its next closest candidates,
and grid.json keeps the configuration that tuned closest, which a solver=default run on the file
samples again.

A solver that is not defined for the SDE (ddpm on VE), or a grid tuned for a stochastic solver, is
recorded with status "invalid" and the reason, and a run that fails is recorded with status
"error": a sweep reports them and goes on, and a single run that did not succeed exits non-zero.
The parts live in sample_config (the schema), sample_target (score function, guidance, reference),
sample_grid (named, saved or tuned grids), sample_inpaint and sample_outputs (metrics and files).
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import sde_spec
from ..solvers import sample
from ..trainer import resolve_device
from .config import dtype_of, sde_label
from .hydra_app import INVALID, USER_ERRORS, RunFailed, register_shared_schemas, run_app
from .sample_config import SampleAppConfig, SolverConfig
from .sample_grid import sampling_grid
from .sample_inpaint import inpaint_batch, inpaint_metrics
from .sample_outputs import measure, summary, write_record, write_samples
from .sample_target import build_target

__all__ = ["main", "run"]


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (conf/sample.yaml and its groups extend them)."""
    cs = ConfigStore.instance()
    cs.store(name="sample_app", node=SampleAppConfig)
    cs.store(group="solver", name="solver_schema", node=SolverConfig)
    register_shared_schemas(cs)


register_configs()


def run(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Sample, measure and write samples.npz, metrics.json and a figure into out_dir; returns
    the record written to metrics.json (status "ok", "invalid" or "error" with the reason)."""
    obj: SampleAppConfig = OmegaConf.to_object(cfg)  # the dataclasses check their values
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = resolve_device(obj.device, "device"), dtype_of(obj.dtype)
    target = build_target(obj, device, dtype)
    record: dict[str, Any] = {
        "model": target.name,
        "sde": sde_label(obj.sde) if target.oracle is not None else sde_spec(target.sde)["name"],
        "solver": obj.solver.name,
        "steps": obj.steps,
        "nfe": None,
        "seed": obj.seed,
        "num_samples": obj.num_samples,
        "status": "ok",
        "error": None,
        "wall_time_s": 0.0,
        "metrics": {},
        "solver_params": dict(obj.solver.params),
        "grid": obj.solver.grid,
    }
    start = time.perf_counter()
    try:
        plan = sampling_grid(obj, target, device, dtype, out)
        record["tuning"] = plan.tuning
        if isinstance(plan.grid, torch.Tensor):
            record["steps"] = len(plan.grid) - 1
        if plan.configuration is not None:
            record["configuration"] = plan.configuration
        chunks, nfe = [], 0
        for b, first in enumerate(range(0, obj.num_samples, obj.batch_size)):
            n = min(obj.batch_size, obj.num_samples - first)
            generator = torch.Generator(device).manual_seed(obj.seed * 100_003 + b)
            common = dict(
                steps=obj.steps,
                grid=plan.grid,
                t_end=obj.t_end,
                denoise=plan.denoise,
                generator=generator,
                progress=sys.stderr.isatty(),
                **plan.params,
            )
            if obj.inpaint.mask is None:
                result = sample(
                    target.score_fn,
                    target.sde,
                    (n, *target.data_shape),
                    solver=plan.solver,
                    device=device,
                    dtype=dtype,
                    return_info=True,
                    **common,
                )
                out_x, used = result.samples, result.nfe
                if result.configuration is not None:
                    record["configuration"] = result.configuration.label
                if result.pilot is not None:
                    record["pilot"] = {
                        "choice": result.pilot.candidate.label,
                        "evaluations": record.get("pilot", {}).get("evaluations", 0)
                        + result.pilot_evaluations,
                    }
            else:
                out_x, used = inpaint_batch(obj, target, first, n, device, dtype, common)
            chunks.append(out_x.detach().cpu())
            nfe = max(nfe, used)
        x = torch.cat(chunks)
        record["nfe"] = nfe
        record["wall_time_s"] = time.perf_counter() - start
        record["metrics"] = measure(x, target, torch.Generator().manual_seed(obj.seed + 1))
        if obj.inpaint.mask is not None:
            record["metrics"].update(inpaint_metrics(x, target, obj, dtype))
        print(f"figure: {write_samples(x, target, record, out)}")
    except INVALID as e:
        record.update(status="invalid", error=str(e))
    except Exception as e:  # a sweep records the failure and goes on; a bug's trace goes to stderr
        if not isinstance(e, USER_ERRORS):
            traceback.print_exc()
        record.update(status="error", error=f"{type(e).__name__}: {e}")
    record["wall_time_s"] = record["wall_time_s"] or time.perf_counter() - start
    write_record(record, out)
    print(summary(record))
    return record


def _task(cfg: DictConfig, out_dir: Path) -> None:
    record = run(cfg, out_dir)
    if record["status"] != "ok":
        raise RunFailed(record["status"], record["error"])


def main() -> None:
    """`sde-diffusion sample`: the Hydra app over `run`; a run that did not succeed fails."""
    run_app("sample", _task)
