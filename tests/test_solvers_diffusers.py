"""Equivalence with an independent implementation: diffusers' DDPM, DDIM and DPM-Solver++
schedulers, step for step on the same eps-function (a fixed random smooth one, and a random
UNet2DModel), timesteps, x_T and noise (float64).

Mapping: diffusers' timestep index k is step k + 1 of the chain, our continuous t = (k + 1) T / N;
our grid is the explicit tensor of those times, and diffusers' final step (to alpha_bar = 1, or to
sigma = 0 for DPM-Solver++) is our final Tweedie step `sample(denoise=True)`.

diffusers keeps its schedule in float32 (trained_betas are cast to float32 and cumprod'ed in
float32; DPMSolverMultistepScheduler stores its sigmas in float32 and rounds the sample to float32
inside step()). To compare the algorithms at float64 precision the tests give diffusers the
float64 alphas_cumprod of the same betas and let its float32 upcast be a float64 one; the update
formulas that run are diffusers' own.
"""

from __future__ import annotations

import types

import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm_module
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
)

from sde_diffusion import DiscreteVPSDE, model_score_fn, sde_from_scheduler_config
from sde_diffusion.solvers import sample

N = 1000
# float32-representable betas, so that diffusers' float32 copy of them is exact
BETAS = torch.linspace(1e-4, 0.02, N, dtype=torch.float32).double()
SDE = DiscreteVPSDE(BETAS)
_W = torch.randn(2, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
TOL = 1e-9  # float64 round-off is ~1e-14 here; the bar is 1e-6


def _x_T(batch: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _t_of(k: torch.Tensor) -> torch.Tensor:
    """Our continuous time of diffusers' timestep index k."""
    return (k.to(torch.float64) + 1) * (SDE.T / N)


def _eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed random smooth noise prediction eps(x, t) (cheap: the DDPM chain calls it 1000
    times; the oracle's exact eps is used by the UNet-free tests in test_solvers_expint.py)."""
    return torch.tanh(x @ _W + 3 * t[:, None] - 1) + 0.1 * x


def _score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -_eps(x, t) / SDE.marginal(t)[1][:, None]


def _eps_of_index(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """eps as a function of diffusers' discrete timestep."""
    return _eps(x, _t_of(k).expand(x.shape[0]))


def _diffusers_loop(scheduler, x_T: torch.Tensor, **step_kw) -> torch.Tensor:
    x = x_T.clone()
    for k in scheduler.timesteps:
        x = scheduler.step(_eps_of_index(x, k), k, x, **step_kw).prev_sample
    return x


def _ours(scheduler, x_T: torch.Tensor, solver: str, **kw):
    """Our sampler on diffusers' timesteps, with the same eps as a score."""
    return sample(_score, SDE, x_T, solver=solver, grid=_t_of(scheduler.timesteps), **kw)


def _scheduler(cls, **config):
    """A diffusers scheduler on BETAS predicting eps, with its schedule recomputed in float64."""
    s = cls(
        num_train_timesteps=N,
        trained_betas=BETAS.numpy(),
        prediction_type="epsilon",
        thresholding=False,
        **config,
    )
    s.betas = BETAS.clone()
    s.alphas = 1 - s.betas
    s.alphas_cumprod = torch.cumprod(s.alphas, 0)
    return s


class _Float64Torch(types.ModuleType):
    """torch, except that float32 means float64 (diffusers' DPM step() hard-codes the upcast)."""

    def __getattr__(self, name: str):
        return torch.float64 if name == "float32" else getattr(torch, name)


@pytest.fixture
def dpm_float64(monkeypatch):
    monkeypatch.setattr(dpm_module, "torch", _Float64Torch("torch"))


def _dpm_scheduler(n: int, order: int) -> DPMSolverMultistepScheduler:
    s = _scheduler(DPMSolverMultistepScheduler, solver_order=order, algorithm_type="dpmsolver++")
    s.set_timesteps(n)
    abar = s.alphas_cumprod
    sig = ((1 - abar) / abar).sqrt()[s.timesteps]
    s.sigmas = torch.cat([sig, sig.new_zeros(1)])  # final_sigmas_type="zero"
    return s


@pytest.mark.parametrize(
    ("variance", "steps"),
    [
        ("fixed_small", N),  # the full DDPM chain t_N, ..., t_1, then x_1 -> x_0
        ("fixed_large", N),
        ("fixed_small", 50),
        ("fixed_large", 50),
    ],
)
def test_ddpm_matches_diffusers(variance, steps):
    s = _scheduler(DDPMScheduler, variance_type=variance, clip_sample=False)
    s.set_timesteps(steps)
    # both draw their noise from a generator seeded alike, one draw per step in the same order
    # (diffusers at every step but the last, k = 0, which is our denoising step)
    x = _diffusers_loop(s, _x_T(), generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    ours = _ours(s, _x_T(), "ddpm", variance=variance, generator=gen)
    assert (ours - x).abs().max() <= TOL


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_ddim_matches_diffusers(eta):
    s = _scheduler(DDIMScheduler, clip_sample=False, set_alpha_to_one=True)
    s.set_timesteps(40)
    # diffusers' last step (to alpha_bar = 1) has variance 0: its extra draw is unused
    gen = torch.Generator().manual_seed(3) if eta else None
    x = _diffusers_loop(s, _x_T(), eta=eta, generator=gen)
    ours = _ours(s, _x_T(), "ddim", eta=eta, generator=torch.Generator().manual_seed(3))
    assert (ours - x).abs().max() <= TOL


@pytest.mark.parametrize("steps", [10, 25])
def test_dpm_solver_2m_matches_diffusers(dpm_float64, steps):
    """2M step for step. diffusers' lower_order_final acts on its last step, to sigma = 0, which
    is our denoising step; our grid (diffusers' timesteps) itself runs at full order."""
    s = _dpm_scheduler(steps, order=2)
    x = _diffusers_loop(s, _x_T())
    res = _ours(s, _x_T(), "dpm_solver", order=2, lower_order_final=False, return_info=True)
    assert res.nfe == steps
    assert (res.samples - x).abs().max() <= TOL


# diffusers' DEIS takes np.log of 0-d tensors
@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")
@pytest.mark.parametrize(("order", "steps"), [(2, 10), (3, 10), (3, 25)])
def test_deis_is_our_multistep_on_eps(order, steps):
    """DEIS (Zhang & Chen 2023) integrates the Lagrange polynomial of eps in log(sigma / alpha)
    against d(sigma / alpha); with rho = e^{-lambda} that is our exponential integrator with
    prediction="noise", step for step (trailing timesteps, down to the first training step; both
    lower the order over the last two steps below 15, so 25 steps run at full order)."""
    s = _scheduler(DEISMultistepScheduler, solver_order=order, timestep_spacing="trailing")
    s.set_timesteps(steps)
    sig = ((1 - s.alphas_cumprod) / s.alphas_cumprod).sqrt()
    s.sigmas = torch.cat([sig[s.timesteps], sig[:1]])  # float64, to the first training step
    x = _diffusers_loop(s, _x_T())
    grid = _t_of(torch.cat([s.timesteps, s.timesteps.new_zeros(1)]))
    res = sample(_score, SDE, _x_T(), "dpm_solver", grid=grid, order=order, prediction="noise",
                 denoise=False, return_info=True)  # fmt: skip
    assert res.nfe == steps
    assert (res.samples - x).abs().max() <= TOL


def test_dpm_solver_3m_differs_from_diffusers_only_in_the_second_difference(dpm_float64):
    """diffusers' 3M weighs its second divided difference D2 ~ h^2 x0''/2 with the coefficient
    of h^2 x0'' (see expint._interpolant_step), so its 3M steps differ from ours by exactly
    gamma_t phi_3 D2: adding that to each of its 3M steps reproduces our sampler."""
    ours = _ours(
        _dpm_scheduler(20, order=3), _x_T(), "dpm_solver", order=3, lower_order_final=False
    )
    as_is = _diffusers_loop(_dpm_scheduler(20, order=3), _x_T())
    assert (ours - as_is).abs().max() > 1e-4  # the difference is real...

    fixed = _dpm_scheduler(20, order=3)
    third_order_update = fixed.multistep_dpm_solver_third_order_update

    def with_full_d2(model_output_list, *, sample, noise=None):
        i = fixed.step_index
        x_t = third_order_update(model_output_list, sample=sample, noise=noise)
        # diffusers' sigmas are sigma_t / alpha_t, so lambda = -log(sigma)
        lam = [-torch.log(fixed.sigmas[j]) for j in (i - 2, i - 1, i, i + 1)]
        h = lam[3] - lam[2]
        r0, r1 = (lam[2] - lam[1]) / h, (lam[1] - lam[0]) / h
        m2, m1, m0 = model_output_list[-3:]
        d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
        alpha_t = 1 / torch.sqrt(fixed.sigmas[i + 1] ** 2 + 1)
        phi_3 = (torch.expm1(-h) / h + 1) / h - 0.5
        return x_t - alpha_t * phi_3 * d2

    fixed.multistep_dpm_solver_third_order_update = with_full_d2
    assert (ours - _diffusers_loop(fixed, _x_T())).abs().max() <= TOL  # ...and it is that term


def test_dpm_solver_3m_with_half_d2_is_diffusers_3m(dpm_float64):
    """d2_weight=0.5 weighs D2 as diffusers does: its 3M step for step, with no patching."""
    ours = _ours(
        _dpm_scheduler(20, order=3), _x_T(), "dpm_solver", order=3, lower_order_final=False,
        d2_weight=0.5,
    )  # fmt: skip
    assert (ours - _diffusers_loop(_dpm_scheduler(20, order=3), _x_T())).abs().max() <= TOL


# ---- adapters: a diffusers UNet2DModel and scheduler configs ---------------------------------


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)  # diffusers initialises its weights from the global RNG
    return (
        UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
        )
        .double()
        .eval()
    )


@torch.no_grad()
def test_unet2d_dpm_solver_matches_diffusers_loop(dpm_float64):
    """A randomly initialised UNet2DModel sampled with our DPM-Solver++(2M) through
    model_score_fn(time_input='index') equals diffusers' own DPMSolverMultistepScheduler loop."""
    unet = _tiny_unet()
    s = _dpm_scheduler(8, order=2)
    sde = sde_from_scheduler_config(s.config)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x_T.clone()
    for k in s.timesteps:  # diffusers' own sampling loop
        x = s.step(unet(x, k).sample, k, x).prev_sample
    score_fn = model_score_fn(lambda x, t: unet(x, t).sample, sde, "eps", time_input="index")
    ours = sample(
        score_fn,
        sde,
        x_T,
        solver="dpm_solver",
        grid=_t_of(s.timesteps),
        lower_order_final=False,
    )
    assert ours.shape == x.shape
    assert (ours - x).abs().max() <= 1e-8


def test_readme_snippet_runs():
    """The README's example, as written there (a random UNet instead of a download)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from sde_diffusion import model_score_fn, sde_from_scheduler_config
    from sde_diffusion.solvers import sample

    unet = UNet2DModel(  # or a trained one: UNet2DModel.from_pretrained(...)
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    scheduler = DDPMScheduler()  # or the checkpoint's own: DDPMScheduler.from_pretrained(...)
    sde = sde_from_scheduler_config(scheduler.config)
    score_fn = model_score_fn(
        lambda x, t: unet(x, t).sample, sde, prediction="eps", time_input="index"
    )
    with torch.no_grad():
        images = sample(score_fn, sde, (4, 3, 8, 8), solver="dpm_solver", steps=20, seeds=range(4))

    assert images.shape == (4, 3, 8, 8) and bool(torch.isfinite(images).all())


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_sde_from_scheduler_config_matches_diffusers(schedule):
    kw = {"beta_start": 0.00085, "beta_end": 0.012} if schedule == "scaled_linear" else {}
    s = DDPMScheduler(num_train_timesteps=N, beta_schedule=schedule, **kw)
    chain = sde_from_scheduler_config(s.config).discretize(N)
    # diffusers computes in float32: agreement to float32 precision (cumprod: 1000 roundings)
    torch.testing.assert_close(chain.betas, s.betas.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        chain.alphas_cumprod, s.alphas_cumprod.double(), rtol=1e-5, atol=1e-9
    )
