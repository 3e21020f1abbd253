"""The test oracle: Gaussian-mixture data has an exact score at every t (math.md section 7).

If p_0 = sum_k pi_k N(mu_k, Sigma_k) and q(x_t | x_0) = N(gamma_t x_0, sigma_t^2 I), then

    p_t = sum_k pi_k N(gamma_t mu_k, C_k(t)),   C_k(t) = gamma_t^2 Sigma_k + sigma_t^2 I.

Each Sigma_k = U_k diag(d_k) U_k^T is diagonalised once, so for every t
C_k(t)^{-1} = U_k diag(1 / (gamma_t^2 d_k + sigma_t^2)) U_k^T and log det C_k(t) are O(D) per
sample once x is projected: the oracle stays cheap for thousands of samples in dimension 64.

`GaussianMixture.score_fn(sde)` is an ordinary score_fn(x, t), so every solver, metric,
likelihood and guidance routine is tested with it exactly as a trained network would be used:
with zero network error, what remains is the method's own error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._tensor import append_dims, check_int, check_positive
from .sde import SDE, VPSDE, ScoreFn

__all__ = ["WEIGHT_TOLERANCE", "GaussianMixture"]

#: how far from 1 the weights of a mixture may sum (float32 weights of a few hundred components)
WEIGHT_TOLERANCE = 1e-5

# any SDE gives the identity kernel at t = 0, so the oracle at t = 0 under it is p_0 itself
_T0_SDE = VPSDE()


class GaussianMixture:
    """p_0 = sum_k weights_k N(means_k, covs_k) in dimension D, with x of shape (batch, *dims).

    weights: (K,) positive, summing to 1 (to within WEIGHT_TOLERANCE: a mixture whose weights
    do not sum to 1 is refused, not renormalised, since it is usually a mistake); means: (K, D);
    covs: (K, D, D) symmetric positive definite, or (K, D) for diagonal covariances, or a
    scalar variance shared by all. Everything must be finite. `dims` gives the data shape
    (prod(dims) = D); by default (D,).
    """

    def __init__(
        self,
        weights: Sequence[float] | Tensor,
        means: Sequence[Sequence[float]] | Tensor,
        covs: Tensor | float,
        dims: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float64,
    ):
        w = torch.as_tensor(weights, dtype=dtype).flatten()
        mu = torch.as_tensor(means, dtype=dtype)
        if mu.ndim != 2 or mu.shape[0] != w.numel():
            raise ValueError(
                f"means must have shape (K, D) with K = {w.numel()}, got {tuple(mu.shape)}"
            )
        if not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
            raise ValueError(f"weights must be positive and finite, got {w.tolist()}")
        total = float(w.sum(dtype=torch.float64))
        if abs(total - 1) > WEIGHT_TOLERANCE:
            raise ValueError(
                f"weights must sum to 1 (to within {WEIGHT_TOLERANCE:g}), got {w.tolist()} "
                f"summing to {total:.6g}"
            )
        if not bool(torch.isfinite(mu).all()):
            k = int((~torch.isfinite(mu)).any(1).nonzero()[0])
            raise ValueError(f"means must be finite; component {k} is {mu[k].tolist()}")
        K, D = mu.shape
        cov = torch.as_tensor(covs, dtype=dtype)
        if cov.ndim == 0:
            cov = cov * torch.eye(D, dtype=dtype).expand(K, D, D)
        elif cov.shape == (K, D):
            cov = torch.diag_embed(cov)
        if cov.shape != (K, D, D):
            raise ValueError(
                f"covs must be a scalar, (K, D) or (K, D, D) = ({K}, {D}, {D}), got {tuple(cov.shape)}"
            )
        if not bool(torch.isfinite(cov).all()):
            raise ValueError("covs must be finite, got NaN or inf entries")
        if not torch.allclose(cov, cov.transpose(-1, -2)):
            asymmetry = (cov - cov.transpose(-1, -2)).abs().amax((-2, -1))
            k = int(asymmetry.argmax())
            raise ValueError(
                f"covs must be symmetric; component {k} has max |C - C^T| = "
                f"{asymmetry[k].item():.3g}"
            )
        evals, evecs = torch.linalg.eigh(cov)
        if bool((evals <= 0).any()):
            k = int(evals.min(-1).values.argmin())
            raise ValueError(
                f"covs must be positive definite; component {k} has smallest eigenvalue "
                f"{evals[k].min().item():.3g}"
            )
        self.dims = tuple(dims) if dims is not None else (D,)
        if math.prod(self.dims) != D:
            raise ValueError(f"dims {self.dims} do not multiply to D = {D}")
        self.weights, self.means, self.covs = w / w.sum(), mu, cov
        self._evals, self._evecs = evals, evecs

    @property
    def num_components(self) -> int:
        return self.weights.numel()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def gaussian(
        cls, mean: Tensor | Sequence[float], cov: Tensor | float, **kwargs
    ) -> GaussianMixture:
        """A single Gaussian N(mean, cov) (cov a (D, D) matrix, a (D,) diagonal or a scalar)."""
        mean = torch.as_tensor(mean, dtype=kwargs.get("dtype", torch.float64)).flatten()
        cov = torch.as_tensor(cov, dtype=mean.dtype)
        return cls([1.0], mean[None], cov if cov.ndim == 0 else cov[None], **kwargs)

    @classmethod
    def ring(
        cls, k: int = 8, radius: float = 4.0, std: float = 0.5, dim: int = 2
    ) -> GaussianMixture:
        """k isotropic components of equal weight and standard deviation `std`, evenly spaced on
        a circle of `radius` in the first two of `dim` coordinates."""
        k, dim = check_int(k, "k"), check_int(dim, "dim", 2)
        std = check_positive(std, "std")
        if not (math.isfinite(radius) and radius >= 0):
            raise ValueError(f"radius must be a finite number >= 0, got {radius}")
        angle = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
        means = torch.zeros(k, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * torch.cos(angle), radius * torch.sin(angle)
        return cls(torch.full((k,), 1 / k), means, std**2)

    @classmethod
    def random(
        cls, k: int, dim: int, generator: torch.Generator | None = None, scale: float = 3.0
    ) -> GaussianMixture:
        """k components with random means, full random covariances and random weights."""
        k, dim = check_int(k, "k"), check_int(dim, "dim")
        g = generator
        w = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        w = w / w.sum()
        means = scale * torch.randn(k, dim, generator=g, dtype=torch.float64)
        a = torch.randn(k, dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
        covs = 0.3 * (a @ a.transpose(-1, -2)) + 0.1 * torch.eye(dim, dtype=torch.float64)
        return cls(w, means, covs)

    # ---- sampling -------------------------------------------------------------------------

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        return_labels: bool = False,
        component: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """n samples from p_0 (float64, shape (n, *dims)); optionally their component labels."""
        n = check_int(n, "n")
        if component is not None and component not in range(self.num_components):
            raise ValueError(
                f"component must be an index in [0, {self.num_components}), got {component!r}"
            )
        if component is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            labels = torch.full((n,), component, dtype=torch.long)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        root = self._evecs[labels] * self._evals[labels].sqrt()[:, None, :]  # U diag(sqrt d)
        x = (self.means[labels] + (root @ z[..., None])[..., 0]).reshape(n, *self.dims)
        return (x, labels) if return_labels else x

    def sample_t(
        self, n: int, t: float | Tensor, sde: SDE, generator: torch.Generator | None = None
    ) -> Tensor:
        """n samples from p_t: perturb samples of p_0 with the SDE's kernel."""
        x0 = self.sample(n, generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return sde.perturb(x0, torch.as_tensor(t, dtype=x0.dtype), noise)

    # ---- exact densities and scores ----------------------------------------------------------

    def _moments(self, x: Tensor, t: Tensor | float, sde: SDE) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample/component projected residuals r = U^T (x - gamma mu), precisions 1 / v
        (v = gamma^2 d + sigma^2 on the eigenbasis) and log N + log w_k, the log joint.

        The variances depend on t alone, so they and their log-determinants are computed once
        per distinct time of the batch (a solver's batch shares one) and gathered."""
        x = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # also an empty batch
        if x.shape[1] != self.dim:
            raise ValueError(
                f"x has {x.shape[1]} features per sample, the mixture has D = {self.dim}"
            )
        t_unique, index = torch.unique(sde.time(t, x).expand(x.shape[0]), return_inverse=True)
        gamma, sigma = sde.marginal(t_unique)
        evals, evecs, means, weights = (
            a.to(x.device, x.dtype) for a in (self._evals, self._evecs, self.means, self.weights)
        )
        v = gamma[:, None, None] ** 2 * evals[None] + sigma[:, None, None] ** 2  # (U, K, D)
        log_norm = torch.log(weights) - 0.5 * (
            torch.log(v).sum(-1) + self.dim * math.log(2 * math.pi)
        )  # (U, K)
        diff = x[:, None, :] - gamma[index, None, None] * means[None]  # (B, K, D)
        r = torch.einsum("kdj,bkd->bkj", evecs, diff)  # coordinates in each eigenbasis
        precision = 1 / v if len(t_unique) == 1 else (1 / v)[index]  # broadcasts over the batch
        log_joint = log_norm[index] - 0.5 * (r * r * precision).sum(-1)
        return r, precision, log_joint

    def log_prob(self, x: Tensor, t: Tensor | float, sde: SDE) -> Tensor:
        """Exact log p_t(x), one value per sample."""
        return torch.logsumexp(self._moments(x, t, sde)[2], dim=1)

    def responsibilities(self, x: Tensor, t: Tensor | float, sde: SDE) -> Tensor:
        """Exact p_t(k | x), shape (batch, K): the Bayes-optimal classifier on noisy data."""
        return torch.softmax(self._moments(x, t, sde)[2], dim=1)

    def log_responsibilities(self, x: Tensor, t: Tensor | float, sde: SDE) -> Tensor:
        """Exact log p_t(k | x), shape (batch, K), finite where p_t(k | x) underflows to 0."""
        return torch.log_softmax(self._moments(x, t, sde)[2], dim=1)

    def data_log_prob(self, x: Tensor) -> Tensor:
        """Exact log p_0(x), one value per sample."""
        return self.log_prob(x, 0.0, _T0_SDE)

    def component_of(self, x: Tensor) -> Tensor:
        """Each sample's most probable component under p_0, argmax_k p_0(k | x), shape (batch,):
        the mode a final sample belongs to."""
        return self._moments(x, 0.0, _T0_SDE)[2].argmax(1)

    def score(
        self, x: Tensor, t: Tensor | float, sde: SDE, component: Tensor | int | None = None
    ) -> Tensor:
        """Exact grad_x log p_t(x); with `component`, the score of that component alone
        (the class-conditional score grad log p_t(x | y = component))."""
        r, precision, log_joint = self._moments(x, t, sde)
        evecs = self._evecs.to(x.device, x.dtype)
        # -C_k^{-1} (x - gamma mu_k), back from each eigenbasis
        comp_scores = -torch.einsum("kdj,bkj->bkd", evecs, r * precision)
        if component is None:
            s = (torch.softmax(log_joint, dim=1)[..., None] * comp_scores).sum(1)
        else:
            idx = torch.as_tensor(component, device=x.device).expand(x.shape[0])
            s = comp_scores[torch.arange(x.shape[0], device=x.device), idx]
        return s.reshape(x.shape)

    def score_fn(self, sde: SDE, component: Tensor | int | None = None) -> ScoreFn:
        """The exact score as a score_fn(x, t): a drop-in stand-in for a trained network."""

        def score_fn(x: Tensor, t: Tensor) -> Tensor:
            return self.score(x, t, sde, component)

        return score_fn

    def eps_fn(self, sde: SDE) -> ScoreFn:
        """The exact noise prediction eps*(x, t) = -sigma_t score(x, t)."""

        def eps_fn(x: Tensor, t: Tensor) -> Tensor:
            t = sde.time(t, x)
            return -append_dims(sde.marginal(t)[1], x.ndim) * self.score(x, t, sde)

        return eps_fn

    # ---- conditioning -------------------------------------------------------------------------

    def condition(self, known_mask: Tensor, x_known: Tensor) -> GaussianMixture:
        """The exact conditional p_0(x_u | x_o = x_known) of the unknown coordinates.

        One observation. known_mask: bool of shape `dims` (or (D,)), True where observed.
        x_known: the observed values, either a full tensor of shape `dims`/(D,) (only the masked
        entries are read) or the vector of the known entries in flattened order.
        Returns a mixture over the unknown coordinates (flattened order, dims (D_u,)): per component
        the Gaussian conditional
            mu_u|o = mu_u + S_uo S_oo^{-1} (x_o - mu_o),   S_u|o = S_uu - S_uo S_oo^{-1} S_ou,
        with weights pi_k N(x_o; mu_o, S_oo) renormalised (Bayes' rule over components).
        This is the target that imputation / inpainting samplers are measured against.
        """
        mask = torch.as_tensor(known_mask, dtype=torch.bool, device=self.means.device).flatten()
        if mask.numel() != self.dim:
            raise ValueError(f"known_mask has {mask.numel()} entries; need D = {self.dim}")
        n_known = int(mask.sum())
        if n_known == self.dim:
            raise ValueError("known_mask marks every coordinate as known: nothing to condition")
        xk = torch.as_tensor(x_known, dtype=self.means.dtype, device=self.means.device).flatten()
        if xk.numel() == self.dim:
            xk = xk[mask]
        elif xk.numel() != n_known:
            raise ValueError(
                f"x_known must have D = {self.dim} entries or one per known coordinate "
                f"({n_known}), got {xk.numel()}"
            )
        u, o = ~mask, mask
        mu_u, mu_o = self.means[:, u], self.means[:, o]
        s_uu = self.covs[:, u][:, :, u]
        s_uo = self.covs[:, u][:, :, o]
        s_oo = self.covs[:, o][:, :, o]
        chol = torch.linalg.cholesky(s_oo)  # (K, n_o, n_o)
        diff = (xk - mu_o)[..., None]  # (K, n_o, 1)
        white = torch.linalg.solve_triangular(chol, diff, upper=False)  # L^{-1}(x_o - mu_o)
        gain_t = torch.cholesky_solve(s_uo.transpose(-1, -2), chol)  # S_oo^{-1} S_ou
        means = mu_u + (s_uo @ torch.cholesky_solve(diff, chol))[..., 0]
        covs = s_uu - s_uo @ gain_t
        covs = 0.5 * (covs + covs.transpose(-1, -2))
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        log_lik = -0.5 * (white.square().sum((-2, -1)) + log_det + n_known * math.log(2 * math.pi))
        weights = torch.softmax(torch.log(self.weights) + log_lik, dim=0)
        # a component far from x_o can underflow to weight 0; keep it (same K, same labels) at the
        # smallest positive weight, which changes no density by a representable amount
        weights = weights.clamp_min(torch.finfo(weights.dtype).tiny)
        return GaussianMixture(weights, means, covs, dtype=self.means.dtype)

    # ---- closed forms for a single Gaussian ----------------------------------------------------

    def marginal_moments(self, t: float | Tensor, sde: SDE) -> tuple[Tensor, Tensor]:
        """Mean (D,) and covariance (D, D) of p_t (for a mixture, of the whole mixture)."""
        gamma, sigma = (
            a.to(self.means.dtype) for a in sde.marginal(torch.as_tensor(t, dtype=self.means.dtype))
        )
        mean_k = gamma * self.means
        mean = (self.weights[:, None] * mean_k).sum(0)
        cov_k = gamma**2 * self.covs + sigma**2 * torch.eye(self.dim, dtype=self.means.dtype)
        dev = mean_k - mean
        cov = (self.weights[:, None, None] * (cov_k + dev[:, :, None] * dev[:, None, :])).sum(0)
        return mean, cov

    def pf_ode_solution(self, x_s: Tensor, s: float, t: float, sde: SDE) -> Tensor:
        """The exact probability-flow ODE map from time s to time t, for a single Gaussian.

        With a Gaussian p_0 the PF-ODE is linear: in the eigenbasis of Sigma each coordinate's
        (x - gamma mu) / sqrt(gamma^2 d + sigma^2) is constant along trajectories.
        """
        if self.num_components != 1:
            raise ValueError("pf_ode_solution is exact only for a single Gaussian (K = 1)")
        flat = x_s.reshape(x_s.shape[0], -1)
        dtype, dev = flat.dtype, flat.device
        U, d, mu = (a.to(dev, dtype) for a in (self._evecs[0], self._evals[0], self.means[0]))
        (gs, ss), (gt, st) = (
            sde.marginal(torch.as_tensor(u, dtype=dtype, device=dev)) for u in (s, t)
        )
        scale = torch.sqrt((gt**2 * d + st**2) / (gs**2 * d + ss**2))
        z = (flat - gs * mu) @ U
        return ((z * scale) @ U.T + gt * mu).reshape(x_s.shape)
