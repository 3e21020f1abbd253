"""The sampling app: `python -m sde_diffusion.sample [group=option ...] [key=value ...]`.

Draws samples from a training checkpoint (`model=ckpt ckpt=...`) or from the exact score of a
Gaussian mixture (`model=oracle`, any SDE, no training), with any solver, and writes into Hydra's
run directory: samples.npz, metrics.json (the record `sde_diffusion.report` collects) and a
figure (a scatter plot for 2-D data, an image grid for images).

    python -m sde_diffusion.sample model=oracle solver=heun steps=10
    python -m sde_diffusion.sample model=ckpt ckpt=outputs/train/.../checkpoints/step_00002000.safetensors
    python -m sde_diffusion.sample model=ckpt ckpt=... guidance.label=3 guidance.scale=1
    python -m sde_diffusion.sample model=ckpt ckpt=... guidance.label=3 guidance.scale=4 \\
        guidance.kind=classifier guidance.classifier=noisy_classifier.safetensors
    python -m sde_diffusion.sample model=oracle solver=unipc steps=9 solver.grid=tuned
    python -m sde_diffusion.sample model=oracle solver=unipc solver.grid=<run dir>/grid.json seed=1
    python -m sde_diffusion.sample -m model=oracle sde=vp,subvp,ve \\
        solver=euler_maruyama,pc,ode,ddpm,ddim,dpm_solver,heun steps=5,10,20,50,100,250,1000

`solver.grid=tuned` fits the grid to the model first (`solvers.tune_grid` on `tune.pilot` prior
draws, `tune.trials` trial grids) and writes it to grid.json; `solver.grid=<grid.json>` reuses it.

A solver that is not defined for the SDE (ddpm on VE), or a grid tuned for a stochastic solver, is
recorded with status "invalid" and the reason, and a run that fails is recorded with status
"error": a sweep reports them and goes on.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .apps import (
    CONF_DIR,
    build_oracle,
    check_override_keys,
    dtype_of,
    register_shared_schemas,
)
from .checkpoint import sde_spec
from .classifier import load_classifier
from .config import build_sde
from .data import DataConfig, load_data
from .figures import save_sample_figure
from .guidance import MASKS, cfg_score_fn, classifier_guided_score_fn, inpaint, inpaint_mask
from .metrics import image_metrics, oracle_metrics, sliced_wasserstein
from .parametrize import model_score_fn
from .sde import SDE, ScoreFn
from .solvers import GRIDS, IncompatibleSDEError, get_solver, sample, tune_grid
from .solvers.tuning import UntunableSolverError
from .trainer import load_model, resolve_device

MODELS = ("oracle", "ckpt")

__all__ = ["GUIDANCE_KINDS", "GuidanceConfig", "SampleAppConfig", "SolverConfig", "main", "run"]


@dataclass
class SolverConfig:
    """A registered solver, its time grid and its parameters.

    grid: None (the solver's own kind), a kind of GRIDS, "tuned" (fitted to the model before
    sampling, see TuneConfig) or the path of a grid.json that a tuned run wrote.
    """

    name: str = "dpm_solver"
    grid: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.grid in (None, "tuned", *GRIDS) or Path(self.grid).is_file():
            return
        raise ValueError(
            f"unknown solver.grid {self.grid!r}; valid choices: {', '.join(GRIDS)}, tuned, or the "
            f"path of an existing grid.json"
        )


@dataclass
class TuneConfig:
    """`solver.grid=tuned`: `trials` trial grids on `pilot` prior draws (seeded by `seed`,
    apart from the sampling noise) against their exact probability flow."""

    pilot: int = 256
    trials: int = 300
    seed: int = 7919

    def __post_init__(self) -> None:
        if self.pilot < 1 or self.trials < 1:
            raise ValueError(f"tune.pilot and tune.trials must be >= 1, got {self}")


GUIDANCE_KINDS = ("cfg", "classifier")


@dataclass
class GuidanceConfig:
    """Class-conditional sampling: `label` (None: unconditional) at guidance `scale`.

    For a checkpoint, `kind` picks the method:
      - cfg: classifier-free guidance of a class-conditional checkpoint in Ho & Salimans'
        convention (scale 0 = the plain conditional model);
      - classifier: the checkpoint's unconditional score (the null label, for a conditional one)
        plus scale * grad log p_t(label | x) of the NoisyClassifier saved at `classifier`
        (`sde_diffusion.classifier.save_classifier`; trained on the checkpoint's SDE).
    For the oracle, always classifier guidance with the exact p_t(y | x) of its components
    (scale 1 = the exact conditional score).
    """

    label: int | None = None
    scale: float = 1.0
    kind: str = "cfg"
    classifier: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in GUIDANCE_KINDS:
            raise ValueError(
                f"unknown guidance.kind {self.kind!r}; valid choices: {', '.join(GUIDANCE_KINDS)}"
            )
        if self.kind == "classifier" and not self.classifier:
            raise ValueError(
                "guidance.kind=classifier needs guidance.classifier=<path to a NoisyClassifier>"
            )
        if self.classifier and not Path(self.classifier).is_file():
            raise ValueError(f"classifier {self.classifier} does not exist")


@dataclass
class InpaintConfig:
    """Inpainting instead of free sampling: `mask` (half, box, random; None: off) hides part of
    held-out data (the oracle's own samples for model=oracle) and the solver fills it in, with
    RePaint resampling when `resample` > 1 (`jump`: its jump length)."""

    mask: str | None = None
    resample: int = 1
    jump: int = 1

    def __post_init__(self) -> None:
        if self.mask is not None and self.mask not in MASKS:
            raise ValueError(
                f"unknown inpaint.mask {self.mask!r}; valid choices: {', '.join(MASKS)}"
            )


@dataclass
class SampleAppConfig:
    """The root of the sampling config."""

    sde: Any = MISSING
    solver: SolverConfig = MISSING
    model: Any = MISSING
    ckpt: str | None = None
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    steps: int = 20
    num_samples: int = 2000
    batch_size: int = 4096
    seed: int = 0
    t_end: float | None = None
    denoise: bool = True
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.model.name not in MODELS:
            raise ValueError(
                f"unknown model {self.model.name!r}; valid choices: {', '.join(MODELS)}"
            )
        if self.model.name == "ckpt" and not self.ckpt:
            raise ValueError("model=ckpt needs ckpt=<path to a training checkpoint>")
        if self.model.name == "ckpt" and not Path(self.ckpt).is_file():
            raise ValueError(f"checkpoint {self.ckpt} does not exist")
        for name in ("steps", "num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        dtype_of(self.dtype)
        get_solver(self.solver.name)


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (conf/sample.yaml and its groups extend them)."""
    cs = ConfigStore.instance()
    cs.store(name="sample_app", node=SampleAppConfig)
    cs.store(group="solver", name="solver_schema", node=SolverConfig)
    register_shared_schemas(cs)


register_configs()


@dataclass
class Target:
    """What is sampled and what the samples are measured against."""

    score_fn: ScoreFn
    sde: SDE
    data_shape: tuple[int, ...]
    reference: torch.Tensor | None = None
    oracle: Any = None
    name: str = ""


def build_target(cfg: SampleAppConfig, device: torch.device, dtype: torch.dtype) -> Target:
    """The score function, SDE and evaluation reference named by the config."""
    label, scale = cfg.guidance.label, cfg.guidance.scale
    if cfg.model.name == "oracle":
        sde = build_sde(cfg.sde)
        mixture = build_oracle(cfg.model, torch.Generator().manual_seed(cfg.seed))
        score_fn = mixture.score_fn(sde)
        if label is not None:
            if not 0 <= label < mixture.num_components:
                raise ValueError(
                    f"guidance.label must lie in [0, {mixture.num_components - 1}], got {label}"
                )

            def log_p_y(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return mixture.log_responsibilities(x, t, sde).gather(1, y[:, None])[:, 0]

            score_fn = classifier_guided_score_fn(score_fn, log_p_y, label, scale, "log_prob")
        return Target(score_fn, sde, mixture.dims, oracle=mixture, name=f"oracle-{cfg.model.kind}")
    model, sde, meta = load_model(cfg.ckpt, device)
    model = model.to(dtype)
    if not (meta.get("config") or {}).get("data"):
        raise ValueError(f"{cfg.ckpt} records no data config to evaluate against")
    data = load_data(DataConfig(**meta["config"]["data"]))
    score_fn = model_score_fn(model, sde, meta["prediction"], "t")
    if label is not None and cfg.guidance.kind == "classifier":
        classifier = load_classifier(cfg.guidance.classifier, device).to(dtype)
        if sde_spec(classifier.sde) != sde_spec(sde):
            raise ValueError(
                f"the classifier {cfg.guidance.classifier} was trained on {classifier.sde!r}, "
                f"the checkpoint on {sde!r}"
            )
        if not 0 <= label < classifier.num_classes:
            raise ValueError(
                f"guidance.label must lie in [0, {classifier.num_classes - 1}], got {label}"
            )
        score_fn = classifier_guided_score_fn(score_fn, classifier, label, scale)
    elif label is not None:
        num_classes = meta["model"]["num_classes"]
        if not num_classes:
            raise ValueError(
                f"guidance.label needs a class-conditional checkpoint; {cfg.ckpt} is not"
            )
        score_fn = cfg_score_fn(model, sde, label, num_classes, scale, "ho", meta["prediction"])
    labelled = label is not None and data.test_labels is not None
    reference = data.test[data.test_labels == label] if labelled else data.test
    return Target(score_fn, sde, data.shape, reference, name=str(cfg.ckpt))


def _inpaint_problem(
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


def _inpaint(
    obj: SampleAppConfig,
    target: Target,
    first: int,
    n: int,
    device: torch.device,
    dtype: torch.dtype,
    common: dict[str, Any],
) -> tuple[torch.Tensor, int]:
    """Fill in a batch of masked observations; returns the result and the counted NFE."""
    x_known, mask = _inpaint_problem(obj, target, first, n, dtype)
    calls = 0

    def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return target.score_fn(x, t)

    x = inpaint(
        counted,
        target.sde,
        x_known.to(device),
        mask.to(device),
        solver=obj.solver.name,
        resample=obj.inpaint.resample,
        jump=obj.inpaint.jump,
        **common,
    )
    return x, calls


def _inpaint_metrics(
    x: torch.Tensor, target: Target, obj: SampleAppConfig, dtype: torch.dtype
) -> dict[str, float]:
    """How the known entries came out (exactly 0 error is the contract) and the error on the
    unknown ones against the hidden originals."""
    x_known, mask = _inpaint_problem(obj, target, 0, len(x), dtype)
    known = mask.expand_as(x).bool()
    return {
        "known_max_abs_error": float((x - x_known)[known].abs().max()),
        "unknown_mse": float((x - x_known)[~known].square().mean()),
    }


def _metrics(x: torch.Tensor, target: Target, generator: torch.Generator) -> dict[str, float]:
    if target.oracle is not None:
        return oracle_metrics(x.double(), target.oracle, generator=generator)
    ref = target.reference.to(x.device, x.dtype)
    if x.ndim == 4:
        return image_metrics(x.float(), ref.float())
    return {"sliced_w2": float(sliced_wasserstein(x, ref, generator=generator))}


def _grid(
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
    }
    (out / "grid.json").write_text(json.dumps({**info, "ts": fit.ts.tolist()}, indent=2))
    return fit.ts, info


def run(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Sample, measure and write samples.npz, metrics.json and a figure into out_dir."""
    obj: SampleAppConfig = OmegaConf.to_object(cfg)  # the dataclasses check their values
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = resolve_device(obj.device), dtype_of(obj.dtype)
    target = build_target(obj, device, dtype)
    record: dict[str, Any] = {
        "model": target.name,
        "sde": getattr(obj.sde, "name", str(obj.sde)),
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
        grid, record["tuning"] = _grid(obj, target, device, dtype, out)
        if isinstance(grid, torch.Tensor):
            record["steps"] = len(grid) - 1
        chunks, nfe = [], 0
        for b, first in enumerate(range(0, obj.num_samples, obj.batch_size)):
            n = min(obj.batch_size, obj.num_samples - first)
            generator = torch.Generator(device).manual_seed(obj.seed * 100_003 + b)
            common = dict(
                steps=obj.steps,
                grid=grid,
                t_end=obj.t_end,
                denoise=obj.denoise,
                generator=generator,
                progress=sys.stderr.isatty(),
                **obj.solver.params,
            )
            if obj.inpaint.mask is None:
                result = sample(
                    target.score_fn,
                    target.sde,
                    (n, *target.data_shape),
                    solver=obj.solver.name,
                    device=device,
                    dtype=dtype,
                    return_info=True,
                    **common,
                )
                out_x, used = result.samples, result.nfe
            else:
                out_x, used = _inpaint(obj, target, first, n, device, dtype, common)
            chunks.append(out_x.detach().cpu())
            nfe = max(nfe, used)
        x = torch.cat(chunks)
        record["nfe"] = nfe
        record["wall_time_s"] = time.perf_counter() - start
        record["metrics"] = _metrics(x, target, torch.Generator().manual_seed(obj.seed + 1))
        if obj.inpaint.mask is not None:
            record["metrics"].update(_inpaint_metrics(x, target, obj, dtype))
        np.savez(out / "samples.npz", samples=x.numpy(), nfe=nfe)
        ref = target.reference if target.oracle is None else target.oracle.sample(len(x))
        figure = save_sample_figure(ref, x, out / "samples.png", title=_title(record))
        print(f"figure: {figure}")
    except (IncompatibleSDEError, UntunableSolverError) as e:
        record.update(status="invalid", error=str(e))
    except Exception as e:  # a sweep records the failure and goes on; the trace goes to stderr
        traceback.print_exc()
        record.update(status="error", error=f"{type(e).__name__}: {e}")
    record["wall_time_s"] = record["wall_time_s"] or time.perf_counter() - start
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    print(_summary(record))
    return record


def _title(record: dict[str, Any]) -> str:
    return f"{record['sde']} / {record['solver']} / NFE {record['nfe']}"


def _summary(record: dict[str, Any]) -> str:
    head = f"{record['model']} | {_title(record)} | {record['status']}"
    if record["status"] != "ok":
        return f"{head}: {record['error']}"
    return head + "".join(f" | {k} {v:.4g}" for k, v in record["metrics"].items())


def main() -> None:
    """Console entry point (sde-diffusion-sample)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    try:
        check_override_keys("sample", [a for a in sys.argv[1:] if not a.startswith("-")])
    except ValueError as e:
        sys.exit(f"error: {e}")

    @hydra.main(config_path=CONF_DIR, config_name="sample", version_base=None)
    def _app(cfg: DictConfig) -> None:
        run(cfg, HydraConfig.get().runtime.output_dir)

    _app()


if __name__ == "__main__":
    # run the app from the imported module, not from __main__: launchers that pickle the config
    # (joblib, submitit) must find its dataclasses under their real module name
    from sde_diffusion.sample import main as module_main

    module_main()
