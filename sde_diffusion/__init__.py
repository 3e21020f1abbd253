"""sde_diffusion: score-based diffusion in continuous time.

The SDE family with closed-form marginals, an exact-score Gaussian-mixture oracle, network
parametrisations, and (in the submodules) solvers, training, likelihood and guidance.
Nothing here imports Hydra or the apps: the command line (`sde-diffusion train|sample|report|
likelihood|demo`) lives in `sde_diffusion.apps`, which imports the library, never the reverse.
"""

from .guidance import cfg_score_fn, classifier_guided_score_fn, inpaint
from .likelihood import bits_per_dim, ddpm_bound, ode_log_likelihood
from .oracle import GaussianMixture
from .parametrize import (
    eps_to_prediction,
    model_score_fn,
    prediction_to_eps,
    sde_from_scheduler_config,
    tweedie_x0,
)
from .precondition import Preconditioned, estimate_sigma_data
from .sde import (
    SDE,
    VESDE,
    VPSDE,
    CosineVPSDE,
    DiscreteSchedule,
    DiscreteVPSDE,
    ScoreFn,
    SubVPSDE,
    get_sde,
)
from .solvers import SOLVERS, SampleResult, sample, time_grid, tune_grid
from .trainer import TrainConfig, Trainer, load_model, load_score_fn

__version__ = "0.1.0"

__all__ = [
    "SDE",
    "SOLVERS",
    "VESDE",
    "VPSDE",
    "CosineVPSDE",
    "DiscreteSchedule",
    "DiscreteVPSDE",
    "GaussianMixture",
    "Preconditioned",
    "SampleResult",
    "ScoreFn",
    "SubVPSDE",
    "TrainConfig",
    "Trainer",
    "bits_per_dim",
    "cfg_score_fn",
    "classifier_guided_score_fn",
    "ddpm_bound",
    "eps_to_prediction",
    "estimate_sigma_data",
    "get_sde",
    "inpaint",
    "load_model",
    "load_score_fn",
    "model_score_fn",
    "ode_log_likelihood",
    "prediction_to_eps",
    "sample",
    "sde_from_scheduler_config",
    "time_grid",
    "tune_grid",
    "tweedie_x0",
]
