"""sde_diffusion: score-based diffusion in continuous time.

The SDE family with closed-form marginals, an exact-score Gaussian-mixture oracle, network
parametrisations, and (in the submodules) solvers, training, likelihood and guidance.
Nothing here imports Hydra: the apps in `sde_diffusion.train` / `.sample` / `.report` do.
"""

from .oracle import GaussianMixture
from .parametrize import (
    eps_to_prediction,
    model_score_fn,
    prediction_to_eps,
    sde_from_scheduler_config,
    tweedie_x0,
)
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

__version__ = "0.1.0"

__all__ = [
    "SDE",
    "VESDE",
    "VPSDE",
    "CosineVPSDE",
    "DiscreteSchedule",
    "DiscreteVPSDE",
    "GaussianMixture",
    "ScoreFn",
    "SubVPSDE",
    "eps_to_prediction",
    "get_sde",
    "model_score_fn",
    "prediction_to_eps",
    "sde_from_scheduler_config",
    "tweedie_x0",
]
