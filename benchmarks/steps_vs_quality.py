"""How many score evaluations for which quality? Our few-step default against every peer, on a
suite of exact-score problems.

    python benchmarks/steps_vs_quality.py --tuned      # the full suite (32 minutes, 1 thread)
    python benchmarks/steps_vs_quality.py --holdout --tuned  # the held-out problems (36 minutes)
    python benchmarks/steps_vs_quality.py --third --tuned    # a third set (15 minutes)
    python benchmarks/steps_vs_quality.py --quick      # three problems, two schedules (1 minute)

Peers (benchmarks/steps_vs_quality_peers.py): diffusers' DPM-Solver++ (2M, 3M), UniPC, DEIS,
DDIM, Euler and Heun on their default, trailing, Karras and Lu-lambda grids with the final step
to sigma = 0, and k-diffusion's dpmpp_2m, dpmpp_3m_sde, lms, heun and euler on Karras and
exponential grids, all driven by the same exact score. k-diffusion is optional; install it with

    pip install --no-deps k-diffusion torchsde trampoline

(its `sampling` module is loaded on its own; without it the run says so and goes on).

Problems: Gaussian-mixture oracles with an exact score at every t (`GaussianMixture`), so what
remains is each sampler's own discretisation error: anisotropic Gaussians in 4, 16 and 64
dimensions (covariance eigenvalues spread 60x, 100x, 200x, random rotation), the 2-D ring of 8,
a 16-D mixture of 8 full-covariance components, a scale mixture (component variances 1e-3, 1e-2,
1e-1, 1 in 8-D) and a low-intrinsic-dimension target (a ring of 6 in a random 2-D plane of R^16,
off-plane variance 1e-4); each under DDPM's discrete linear betas, the continuous VP and the
cosine VP. Diffusers runs on the schedule's 1000 DDPM betas and evaluates the score at its
timesteps' continuous times, k-diffusion through a denoiser D(x, sigma) of the same score.
`--schedules` also takes Stable Diffusion's scaled-linear betas and two SDEs without betas, VE and
sub-VP, where diffusers' EDM schedulers stand in for its DDPM ones and the sigma-grid peers also
end at sigma 0.002 and 0.01 (steps_vs_quality_peers.SIGMA_MINS); their results go to files of
their own, and so do those of part of the suite's schedules (`--quick` too), each file named
after them; a run of some `--problems` or `--peers` names those in its file as well.

Errors:
- Gaussians: the exact KL from the sampler's output law to the target. A deterministic sampler
  driven by the exact score of a Gaussian is an affine map x_T -> b + A x_T, so running it on
  x_T = 0 and the unit vectors gives its output law N(b, A A^T) exactly; stochastic samplers
  are scored by the KL of their samples' mean and covariance (GAUSS_SAMPLES of them; the bias of
  that estimate, about D (D + 3) / (4 n) nats, is printed as their floor).
- mixtures: sliced W2 between the samples and the exact probability-flow map of the same x_T to the
  data (dopri5 at FLOW_TOL to t_min, and `flow_to_data` on to sigma = 0): coupled through x_T it is
  free of sampling noise for deterministic samplers (stochastic ones are not coupled to the flow and
  stay at the sampling-noise level), except for the rare draws that a sampler sends to another mode
  than the flow does: at a rate of 1 in 1000, MIX_SAMPLES = 1000 draws see 0-3 of them.
  `--mix-samples 20000` measures those rates (slow; the first 1000 draws are the default's). Each
  mixture cell's best peer setting, the least of some 37 errors on those draws, is then measured
  again next to ours on FRESH_SAMPLES new draws (`--fresh-samples`): where switches decide, the
  least of many is biased low, and a setting measured on draws it was not chosen on is not.
Budgets are matched on counted evaluations: each sampler runs the most steps whose counted NFE
fits the budget. Every problem reports, at each NFE, the best peer setting and our ratio to it,
and our error at NFE 20 against our own at NFE 1000 (the floor: `pilot.CONVERGED`, which the
default runs unpiloted at that many steps). The default's pilot choices
and their cost are printed; "default without pilot" is `pilot=0`, the fixed configuration. With
--tuned, `tune_grid(..., None, ...)` fits the default's configuration and the pilot's three next
closest to each problem at each budget and keeps one (pilot draws independent of x_T, reference
`pilot.exact_flow`), and those rows are compared too, with what each fit chose and cost. --holdout runs problems that no choice of the default was made on instead, --third a
third set, added once both were in place (the pilot's switch floor was found on it), --random
SEED COUNT that many random Gaussians (`random_gaussian`: the probe that found where squared
distance misranks Gaussians, docs/default_sampler.md "Gaussian targets"), --random-mixtures
SEED COUNT that many random mixtures (`random_mixture`: dimension, component count, weights,
separation, shapes and scales from the seed).
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from sde_diffusion import SDE, VESDE, VPSDE, CosineVPSDE, DiscreteVPSDE, GaussianMixture, SubVPSDE
from sde_diffusion.metrics import SlicedW2, gaussian_kl, gaussian_kl_from_samples
from sde_diffusion.sde import ScoreFn
from sde_diffusion.solvers import sample, tune_grid
from sde_diffusion.solvers.pilot import exact_flow

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steps_vs_quality_peers import (
    FRESH_SEED,
    X_T_SEED,
    Peer,
    diffusers_peers,
    k_diffusion_peers,
    steps_for_budget,
)

NFES, FLOOR_NFE = (5, 10, 20), 1000
SCHEDULES: dict[str, Callable[[], SDE]] = {
    "ddpm": DiscreteVPSDE.ddpm,
    "vp": VPSDE,
    "cosine": CosineVPSDE,
    "scaled_linear": DiscreteVPSDE.scaled_linear,  # Stable Diffusion's; not in the suite's default
    "ve": VESDE,  # no betas: diffusers' EDM schedulers take the place of its DDPM ones
    "subvp": SubVPSDE,
}
#: the schedules every problem runs under unless --schedules says otherwise
SUITE_SCHEDULES = ("ddpm", "vp", "cosine")
FLOW_TOL = 1e-7  # of the exact flow: dopri5 in the log-SNR (solvers/ode.py)
MIX_SAMPLES, GAUSS_SAMPLES, PROJECTIONS = 1000, 4000, 256
#: mixtures: the draws on which each cell's best peer is measured once more
FRESH_SAMPLES = 4000
#: tuned grids: pilot draws, trial grids, and the tolerance of the pilot's exact flow
#: (`pilot.exact_flow`, tune_grid's own reference, trapezoidal step to sigma = 0 included; tight,
#: since at 20 steps the default comes within tune_grid's own REFERENCE_TOL of it)
PILOT, TRIALS, TUNE_TOL = 256, 200, 1e-8
HERE = Path(__file__).resolve().parent


# ---- the suite ----------------------------------------------------------------------------------


def _rotation(dim: int, g: torch.Generator) -> Tensor:
    return torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]


def anisotropic(dim: int, spread: float, seed: int) -> GaussianMixture:
    """N(mu, U diag(d) U^T): eigenvalues log-spaced from 2 / spread to 2, a random rotation U."""
    g = torch.Generator().manual_seed(seed)
    d = torch.logspace(math.log10(2 / spread), math.log10(2), dim, dtype=torch.float64)
    u = _rotation(dim, g)
    mean = 0.5 * torch.randn(dim, generator=g, dtype=torch.float64)
    return GaussianMixture.gaussian(mean, u @ torch.diag(d) @ u.T)


def scale_mixture(
    dim: int = 8, seed: int = 3, variances: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0)
) -> GaussianMixture:
    """Isotropic components with the given variances (default 1e-3, 1e-2, 1e-1 and 1) at random
    means."""
    g = torch.Generator().manual_seed(seed)
    k = len(variances)
    var = torch.tensor(variances, dtype=torch.float64)
    means = torch.randn(k, dim, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.full((k,), 1 / k), means, var[:, None].expand(k, dim).clone())


def low_dimensional(dim: int = 16, seed: int = 4, off_plane: float = 1e-4) -> GaussianMixture:
    """A ring of 6 components (radius 2, in-plane std 0.3) in a random 2-D plane of R^dim,
    off-plane variance `off_plane`."""
    g = torch.Generator().manual_seed(seed)
    u = _rotation(dim, g)
    ring = GaussianMixture.ring(k=6, radius=2.0, std=0.3)
    means = torch.zeros(6, dim, dtype=torch.float64)
    means[:, :2] = ring.means
    d = torch.full((dim,), off_plane, dtype=torch.float64)
    d[:2] = 0.09
    cov = u @ torch.diag(d) @ u.T
    return GaussianMixture(torch.full((6,), 1 / 6), means @ u.T, cov.expand(6, dim, dim).clone())


def grid_of_points(k: int = 5, spacing: float = 1.0, std: float = 0.1) -> GaussianMixture:
    """A k x k grid of isotropic components in the plane."""
    ticks = spacing * (torch.arange(k, dtype=torch.float64) - (k - 1) / 2)
    means = torch.cartesian_prod(ticks, ticks)
    covs = torch.full((k * k, 2), std**2, dtype=torch.float64)
    return GaussianMixture(torch.full((k * k,), 1 / k**2), means, covs)


def holdout() -> dict[str, Callable[[], GaussianMixture]]:
    """Problems no choice of the default was made on (`--holdout`): other dimensions, spreads,
    scales and shapes."""
    return {
        "Gaussian 8-D (500x)": lambda: anisotropic(8, 500.0, 11),
        "Gaussian 32-D (30x)": lambda: anisotropic(32, 30.0, 12),
        "32-D mixture of 4": lambda: GaussianMixture.random(
            4, 32, generator=torch.Generator().manual_seed(32)
        ),
        "scale mixture 4-D (1e-4..3)": lambda: scale_mixture(4, 21, (1e-4, 3e-3, 0.1, 3.0)),
        "2-D grid of 25": grid_of_points,
        "ring in R^8 (off-plane 1e-3)": lambda: low_dimensional(8, 9, 1e-3),
    }


def narrow_modes(dim: int = 3, distance: float = 6.0, std: float = 0.05) -> GaussianMixture:
    """Two equal isotropic modes of `std`, `distance` apart along the first axis."""
    means = torch.zeros(2, dim, dtype=torch.float64)
    means[:, 0] = torch.tensor([distance / 2, -distance / 2], dtype=torch.float64)
    covs = torch.full((2, dim), std**2, dtype=torch.float64)
    return GaussianMixture(torch.full((2,), 0.5, dtype=torch.float64), means, covs)


def unequal_mixture(dim: int = 10, seed: int = 303) -> GaussianMixture:
    """Three full-covariance components (eigenvalues 0.01 to 0.5, random rotations) with weights
    0.6, 0.3 and 0.1 at random means of scale 2."""
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(3, dim, generator=g, dtype=torch.float64)
    d = torch.logspace(-2, math.log10(0.5), dim, dtype=torch.float64)
    covs = []
    for _ in range(3):
        u = _rotation(dim, g)
        covs.append(u @ torch.diag(d) @ u.T)
    weights = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    return GaussianMixture(weights, means, torch.stack(covs))


def off_centre(seed: int = 404) -> GaussianMixture:
    """A 2-D Gaussian at (3, -2), variances 0.05 and 0.5 along a random rotation: the prior's
    bias gamma_T mu sets a floor for every sampler."""
    u = _rotation(2, torch.Generator().manual_seed(seed))
    cov = u @ torch.diag(torch.tensor([0.05, 0.5], dtype=torch.float64)) @ u.T
    return GaussianMixture.gaussian(torch.tensor([3.0, -2.0], dtype=torch.float64), cov)


def third() -> dict[str, Callable[[], GaussianMixture]]:
    """A third set (`--third`), added once the suite and the held-out set were in place."""
    return {
        "Gaussian 12-D (1000x)": lambda: anisotropic(12, 1000.0, 77),
        "Gaussian 2-D off-centre": off_centre,
        "10-D mixture of 3 (unequal)": unequal_mixture,
        "3-D two narrow modes": narrow_modes,
    }


#: `random_gaussian`'s dimensions and eigenvalue profiles
RANDOM_DIMS, PROFILES = (2, 3, 5, 6, 8, 12, 20, 32, 48), ("log", "two", "rand")


def _eigenvalues(profile: str, top: float, spread: float, dim: int, g: torch.Generator) -> Tensor:
    """`dim` eigenvalues between top / spread and top: log-spaced from end to end ("log"), in two
    equal clusters at both ends ("two") or log-uniform between them ("rand", drawn from g)."""
    if profile == "log":
        return torch.logspace(math.log10(top / spread), math.log10(top), dim, dtype=torch.float64)
    if profile == "two":
        return torch.where(torch.arange(dim) < dim // 2, top / spread, top).double()
    return top / spread ** torch.rand(dim, generator=g, dtype=torch.float64)


def random_gaussian(seed: int) -> tuple[str, GaussianMixture]:
    """A Gaussian drawn from `seed`, with its name: a dimension of RANDOM_DIMS, eigenvalues
    between top / spread and top (spread log-uniform in 10-5000, top in 0.3-3.3), log-spaced
    from end to end, in two equal clusters at both ends, or log-uniform between them, a random
    rotation, and a mean whose coordinates have a random standard deviation (0-1)."""
    g = torch.Generator().manual_seed(seed)
    dim = RANDOM_DIMS[int(torch.randint(len(RANDOM_DIMS), (1,), generator=g))]
    spread = float(10 ** (1 + 2.7 * torch.rand(1, generator=g)))
    profile = PROFILES[int(torch.randint(len(PROFILES), (1,), generator=g))]
    top = float(0.3 + 3 * torch.rand(1, generator=g))
    ev = _eigenvalues(profile, top, spread, dim, g)
    u = _rotation(dim, g)
    mean = float(torch.rand(1, generator=g)) * torch.randn(dim, generator=g, dtype=torch.float64)
    name = f"random Gaussian {seed}: {dim}-D, {profile} {spread:.0f}x"
    return name, GaussianMixture.gaussian(mean, u @ torch.diag(ev) @ u.T)


#: `random_mixture`'s dimensions
MIXTURE_DIMS = (2, 3, 4, 6, 8, 12, 16, 24, 32)


def random_mixture(seed: int) -> tuple[str, GaussianMixture]:
    """A Gaussian mixture drawn from `seed`, with its name: a dimension of MIXTURE_DIMS, 2-12
    components with flat-Dirichlet weights and means of a random scale (0.3-3 per coordinate),
    each a Gaussian of its own random rotation whose eigenvalues lie between top / spread and
    top in one of PROFILES (spread log-uniform in 1-300), with tops log-uniform between 1 and
    1/1000 of a common top in 0.03-1.03 (component scales apart by up to 1000x)."""
    g = torch.Generator().manual_seed(seed)
    dim = MIXTURE_DIMS[int(torch.randint(len(MIXTURE_DIMS), (1,), generator=g))]
    k = 2 + int(torch.randint(11, (1,), generator=g))
    w = -torch.rand(k, generator=g, dtype=torch.float64).log()
    means = float(0.3 + 2.7 * torch.rand(1, generator=g)) * torch.randn(
        k, dim, generator=g, dtype=torch.float64
    )
    profile = PROFILES[int(torch.randint(len(PROFILES), (1,), generator=g))]
    spread = float(10 ** (2.5 * torch.rand(1, generator=g)))
    scales = float(10 ** (3 * torch.rand(1, generator=g)))
    top = float(0.03 + torch.rand(1, generator=g))
    covs = []
    for _ in range(k):
        ev = _eigenvalues(
            profile, top / scales ** float(torch.rand(1, generator=g)), spread, dim, g
        )
        u = _rotation(dim, g)
        covs.append(u @ torch.diag(ev) @ u.T)
    name = f"random mixture {seed}: {dim}-D, {k} components, {profile} {spread:.0f}x, {scales:.0f}x"
    return name, GaussianMixture(w / w.sum(), means, torch.stack(covs))


def problems(quick: bool) -> dict[str, Callable[[], GaussianMixture]]:
    suite = {
        "Gaussian 4-D (60x)": lambda: anisotropic(4, 60.0, 5),
        "Gaussian 16-D (100x)": lambda: anisotropic(16, 100.0, 1),
        "Gaussian 64-D (200x)": lambda: anisotropic(64, 200.0, 2),
        "2-D ring of 8": lambda: GaussianMixture.ring(k=8, radius=4.0, std=0.5),
        "16-D mixture of 8": lambda: GaussianMixture.random(
            8, 16, generator=torch.Generator().manual_seed(16)
        ),
        "scale mixture 8-D": scale_mixture,
        "2-D ring in R^16": low_dimensional,
    }
    if quick:
        keep = ("Gaussian 16-D (100x)", "2-D ring of 8", "scale mixture 8-D")
        suite = {k: suite[k] for k in keep}
    return suite


@dataclass
class Problem:
    """One target under one schedule, with its shared x_T and exact reference."""

    name: str
    schedule: str
    mixture: GaussianMixture
    sde: SDE
    z: Tensor  # standard normal x_T noise shared by every sampler
    flow: Tensor | None = None  # mixtures: the exact flow of z
    _judge: SlicedW2 | None = field(default=None, repr=False)

    @property
    def gaussian(self) -> bool:
        return self.mixture.num_components == 1

    @property
    def metric(self) -> str:
        return "KL" if self.gaussian else "flow W2"

    @functools.cached_property
    def score_fn(self) -> ScoreFn:
        """One score function per problem, so that the default's pilot runs once per budget."""
        return self.mixture.score_fn(self.sde)

    def error(self, run: Callable[[Tensor], tuple[Tensor, int]], stochastic: bool) -> tuple:
        """(error, counted NFE) of a sampler run(x_T) -> (samples, nfe)."""
        if not self.gaussian:
            x, nfe = run(self.sde.prior_std() * self.z)
            return float(self._judge(x)), nfe
        mean, cov = self.mixture.means[0], self.mixture.covs[0]
        if stochastic:
            x, nfe = run(self.sde.prior_std() * self.z)
            return float(gaussian_kl_from_samples(x, mean, cov)), nfe
        d = self.mixture.dim
        basis = torch.cat([torch.zeros(1, d), torch.eye(d)]).double()
        y, nfe = run(self.sde.prior_std() * basis)
        b, a = y[0], (y[1:] - y[0]).T
        return float(gaussian_kl(b, a @ a.T, mean, cov)), nfe

    def solve_flow(self) -> None:
        """Mixtures: the exact flow of z to the data and the sliced-W2 judge against it."""
        x_T = self.sde.prior_std() * self.z
        tol = {"rtol": FLOW_TOL, "atol": FLOW_TOL}
        x = sample(self.score_fn, self.sde, x_T, "ode", 1, denoise=False, **tol)
        self.flow = flow_to_data(self.mixture, self.sde, x)
        g = torch.Generator().manual_seed(7)
        self._judge = SlicedW2(self.flow, PROJECTIONS, g, len(self.z))

    def redrawn(self, n: int, seed: int) -> Problem:
        """A mixture problem on `n` fresh draws of x_T. It shares the score function, so the
        default's pilot, whose draws are its own, is not run again."""
        fresh = Problem(self.name, self.schedule, self.mixture, self.sde,
                        _normal(n, self.mixture.dim, seed))  # fmt: skip
        fresh.score_fn = self.score_fn
        fresh.solve_flow()
        return fresh


def _slug(text: str) -> str:
    """A file-name part for a problem or peer label: lower case, each run of other characters
    than letters and digits one underscore ("32-D mixture of 4": "32_d_mixture_of_4")."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def flow_to_data(mixture: GaussianMixture, sde: SDE, x: Tensor) -> Tensor:
    """The exact flow from x at the schedule's t_min on to the data (sigma = 0), which no
    score function on [t_min, T] can see: in y = x / gamma and s = sigma / gamma the flow is the
    same on every SDE, so the mixture's own score under a VE SDE from s down to a millionth of
    it carries y there (dopri5 at FLOW_TOL), and its Tweedie step the rest."""
    gamma, sigma = (float(v) for v in sde.marginal(torch.tensor(float(sde.t_min))))
    s = sigma / gamma
    tiny = 1e-6 * s
    ve = VESDE(sigma_min=tiny, sigma_max=math.sqrt(s * s + tiny * tiny))
    tol = {"rtol": FLOW_TOL, "atol": FLOW_TOL}
    return sample(mixture.score_fn(ve), ve, x / gamma, "ode", 1, **tol)


def _normal(n: int, dim: int, seed: int) -> Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def make_problem(
    name: str, mixture: GaussianMixture, schedule: str, mix_samples: int = MIX_SAMPLES
) -> Problem:
    n = GAUSS_SAMPLES if mixture.num_components == 1 else mix_samples
    z = _normal(n, mixture.dim, X_T_SEED)
    problem = Problem(name, schedule, mixture, SCHEDULES[schedule](), z)
    if not problem.gaussian:
        problem.solve_flow()
    return problem


# ---- samplers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A sampler: run(problem, steps, x_T, seed) -> (samples, counted NFE)."""

    label: str
    run: Callable[[Problem, int, Tensor, int], tuple[Tensor, int]]
    stochastic: bool = False
    fixed: bool = False  # one evaluation per step, known without counting
    applies: Callable[[SDE], bool] = lambda sde: True  # the SDEs it can run on

    @property
    def ours(self) -> bool:
        return self.label.startswith("ours")


#: the default's pilot choices: (problem, schedule, steps) -> (configuration, its evaluations)
PILOTS: dict[tuple[str, str, int], tuple[str, int]] = {}


def ours(label: str, fixed: bool = False, **settings: object) -> Method:
    """`sample()` with `settings` (none: the default configuration, whose pilot choices go into
    PILOTS); `fixed`: one evaluation per step (not counted to fit the budget, which for the
    default would run a pilot for every step count tried; its result's NFE is still counted)."""

    def run(problem: Problem, steps: int, x_T: Tensor, seed: int) -> tuple[Tensor, int]:
        g = torch.Generator().manual_seed(seed)
        res = sample(problem.score_fn, problem.sde, x_T, steps=steps, generator=g,
                     return_info=True, **settings)  # fmt: skip
        if res.pilot is not None:
            key = (problem.name, problem.schedule, steps)
            PILOTS[key] = (res.pilot.candidate.label, res.pilot.evaluations)
        return res.samples, res.nfe

    return Method("ours: " + label, run, fixed=fixed)


def tuned(log: dict) -> Method:
    """The default's pilot choice on a grid `tune_grid` fits per problem and budget, on PILOT
    prior draws independent of the problem's x_T; each fit and its seconds go into `log`."""

    def run(problem: Problem, steps: int, x_T: Tensor, seed: int) -> tuple[Tensor, int]:
        key = (problem.name, problem.schedule, steps)
        if key not in log:
            start = time.perf_counter()
            g = torch.Generator().manual_seed(1000 + steps)
            pilot = problem.sde.prior_std() * torch.randn(
                PILOT, problem.mixture.dim, generator=g, dtype=torch.float64
            )
            flow = exact_flow(problem.score_fn, problem.sde, pilot, TUNE_TOL)
            fit = tune_grid(problem.score_fn, problem.sde, None, steps, pilot, trials=TRIALS,
                            reference=flow)  # fmt: skip
            log[key] = (fit, time.perf_counter() - start)
        res = sample(problem.score_fn, problem.sde, x_T, return_info=True, **log[key][0].kwargs)
        return res.samples, res.nfe

    return Method("ours: default, grid=tune_grid", run, fixed=True)


def from_peer(p: Peer) -> Method:
    def run(problem: Problem, steps: int, x_T: Tensor, seed: int) -> tuple[Tensor, int]:
        return p.run(problem.score_fn, problem.sde, x_T, steps, seed)

    stochastic = "sde" in p.label or "DDPM" in p.label
    return Method(p.label, run, stochastic, applies=p.applies)


def budget_steps(method: Method, budget: int, problem: Problem, cache: dict) -> int | None:
    """`steps_for_budget` with the NFE counted on a one-sample batch (cached); `fixed` methods
    spend one evaluation per step."""
    if method.fixed:
        return budget
    x1 = problem.sde.prior_std() * problem.z[:1]

    def nfe(steps: int) -> int:
        key = (method.label, problem.name, problem.schedule, steps)
        if key not in cache:
            cache[key] = method.run(problem, steps, x1, 0)[1]
        return cache[key]

    return steps_for_budget(nfe, budget)


def evaluate(problem: Problem, method: Method, budget: int, cache: dict) -> dict:
    """One cell: the error at `budget` (None where the sampler fails or cannot fit it)."""
    record = {"problem": problem.name, "schedule": problem.schedule, "solver": method.label,
              "budget": budget, "nfe": None, "error": None, "status": "ok"}  # fmt: skip
    try:
        steps = budget_steps(method, budget, problem, cache)
        if steps is None:
            record["status"] = "does not fit"
            return record
        err, nfe = problem.error(lambda x_T: method.run(problem, steps, x_T, 0), method.stochastic)
        record.update(nfe=nfe, error=err if math.isfinite(err) else None)
        if record["error"] is None:
            record["status"] = "non-finite"
    except Exception as e:  # a failing sampler is a table entry, not the end of the benchmark
        record.update(status=f"{type(e).__name__}: {e}"[:80])
    return record


def remeasure(
    fresh: Problem, records: Sequence[dict], mine: Sequence[Method], peers: Sequence[Method],
    cache: dict,
) -> list[dict]:  # fmt: skip
    """Each budget's best peer setting, chosen on the problem's own draws, and our `mine`,
    measured again on `fresh` draws. Where rare mode switches decide a mixture's error, the
    least of some 37 peer errors on one set of draws is biased low: the setting that happened to
    switch no draw wins. On draws it was not chosen on, its error is an unbiased measure."""
    by_label = {m.label: m for m in peers}
    out = [evaluate(fresh, m, b, cache) for m in mine for b in NFES]
    for b in NFES:
        best = _best(records, b, mine=False)
        if best is not None:
            out.append(evaluate(fresh, by_label[best["solver"]], b, cache))
    return out


# ---- tables ---------------------------------------------------------------------------------------


def _best(records: Sequence[dict], budget: int, mine: bool | None) -> dict | None:
    ok = [
        r
        for r in records
        if r["budget"] == budget
        and r["error"] is not None
        and (mine is None or r["solver"].startswith("ours") == mine)
    ]
    return min(ok, key=lambda r: r["error"], default=None)


def summary_row(problem: Problem, records: Sequence[dict], label: str) -> list[str]:
    """Per NFE: our `label` row's error, the best peer's and the ratio; then NFE 20 / floor."""
    cells = [f"{problem.name}, {problem.schedule}", problem.metric]
    for b in NFES:
        me = next((r for r in records if r["solver"] == label and r["budget"] == b), None)
        peer = _best(records, b, mine=False)
        if not (me and me["error"] is not None and peer):
            cells.append("n/a")
            continue
        ratio = me["error"] / peer["error"]
        name = peer["solver"].split(": ", 1)[1]
        cells.append(f"{ratio:.2f} ({me['error']:.2g} vs {peer['error']:.2g} {name})")
    me20 = next((r for r in records if r["solver"] == label and r["budget"] == 20), None)
    floor = next((r for r in records if r["solver"] == label and r["budget"] == FLOOR_NFE), None)
    if me20 and floor and me20["error"] is not None and floor["error"]:
        cells.append(f"{me20['error'] / floor['error']:.3g} (floor {floor['error']:.2g})")
    else:
        cells.append("n/a")
    return cells


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(["\n".join(lines), *("| " + " | ".join(r) + " |" for r in rows)])


def detail_table(records: Sequence[dict]) -> str:
    """Every sampler's error (counted NFE) at every budget."""
    budgets = sorted({r["budget"] for r in records})
    rows = []
    for label in dict.fromkeys(r["solver"] for r in records):
        cells = [label]
        for b in budgets:
            r = next((r for r in records if r["solver"] == label and r["budget"] == b), None)
            if r is None:
                cells.append("")
            elif r["error"] is None:
                cells.append(r["status"])
            else:
                cells.append(f"{r['error']:.3g} ({r['nfe']})")
        rows.append(cells)
    return md_table(["sampler \\ NFE", *map(str, budgets)], rows)


def problem_set(args: argparse.Namespace) -> dict[str, Callable[[], GaussianMixture]]:
    if args.holdout:
        return holdout()
    if args.random or args.random_mixtures:
        first, count = args.random or args.random_mixtures
        draw = random_gaussian if args.random else random_mixture
        drawn = [draw(seed) for seed in range(first, first + count)]
        return {name: lambda mix=mix: mix for name, mix in drawn}
    return third() if args.third else problems(args.quick)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 problems x 2 schedules")
    parser.add_argument("--schedules", nargs="+", default=None, choices=list(SCHEDULES))
    parser.add_argument("--problems", nargs="+", default=None, help="names containing these")
    parser.add_argument("--peers", nargs="+", default=None, help="peer labels containing these")
    parser.add_argument("--tuned", action="store_true", help="also tune_grid rows (slow)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--holdout", action="store_true", help="the held-out problems instead")
    chosen.add_argument("--third", action="store_true", help="the third set instead")
    for flag, what in (("--random", "Gaussians (random_gaussian)"),
                       ("--random-mixtures", "Gaussian mixtures (random_mixture)")):  # fmt: skip
        chosen.add_argument(flag, nargs=2, type=int, metavar=("SEED", "COUNT"),
                            help=f"COUNT random {what} from SEED on instead")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--mix-samples",
        type=int,
        default=MIX_SAMPLES,
        help="x_T draws per mixture (their first MIX_SAMPLES are the default's)",
    )
    parser.add_argument(
        "--fresh-samples",
        type=int,
        default=FRESH_SAMPLES,
        help="mixtures: fresh x_T draws to measure each best peer on again (0: none)",
    )
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    schedules = args.schedules or (["ddpm", "cosine"] if args.quick else list(SUITE_SCHEDULES))

    default = ours("default", fixed=True)
    methods = [
        default,
        ours("default without pilot (pilot=0)", pilot=0),
        ours("dpm_solver (data, Tweedie)", solver="dpm_solver"),
        ours("unipc (data, Tweedie)", solver="unipc"),
        ours("unipc noise", solver="unipc", prediction="noise", lower_order_final=False),
    ]
    peers = [from_peer(p) for p in diffusers_peers()]
    try:
        peers += [from_peer(p) for p in k_diffusion_peers()]
    except ImportError as e:
        print(f"running without k-diffusion: {e}")
    if args.peers is not None:
        peers = [p for p in peers if any(k in p.label for k in args.peers)]
    suite = {
        k: v
        for k, v in problem_set(args).items()
        if args.problems is None or any(name in k for name in args.problems)
    }
    tuning_log: dict = {}
    tuned_method = tuned(tuning_log) if args.tuned else None

    header = ["problem, schedule", "error", *(f"NFE {b}: ours / best peer" for b in NFES),
              f"NFE 20 / NFE {FLOOR_NFE}"]  # fmt: skip
    mine = [default] + ([tuned_method] if tuned_method else [])
    start, cache, all_records, text = time.perf_counter(), {}, [], []
    summary, fresh_summary = [], []
    for name, build in suite.items():
        for schedule in schedules:
            problem = make_problem(name, build(), schedule, args.mix_samples)
            runs = [m for m in methods + peers if m.applies(problem.sde)]
            records = [evaluate(problem, m, b, cache) for m in runs for b in NFES]
            records.append(evaluate(problem, default, FLOOR_NFE, cache))
            if tuned_method is not None:
                records += [evaluate(problem, tuned_method, b, cache) for b in NFES]
            all_records += records
            rows = [summary_row(problem, records, default.label)]
            if tuned_method is not None:
                rows.append(summary_row(problem, records, tuned_method.label))
                rows[-1][0] += " (tuned grid)"
            summary += rows
            if not problem.gaussian and args.fresh_samples:
                fresh = problem.redrawn(args.fresh_samples, FRESH_SEED)
                fresh_records = remeasure(fresh, records, mine, peers, cache)
                fresh_rows = [summary_row(fresh, fresh_records, m.label)[:-1] for m in mine]
                for row, m in zip(fresh_rows, mine, strict=True):
                    row[0] += " (tuned grid)" if m is tuned_method else ""
                print(md_table(header[:-1], fresh_rows), flush=True)
                fresh_summary += fresh_rows
            section = [f"### {problem.name}, {problem.schedule} schedule ({problem.metric})",
                       detail_table(records)]  # fmt: skip
            print("\n\n".join(section) + "\n", flush=True)
            print(md_table(header, rows), flush=True)
            text += section
    elapsed = time.perf_counter() - start
    table = md_table(header, summary)
    tuning = [
        f"{p}, {s}, {steps} steps: {fit.configuration.label}, {fit.nfe} evaluations, {secs:.0f} s"
        for (p, s, steps), (fit, secs) in tuning_log.items()
    ]
    command = "python benchmarks/steps_vs_quality.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    kind = {"holdout": "held-out problems", "third": "third set", "random": "random Gaussians",
            "random_mixtures": "random mixtures"}  # fmt: skip
    md = [
        "# Steps against quality: the default sampler against every peer, exact-score "
        + next((v for k, v in kind.items() if getattr(args, k)), "suite"),
        f"Regenerate with `{command.strip()}` ({elapsed:.0f} s, {args.threads} torch thread(s)). "
        "Errors: exact KL for the Gaussians, sliced W2 to the exact flow of the same x_T for the "
        "mixtures. Ratios below 1: our default beats the best peer setting at that NFE.",
        table,
        "The default's pilot (256 prior draws, its own seed) chose, at each budget: "
        + "; ".join(
            f"{p}, {s}, NFE {n}: {label} ({evals} single-sample evaluations)"
            for (p, s, n), (label, evals) in PILOTS.items()
            if n in NFES
        )
        + ".",
        *(["Tuning cost: " + "; ".join(tuning) + "."] if tuning else []),
        *(
            [
                f"## The mixtures on {args.fresh_samples} fresh draws",
                "Each cell's best peer setting above, chosen on the same draws as ours, and our "
                f"default, measured once more on {args.fresh_samples} new draws of x_T (seed "
                f"{FRESH_SEED}): the least of some 37 peer errors on one set of draws is biased "
                "low where a few draws sent to another mode decide the error, and this measure "
                "is not. The Gaussians' KL is exact and needs none.",
                md_table(header[:-1], fresh_summary),
            ]
            if fresh_summary
            else []
        ),
        "## Every sampler",
        *text,
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "steps_vs_quality" + ("_holdout" if args.holdout else "_third" if args.third else "")
    stem += f"_random_{args.random[0]}_{args.random[1]}" if args.random else ""
    if args.random_mixtures:
        stem += "_random_mixtures_{}_{}".format(*args.random_mixtures)
    # a run of some problems, some peers or some of the suite's schedules names them, and
    # schedules outside the suite's get files of their own, so that no run overwrites the file
    # of another (or the suite's)
    stem += "".join("_" + _slug(name) for name in args.problems or [])
    missing = [s for s in SUITE_SCHEDULES if s not in schedules]
    named = schedules if missing else [s for s in schedules if s not in SUITE_SCHEDULES]
    if named:
        stem += "_" + "_".join(named)
    if args.peers is not None:
        stem += "_peers_" + "_".join(_slug(label) for label in args.peers)
    if args.mix_samples != MIX_SAMPLES:
        stem += f"_{args.mix_samples}_draws"
    (args.out / f"{stem}.md").write_text("\n\n".join(md) + "\n")
    labels = [default.label] + ([tuned_method.label] if tuned_method else [])
    plot_ratios(all_records, labels, schedules, args.out / f"{stem}.png")
    print(table)
    if fresh_summary:
        print(f"On {args.fresh_samples} fresh draws:\n" + md_table(header[:-1], fresh_summary))
    print(f"{elapsed:.0f} s; wrote {args.out / stem}.md and .png")
    return 0


def plot_ratios(records: Sequence[dict], labels: Sequence[str], schedules: Sequence[str],
                path: Path) -> None:  # fmt: skip
    """Ours / best peer against the NFE: one panel per schedule, one colour per problem, solid
    for the default and dashed for the tuned grid; below the line at 1 ours wins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["problem"] for r in records))
    fig, axes = plt.subplots(1, len(schedules), figsize=(5 * len(schedules), 4.5), squeeze=False)
    for ax, schedule in zip(axes[0], schedules, strict=True):
        for i, name in enumerate(names):
            group = [r for r in records if (r["problem"], r["schedule"]) == (name, schedule)]
            for label, style in zip(labels, ("-", "--"), strict=False):
                points = []
                for b in NFES:
                    me = next((r for r in group if r["solver"] == label and r["budget"] == b), None)
                    peer = _best(group, b, mine=False)
                    if me and me["error"] is not None and peer:
                        points.append((b, me["error"] / peer["error"]))
                if points:
                    ax.plot(*zip(*points, strict=True), style, color=f"C{i}", marker="o",
                            label=name if style == "-" else None)  # fmt: skip
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(xscale="log", yscale="log", title=f"{schedule}: ours / best peer (dashed: tuned)",
               xlabel="NFE", xticks=list(NFES), xticklabels=list(map(str, NFES)))  # fmt: skip
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the NFE ticks
        ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
        for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            set_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 0.5, not 5 x 10^-1
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
