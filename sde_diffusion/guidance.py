"""Guidance and controllable generation, each as a transformer of the one solver contract.

- `classifier_guided_score_fn`: s(x, t) + w grad_x log p_t(y | x)  (math.md section 6).
- `cfg_eps` / `cfg_score_fn`: classifier-free guidance from one conditional network with a null
  label, conditional and unconditional outputs from a single batched call.
- `inpaint`: score_sde's controllable generation (known entries replaced at every step by a
  noised copy of the observation), with RePaint's resampling (Lugmayr et al. 2022) as an option.

The guided functions are ordinary score_fn(x, t), so every registered solver samples them; `inpaint`
drives the registered solvers one grid interval at a time.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._tensor import (
    check_batch,
    check_callable,
    check_choice,
    check_finite,
    check_int,
)
from .parametrize import model_score_fn, tweedie_x0
from .sde import SDE, ScoreFn, check_sde
from .solvers import get_solver
from .solvers._registry import generator_noise
from .solvers.grids import resolve_grid

CLASSIFIER_OUTPUTS = ("logits", "log_prob")
CFG_CONVENTIONS = ("lerp", "ho")
MASKS = ("half", "box", "random")

__all__ = [
    "CFG_CONVENTIONS",
    "CLASSIFIER_OUTPUTS",
    "MASKS",
    "cfg_eps",
    "cfg_score_fn",
    "classifier_guided_score_fn",
    "inpaint",
    "inpaint_mask",
    "repaint_walk",
]

Labels = Tensor | int


def _check_scale(scale: float, name: str = "scale") -> float:
    if not math.isfinite(float(scale)):
        raise ValueError(f"{name} must be a finite number, got {scale}")
    return float(scale)


def _labels(y: Labels, x: Tensor) -> Tensor:
    """y as a (batch,) long tensor on x's device (an int is shared by the whole batch)."""
    y = torch.as_tensor(y, device=x.device)
    if y.is_floating_point() or y.ndim > 1 or (y.ndim == 1 and y.shape[0] != x.shape[0]):
        raise ValueError(
            f"labels must be an integer or an integer tensor of shape ({x.shape[0]},), "
            f"got {y.dtype} of shape {tuple(y.shape)}"
        )
    return y.long().expand(x.shape[0])


def classifier_guided_score_fn(
    score_fn: ScoreFn,
    classifier: Callable[..., Tensor],
    y: Labels,
    scale: float = 1.0,
    output: str = "logits",
) -> ScoreFn:
    """The score of the guided density p_t(x) p_t(y | x)^w: s(x, t) + w grad_x log p_t(y | x).

    classifier: with output="logits", classifier(x, t) returns logits (batch, K) of a
        time-dependent classifier p_t(. | x) (log-softmax is taken here); with
        output="log_prob", classifier(x, t, y) returns log p_t(y | x) of shape (batch,) directly.
        Either way the gradient comes from autograd, so the classifier must treat samples
        independently (no batch statistics: call an nn.Module in eval mode).
    y: the target class, an int for the whole batch or a (batch,) tensor.
    scale: w; w = 1 gives the exact class-conditional score when the classifier is exact.
    """
    check_callable(score_fn, "score_fn")
    check_callable(classifier, "classifier")
    check_choice("classifier output", output, CLASSIFIER_OUTPUTS)
    w = _check_scale(scale)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        labels = _labels(y, x)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            if output == "logits":
                logits = classifier(x_in, t)
                log_p = torch.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]
            else:
                log_p = classifier(x_in, t, labels)
            if log_p.shape != (x.shape[0],):
                raise ValueError(
                    f"the classifier's log p_t(y | x) has shape {tuple(log_p.shape)}, "
                    f"expected ({x.shape[0]},)"
                )
            # samples are independent, so the gradient of the sum is each sample's own gradient
            (grad,) = torch.autograd.grad(log_p.sum(), x_in)
        return score_fn(x, t) + w * grad.to(x.dtype)

    return guided


def cfg_eps(
    model: Callable[..., Tensor],
    y: Labels,
    null_label: Labels,
    scale: float,
    convention: str = "lerp",
) -> Callable[[Tensor, Tensor], Tensor]:
    """Classifier-free guidance: combine model(x, t, y) and model(x, t, null) from one call.

    model(x, t, labels) is a conditional network trained with the label dropped to `null_label`
    (for sde_diffusion's nets, null_label = num_classes); conditional and unconditional inputs
    are concatenated into one batch of 2B, so a guided evaluation costs one network call.
    convention:
      - "lerp" (math.md section 6, diffusers' guidance_scale):
            out = out(null) + w (out(y) - out(null)); w = 0 unconditional, w = 1 conditional.
      - "ho" (Ho & Salimans 2021, eq. 6): out = (1 + w) out(y) - w out(null); w = 0 conditional
        (the same family: ho at w equals lerp at w + 1).
    The weights sum to one, so the combination commutes with the affine maps between the
    eps, x0, v and score parametrisations: the model may predict any of them.
    """
    check_callable(model, "model")
    check_choice("guidance convention", convention, CFG_CONVENTIONS)
    w = _check_scale(scale)
    w_cond = w if convention == "lerp" else 1 + w

    def guided(x: Tensor, t: Tensor) -> Tensor:
        labels = torch.cat([_labels(y, x), _labels(null_label, x)])
        t2 = torch.cat([t, t]) if t.ndim == 1 else t
        out_cond, out_null = model(torch.cat([x, x]), t2, labels).chunk(2)
        return out_null + w_cond * (out_cond - out_null)

    return guided


def cfg_score_fn(
    model: Callable[..., Tensor],
    sde: SDE,
    y: Labels,
    null_label: Labels,
    scale: float,
    convention: str = "lerp",
    prediction: str = "eps",
    time_input: str = "t",
    num_train_timesteps: int | None = None,
) -> ScoreFn:
    """Classifier-free guidance as a score_fn for any solver: `cfg_eps` wrapped by
    `parametrize.model_score_fn` (prediction, time_input and num_train_timesteps as there)."""
    guided = cfg_eps(model, y, null_label, scale, convention)
    return model_score_fn(guided, sde, prediction, time_input, num_train_timesteps)


# ---- inpainting / imputation ------------------------------------------------------------------


def repaint_walk(steps: int, resample: int = 1, jump: int = 1) -> list[int]:
    """The sequence of grid indices RePaint visits (Lugmayr et al. 2022, "jump" schedule).

    Index 0 is T and index `steps` is t_end. The walk steps down one index at a time; on reaching
    an index i >= jump with (steps - i) divisible by `jump`, it jumps back up to i - jump
    (re-noising with the forward kernel) and walks down again, `resample - 1` times per index.
    resample = 1 is the plain replacement method: 0, 1, ..., steps.
    """
    for name, v in (("steps", steps), ("resample", resample), ("jump", jump)):
        check_int(v, name)
    left = {i: resample - 1 for i in range(jump, steps + 1) if (steps - i) % jump == 0}
    walk, i = [0], 0
    while i < steps:
        i += 1
        walk.append(i)
        if left.get(i, 0) > 0:
            left[i] -= 1
            walk.extend(range(i - 1, i - jump - 1, -1))
            i -= jump
    return walk


def _check_mask(mask: Tensor, x: Tensor) -> Tensor:
    """A 0/1 mask of x's shape or of one sample's shape, as a boolean of x's shape (True = known)."""
    mask = torch.as_tensor(mask, device=x.device)
    if tuple(mask.shape) not in (tuple(x.shape), tuple(x.shape[1:])):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}; it must match x_known {tuple(x.shape)} "
            f"or one sample {tuple(x.shape[1:])}"
        )
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(f"mask must be binary (0 = unknown, 1 = known), found the value {bad}")
    return mask.bool().expand_as(x)


def inpaint(
    score_fn: ScoreFn,
    sde: SDE,
    x_known: Tensor,
    mask: Tensor,
    solver: str = "euler_maruyama",
    steps: int = 100,
    resample: int = 1,
    jump: int = 1,
    grid: str | Tensor | None = None,
    t_end: float | None = None,
    denoise: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **solver_params: object,
) -> Tensor:
    """Sample the unknown entries of x_known given the known ones (mask = 1), with any solver.

    Replacement (score_sde's controllable generation): before every solver step from t to s the
    known entries are overwritten by a fresh x_t = gamma_t x_known + sigma_t z; the step then
    runs on the whole state. This conditions only through the noised observation and is biased
    (the unknown entries never see the realised noise of the known ones); resampling reduces it.
    RePaint resampling: `resample` > 1 walks the grid as `repaint_walk(steps, resample, jump)`;
    each jump back from s to t re-noises the whole state with the forward kernel
    x_t = (gamma_t / gamma_s) x_s + sqrt(sigma_t^2 - (gamma_t / gamma_s)^2 sigma_s^2) z.

    x_known: (batch, *dims); its unknown entries are ignored (they may be NaN).
    mask: 0/1 (or bool) of shape x_known.shape, or of one sample's shape for the whole batch.
    solver / solver_params: any registered solver and its parameters; it is run on the two-point
        grid of each interval, stochastic ones with noise on every interval but the last.
    steps / grid / t_end: the time grid as in `solvers.sample`; denoise ends with Tweedie's step.
    The result holds x_known exactly on the mask.
    """
    check_callable(score_fn, "score_fn")
    check_sde(sde)
    check_batch(x_known, "x_known", finite=False)
    spec = get_solver(solver)
    spec.check_params(solver_params)
    # solvers that drop their last step's noise must keep it here: every interval is a last step
    keep_last_noise = "noise_last" in inspect.signature(spec.fn).parameters
    ts = resolve_grid(sde, grid, steps, spec.default_grid, t_end)
    known_at = _check_mask(mask, x_known)
    known = torch.where(known_at, x_known, torch.zeros_like(x_known))
    check_finite(known, "x_known on the mask")
    noise = generator_noise(generator)
    walk = repaint_walk(len(ts) - 1, resample, jump)
    gamma, sigma = sde.marginal(ts)  # float64 on the host: the re-noising is computed once here
    ts_x = ts.to(x_known.device, x_known.dtype)

    def observe(x: Tensor, i: int) -> Tensor:
        return torch.where(known_at, gamma[i].item() * known + sigma[i].item() * noise(known), x)

    x = sde.prior_std() * noise(known)
    moves = list(itertools.pairwise(walk))
    for k, (i, j) in enumerate(tqdm(moves, desc="inpaint", disable=not progress, leave=False)):
        if j > i:  # reverse step ts[i] -> ts[j] on the whole state, after replacement
            params = dict(solver_params)
            if spec.stochastic:
                params["noise"] = noise
            if keep_last_noise:
                params["noise_last"] = k < len(moves) - 1
            x = spec.run(score_fn, sde, observe(x, i), ts_x[[i, j]], **params)
        else:  # forward jump ts[i] -> ts[j] (j < i, a later time) with the exact kernel
            a = gamma[j] / gamma[i]
            b = torch.sqrt(torch.clamp(sigma[j] ** 2 - (a * sigma[i]) ** 2, min=0))
            x = a.item() * x + b.item() * noise(x)
    x = observe(x, len(ts) - 1)
    if denoise:
        t = ts_x[-1].expand(x.shape[0])
        x = tweedie_x0(x, t, score_fn(x, t), sde)
    return torch.where(known_at, known, x)


def inpaint_mask(
    kind: str,
    shape: Sequence[int],
    fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A 0/1 mask (1 = known) of one sample's shape (C, H, W), for the usual inpainting tasks.

    half: the top half of the rows known; box: all known but a centred box of `fraction` of the
    height and width; random: each pixel (all channels together) known with probability `fraction`.
    """
    check_choice("mask", kind, MASKS)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    if len(shape) != 3:
        raise ValueError(
            f"the {kind!r} mask is for images of shape (C, H, W); got data of shape {tuple(shape)}"
        )
    c, h, w = (int(n) for n in shape)
    mask = torch.ones(c, h, w)
    if kind == "half":
        mask[:, h // 2 :] = 0
    elif kind == "box":
        bh, bw = max(1, round(fraction * h)), max(1, round(fraction * w))
        top, left = (h - bh) // 2, (w - bw) // 2
        mask[:, top : top + bh, left : left + bw] = 0
    else:
        mask = (torch.rand(1, h, w, generator=generator) < fraction).float().expand(c, h, w)
    return mask.clone()
