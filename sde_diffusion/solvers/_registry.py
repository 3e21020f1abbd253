"""The name -> solver registry and the noise sources solvers draw from.

A solver is a plain function `solver(score_fn, sde, x, ts, *, callback=None, [noise], **params)`
that steps x from ts[0] down to ts[-1] and returns it. Stochastic solvers take `noise`, a callable
returning standard normal noise shaped like its argument; `sample()` passes it only to them.
Euler–Maruyama and predictor–corrector (score_sde's convention) add no noise on their last step
unless called with `noise_last=True`, which callers that step a grid one interval at a time
(inpainting) pass; the ancestral samplers (ddpm, ddim) draw noise on every step, as the chain does.
A solver that cannot work on an SDE raises IncompatibleSDEError, so sweeps can report the
combination as invalid rather than failed.

`register` wraps each solver in `check_solver_call`, so a solver called directly is as safe as
`sample()`: its score_fn, SDE, state, grid and parameter names are checked once per call.
`sample()` and `inpaint` check the same things themselves (resolving or building the grid) and
run the unchecked function through `SolverSpec.run`, so nothing is checked twice or per step.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._tensor import check_batch, check_callable, check_choice, check_keywords, is_finite
from ..sde import SDE, ScoreFn, check_sde
from .grids import check_grid

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
    #: fn without its argument checks, for callers that made them (None: fn checks nothing)
    unchecked: Callable[..., Tensor] | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def params(self) -> tuple[str, ...]:
        """The parameters a caller may set by name (order, eta, ...): every keyword-only one but
        the `callback` and `noise` that `sample()` supplies."""
        return tuple(p for p in keyword_parameters(self.fn) if p not in ("callback", "noise"))

    @functools.cached_property
    def takes_any_params(self) -> bool:
        """Whether fn takes **params, and so any name."""
        kinds = {p.kind for p in inspect.signature(self.fn).parameters.values()}
        return inspect.Parameter.VAR_KEYWORD in kinds

    def check_params(self, params: Mapping[str, object]) -> None:
        """Refuse parameters the solver does not take, naming them and `params`."""
        if not self.takes_any_params:
            check_keywords(f"solver {self.name!r}", params, self.params)

    def run(
        self, score_fn: Callable[..., Tensor], sde: SDE, x: Tensor, ts: Tensor, **params: object
    ) -> Tensor:
        """Call the solver on arguments the caller has checked (`check_solver_call`)."""
        return (self.unchecked or self.fn)(score_fn, sde, x, ts, **params)


SOLVERS: dict[str, SolverSpec] = {}


class IncompatibleSDEError(ValueError):
    """A solver asked to run on an SDE it is not defined for (ddpm on VE, say)."""


def register(
    name: str, default_grid: str = "uniform", grid_sets_nfe: bool = True
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Add a solver function to the registry under `name`; it is returned wrapped in
    `check_solver_call` (same name, signature and docstring)."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        valid = keyword_parameters(fn)

        @functools.wraps(fn)
        def checked(
            score_fn: Callable[..., Tensor], sde: SDE, x: Tensor, ts: Tensor, **params: object
        ) -> Tensor:
            check_solver_call(name, valid, score_fn, sde, x, ts, params)
            return fn(score_fn, sde, x, ts, **params)

        stochastic = "noise" in valid
        SOLVERS[name] = SolverSpec(name, checked, default_grid, stochastic, grid_sets_nfe, fn)
        return checked

    return wrap


def keyword_parameters(fn: Callable[..., Tensor]) -> tuple[str, ...]:
    """The keyword-only parameters of a solver function, in order."""
    kinds = inspect.signature(fn).parameters.items()
    return tuple(n for n, p in kinds if p.kind is inspect.Parameter.KEYWORD_ONLY)


def check_solver_call(
    name: str,
    valid: Sequence[str],
    score_fn: object,
    sde: object,
    x: object,
    ts: object,
    params: Mapping[str, object],
) -> None:
    """The contract every solver call meets: a callable score_fn, an SDE instance, a finite
    floating state of shape (batch >= 1, *dims), a valid time grid (`grids.check_grid`) and
    only parameters the solver takes (the error lists them)."""
    check_keywords(f"solver {name!r}", params, valid)
    check_callable(score_fn, "score_fn")
    check_grid(ts, check_sde(sde))  # type: ignore[arg-type]
    check_batch(x, "x")


def get_solver(name: str) -> SolverSpec:
    """Look a solver up by name; the error lists the valid names."""
    check_choice("solver", name, sorted(SOLVERS))
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
        check_seeds(seeds, like.shape[0])
        z = torch.stack([torch.randn(like.shape[1:], generator=g, dtype=like.dtype) for g in gens])
        return z.to(like.device)

    return noise


def check_seeds(seeds: Sequence[int], batch: int) -> None:
    """Per-sample seeds must number one per sample of the batch."""
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}: need one per sample")


def steps(ts: Tensor) -> enumerate[tuple[Tensor, Tensor]]:
    """Enumerate the (t, t_next) pairs of a grid: a solver's loop header."""
    return enumerate(itertools.pairwise(ts))


def at(t: Tensor, x: Tensor) -> Tensor:
    """The grid time t (0-d) as the (batch,) tensor the score_fn contract asks for."""
    return t.expand(x.shape[0])


class CheckedScore:
    """Wraps score_fn: counts every call (the NFE, never computed) and checks what comes back
    (shape, NaN or inf on the host), naming the step and t."""

    def __init__(self, score_fn: ScoreFn):
        self.score_fn, self.nfe, self.step = score_fn, 0, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        out = self.score_fn(x, t)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"score_fn returned {shape} for x of shape {tuple(x.shape)} at {self._where(t)}"
            )
        if out.device.type == "cpu" and not is_finite(out):
            raise ValueError(f"score_fn output at {self._where(t)} contains NaN or inf")
        return out

    def _where(self, t: Tensor) -> str:
        return f"step {self.step} (t={t.reshape(-1)[0].item()})"
