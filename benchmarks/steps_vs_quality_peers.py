"""Peers for the steps-vs-quality benchmarks: diffusers' schedulers and k-diffusion's samplers in
all their sensible settings, driven through any score_fn(x, t) on any of the package's SDEs.

Every peer is `run(score_fn, sde, x_T, steps, seed) -> (samples, counted NFE)` on the SDEs that
its `applies` accepts, so the oracle suite (steps_vs_quality.py) and the trained networks
(steps_vs_quality_trained.py) hand them the very score function our own solvers get, and budgets
are matched on counted evaluations.

- diffusers: the scheduler runs on the SDE's DDPM betas (a DiscreteVPSDE's own, or the continuous
  schedule discretised on N = 1000 steps, `VPFamilySDE.discretize`); its eps-model at timestep k
  (fractional where its grid puts it) is the score's eps at t = (k + 1) T / N. An SDE without
  betas (VE, sub-VP) gets diffusers' EDM schedulers instead, in k-diffusion's coordinates (below)
  on the same noise levels, fed the denoiser through their eps preconditioning.
- k-diffusion: its samplers take a denoiser D(x, sigma) in the variance-exploding coordinates
  x / gamma with noise level sigma = sigma_t / gamma_t; D is the score's Tweedie x0 at the t whose
  log-SNR is -log sigma. Its grids run from the SDE's noise level at T down to that at t_min,
  then to 0, and the final step to 0 is its denoising step.

k-diffusion is not a dependency of this package. Install it without its training extras, which
the samplers do not use:

    pip install --no-deps k-diffusion torchsde trampoline   # + scipy, torchdiffeq, tqdm (ours)

`import k_diffusion` imports its training utilities (torchvision, skimage, ...); only its
`sampling.py` is loaded here, with the one helper it takes from them (`utils.append_dims`).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sde_diffusion import SDE, DiscreteVPSDE
from sde_diffusion._tensor import append_dims
from sde_diffusion.parametrize import tweedie_x0
from sde_diffusion.sde import ScoreFn, VPFamilySDE
from sde_diffusion.solvers import sample

#: diffusers' training steps for SDEs that are not discrete already
TRAIN_STEPS = 1000
#: on SDEs without betas (VE, sub-VP: noise level 1e-4 at t_min, where the VP family has
#: 0.006-0.03), the sigma-grid peers also end at EDM's default sigma_min and at 0.01 (VE's own
#: sigma_min), the ends a user of those samplers would pick
SIGMA_MINS = (0.002, 0.01)
#: the benchmarks' seeds for x_T and for the fresh draws that re-measure each best peer, apart
#: from every other seed there: the default's pilot (pilot.PILOT_SEED and the next; on its own
#: draws the default would be judged where it was chosen), the stochastic samplers' noise (0:
#: x_T equal to the first noise would correlate the two), the problems and tune_grid's pilots
#: (below 2000)
X_T_SEED, FRESH_SEED = 7001, 7002

__all__ = [
    "FRESH_SEED",
    "X_T_SEED",
    "Peer",
    "diffusers_peers",
    "has_betas",
    "k_diffusion_peers",
    "load_k_diffusion_sampling",
    "steps_for_budget",
]


@dataclass(frozen=True)
class Peer:
    """A peer sampler: run(score_fn, sde, x_T, steps, seed) -> (samples, counted NFE)."""

    label: str
    run: Callable[[ScoreFn, SDE, Tensor, int, int], tuple[Tensor, int]]
    applies: Callable[[SDE], bool] = lambda sde: True  # the SDEs it can run on


def has_betas(sde: SDE) -> bool:
    """Whether diffusers' DDPM-beta schedulers can run on `sde` (the VP family)."""
    return isinstance(sde, VPFamilySDE)


def _betas(sde: SDE) -> Tensor:
    if isinstance(sde, DiscreteVPSDE):
        return sde.betas
    if not has_betas(sde):
        raise ValueError(f"peers need a VP-family SDE (DDPM betas), got {type(sde).__name__}")
    return sde.discretize(TRAIN_STEPS).betas


def _diffusers(cls_name: str, label: str, **settings: object) -> Peer:
    """diffusers' `cls_name` scheduler with `settings` on the SDE's betas (eps prediction,
    no clipping or thresholding)."""
    import diffusers

    cls = getattr(diffusers, cls_name)
    accepted = inspect.signature(cls.__init__).parameters
    base = {"prediction_type": "epsilon", "clip_sample": False, "thresholding": False}
    base = {k: v for k, v in base.items() if k in accepted}
    takes_generator = "generator" in inspect.signature(cls.step).parameters

    def run(score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int, seed: int) -> tuple[Tensor, int]:
        betas = _betas(sde)
        n = betas.numel()
        sched = cls(num_train_timesteps=n, trained_betas=betas.numpy(), **base, **settings)
        sched.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed)
        x, nfe = x_T * sched.init_noise_sigma, 0
        for k in sched.timesteps:
            t = ((torch.as_tensor(k, dtype=torch.float64) + 1) * (sde.T / n)).to(x.device, x.dtype)
            t = t.expand(x.shape[0])
            x_in = sched.scale_model_input(x, k)
            eps = -append_dims(sde.marginal(t)[1], x.ndim) * score_fn(x_in, t)
            nfe += 1
            extra = {"generator": g} if takes_generator else {}
            x = sched.step(eps, k, x, **extra).prev_sample
        return x, nfe

    return Peer("diffusers: " + label, run, has_betas)


def _diffusers_edm(
    cls_name: str, label: str, sigma_min: float | None = None, **settings: object
) -> Peer:
    """diffusers' EDM scheduler `cls_name` with `settings` on an SDE without betas: k-diffusion's
    coordinates and noise levels (`edm_sigmas`), final step to 0; the denoiser D enters through
    the scheduler's eps preconditioning D = c_skip x + c_out F (Karras et al. 2022, Table 1), so
    F = (D - c_skip x) / c_out."""
    import diffusers

    cls = getattr(diffusers, cls_name)

    def run(score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int, seed: int) -> tuple[Tensor, int]:
        s_min, s_max = edm_sigmas(sde, sigma_min=sigma_min)
        sched = cls(sigma_min=s_min, sigma_max=s_max, final_sigmas_type="zero", **settings)
        sched.set_timesteps(steps)
        denoise, s_data = edm_denoiser(score_fn, sde), sched.config.sigma_data
        x = ve_coordinates(sde, x_T)
        for k in sched.timesteps:
            sched.scale_model_input(x, k)  # only to set the scheduler's step index
            sigma = sched.sigmas[sched.step_index].to(x)
            c_skip = s_data**2 / (sigma**2 + s_data**2)
            c_out = sigma * s_data / (sigma**2 + s_data**2).sqrt()
            f = (denoise(x, sigma.expand(x.shape[0])) - c_skip * x) / c_out
            x = sched.step(f, k, x).prev_sample
        return x, len(sched.timesteps)

    return Peer("diffusers: " + label, run, lambda sde: not has_betas(sde))


def _sigma_min_variants(make: Callable[[float | None], Peer]) -> list[Peer]:
    """make(None), whose noise levels run down to the SDE's at t_min, and make(s) for s in
    SIGMA_MINS, down to s instead, on the SDEs without betas whose level at t_min lies below s."""
    peers = [make(None)]
    for s in SIGMA_MINS:
        p = make(s)

        def applies(sde: SDE, p: Peer = p, s: float = s) -> bool:
            return p.applies(sde) and not has_betas(sde) and edm_sigmas(sde)[0] < s

        peers.append(Peer(f"{p.label}, sigma_min {s:g}", p.run, applies))
    return peers


def diffusers_peers() -> list[Peer]:
    """DPM-Solver++ (2M, 3M), UniPC (2, 3), DEIS (2, 3) on their default ("linspace"),
    "trailing", Karras and (DPM-Solver++) Lu-lambda grids, final step to sigma = 0; DDIM; Euler and
    Heun on trailing and Karras grids. Without betas: the EDM DPM-Solver++ (2M, 3M) and Euler on
    Karras and exponential noise levels."""
    grids: dict[str, dict[str, object]] = {
        "linspace": {},
        "trailing": {"timestep_spacing": "trailing"},
        "karras": {"use_karras_sigmas": True},
    }
    peers = []
    for order in (2, 3):
        for grid, kw in {**grids, "lu": {"use_lu_lambdas": True}}.items():
            peers.append(
                _diffusers(
                    "DPMSolverMultistepScheduler",
                    f"DPM++{order}M {grid}",
                    solver_order=order,
                    final_sigmas_type="zero",
                    **kw,
                )
            )
        for grid, kw in grids.items():
            peers.append(
                _diffusers(
                    "UniPCMultistepScheduler",
                    f"UniPC{order} {grid}",
                    solver_order=order,
                    final_sigmas_type="zero",
                    **kw,
                )
            )
            peers.append(
                _diffusers(
                    "DEISMultistepScheduler", f"DEIS{order} {grid}", solver_order=order, **kw
                )
            )
    for grid in ("linspace", "trailing"):
        peers.append(_diffusers("DDIMScheduler", f"DDIM {grid}", **grids[grid]))
    for name in ("Euler", "Heun"):
        for grid in ("trailing", "karras"):
            peers.append(_diffusers(f"{name}DiscreteScheduler", f"{name} {grid}", **grids[grid]))
    for schedule in ("karras", "exponential"):
        for order in (2, 3):
            peers += _sigma_min_variants(
                functools.partial(
                    _diffusers_edm,
                    "EDMDPMSolverMultistepScheduler",
                    f"EDM DPM++{order}M {schedule}",
                    solver_order=order,
                    sigma_schedule=schedule,
                )
            )
        peers += _sigma_min_variants(
            functools.partial(
                _diffusers_edm,
                "EDMEulerScheduler",
                f"EDM Euler {schedule}",
                sigma_schedule=schedule,
            )
        )
    return peers


def load_k_diffusion_sampling() -> types.ModuleType:
    """k-diffusion's `sampling` module, loaded from its file with a stand-in for the one helper
    it imports from `k_diffusion.utils` (whose own imports need torchvision and more)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "k-diffusion is not installed: pip install --no-deps k-diffusion torchsde trampoline"
        )
    if "_kdiff.sampling" in sys.modules:
        return sys.modules["_kdiff.sampling"]
    package = types.ModuleType("_kdiff")
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("_kdiff.utils")
    utils.append_dims = append_dims
    sys.modules.update({"_kdiff": package, "_kdiff.utils": utils})
    path = f"{package.__path__[0]}/sampling.py"
    sampling_spec = importlib.util.spec_from_file_location("_kdiff.sampling", path)
    module = importlib.util.module_from_spec(sampling_spec)
    sys.modules["_kdiff.sampling"] = module
    sampling_spec.loader.exec_module(module)
    return module


def edm_denoiser(score_fn: ScoreFn, sde: SDE) -> Callable[[Tensor, Tensor], Tensor]:
    """D(x, sigma): the score's Tweedie x0 in the coordinates x / gamma with noise level
    sigma = sigma_t / gamma_t = exp(-lambda_t), i.e. at t = t_from_log_snr(-log sigma)."""

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        t = sde.t_from_log_snr(-torch.log(sigma))
        gamma = append_dims(sde.marginal(t)[0], x.ndim)
        x_t = gamma * x
        return tweedie_x0(x_t, t, score_fn(x_t, t), sde)

    return denoiser


def edm_sigmas(
    sde: SDE, dtype: torch.dtype = torch.float64, sigma_min: float | None = None
) -> tuple[float, float]:
    """(noise level at t_min, or sigma_min; noise level at T) in the coordinates x / gamma."""
    lam = sde.log_snr(torch.tensor([sde.t_min, sde.T], dtype=dtype))
    return sigma_min or float(torch.exp(-lam[0])), float(torch.exp(-lam[1]))


def ve_coordinates(sde: SDE, x_T: Tensor) -> Tensor:
    """x_T / gamma_T: a prior draw in the coordinates x / gamma of `edm_denoiser`."""
    gamma_T = sde.marginal(torch.as_tensor(sde.T, dtype=x_T.dtype, device=x_T.device))[0]
    return x_T / gamma_T


def _k_diffusion(sampler: str, grid: str, sigma_min: float | None = None) -> Peer:
    """k-diffusion's `sample_<sampler>` on its `get_sigmas_<grid>` grid (then 0)."""
    k = load_k_diffusion_sampling()
    fn = getattr(k, f"sample_{sampler}")
    takes_noise = "noise_sampler" in inspect.signature(fn).parameters

    def run(score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int, seed: int) -> tuple[Tensor, int]:
        nfe = 0
        denoise = edm_denoiser(score_fn, sde)

        def model(x: Tensor, sigma: Tensor) -> Tensor:
            nonlocal nfe
            nfe += 1
            return denoise(x, sigma)

        s_min, s_max = edm_sigmas(sde, sigma_min=sigma_min)
        sigmas = getattr(k, f"get_sigmas_{grid}")(steps, s_min, s_max).to(x_T.device, x_T.dtype)
        extra = {}
        if takes_noise:
            g = torch.Generator().manual_seed(seed)
            extra["noise_sampler"] = lambda s, s_next: torch.randn(
                x_T.shape, generator=g, dtype=x_T.dtype
            ).to(x_T.device)
        x = fn(model, ve_coordinates(sde, x_T), sigmas, disable=True, **extra)
        return x, nfe

    return Peer(f"k-diffusion: {sampler} {grid}", run)


def k_diffusion_peers() -> list[Peer]:
    """dpmpp_2m, dpmpp_3m_sde, lms, heun and euler on Karras (rho = 7) and exponential (uniform
    log-SNR) grids (without betas also down to SIGMA_MINS)."""
    return [
        peer
        for s in ("dpmpp_2m", "dpmpp_3m_sde", "lms", "heun", "euler")
        for g in ("karras", "exponential")
        for peer in _sigma_min_variants(functools.partial(_k_diffusion, s, g))
    ]


def solver_steps(
    score_fn: ScoreFn, sde: SDE, shape: tuple[int, ...], solver: str, budget: int
) -> int | None:
    """The largest `steps` of `sample(..., solver, steps=steps)` whose counted NFE (one sample
    of `shape`, the final Tweedie step included) fits the budget; heun's last step is Euler, so
    its steps are not the budget's half less one."""

    @functools.cache
    def nfe(steps: int) -> int:
        return sample(score_fn, sde, (1, *shape), solver, steps=steps, return_info=True).nfe

    return steps_for_budget(nfe, budget)


def steps_for_budget(nfe: Callable[[int], int], budget: int) -> int | None:
    """The largest step count whose counted NFE, nfe(steps), fits the budget: a linear guess
    from 2 and 3 steps (k-diffusion's dpmpp_3m_sde cannot run one), walked to the exact answer;
    None if no step count fits. No more than `budget` steps are tried (diffusers refuses more
    inference steps than training steps). `nfe` should cache: it is called repeatedly."""
    if budget < 3 or nfe(2) > budget:
        return 1 if nfe(1) <= budget else None
    per_step = max(nfe(3) - nfe(2), 1)
    steps = min(budget, max(2, (budget - nfe(2)) // per_step + 2))
    while steps > 2 and nfe(steps) > budget:
        steps -= 1
    while steps < budget and nfe(steps + 1) <= budget:
        steps += 1
    return steps
