"""The sampling app's config schema: what to sample (model, guidance, inpainting), with which
solver and grid, how many, where. Each dataclass checks its values when OmegaConf builds it,
naming the valid range or choices."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from ..guidance import MASKS
from ..solvers import GRIDS, get_solver
from ..solvers.sampling import final_step
from ..solvers.tuning import HOLDOUT
from .config import dtype_of

MODELS = ("oracle", "ckpt")

__all__ = [
    "DEFAULT_SOLVER",
    "GUIDANCE_KINDS",
    "MODELS",
    "GuidanceConfig",
    "InpaintConfig",
    "SampleAppConfig",
    "SolverConfig",
    "TuneConfig",
]


#: `solver=default`: `sample()`'s default, the configuration its pilot picks for the model
DEFAULT_SOLVER = "default"


@dataclass
class SolverConfig:
    """A registered solver (or DEFAULT_SOLVER), its time grid and its parameters.

    grid: None (the solver's own kind), a kind of GRIDS, "tuned" (fitted to the model before
    sampling, see TuneConfig; for DEFAULT_SOLVER with the configuration that tuned closest) or
    the path of a grid.json that a tuned run wrote (for DEFAULT_SOLVER: with the configuration
    it was tuned for).
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
    apart from the sampling noise) against their exact probability flow, the `holdout` share of
    the draws held out of the search to decide where it stops (`solvers.tune_grid`)."""

    pilot: int = 256
    trials: int = 300
    seed: int = 7919
    holdout: float = HOLDOUT

    def __post_init__(self) -> None:
        if self.pilot < 1 or self.trials < 1:
            raise ValueError(f"tune.pilot and tune.trials must be >= 1, got {self}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"tune.holdout must lie in [0, 1), got {self.holdout}")


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
    #: None: the solver's own (a named solver ends with the Tweedie step, the default's pilot
    #: decides); true / "tweedie", "trapezoid" (the trapezoidal step from t_min, `sample()`'s
    #: denoise) or false; with solver=default any value, like t_end or solver.params, skips the
    #: pilot
    denoise: bool | str | None = None
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
        if self.solver.name != DEFAULT_SOLVER:
            get_solver(self.solver.name)
        elif self.inpaint.mask is not None:
            raise ValueError("inpainting needs a named solver, not solver=default")
        if self.denoise is not None:
            final_step(self.denoise)
        fitted = self.solver.grid not in (None, *GRIDS)  # tuned here or saved by a tuned run
        if fitted and self.t_end is not None:
            raise ValueError(
                f"t_end ends a grid of a named kind; solver.grid={self.solver.grid} ends at its "
                "own last time: drop t_end"
            )
        if fitted and self.solver.name == DEFAULT_SOLVER and self.denoise is not None:
            raise ValueError(
                f"solver=default with solver.grid={self.solver.grid} samples the configuration "
                "the grid is tuned for, its last step included: drop denoise, or name a solver "
                "(dpm_solver, unipc)"
            )
        if self.inpaint.mask is not None and self.denoise == "trapezoid":
            raise ValueError("inpainting ends with the Tweedie step: denoise=trapezoid is not one")
