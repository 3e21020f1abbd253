"""Samplers over one contract: any callable score_fn(x, t) -> grad_x log p_t(x).

`sample()` runs any registered solver by name (`tune_grid` fits its few-step grid to a score
function); each solver is also a plain function
`solver(score_fn, sde, x, ts, ...)` over an explicit decreasing time grid, importable on its
own with its parameters named as in its paper. A solver asks the SDE for every coefficient and
knows nothing of networks, configs or global state.
"""

from __future__ import annotations

from . import ancestral, expint, heun, ode, sde_solvers  # noqa: F401  (registers the solvers)
from ._registry import SOLVERS, IncompatibleSDEError, SolverSpec, get_solver
from .ancestral import ddim, ddpm
from .expint import dpm_solver_pp, unipc
from .grids import GRIDS, time_grid
from .heun import edm_heun
from .ode import probability_flow_ode
from .sampling import SampleResult, sample
from .sde_solvers import euler_maruyama, langevin_step, predictor_corrector
from .tuning import TunedGrid, tunable_solvers, tune_grid

__all__ = [
    "GRIDS",
    "SOLVERS",
    "IncompatibleSDEError",
    "SampleResult",
    "SolverSpec",
    "TunedGrid",
    "ddim",
    "ddpm",
    "dpm_solver_pp",
    "edm_heun",
    "euler_maruyama",
    "get_solver",
    "langevin_step",
    "predictor_corrector",
    "probability_flow_ode",
    "sample",
    "time_grid",
    "tunable_solvers",
    "tune_grid",
    "unipc",
]
