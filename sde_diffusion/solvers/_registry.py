"""The name -> solver registry and the noise sources solvers draw from.

A solver is a plain function `solver(score_fn, sde, x, ts, *, callback=None, [noise], **params)`
that steps x from ts[0] down to ts[-1] and returns it. Stochastic solvers take `noise`, a callable
returning standard normal noise shaped like its argument; `sample()` passes it only to them.
Euler–Maruyama and predictor–corrector (score_sde's convention) add no noise on their last step
unless called with `noise_last=True`, which callers that step a grid one interval at a time
(inpainting) pass; the ancestral samplers (ddpm, ddim) draw noise on every step, as the chain does.
A solver that cannot work on an SDE raises IncompatibleSDEError, so sweeps can report the
combination as invalid rather than failed.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

NoiseSource = Callable[[Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor], None]


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver: its function, the grid it defaults to, whether it draws noise, and
    whether its grid sets its evaluations (then `sample(denoise=True)` ends the default grid
    half a step above t = 0, see `grids.final_time`; not so for an adaptive ODE solver)."""

    name: str
    fn: Callable[..., Tensor]
    default_grid: str
    stochastic: bool
    grid_sets_nfe: bool = True


SOLVERS: dict[str, SolverSpec] = {}


class IncompatibleSDEError(ValueError):
    """A solver asked to run on an SDE it is not defined for (ddpm on VE, say)."""


def register(
    name: str, default_grid: str = "uniform", grid_sets_nfe: bool = True
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Add a solver function to the registry under `name`."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        stochastic = "noise" in inspect.signature(fn).parameters
        SOLVERS[name] = SolverSpec(name, fn, default_grid, stochastic, grid_sets_nfe)
        return fn

    return wrap


def get_solver(name: str) -> SolverSpec:
    """Look a solver up by name; the error lists the valid names."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid choices: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


def generator_noise(generator: torch.Generator | None = None) -> NoiseSource:
    """Noise for the whole batch from one generator (or the global RNG when None)."""

    def noise(like: Tensor) -> Tensor:
        if generator is None:
            return torch.randn_like(like)
        z = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
        return z.to(like.device)

    return noise


def per_sample_noise(seeds: Sequence[int]) -> NoiseSource:
    """Noise in which sample b depends on seeds[b] alone, not on the batch it is drawn in.

    One generator per sample: reproducible across batch sizes and orders, at the price of a
    Python loop over the batch per draw (use `generator_noise` when that matters more).
    """
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def noise(like: Tensor) -> Tensor:
        if like.shape[0] != len(gens):
            raise ValueError(f"{len(gens)} seeds for a batch of {like.shape[0]}")
        z = torch.stack([torch.randn(like.shape[1:], generator=g, dtype=like.dtype) for g in gens])
        return z.to(like.device)

    return noise


def steps(ts: Tensor) -> enumerate[tuple[Tensor, Tensor]]:
    """Enumerate the (t, t_next) pairs of a grid: a solver's loop header."""
    return enumerate(itertools.pairwise(ts))


def at(t: Tensor, x: Tensor) -> Tensor:
    """The grid time t (0-d) as the (batch,) tensor the score_fn contract asks for."""
    return t.expand(x.shape[0])
