"""The exact conditional of a Gaussian mixture, from first principles with numpy and scipy.

PRIVATE STAND-IN, to be replaced by `GaussianMixture.condition` (issue 6, point 1) once merged.
For p = sum_k pi_k N(mu_k, S_k) and x split into known (index set K) and unknown (U) coordinates,

    p(x_U | x_K = a) = sum_k w_k N(mu_kU + S_kUK S_kKK^{-1} (a - mu_kK), S_kUU - S_kUK S_kKK^{-1} S_kKU)
    w_k proportional to pi_k N(a; mu_kK, S_kKK)

(Bishop, PRML eqs. 2.81-2.82 for each component; Bayes' rule for the weights).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import multivariate_normal

from sde_diffusion import GaussianMixture


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
