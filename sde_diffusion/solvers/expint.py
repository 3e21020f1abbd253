"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast solver for guided sampling of diffusion
probabilistic models"): high-order exponential integrators of the probability-flow ODE.

In lambda = log(gamma / sigma) the probability-flow ODE for the data prediction
x0(x, t) = E[x_0 | x_t = x] (Tweedie, math.md section 2) has the exact solution

    x_t = (sigma_t / sigma_s) x_s + sigma_t integral_{lambda_s}^{lambda_t} e^lambda x0 d lambda,

and DPM-Solver++ integrates the linear part exactly and x0 by a Taylor expansion in lambda.
The paper's alpha_t is gamma_t here; it steps from t_{i-1} to t_i with h_i = lambda_{t_i} -
lambda_{t_{i-1}} > 0. Everything is written with gamma, sigma and lambda from the SDE, so the
solver runs on every SDE of the family (VP, sub-VP, VE, discrete betas).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._tensor import check_choice
from ..sde import SDE, ScoreFn
from ._registry import Callback, at, register, steps

METHODS = ("multistep", "singlestep")
ORDERS = (1, 2, 3)
#: what the multistep solvers interpolate in lambda: x0 (DPM-Solver++) or eps (DPM-Solver, DEIS)
PREDICTIONS = ("data", "noise")
#: grids with fewer steps than this take lower orders at their last steps (lower_order_final)
LOWER_ORDER_FINAL_BELOW = 15
#: UniPC's first corrector, the one step with a single past output: the line through both ends
#: integrated exactly, or the paper's UniC-1 with B(h) = e^h - 1 and a_1 = 1/2 (diffusers' "bh2")
FIRST_CORRECTORS = ("exact", "bh2")

__all__ = ["FIRST_CORRECTORS", "METHODS", "ORDERS", "PREDICTIONS", "dpm_solver_pp", "unipc"]


def _data_prediction(score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor) -> Tensor:
    """x0_theta(x, t) = (x + sigma_t^2 score(x, t)) / gamma_t (Tweedie), for a grid time t: the
    coefficients are taken at the scalar t, not recomputed over the batch."""
    gamma, sigma = sde.marginal(t)
    return (x + sigma * sigma * score_fn(x, at(t, x))) / gamma


def _model_output(
    score_fn: ScoreFn, x: Tensor, t: Tensor, marginal: tuple[float, float], prediction: str
) -> Tensor:
    """What the multistep loop interpolates at the grid time t, from the marginal (gamma, sigma)
    there (host scalars): x0 = x / gamma + (sigma^2 / gamma) score (data) or eps = -sigma score
    (noise)."""
    gamma, sigma = marginal
    score = score_fn(x, at(t, x))
    if prediction == "data":
        return _combination([1 / gamma, sigma * sigma / gamma], [x, score])
    return _combination([-sigma], [score])


def _combination(weights: list[float], terms: list[Tensor]) -> Tensor:
    """sum_i w_i terms_i, one kernel per term (the add fuses the multiply): on a GPU the
    multistep loop is bound by kernel launches, not by arithmetic."""
    out = terms[0] * weights[0]
    for w, term in zip(weights[1:], terms[1:], strict=True):
        out = out.add(term, alpha=w)
    return out


def _first_order(
    x: Tensor, m: Tensor, sig_s: Tensor, sig_t: Tensor, gam_t: Tensor, h: Tensor
) -> Tensor:
    """DPM-Solver++-1 (= DDIM) from s to t: x_t = (sigma_t/sigma_s) x_s - gamma_t (e^{-h} - 1) m."""
    return (sig_t / sig_s) * x - (gam_t * torch.expm1(-h)) * m


def _interpolant_weights(
    offsets: list[float], h: float, prediction: str = "data", d2_weight: float = 1.0
) -> list[float]:
    """Weights b with integral_0^h w(u) P(lambda_s + u) du = sum_i b_i m_i, where P is the
    polynomial through (lambda_s + offsets[i], m_i) (one offset is 0) and the kernel is
    w(u) = e^{-(h-u)} for data prediction, e^{h-u} for noise prediction.

    Writing P(lambda_s + u) = sum_j c_j u^j / j! (c_j = P's j-th derivative at lambda_s, V c = m
    with the Vandermonde matrix V_ij = u_i^j / j!), the integral is sum_j psi_j c_j with, by parts,

        data:   psi_j = integral_0^h e^{-(h-u)} u^j / j! du,  psi_0 = 1 - e^{-h},  psi_j = h^j / j! - psi_{j-1}
        noise:  psi_j = integral_0^h e^{h-u} u^j / j! du,     psi_0 = e^h - 1,     psi_j = psi_{j-1} - h^j / j!

    so b solves V^T b = psi, in float64 because the psi_j cancel for small h. `d2_weight` scales
    psi_2, the weight of the curvature c_2 (`_interpolant_step`).
    """
    if prediction == "data":
        psi = [-math.expm1(-h)]
        for j in range(1, len(offsets)):
            psi.append(h**j / math.factorial(j) - psi[-1])
    else:
        psi = [math.expm1(h)]
        for j in range(1, len(offsets)):
            psi.append(psi[-1] - h**j / math.factorial(j))
    if len(psi) > 2:
        psi[2] = d2_weight * psi[2]
    return _solve_transposed_vandermonde(offsets, psi)


def _solve_transposed_vandermonde(offsets: list[float], rhs: list[float]) -> list[float]:
    """b with V^T b = rhs, V_ij = offsets_i^j / j!: the weights that map values at the nodes to
    the functional sum_j rhs_j c_j of the interpolating polynomial's Taylor coefficients c."""
    powers = [[u**j / math.factorial(j) for u in offsets] for j in range(len(offsets))]
    f64 = torch.float64
    return torch.linalg.solve(
        torch.tensor(powers, dtype=f64), torch.tensor(rhs, dtype=f64)
    ).tolist()


def _extrapolation_weights(offsets: list[float], h: float) -> list[float]:
    """Lagrange weights w with P(lambda_s + h) = sum_i w_i m_i for the polynomial P through
    (lambda_s + offsets[i], m_i): the functional is the value at h, rhs_j = h^j / j!."""
    return _solve_transposed_vandermonde(
        offsets, [h**j / math.factorial(j) for j in range(len(offsets))]
    )


def _interpolant_step(
    x: Tensor,
    m: list[Tensor],
    lam: list[float],
    lam_s: float,
    lam_t: float,
    marginal_s: tuple[float, float],
    marginal_t: tuple[float, float],
    prediction: str = "data",
    d2_weight: float = 1.0,
) -> Tensor:
    """From s to t, integrating exactly the polynomial in lambda through the model outputs m at
    log-SNRs lam (an exponential Adams method, of order len(m)); marginal_s and marginal_t are
    (gamma, sigma) at s and t. For x0 predictions (data):

        x_t = (sigma_t / sigma_s) x_s + gamma_t integral_0^h e^{-(h-u)} P(lambda_s + u) du,

    and for eps predictions (noise; DPM-Solver's and DEIS's form of the same ODE):

        x_t = (gamma_t / gamma_s) x_s - sigma_t integral_0^h e^{h-u} P(lambda_s + u) du.

    Through the last three x0 this is DPM-Solver++(3M); in divided differences D1 ~ h x0' and
    D2 ~ h^2 x0'' it reads

        x_t = (sigma_t/sigma_s) x_s - gamma_t phi_1 m + gamma_t phi_2 D1 - gamma_t phi_3 D2,
        phi_1 = e^{-h} - 1,  phi_2 = phi_1/h + 1,  phi_3 = phi_2/h - 1/2,

    since integral_0^h e^{-(h-u)} u^2/2 du = -h^2 phi_3. The reference implementation, diffusers
    and k-diffusion take D2 = (D1_0 - D1_1)/(r0 + r1) ~ h^2 x0''/2, half of this term, which
    leaves a local error O(h^3): their 3M converges with order 2 (measured slopes 1.1-1.8 on EDM
    grids of 20-160 steps, where this one gives 3.0; tests/test_solvers_diffusers.py pins that
    the two differ by that term alone). `d2_weight` scales the term: 0.5 is their 3M. Damping
    the curvature that three coarse steps extrapolate can pay where few steps cross a fast
    change of x0 (the default's pilot tries both, `pilot.CANDIDATES`).
    """
    b = _interpolant_weights([lam_i - lam_s for lam_i in lam], lam_t - lam_s, prediction, d2_weight)
    (gam_s, sig_s), (gam_t, sig_t) = marginal_s, marginal_t
    if prediction == "data":
        return _combination([sig_t / sig_s, *(gam_t * b_i for b_i in b)], [x, *m])
    return _combination([gam_t / gam_s, *(-sig_t * b_i for b_i in b)], [x, *m])


def _multistep_update(
    x: Tensor, m: list[Tensor], lam: list[float], sig_s: float, sig_t: float, gam_t: float
) -> Tensor:
    """One multistep update of order k = len(m) <= 2 from t_{i-1} to t_i, as in the paper.

    m = [x0 at t_{i-k}, ..., x0 at t_{i-1}] (newest last), lam = lambda at [t_{i-k}, ..., t_i].
    Both orders step x_t = (sigma_t / sigma_s) x_s - gamma_t (e^{-h} - 1) D: order 1 (DDIM) with
    D = m_{i-1}, order 2 (Algorithm 2, 2M) with D = (1 + 1/(2 r)) m_{i-1} - 1/(2 r) m_{i-2},
    r = h_{i-1} / h_i. Higher orders go through `_interpolant_step`.
    """
    h = lam[-1] - lam[-2]
    d = [1.0]
    if len(m) == 2:
        r = (lam[-2] - lam[-3]) / h
        d = [1 + 1 / (2 * r), -1 / (2 * r)]
    c = -gam_t * math.expm1(-h)
    return _combination([sig_t / sig_s, *(c * d_i for d_i in d)], [x, *reversed(m)])


def _singlestep_update(
    score_fn: ScoreFn, sde: SDE, x: Tensor, t_prev: Tensor, t: Tensor, order: int
) -> Tensor:
    """One singlestep update of the given order from t_prev to t, with intermediate points
    at lambda_{t_prev} + r h: r = 1/2 (2S, Algorithm 1 of the paper) or r = 1/3, 2/3 (3S, the
    DPM-Solver-3 of Lu et al. 2022a in data-prediction form)."""
    lam_s, lam_t = sde.log_snr(t_prev), sde.log_snr(t)
    h = lam_t - lam_s
    (_, sig_s), (gam_t, sig_t) = sde.marginal(t_prev), sde.marginal(t)
    m0 = _data_prediction(score_fn, sde, x, t_prev)
    x_t = _first_order(x, m0, sig_s, sig_t, gam_t, h)
    if order == 1:
        return x_t
    r1 = 0.5 if order == 2 else 1 / 3
    s1 = sde.t_from_log_snr(lam_s + r1 * h)
    gam_1, sig_1 = sde.marginal(s1)
    m1 = _data_prediction(score_fn, sde, _first_order(x, m0, sig_s, sig_1, gam_1, r1 * h), s1)
    phi_1 = torch.expm1(-h)
    if order == 2:
        return x_t - (0.5 / r1) * (gam_t * phi_1) * (m1 - m0)
    r2 = 2 / 3
    s2 = sde.t_from_log_snr(lam_s + r2 * h)
    gam_2, sig_2 = sde.marginal(s2)
    phi_22 = torch.expm1(-r2 * h) / (r2 * h) + 1
    u2 = _first_order(x, m0, sig_s, sig_2, gam_2, r2 * h) + (r2 / r1) * (gam_2 * phi_22) * (m1 - m0)
    m2 = _data_prediction(score_fn, sde, u2, s2)
    phi_2 = phi_1 / h + 1
    return x_t + (1 / r2) * (gam_t * phi_2) * (m2 - m0)


def _multistep(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    ts: Tensor,
    order: int,
    lower_order_final: bool,
    corrector: bool,
    prediction: str,
    to_zero: bool,
    callback: Callback | None,
    final_jump: bool = False,
    d2_weight: float = 1.0,
    first_corrector: str = "exact",
) -> Tensor:
    """The multistep loop shared by DPM-Solver++ (predictor only) and UniPC (with corrector).

    Step i evaluates the model output m (x0, or eps with prediction="noise") at (x_i, t_i) and
    predicts x_{i+1} from the last k of them, with
    k = min(order, i + 1) (warm-up) and, under `lower_order_final` on grids of fewer than 15
    steps, k <= steps left; with `final_jump` a first-order jump to sigma = 0 follows the grid
    (the Tweedie step of `sample(denoise=True)`, DPM-Solver++'s step to lambda = inf) and counts
    as the last step, as in diffusers' final_sigmas_type="zero". With `corrector`, that same
    evaluation first corrects x_i: the step from t_{i-1} is redone through the polynomial that
    also passes through the new x0 (one more node, one more order, no extra evaluation), while
    the uncorrected output stays in the history. `first_corrector="bh2"` takes the paper's
    weight for the first correction instead (`unipc`).
    With `to_zero` (noise prediction), a last step from the grid's end to sigma = 0 that evaluates
    nothing: the first-order step x_0 = (x - sigma eps) / gamma with eps the last step's own
    polynomial extrapolated to the grid's end. `d2_weight` scales the predictor's curvature term
    (`_interpolant_step`); the corrector integrates its polynomial exactly.
    """
    n = len(ts) - 1
    # every coefficient is a Python float (float64), from one copy of the grid per run: no step
    # waits on the device, and none launches a kernel per scalar
    ts_host = ts.detach().cpu().double()
    lam = sde.log_snr(ts_host).tolist()
    gamma, sigma = (v.tolist() for v in sde.marginal(ts_host))
    history: list[Tensor] = []
    x_prev, k = x, 0

    def adams(x_s: Tensor, nodes: list[Tensor], first: int, s: int, w: float = 1.0) -> Tensor:
        """`_interpolant_step` from ts[s] to ts[s + 1] through m at ts[first:first + len]."""
        lam_nodes = lam[first : first + len(nodes)]
        return _interpolant_step(
            x_s,
            nodes,
            lam_nodes,
            lam[s],
            lam[s + 1],
            (gamma[s], sigma[s]),
            (gamma[s + 1], sigma[s + 1]),
            prediction,
            w,
        )

    for i, (t_prev, t) in steps(ts):
        m = _model_output(score_fn, x, t_prev, (gamma[i], sigma[i]), prediction)
        if corrector and k == 1 and first_corrector == "bh2":
            # UniC-1, x0 weighted 1/2 at both ends: the 2M update with the new node r = -1 ahead
            x = _multistep_update(
                x_prev, [m, history[-1]], [lam[i], lam[i - 1], lam[i]], sigma[i - 1], sigma[i],
                gamma[i],
            )  # fmt: skip
        elif corrector and i > 0:
            x = adams(x_prev, [*history[-k:], m], i - k, i - 1)
        history = [*history, m][-order:]
        k = min(order, i + 1)
        if lower_order_final and n + final_jump < LOWER_ORDER_FINAL_BELOW:
            k = min(k, n - i + final_jump)
        x_prev = x
        if k > 2 or prediction == "noise":
            x = adams(x, history[-k:], i - k + 1, i, d2_weight)
        else:
            x = _multistep_update(
                x, history[-k:], lam[i - k + 1 : i + 2], sigma[i], sigma[i + 1], gamma[i + 1]
            )
        if callback is not None:
            callback(i, t, x)
    if to_zero:
        w = _extrapolation_weights(
            [lam_i - lam[n - 1] for lam_i in lam[n - k : n]], lam[n] - lam[n - 1]
        )
        eps_weights = [-sigma[n] / gamma[n] * w_i for w_i in w]
        x = _combination([1 / gamma[n], *eps_weights], [x, *history[-k:]])
    return x


@register("dpm_solver", default_grid="log_snr")
def dpm_solver_pp(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    ts: Tensor,
    *,
    order: int = 2,
    method: str = "multistep",
    lower_order_final: bool = True,
    prediction: str = "data",
    to_zero: bool = False,
    final_jump: bool = False,
    d2_weight: float = 1.0,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++ with data prediction over the grid ts (default: uniform in log-SNR).

    method="multistep" (2M, 3M; the paper's Algorithm 2 and its third-order extension): one
    score evaluation per step, reusing the x0 predictions of the previous `order - 1` grid
    points; the first steps warm up with orders 1, 2, ... With `lower_order_final`, grids of
    fewer than 15 steps finish with lower orders, min(order, steps left), which stabilises very
    few steps (diffusers' threshold; the reference implementation uses 10); `final_jump` says
    that a first-order jump to sigma = 0 follows (`sample`'s Tweedie step) and counts it as the
    last of them, so the grid's own last step keeps order 2 instead of falling to DDIM. 3M
    weighs its second divided difference by the Taylor coefficient (see `_interpolant_step`), so
    it is third order where the reference's and diffusers' 3M are second order; d2_weight=0.5
    (in [0, 1], multistep only) is theirs: with lower_order_final=False on diffusers'
    timesteps, diffusers' 3M step for step.
    method="singlestep" (2S, 3S): `order` evaluations per step at intermediate log-SNRs.
    order=1 is DDIM (eta = 0) in either method. NFE: steps (multistep) or order * steps.
    On the grid of diffusers' timesteps with lower_order_final=False, followed by
    `sample(denoise=True)`, 2M is diffusers' DPMSolverMultistepScheduler step for step: its
    final first-order step to sigma = 0 returns the data prediction, i.e. Tweedie.
    """
    _check_order(order)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("method", method, METHODS)
    _check_ends(to_zero, final_jump, prediction)
    if not 0 <= d2_weight <= 1:  # also refuses NaN
        raise ValueError(f"d2_weight must lie in [0, 1] (0.5: diffusers' 3M), got {d2_weight}")
    if method == "singlestep" and (prediction != "data" or to_zero or final_jump or d2_weight != 1):
        raise ValueError(
            "method='singlestep' takes data prediction only, without to_zero, final_jump or "
            "d2_weight"
        )
    if method == "multistep":
        return _multistep(
            score_fn, sde, x, ts, order, lower_order_final, False, prediction, to_zero, callback,
            final_jump, d2_weight,
        )  # fmt: skip
    for i, (t_prev, t) in steps(ts):
        x = _singlestep_update(score_fn, sde, x, t_prev, t, order)
        if callback is not None:
            callback(i, t, x)
    return x


@register("unipc", default_grid="log_snr")
def unipc(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    ts: Tensor,
    *,
    order: int = 3,
    lower_order_final: bool = True,
    prediction: str = "data",
    to_zero: bool = False,
    final_jump: bool = False,
    first_corrector: str = "exact",
    callback: Callback | None = None,
) -> Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: A unified predictor-corrector framework for fast sampling
    of diffusion models") with data prediction: the multistep DPM-Solver++ predictor of `order`
    (UniP) and the corrector UniC, which raises the order to order + 1 at no extra evaluation.

    UniC reuses the evaluation at the predicted x_i, which the next step needs anyway, to redo
    the step into x_i through one more interpolation node (see `_multistep`); the last step has
    no evaluation after it and stays uncorrected. The paper's coefficients a solve R_p(h) a =
    phi(h) / B(h); solved exactly, B(h) drops out of B(h) a and the corrector integrates the
    interpolating polynomial exactly, which is what `_interpolant_step` does at every order.
    At order 1 (the first correction, with one past output) the paper and diffusers fix
    a_1 = 1/2 instead, with B(h) = e^h - 1 (diffusers' default "bh2"): the correction weighs x0
    at both ends by -phi_1 / 2 = (1 - e^{-h}) / 2, where the exact line gives the new one phi_2
    and the old one -phi_1 - phi_2 (`_interpolant_step`): equal to leading order in h, it
    damps the new output over a long first step (at h = 2: 0.43 against 0.57).
    `first_corrector="bh2"` (data prediction) takes it; the default's pilot tries both
    (`pilot.CANDIDATES`). order=3 (the paper's choice for unconditional sampling) measured
    best at 10-20 evaluations on the oracle mixtures of benchmarks/steps_vs_quality.py; order 2
    suits guided sampling. NFE: steps.
    lower_order_final and final_jump as in `dpm_solver_pp`: with both, on diffusers' timesteps
    and followed by `sample(denoise=True)`, this is diffusers' UniPCMultistepScheduler at fewer
    than 15 steps (tests/test_few_step_defaults.py).
    """
    _check_order(order)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("first_corrector", first_corrector, FIRST_CORRECTORS)
    _check_ends(to_zero, final_jump, prediction)
    if first_corrector == "bh2" and prediction != "data":
        raise ValueError("first_corrector='bh2' needs prediction='data'")
    return _multistep(
        score_fn, sde, x, ts, order, lower_order_final, True, prediction, to_zero, callback,
        final_jump, first_corrector=first_corrector,
    )  # fmt: skip


def _check_ends(to_zero: bool, final_jump: bool, prediction: str) -> None:
    # with x0 predictions the step to sigma = 0 would return the extrapolated x0 itself, its
    # error no longer damped by sigma at the grid's end
    if to_zero and prediction != "noise":
        raise ValueError("to_zero needs prediction='noise'")
    if to_zero and final_jump:
        raise ValueError("to_zero and final_jump both end the grid at sigma = 0: pass one")


def _check_order(order: int) -> None:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order}")
