"""The bad-input catalogue of the library (issue 14): every row is a call a user could make by
mistake, the exception it must raise and the key words its message must hold (the argument,
the bad value, the valid choices or range), so that no mistake is silent or cryptic."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch

from sde_diffusion import (
    VESDE,
    VPSDE,
    CosineVPSDE,
    DiscreteVPSDE,
    GaussianMixture,
    SubVPSDE,
    bits_per_dim,
    cfg_score_fn,
    classifier_guided_score_fn,
    ddpm_bound,
    get_sde,
    inpaint,
    load_model,
    load_score_fn,
    model_score_fn,
    ode_log_likelihood,
    sde_from_scheduler_config,
    time_grid,
    tune_grid,
    tweedie_x0,
)
from sde_diffusion.solvers import (
    SOLVERS,
    IncompatibleSDEError,
    _registry,
    ddim,
    ddpm,
    dpm_solver_pp,
    edm_heun,
    grids,
    sample,
)
from sde_diffusion.solvers.pilot import Candidate
from sde_diffusion.solvers.tuning import UntunableSolverError

SDE_ = VPSDE()
TARGET = GaussianMixture.ring(k=2, radius=1.0)
SCORE = TARGET.score_fn(SDE_)
X = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
DOWN = torch.linspace(1.0, 0.01, 5)  # a valid grid
UP = torch.linspace(0.01, 1.0, 5)  # the mistake of issue 14: silently all-NaN before
#: an index no machine has (on a CPU-only torch, cuda:7 as in the issue)
ABSENT_CUDA = f"cuda:{max(7, torch.cuda.device_count())}"


def sample_(
    score_fn: object = SCORE, sde: object = SDE_, shape_or_x_T: object = (3, 2), **kw: object
) -> object:
    """sample() of SCORE on SDE_ in a batch of 3 on 3 steps, but for what a row overrides."""
    kw.setdefault("steps", 3)
    return sample(score_fn, sde, shape_or_x_T, **kw)


def ddim_(
    score_fn: object = SCORE, sde: object = SDE_, x: object = X, ts: object = DOWN, **kw: object
) -> object:
    """DDIM called directly, as in issue 14, but for what a row overrides."""
    return ddim(score_fn, sde, x, ts, noise=None, **kw)


def mixture(**kw: object) -> GaussianMixture:
    """A valid two-component mixture in 2-D but for what `kw` replaces."""
    args = {"weights": [0.5, 0.5], "means": [[0.0, 0.0], [1.0, 1.0]], "covs": 1.0, **kw}
    return GaussianMixture(**args)


def inpaint_(**kw: object) -> object:
    args = {"x_known": X, "mask": torch.tensor([1, 0]), "steps": 2, **kw}
    return inpaint(SCORE, SDE_, **args)


def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    return torch.zeros_like(x)


def logits(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[0], 2, dtype=x.dtype)


def guided_float_label() -> object:
    guided = classifier_guided_score_fn(SCORE, logits, y=torch.tensor([0.5, 1.5, 0.0]))
    return guided(X, torch.full((3,), 0.5))


Case = tuple[str, Callable[[], object], type[Exception], tuple[str, ...]]

CASES: list[Case] = [
    # ---- a solver called directly: the registry checks its call as sample() does ----------
    ("solver: increasing grid", lambda: ddim_(ts=UP), ValueError, ("ts", "strictly decrease", "ts[0]=")),
    ("solver: grid with NaN", lambda: ddim_(ts=torch.tensor([1.0, float("nan"), 0.1])), ValueError, ("ts", "NaN")),
    ("solver: grid above T", lambda: ddim_(ts=torch.tensor([1.5, 0.5])), ValueError, ("ts", "(0, T = 1.0]", "1.5")),
    ("solver: grid reaching 0", lambda: ddim_(ts=torch.tensor([1.0, 0.0])), ValueError, ("ts", "(0, T = 1.0]", "0.0")),
    ("solver: 2-D grid", lambda: ddim_(ts=DOWN[None]), ValueError, ("ts", "1-D", "(1, 5)")),
    ("solver: one-point grid", lambda: ddim_(ts=DOWN[:1]), ValueError, ("ts", "at least 2 points")),
    ("solver: grid as a list", lambda: ddim_(ts=[1.0, 0.5]), TypeError, ("ts", "torch.Tensor", "list")),
    ("solver: integer state", lambda: ddim_(x=X.long()), ValueError, ("x.dtype", "floating-point", "torch.int64")),
    ("solver: state with NaN", lambda: ddim_(x=X * float("nan")), ValueError, ("x", "NaN")),
    ("solver: empty batch", lambda: ddim_(x=X[:0]), ValueError, ("x", "batch >= 1", "(0, 2)")),
    ("solver: state as a list", lambda: ddim_(x=[[0.0, 0.0]]), TypeError, ("x", "torch.Tensor", "list")),
    ("solver: sde None", lambda: ddim_(sde=None), TypeError, ("sde", "VPSDE", "VESDE", "None")),
    ("solver: SDE class, not instance", lambda: ddim_(sde=VPSDE), TypeError, ("sde", "SDE instance", "VPSDE")),
    ("solver: score_fn None", lambda: ddim_(score_fn=None), TypeError, ("score_fn", "callable", "None")),
    ("solver: misspelt parameter", lambda: dpm_solver_pp(SCORE, SDE_, X, DOWN, ordr=2), TypeError, ("'ordr'", "order", "method", "lower_order_final")),
    ("solver: eta above 1", lambda: ddim_(eta=2.0), ValueError, ("eta", "[0, 1]", "2.0")),
    ("solver: order 4", lambda: dpm_solver_pp(SCORE, SDE_, X, DOWN, order=4), ValueError, ("order", "(1, 2, 3)", "4")),
    ("solver: unknown method", lambda: dpm_solver_pp(SCORE, SDE_, X, DOWN, method="adams"), ValueError, ("method", "'adams'", "multistep", "singlestep")),
    ("solver: ddpm on VE", lambda: ddpm(SCORE, VESDE(), X, DOWN, noise=torch.randn_like), IncompatibleSDEError, ("ddpm", "variance-preserving", "VESDE")),
    ("solver: ddpm variance", lambda: ddpm(SCORE, SDE_, X, DOWN, noise=torch.randn_like, variance="learned"), ValueError, ("variance", "'learned'", "fixed_small", "fixed_large")),
    ("solver: heun S_churn < 0", lambda: edm_heun(SCORE, SDE_, X, DOWN, noise=torch.randn_like, S_churn=-1.0), ValueError, ("S_churn", ">= 0", "-1.0")),
    # ---- sample() -------------------------------------------------------------------------
    ("sample: seeds and generator", lambda: sample_(seeds=[1, 2, 3], generator=torch.Generator()), ValueError, ("seeds", "generator", "not both")),
    ("sample: sde None", lambda: sample_(sde=None), TypeError, ("sde", "VPSDE", "SubVPSDE", "get_sde", "None")),
    ("sample: score_fn None", lambda: sample_(score_fn=None), TypeError, ("score_fn", "callable", "None")),
    ("sample: shape (0, 2)", lambda: sample_(shape_or_x_T=(0, 2)), ValueError, ("shape", "positive integers", "(0, 2)")),
    ("sample: shape (-1, 2)", lambda: sample_(shape_or_x_T=(-1, 2)), ValueError, ("shape", "positive integers", "(-1, 2)")),
    ("sample: shape an int", lambda: sample_(shape_or_x_T=3), ValueError, ("shape", "sequence", "3")),
    ("sample: integer dtype", lambda: sample_(dtype=torch.int64), ValueError, ("dtype", "floating-point", "torch.int64")),
    ("sample: absent cuda device", lambda: sample_(device=ABSENT_CUDA), ValueError, ("device", repr(ABSENT_CUDA), "not available", "cpu")),
    ("sample: not a device", lambda: sample_(device="gpu"), ValueError, ("device", "'gpu'", "cpu", "cuda:N", "mps")),
    ("sample: misspelt parameter", lambda: sample_(solver="dpm_solver", ordr=2), TypeError, ("'ordr'", "order", "method", "lower_order_final")),
    ("sample: parameter of another solver", lambda: sample_(solver="euler_maruyama", S_churn=1.0), TypeError, ("'S_churn'", "noise_last")),
    ("sample: steps 0", lambda: sample_(steps=0), ValueError, ("steps", "positive integer", "0")),
    ("sample: steps -3", lambda: sample_(steps=-3), ValueError, ("steps", "positive integer", "-3")),
    ("sample: steps 2.5", lambda: sample_(steps=2.5), ValueError, ("steps", "positive integer", "2.5")),
    ("sample: steps None", lambda: sample_(steps=None), ValueError, ("steps", "positive integer", "None")),
    ("sample: t_end above T", lambda: sample_(t_end=5.0), ValueError, ("t_end=5.0", "T = 1.0")),
    ("sample: t_end 0", lambda: sample_(t_end=0.0), ValueError, ("t_end=0.0", "0 < t_end")),
    ("sample: unknown grid", lambda: sample_(grid="linear"), ValueError, ("grid", "'linear'", "uniform", "log_snr", "edm", "quadratic")),
    ("sample: increasing grid", lambda: sample_(grid=UP), ValueError, ("grid", "strictly decrease", "grid[0]=")),
    ("sample: grid tensor and t_end", lambda: sample_(solver="unipc", grid=UP.flip(0), t_end=0.1), ValueError, ("t_end=0.1", "explicit grid tensor", "one or the other")),
    ("sample: unknown solver", lambda: sample_(solver="rk45"), ValueError, ("solver", "'rk45'", "dpm_solver", "unipc", "heun")),
    ("sample: unknown denoise", lambda: sample_(denoise="heun"), ValueError, ("denoise", "'heun'", "True", "'tweedie'", "'trapezoid'")),
    ("Candidate: an end's old name", lambda: Candidate("unipc", "data", "log_snr", "trailing"), ValueError, ("end", "'trailing'", "t_min", "half", "full", "sigma_min")),
    ("Candidate: unknown last step", lambda: Candidate("unipc", "data", "log_snr", "half", final="jump"), ValueError, ("final", "'jump'", "tweedie", "trapezoid")),
    ("Candidate: unknown solver", lambda: Candidate("heun", "data", "log_snr", "half"), ValueError, ("solver", "'heun'", "dpm_solver", "unipc")),
    ("sample: solver a function", lambda: sample_(solver=ddim), TypeError, ("solver", "SolverSpec", "function")),
    ("sample: integer x_T", lambda: sample_(shape_or_x_T=X.long()), ValueError, ("x_T.dtype", "floating-point", "torch.int64")),
    ("sample: x_T with inf", lambda: sample_(shape_or_x_T=X / 0), ValueError, ("x_T", "NaN or inf")),
    ("sample: device other than x_T's", lambda: sample_(shape_or_x_T=X, device="meta"), ValueError, ("device 'meta'", "x_T on cpu")),
    ("sample: dtype other than x_T's", lambda: sample_(shape_or_x_T=X, dtype=torch.float64), ValueError, ("dtype torch.float64", "x_T of dtype torch.float32")),
    ("sample: too few seeds", lambda: sample_(seeds=[1, 2]), ValueError, ("2 seeds", "batch of 3")),
    ("sample: too few seeds for x_T", lambda: sample_(shape_or_x_T=X, solver="dpm_solver", seeds=[1]), ValueError, ("1 seeds", "batch of 3")),
    # ---- the Gaussian-mixture oracle ------------------------------------------------------
    ("mixture: weights sum to 0.5", lambda: GaussianMixture([0.25, 0.25], [[0.0], [1.0]], 1.0), ValueError, ("weights", "sum to 1", "[0.25, 0.25]", "0.5")),
    ("mixture: negative weight", lambda: mixture(weights=[1.5, -0.5]), ValueError, ("weights", "positive", "-0.5")),
    ("mixture: means not (K, D)", lambda: mixture(means=[0.0, 1.0]), ValueError, ("means", "(K, D)", "K = 2", "(2,)")),
    ("mixture: covs of the wrong shape", lambda: mixture(covs=torch.ones(3)), ValueError, ("covs", "(2, 2, 2)", "(3,)")),
    ("mixture: covs not positive definite", lambda: mixture(covs=torch.tensor([[1.0, -1.0], [1.0, 1.0]])), ValueError, ("covs", "positive definite", "component 0", "-1")),
    ("mixture: covs not symmetric", lambda: mixture(covs=torch.tensor([[[1.0, 0.5], [0.0, 1.0]]] * 2)), ValueError, ("covs", "symmetric", "component 0", "0.5")),
    ("mixture: covs with NaN", lambda: mixture(covs=float("nan")), ValueError, ("covs", "finite")),
    ("mixture: means with inf", lambda: mixture(means=[[0.0, 0.0], [float("inf"), 1.0]]), ValueError, ("means", "finite", "component 1", "[inf, 1.0]")),
    ("mixture: dims of another size", lambda: mixture(dims=(3,)), ValueError, ("dims", "(3,)", "D = 2")),
    ("mixture: ring std -1", lambda: GaussianMixture.ring(std=-1.0), ValueError, ("std", "> 0", "-1.0")),
    ("mixture: ring k 0", lambda: GaussianMixture.ring(k=0), ValueError, ("k", "positive integer", "0")),
    ("mixture: ring k 2.5", lambda: GaussianMixture.ring(k=2.5), ValueError, ("k", "positive integer", "2.5")),
    ("mixture: ring dim 1", lambda: GaussianMixture.ring(dim=1), ValueError, ("dim", ">= 2", "1")),
    ("mixture: ring radius nan", lambda: GaussianMixture.ring(radius=float("nan")), ValueError, ("radius", ">= 0", "nan")),
    ("mixture: random k 0", lambda: GaussianMixture.random(0, 2), ValueError, ("k", "positive integer", "0")),
    ("mixture: sample 0", lambda: TARGET.sample(0), ValueError, ("n", "positive integer", "0")),
    ("mixture: sample component 5", lambda: TARGET.sample(4, component=5), ValueError, ("component", "[0, 2)", "5")),
    # ---- the SDEs -------------------------------------------------------------------------
    ("get_sde: unknown name", lambda: get_sde("vpp"), ValueError, ("SDE", "'vpp'", "vp", "vp_cosine", "subvp", "ve", "ddpm")),
    ("get_sde: parameter of another SDE", lambda: get_sde("vp", sigma_min=0.1), TypeError, ("'sigma_min'", "beta_min", "beta_max", "T")),
    ("get_sde: unknown ddpm schedule", lambda: get_sde("ddpm", schedule="cosine"), ValueError, ("ddpm schedule", "'cosine'", "linear", "scaled_linear")),
    ("VPSDE: beta_min < 0", lambda: VPSDE(beta_min=-1.0), ValueError, ("beta_min", "> 0", "-1.0")),
    ("VPSDE: beta_max < beta_min", lambda: VPSDE(beta_min=1.0, beta_max=0.5), ValueError, ("beta_max", ">= beta_min = 1.0", "0.5")),
    ("VPSDE: T 0", lambda: VPSDE(T=0.0), ValueError, ("T", "(0, inf)", "0.0")),
    ("SubVPSDE: T -1", lambda: SubVPSDE(T=-1.0), ValueError, ("T", "(0, inf)", "-1.0")),
    ("VESDE: sigma_min 0", lambda: VESDE(sigma_min=0.0), ValueError, ("sigma_min", "> 0", "0.0")),
    ("VESDE: sigma_max <= sigma_min", lambda: VESDE(sigma_min=1.0, sigma_max=0.5), ValueError, ("sigma_max", "sigma_min = 1.0", "0.5")),
    ("CosineVPSDE: T 1", lambda: CosineVPSDE(T=1.0), ValueError, ("T", "(0, 1.0)", "1.0")),
    ("DiscreteVPSDE: no betas", lambda: DiscreteVPSDE([]), ValueError, ("betas", "at least one")),
    ("DiscreteVPSDE: negative beta", lambda: DiscreteVPSDE([-0.1, 0.2]), ValueError, ("betas", "(0, 1)", "-0.1")),
    ("DiscreteVPSDE: beta 1", lambda: DiscreteVPSDE([0.5, 1.0]), ValueError, ("betas", "(0, 1)", "1.0")),
    ("DiscreteVPSDE.ddpm: N 0", lambda: DiscreteVPSDE.ddpm(N=0), ValueError, ("N", "positive integer", "0")),
    ("VPSDE.discretize: N 0", lambda: SDE_.discretize(0), ValueError, ("N", "positive integer", "0")),
    # ---- time grids and tuned grids -------------------------------------------------------
    ("time_grid: unknown kind", lambda: time_grid(SDE_, 5, "cubic"), ValueError, ("grid", "'cubic'", "uniform", "quadratic")),
    ("time_grid: steps 0", lambda: time_grid(SDE_, 0), ValueError, ("steps", "positive integer", "0")),
    ("time_grid: t_end above t_start", lambda: time_grid(SDE_, 5, t_end=0.9, t_start=0.5), ValueError, ("t_end=0.9", "t_start=0.5", "0 < t_end < t_start")),
    ("time_grid: rho 0", lambda: time_grid(SDE_, 5, "edm", rho=0.0), ValueError, ("rho", "> 0", "0.0")),
    ("time_grid: sde None", lambda: time_grid(None, 5), TypeError, ("sde", "VPSDE", "None")),
    ("tune_grid: stochastic solver", lambda: tune_grid(SCORE, SDE_, "ddpm"), UntunableSolverError, ("'ddpm'", "dpm_solver", "unipc")),
    ("tune_grid: trials 0", lambda: tune_grid(SCORE, SDE_, trials=0), ValueError, ("trials", "positive integer", "0")),
    ("tune_grid: steps 0", lambda: tune_grid(SCORE, SDE_, steps=0), ValueError, ("steps", "positive integer", "0")),
    ("tune_grid: misspelt parameter", lambda: tune_grid(SCORE, SDE_, "unipc", ordr=2), TypeError, ("'ordr'", "order", "lower_order_final")),
    ("tune_grid: pilot shape (0, 2)", lambda: tune_grid(SCORE, SDE_, pilot=(0, 2)), ValueError, ("pilot", "positive integers", "(0, 2)")),
    ("tune_grid: integer pilot", lambda: tune_grid(SCORE, SDE_, pilot=X.long()), ValueError, ("pilot.dtype", "torch.int64")),
    # ---- parametrisations -----------------------------------------------------------------
    ("model_score_fn: unknown prediction", lambda: model_score_fn(model, SDE_, "epsilon"), ValueError, ("prediction", "'epsilon'", "eps", "x0", "v", "score")),
    ("model_score_fn: unknown time_input", lambda: model_score_fn(model, SDE_, time_input="step"), ValueError, ("time_input", "'step'", "t", "index", "sigma")),
    ("model_score_fn: index without N", lambda: model_score_fn(model, SDE_, time_input="index"), ValueError, ("num_train_timesteps", "DiscreteVPSDE")),
    ("model_score_fn: N 0", lambda: model_score_fn(model, SDE_, time_input="index", num_train_timesteps=0), ValueError, ("num_train_timesteps", "positive integer", "0")),
    ("model_score_fn: model None", lambda: model_score_fn(None, SDE_), TypeError, ("model", "callable", "None")),
    ("tweedie_x0: sde None", lambda: tweedie_x0(X, torch.full((3,), 0.5), X, None), TypeError, ("sde", "VPSDE", "None")),
    ("scheduler config: unknown beta_schedule", lambda: sde_from_scheduler_config({"beta_schedule": "cosine"}), ValueError, ("beta_schedule", "'cosine'", "linear", "scaled_linear", "squaredcos_cap_v2")),
    ("scheduler config: 0 timesteps", lambda: sde_from_scheduler_config({"num_train_timesteps": 0}), ValueError, ("num_train_timesteps", "positive integer", "0")),
    ("scheduler config: not a mapping", lambda: sde_from_scheduler_config(["linear"]), TypeError, ("config", "mapping", "list")),
    # ---- guidance and inpainting ----------------------------------------------------------
    ("cfg: unknown convention", lambda: cfg_score_fn(model, SDE_, 0, 2, 1.0, convention="dg"), ValueError, ("convention", "'dg'", "lerp", "ho")),
    ("cfg: scale nan", lambda: cfg_score_fn(model, SDE_, 0, 2, float("nan")), ValueError, ("scale", "finite", "nan")),
    ("cfg: unknown prediction", lambda: cfg_score_fn(model, SDE_, 0, 2, 1.0, prediction="eps0"), ValueError, ("prediction", "'eps0'", "x0", "v")),
    ("classifier guidance: unknown output", lambda: classifier_guided_score_fn(SCORE, logits, 0, output="probs"), ValueError, ("output", "'probs'", "logits", "log_prob")),
    ("classifier guidance: classifier None", lambda: classifier_guided_score_fn(SCORE, None, 0), TypeError, ("classifier", "callable", "None")),
    ("classifier guidance: float labels", guided_float_label, ValueError, ("labels", "integer", "torch.float32", "(3,)")),
    ("inpaint: mask of another shape", lambda: inpaint_(mask=torch.ones(3)), ValueError, ("mask", "(3,)", "(3, 2)", "(2,)")),
    ("inpaint: mask not binary", lambda: inpaint_(mask=torch.tensor([1.0, 0.5])), ValueError, ("mask", "binary", "0.5")),
    ("inpaint: unknown solver", lambda: inpaint_(solver="rk45"), ValueError, ("solver", "'rk45'", "euler_maruyama", "pc")),
    ("inpaint: misspelt parameter", lambda: inpaint_(solver="pc", snrr=0.1), TypeError, ("'snrr'", "snr", "n_corrector")),
    ("inpaint: resample 0", lambda: inpaint_(resample=0), ValueError, ("resample", "positive integer", "0")),
    ("inpaint: x_known a list", lambda: inpaint_(x_known=[[0.0, 1.0]]), TypeError, ("x_known", "torch.Tensor", "list")),
    ("inpaint: sde None", lambda: inpaint(SCORE, None, X, torch.tensor([1, 0])), TypeError, ("sde", "VPSDE", "None")),
    # ---- likelihoods ----------------------------------------------------------------------
    ("ode_log_likelihood: unknown divergence", lambda: ode_log_likelihood(X, SDE_, SCORE, divergence="trace"), ValueError, ("divergence", "'trace'", "exact", "hutchinson")),
    ("ode_log_likelihood: unknown probe", lambda: ode_log_likelihood(X, SDE_, SCORE, divergence="hutchinson", probe="uniform"), ValueError, ("probe", "'uniform'", "rademacher", "gaussian")),
    ("ode_log_likelihood: num_probes 0", lambda: ode_log_likelihood(X, SDE_, SCORE, divergence="hutchinson", num_probes=0), ValueError, ("num_probes", "positive integer", "0")),
    ("ode_log_likelihood: t_eps at T", lambda: ode_log_likelihood(X, SDE_, SCORE, t_eps=1.0), ValueError, ("t_eps", "[0, T = 1.0)", "1.0")),
    ("ode_log_likelihood: integer x", lambda: ode_log_likelihood(X.long(), SDE_, SCORE), ValueError, ("x.dtype", "floating-point", "torch.int64")),
    ("ode_log_likelihood: sde None", lambda: ode_log_likelihood(X, None, SCORE), TypeError, ("sde", "VPSDE", "None")),
    ("bits_per_dim: num_dims 0", lambda: bits_per_dim(torch.zeros(3), 0), ValueError, ("num_dims", "positive integer", "0")),
    ("bits_per_dim: bin_width < 0", lambda: bits_per_dim(torch.zeros(3), 2, bin_width=-1.0), ValueError, ("bin_width", "> 0", "-1.0")),
    ("ddpm_bound: VE SDE", lambda: ddpm_bound(X, VESDE(), SCORE, 10), ValueError, ("sde", "VP-family", "VESDE")),
    ("ddpm_bound: num_steps 1", lambda: ddpm_bound(X, SDE_, SCORE, 1), ValueError, ("num_steps", ">= 2", "1")),
    ("ddpm_bound: num_steps needed", lambda: ddpm_bound(X, SDE_, SCORE), ValueError, ("num_steps", "DiscreteVPSDE")),
    ("ddpm_bound: unknown decoder", lambda: ddpm_bound(X, SDE_, SCORE, 10, decoder="bernoulli"), ValueError, ("decoder", "'bernoulli'", "gaussian", "discretized")),
    # ---- checkpoints ----------------------------------------------------------------------
    ("load_score_fn: no checkpoint", lambda: load_score_fn("no/such/run.safetensors"), FileNotFoundError, ("no checkpoint", "no/such/run.safetensors")),
    ("load_model: no checkpoint", lambda: load_model("no/such/run.safetensors"), FileNotFoundError, ("no checkpoint", "no/such/run.safetensors")),
]  # fmt: skip


@pytest.mark.parametrize(
    "call, error, words", [pytest.param(c, e, w, id=i) for i, c, e, w in CASES]
)
def test_bad_input_gets_a_clear_error(
    call: Callable[[], object], error: type[Exception], words: tuple[str, ...]
) -> None:
    with pytest.raises(error) as info:
        call()
    missing = [w for w in words if w not in str(info.value)]
    assert not missing, f"{type(info.value).__name__}: {info.value} lacks {missing}"


def test_the_catalogue_is_large_and_its_ids_unique() -> None:
    ids = [case[0] for case in CASES]
    assert len(ids) >= 45 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_called_directly_refuses_an_increasing_grid(name: str) -> None:
    spec = SOLVERS[name]
    noise = {"noise": torch.randn_like} if spec.stochastic else {}
    with pytest.raises(ValueError, match=r"ts must strictly decrease"):
        spec.fn(SCORE, SDE_, X, UP, **noise)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_checked_solvers_keep_their_name_signature_and_docstring(name: str) -> None:
    spec = SOLVERS[name]
    assert spec.unchecked is not None and spec.fn is not spec.unchecked
    assert spec.fn.__name__ == spec.unchecked.__name__
    assert spec.fn.__doc__ == spec.unchecked.__doc__
    assert inspect.signature(spec.fn) == inspect.signature(spec.unchecked)


def test_sample_checks_an_explicit_grid_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """sample() checks the grid itself and runs the unchecked solver: one check per call."""
    calls = []
    check_grid = grids.check_grid

    def counted(*args: object) -> torch.Tensor:
        calls.append(args)
        return check_grid(*args)

    monkeypatch.setattr(grids, "check_grid", counted)
    monkeypatch.setattr(_registry, "check_grid", counted)
    sample(SCORE, SDE_, X, "dpm_solver", grid=DOWN.double())
    assert len(calls) == 1


def test_a_solver_of_any_keywords_takes_any_parameter() -> None:
    """A user's SolverSpec whose function takes **params gets them all: only a solver with a
    closed list of parameters can refuse one."""
    seen: dict[str, object] = {}

    def identity(
        score_fn: object,
        sde: object,
        x: torch.Tensor,
        ts: object,
        *,
        callback: object = None,
        **params: object,
    ) -> torch.Tensor:
        seen.update(params)
        return x

    spec = _registry.SolverSpec("identity", identity, "uniform", stochastic=False)
    sample(SCORE, SDE_, X, spec, steps=2, denoise=False, anything=1)
    assert seen == {"anything": 1}
