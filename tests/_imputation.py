"""Imputation problems with a known answer, shared by tests/test_inpaint.py and
benchmarks/imputation_bias.py.

The exact conditional of a Gaussian mixture is computed here from first principles with numpy and
scipy. PRIVATE STAND-IN, to be replaced by `GaussianMixture.condition` (issue 6, point 1) once
merged.
For p = sum_k pi_k N(mu_k, S_k) and x split into known (index set K) and unknown (U) coordinates,

    p(x_U | x_K = a) = sum_k w_k N(mu_kU + S_kUK S_kKK^{-1} (a - mu_kK), S_kUU - S_kUK S_kKK^{-1} S_kKU)
    w_k proportional to pi_k N(a; mu_kK, S_kKK)

(Bishop, PRML eqs. 2.81-2.82 for each component; Bayes' rule for the weights).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import multivariate_normal

from sde_diffusion import VPSDE, GaussianMixture
from sde_diffusion.guidance import inpaint


def conditional_mixture(
    gm: GaussianMixture, known: np.ndarray, a: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights (K,), means (K, |U|) and covariances (K, |U|, |U|) of p(x_U | x_known = a)."""
    known = np.asarray(known)
    unknown = np.setdiff1d(np.arange(gm.dim), known)
    pis, mus, covs = (np.asarray(v, dtype=np.float64) for v in (gm.weights, gm.means, gm.covs))
    log_w, means, cvs = [], [], []
    for pi, mu, c in zip(pis, mus, covs, strict=True):
        ckk, cuk, cuu = (
            c[np.ix_(known, known)],
            c[np.ix_(unknown, known)],
            c[np.ix_(unknown, unknown)],
        )
        gain = np.linalg.solve(ckk, cuk.T).T  # S_UK S_KK^{-1}
        log_w.append(np.log(pi) + multivariate_normal(mu[known], ckk).logpdf(a))
        means.append(mu[unknown] + gain @ (a - mu[known]))
        cvs.append(cuu - gain @ cuk.T)
    log_w = np.array(log_w)
    w = np.exp(log_w - log_w.max())
    return w / w.sum(), np.array(means), np.array(cvs)


def mixture_moments(
    w: np.ndarray, means: np.ndarray, covs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a Gaussian mixture (law of total covariance)."""
    mean = w @ means
    dev = means - mean
    cov = np.einsum("k,kij->ij", w, covs) + np.einsum("k,ki,kj->ij", w, dev, dev)
    return mean, cov


def mixture_sample(
    w: np.ndarray, means: np.ndarray, covs: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """n samples of a Gaussian mixture."""
    comp = rng.choice(len(w), size=n, p=w)
    roots = np.linalg.cholesky(covs)
    z = rng.standard_normal((n, means.shape[1]))
    return means[comp] + np.einsum("nij,nj->ni", roots[comp], z)


def sliced_w2(x: np.ndarray, y: np.ndarray, projections: int, rng: np.random.Generator) -> float:
    """Sliced 2-Wasserstein distance between equal-size samples: the root mean over random unit
    directions of the 1-D W2^2, which for sorted samples is the mean squared gap."""
    d = rng.standard_normal((projections, x.shape[1]))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    px, py = np.sort(x @ d.T, axis=0), np.sort(y @ d.T, axis=0)
    return float(np.sqrt(np.mean((px - py) ** 2)))


def correlated_pair() -> tuple[GaussianMixture, np.ndarray, np.ndarray]:
    """Two strongly correlated 2-D components (rho = 0.9), x1 = 0.5 known: p(x2 | x1) is a
    reweighted mixture (weights 0.12, 0.88) of variance 0.21."""
    c = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    gm = GaussianMixture([0.5, 0.5], [[-2.0, -2.0], [2.0, 2.0]], torch.stack([c, c]))
    return gm, np.array([0]), np.array([0.5])


def equicorrelated_4d() -> tuple[GaussianMixture, np.ndarray, np.ndarray]:
    """Two overlapping 4-D components with equicorrelated covariance 0.3 I + 0.7 (rho = 0.7),
    the first two coordinates known: the conditional reweights the components to 0.23, 0.77."""
    c = 0.3 * torch.eye(4, dtype=torch.float64) + 0.7
    gm = GaussianMixture([0.6, 0.4], [[-1.5] * 4, [1.5] * 4], torch.stack([c, c]))
    return gm, np.array([0, 1]), np.array([0.3, 0.6])


def separated_4d() -> tuple[GaussianMixture, np.ndarray, np.ndarray]:
    """A random 4-D mixture with well separated modes, coordinates 0 and 2 known: the
    observation selects the component of prior weight 0.19 with probability 0.9999."""
    gm = GaussianMixture.random(3, 4, torch.Generator().manual_seed(2), scale=2.0)
    return gm, np.array([0, 2]), np.array([0.5, -1.0])


def imputation_errors(
    gm: GaussianMixture, known: np.ndarray, a: np.ndarray, n: int, sde=None, **inpaint_kw
) -> dict[str, float]:
    """Impute the unknown coordinates of n copies of the observation x_known = a with the
    oracle's exact score, and measure against the exact conditional: the Euclidean error of the
    mean, the Frobenius error of the covariance, the sliced W2 distance, the sliced W2 between
    two exact samples of the same size (the floor set by sampling noise), and the NFE."""
    sde = sde or VPSDE()
    w, m, c = conditional_mixture(gm, known, a)
    mean, cov = mixture_moments(w, m, c)
    rng = np.random.default_rng(0)
    ref, ref2 = (mixture_sample(w, m, c, n, rng) for _ in range(2))
    x_known = torch.zeros(n, gm.dim, dtype=torch.float64)
    x_known[:, known] = torch.as_tensor(a, dtype=torch.float64)
    mask = torch.zeros(gm.dim, dtype=torch.float64)
    mask[known] = 1
    nfe = 0

    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return gm.score(x, t, sde)

    out = inpaint(score_fn, sde, x_known, mask, **inpaint_kw)
    xu = out[:, mask == 0].numpy()
    return {
        "mean": float(np.linalg.norm(xu.mean(0) - mean)),
        "cov": float(np.linalg.norm(np.atleast_2d(np.cov(xu.T)) - cov)),
        "sw2": sliced_w2(xu, ref, 64, rng),
        "floor": sliced_w2(ref2, ref, 64, rng),
        "nfe": nfe,
    }
