"""Sample-quality metrics: distances between sample sets, and exact ones against the oracle.

- `sliced_wasserstein`: sliced W2, the root mean squared 1-D W2 over random directions;
- `mmd2`: the unbiased MMD^2 estimator with a Gaussian (RBF) kernel;
- `gaussian_kl`, `gaussian_kl_from_samples`: KL between Gaussians, and from sample moments to a
  Gaussian target's exact moments (deterministic samplers on a Gaussian target output Gaussians);
- `mean_log_prob`, `mode_coverage`: exact log p_0 under the oracle and coverage of its modes;
- `frechet_distance`, `precision_recall`: Fréchet distance and k-NN manifold precision/recall
  (Kynkäänniemi et al. 2019) in a feature space; `digits_classifier` is the feature network for
  8x8 digits, trained here by a fixed procedure and cached, never downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .oracle import GaussianMixture

__all__ = [
    "DigitsClassifier",
    "ModeCoverage",
    "SlicedW2",
    "default_cache_dir",
    "digits_classifier",
    "exact_log_prob",
    "frechet_distance",
    "gaussian_frechet_distance",
    "gaussian_kl",
    "gaussian_kl_from_samples",
    "image_metrics",
    "mean_log_prob",
    "median_bandwidth",
    "mmd2",
    "mode_coverage",
    "oracle_metrics",
    "precision_recall",
    "sliced_w2_projected",
    "sliced_wasserstein",
    "sliced_wasserstein_floor",
    "train_digits_classifier",
    "unit_directions",
]

_BLOCK = 2048  # rows per block in pairwise computations, to bound memory


def _flat(x: Tensor, name: str) -> Tensor:
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (n, *dims) with n >= 1, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten both sets to (n, D), check D matches, and compute in their common float dtype."""
    x, y = _flat(x, "x"), _flat(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features per sample, y has {y.shape[1]}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    return x.to(dtype), y.to(dtype)


# ---- sliced Wasserstein -------------------------------------------------------------------------


def _w2_squared_sorted(xs: Tensor, ys: Tensor) -> Tensor:
    """Exact W2^2 between 1-D empirical measures, per column of the sorted (n, P) and (m, P) sets.

    W2^2 = integral_0^1 (F^-1(u) - G^-1(u))^2 du, where both quantile functions are step functions;
    with breakpoints i/n and j/m counted in units of 1/(n m), the integral is an exact finite sum.
    """
    n, m = xs.shape[0], ys.shape[0]
    if n == m:
        return (xs - ys).square().mean(0)
    dev = xs.device
    knots = torch.unique(
        torch.cat([torch.arange(1, n + 1, device=dev) * m, torch.arange(1, m + 1, device=dev) * n])
    )
    widths = torch.diff(knots, prepend=knots.new_zeros(1)).to(xs.dtype) / (n * m)
    ix = (knots + m - 1) // m - 1  # F^-1 on the interval ending at this knot: ceil(u n) - 1
    iy = (knots + n - 1) // n - 1
    return (widths[:, None] * (xs[ix] - ys[iy]).square()).sum(0)


def unit_directions(
    dim: int,
    num: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """`num` directions uniform on the unit sphere of R^dim, the columns of a (dim, num) tensor:
    the projections of a sliced distance (`SlicedW2`)."""
    theta = torch.randn(dim, num, generator=generator, dtype=dtype, device=device)
    return theta / theta.norm(dim=0, keepdim=True)


def sliced_w2_projected(x: Tensor, y: Tensor) -> Tensor:
    """Sliced W2 between two sample sets from their projections on the same unit directions,
    (n, P) and (m, P): what `SlicedW2` computes once the sets are projected, for a caller that
    keeps P numbers per sample instead of the samples."""
    return _w2_squared_sorted(x.sort(0).values, y.sort(0).values).mean().sqrt()


class SlicedW2:
    """Sliced W2 to one fixed reference set y: the directions and y's sorted projections are
    computed once, so scoring many sample sets against it (a benchmark's table) costs one sort
    of each. `SlicedW2(y, P, generator)(x)` is `sliced_wasserstein(x, y, P, generator)`.

    With `levels=n`, y is kept only as its empirical quantiles at (i - 1/2) / n, i = 1..n, and
    sample sets of n points are scored against those: for a reference many times larger than the
    sample sets, the W2 to y's distribution rather than to its particular draw, in the memory of
    n points (the reference is projected `_CHUNK` directions at a time).
    """

    _CHUNK = 32

    def __init__(
        self,
        y: Tensor,
        num_projections: int = 512,
        generator: torch.Generator | None = None,
        levels: int | None = None,
    ):
        if int(num_projections) != num_projections or num_projections < 1:
            raise ValueError(f"num_projections must be a positive integer, got {num_projections}")
        y = _flat(y, "y")
        y = y.to(torch.promote_types(y.dtype, torch.float32))
        self.theta = unit_directions(y.shape[1], int(num_projections), generator, y.dtype, y.device)
        self.levels = levels
        if levels is None:
            self.ys = self._sorted_projections(y)
            return
        if not 1 <= levels <= y.shape[0]:
            raise ValueError(f"levels must lie in [1, {y.shape[0]}] (the size of y), got {levels}")
        m = y.shape[0]
        u = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
        index = (torch.ceil(u * m).long() - 1).to(y.device)  # F^-1(u) = y_(ceil(u m))
        self.ys = torch.cat(
            [
                torch.sort(theta_c.T @ y.T, dim=1).values[:, index].T
                for theta_c in self.theta.split(self._CHUNK, dim=1)
            ],
            dim=1,
        )

    def _sorted_projections(self, x: Tensor) -> Tensor:
        # one projection per row: sorting contiguous rows is several times faster than columns
        return torch.sort(self.theta.T.to(x.dtype) @ x.T, dim=1).values.T

    def __call__(self, x: Tensor) -> Tensor:
        x = _flat(x, "x")
        if x.shape[1] != self.theta.shape[0]:
            raise ValueError(f"x has {x.shape[1]} features per sample, y has {self.theta.shape[0]}")
        if self.levels is not None and x.shape[0] != self.levels:
            raise ValueError(f"x has {x.shape[0]} samples; this reference scores {self.levels}")
        dtype = torch.promote_types(x.dtype, self.theta.dtype)
        xs = self._sorted_projections(x.to(dtype))
        return _w2_squared_sorted(xs, self.ys.to(dtype)).mean().sqrt()


def sliced_wasserstein(
    x: Tensor, y: Tensor, num_projections: int = 512, generator: torch.Generator | None = None
) -> Tensor:
    """Sliced Wasserstein-2 distance between two sample sets of shape (n, *dims) and (m, *dims).

    SW2 = (E_theta W2^2(theta^T x, theta^T y))^(1/2) over directions theta uniform on the sphere,
    estimated with `num_projections` directions from `generator`; each 1-D W2 is exact for the
    empirical measures (sizes may differ). For N(0, s^2 I) against N(delta, s^2 I) in D dimensions
    the population value is |delta| / sqrt(D), since E (theta . delta)^2 = |delta|^2 / D.
    """
    x, y = _pair(x, y)
    return SlicedW2(y, num_projections, generator)(x)


def sliced_wasserstein_floor(
    pool: Tensor,
    y: Tensor,
    n: int,
    num_projections: int = 512,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sliced W2 from each of the len(pool) // n disjoint n-point subsets of `pool` to y, on one
    set of directions: what exact samples of n points score against y, when pool is more data.

    One such value is a poor yardstick: with n = 2000 points of a 2-D toy the disjoint subsets
    of one training set range over 0.6-1.5x their median (a mode's weight moves by its binomial
    noise, and W2 charges it the squared distance to the next mode). Read a model's n samples
    against the median of these, and their spread as the noise of that comparison.
    """
    pool, y = _pair(pool, y)
    if int(n) != n or not 1 <= n <= pool.shape[0]:
        raise ValueError(f"n must be an integer in [1, {pool.shape[0]}] (the pool's size), got {n}")
    score = SlicedW2(y, num_projections, generator)
    return torch.stack([score(chunk) for chunk in pool[: pool.shape[0] // n * n].split(n)])


# ---- MMD ----------------------------------------------------------------------------------------


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    return (a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)


def _kernel_sum(a: Tensor, b: Tensor, inv_two_h2: Tensor, same: bool) -> Tensor:
    """sum_{i,j} sum_h exp(-|a_i - b_j|^2 / (2 h^2)), leaving out i = j when a is b."""
    total = a.new_zeros(())
    for start in range(0, a.shape[0], _BLOCK):
        d2 = _sq_dists(a[start : start + _BLOCK], b)
        k = torch.exp(-d2[..., None] * inv_two_h2).sum(-1)
        if same:
            rows = torch.arange(k.shape[0], device=a.device)
            k[rows, rows + start] = 0
        total = total + k.sum()
    return total


def median_bandwidth(x: Tensor, y: Tensor, max_points: int = 1000) -> float:
    """The median heuristic: the median pairwise Euclidean distance in the pooled sample.

    At most `max_points` evenly spaced points of the pool are used, so it stays cheap and
    deterministic.
    """
    pool = torch.cat(_pair(x, y))
    idx = torch.linspace(0, pool.shape[0] - 1, min(max_points, pool.shape[0])).round().long()
    pool = pool[idx.to(pool.device)]
    d2 = _sq_dists(pool, pool)
    off = d2[~torch.eye(pool.shape[0], dtype=torch.bool, device=pool.device)]
    return float(off.median().sqrt())


def mmd2(x: Tensor, y: Tensor, bandwidth: float | Sequence[float] | None = None) -> Tensor:
    """Unbiased estimate of MMD^2 (Gretton et al. 2012) with the Gaussian kernel.

    k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)) over the bandwidths h given (a float or a list);
    None uses one bandwidth from the median heuristic (`median_bandwidth`). The U-statistic
    leaves out the i = j terms, so it is unbiased and can be slightly negative when x and y come
    from the same distribution. Needs at least 2 samples in each set.
    """
    x, y = _pair(x, y)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd2 needs at least 2 samples per set, got {n} and {m}")
    if bandwidth is None:
        bandwidth = median_bandwidth(x, y)
    h = torch.as_tensor(bandwidth, dtype=x.dtype, device=x.device).flatten()
    if h.numel() == 0 or not bool(torch.isfinite(h).all()) or bool((h <= 0).any()):
        raise ValueError(f"bandwidths must be finite and > 0, got {h.tolist()}")
    inv = 1 / (2 * h * h)
    kxx = _kernel_sum(x, x, inv, same=True) / (n * (n - 1))
    kyy = _kernel_sum(y, y, inv, same=True) / (m * (m - 1))
    kxy = _kernel_sum(x, y, inv, same=False) / (n * m)
    return kxx + kyy - 2 * kxy


# ---- Gaussian KL --------------------------------------------------------------------------------


def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sample mean and unbiased sample covariance of (n, D) samples."""
    mean = x.mean(0)
    c = x - mean
    return mean, c.T @ c / (x.shape[0] - 1)


def gaussian_kl(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> Tensor:
    """KL(N(mean1, cov1) || N(mean2, cov2)) for full (D, D) covariances, in nats.

    0.5 [tr(C2^-1 C1) + (m2 - m1)^T C2^-1 (m2 - m1) - D + log det C2 - log det C1].
    """
    d = mean1.shape[-1]
    l2 = torch.linalg.cholesky(cov2)
    l1 = torch.linalg.cholesky(cov1)
    a = torch.linalg.solve_triangular(l2, l1, upper=False)  # tr(C2^-1 C1) = |L2^-1 L1|_F^2
    b = torch.linalg.solve_triangular(l2, (mean2 - mean1)[..., None], upper=False)
    logdet = 2 * (
        torch.log(torch.diagonal(l2, dim1=-2, dim2=-1))
        - torch.log(torch.diagonal(l1, dim1=-2, dim2=-1))
    ).sum(-1)
    return 0.5 * (a.square().sum((-2, -1)) + b.square().sum((-2, -1)) - d + logdet)


def gaussian_kl_from_samples(x: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    """KL(N(m_hat, C_hat) || N(mean, cov)) from the samples' mean and (unbiased) covariance.

    The exact KL of a sampler's output to a Gaussian target when that output is Gaussian (a
    deterministic sampler driven by the exact score on a Gaussian target). Its sampling bias is
    about (D + D (D + 1) / 2) / (2 n) nats for n samples of the target itself.
    """
    x = _flat(x, "x")
    mean = torch.as_tensor(mean).to(device=x.device, dtype=x.dtype).flatten()
    cov = torch.as_tensor(cov).to(device=x.device, dtype=x.dtype)
    d = x.shape[1]
    if mean.numel() != d or cov.shape != (d, d):
        raise ValueError(
            f"target mean/cov must have shapes ({d},), ({d}, {d}); got "
            f"{tuple(mean.shape)}, {tuple(cov.shape)}"
        )
    if x.shape[0] <= d:
        raise ValueError(
            f"need more samples than dimensions (D = {d}) for a covariance, got {x.shape[0]}"
        )
    m_hat, c_hat = _moments(x.double())
    return gaussian_kl(m_hat, c_hat, mean.double(), cov.double()).to(x.dtype)


# ---- exact quantities under the oracle ----------------------------------------------------------


def exact_log_prob(x: Tensor, mixture: GaussianMixture) -> Tensor:
    """Exact log p_0(x) under the oracle's mixture, one value per sample, in nats."""
    return mixture.data_log_prob(x)


def mean_log_prob(x: Tensor, mixture: GaussianMixture) -> Tensor:
    """Mean exact log p_0(x) of the samples under the oracle's mixture, in nats per sample."""
    return exact_log_prob(x, mixture).mean()


def _chi2_quantile(level: float, dof: int) -> float:
    """The chi-square(dof) quantile at `level`: bisection on its cdf gammainc(dof/2, q/2)."""
    lo, hi = (
        torch.tensor(0.0, dtype=torch.float64),
        torch.tensor(float(dof) + 100.0 * dof**0.5 + 100),
    )
    half = torch.tensor(dof / 2, dtype=torch.float64)
    for _ in range(200):  # the bracket halves each time: far below float64 resolution at the end
        mid = 0.5 * (lo + hi)
        if float(torch.special.gammainc(half, mid / 2)) < level:
            lo = mid
        else:
            hi = mid
    return float(0.5 * (lo + hi))


@dataclass(frozen=True)
class ModeCoverage:
    """coverage: fraction of components with at least `min_count` in-mode samples;
    in_mode_fraction: fraction of all samples that lie in the mode they are assigned to;
    weight_error: total variation between the in-mode samples' component frequencies and the
    mixture weights; counts: in-mode samples per component."""

    coverage: float
    in_mode_fraction: float
    weight_error: float
    counts: tuple[int, ...]


def mode_coverage(
    x: Tensor,
    mixture: GaussianMixture,
    radius: float | None = None,
    level: float = 0.999,
    min_count: int = 1,
) -> ModeCoverage:
    """Which mixture components the samples reach, and how many samples land in a mode.

    Each sample is assigned to its most probable component (the exact responsibilities at t = 0).
    It is in that mode when its squared Mahalanobis distance to the component is at most the
    chi-square(D) quantile at `level` (a sample of the component itself is in mode with
    probability `level`), or, with `radius`, when its Euclidean distance to the mean is at most
    radius.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if radius is not None and not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    x = _flat(x, "x").to(mixture.means.device, mixture.means.dtype)
    label = mixture.component_of(x)
    diff = x - mixture.means[label]
    if radius is None:
        chol = torch.linalg.cholesky(mixture.covs)
        maha = x.new_zeros(x.shape[0])  # squared Mahalanobis distance, one component at a time
        for k in range(mixture.num_components):
            sel = label == k
            white = torch.linalg.solve_triangular(chol[k], diff[sel].T, upper=False)
            maha[sel] = white.square().sum(0)
        inside = maha <= _chi2_quantile(level, mixture.dim)
    else:
        inside = diff.norm(dim=1) <= radius
    counts = torch.bincount(label[inside], minlength=mixture.num_components)
    freq = counts.to(mixture.weights.dtype) / max(int(counts.sum()), 1)
    return ModeCoverage(
        coverage=float((counts >= min_count).double().mean()),
        in_mode_fraction=float(inside.double().mean()),
        weight_error=float(0.5 * (freq - mixture.weights).abs().sum()),
        counts=tuple(int(c) for c in counts),
    )


def oracle_metrics(
    x: Tensor,
    mixture: GaussianMixture,
    reference: Tensor | None = None,
    num_projections: int = 512,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Every oracle metric of the samples x, as plain floats (for metrics.json and reports).

    sliced_w2 and mmd2 against `reference` (by default as many fresh samples of the mixture,
    drawn from `generator`), mean_log_p0, mode coverage for K > 1 and the exact Gaussian KL for
    K = 1.
    """
    x = _flat(x, "x").to(mixture.means.device, mixture.means.dtype)
    if reference is None:
        reference = mixture.sample(x.shape[0], generator)
    reference = _flat(reference, "reference").to(x.device, x.dtype)
    out = {
        "sliced_w2": float(sliced_wasserstein(x, reference, num_projections, generator)),
        "mmd2": float(mmd2(x, reference)),
        "mean_log_p0": float(mean_log_prob(x, mixture)),
    }
    if mixture.num_components > 1:
        cov = mode_coverage(x, mixture)
        out.update(
            mode_coverage=cov.coverage,
            in_mode_fraction=cov.in_mode_fraction,
            mode_weight_error=cov.weight_error,
        )
    elif x.shape[0] > mixture.dim:
        out["gaussian_kl"] = float(gaussian_kl_from_samples(x, mixture.means[0], mixture.covs[0]))
    return out


# ---- Fréchet distance and precision / recall in a feature space ---------------------------------


def _psd_sqrt(c: Tensor) -> Tensor:
    evals, evecs = torch.linalg.eigh(c)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def gaussian_frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> Tensor:
    """|m1 - m2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)): the squared W2 distance between Gaussians.

    tr (C1 C2)^(1/2) is computed as the sum of square roots of the eigenvalues of the symmetric
    C1^(1/2) C2 C1^(1/2) (same spectrum), which is stable for singular covariances.
    """
    s1 = _psd_sqrt(cov1)
    cross = torch.linalg.eigvalsh(s1 @ cov2 @ s1).clamp_min(0).sqrt().sum()
    return (mean1 - mean2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross


def frechet_distance(feat_x: Tensor, feat_y: Tensor) -> Tensor:
    """Fréchet distance between Gaussians fitted to feature sets (n, F) and (m, F) (as in FID)."""
    fx, fy = _pair(feat_x, feat_y)
    m1, c1 = _moments(fx.double())
    m2, c2 = _moments(fy.double())
    return gaussian_frechet_distance(m1, c1, m2, c2).to(fx.dtype)


def _kth_nn_radius(a: Tensor, k: int) -> Tensor:
    """Distance from each point of a to its k-th nearest neighbour in a (itself excluded)."""
    radii = []
    for start in range(0, a.shape[0], _BLOCK):
        d2 = _sq_dists(a[start : start + _BLOCK], a)
        radii.append(d2.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(radii).sqrt()


def _fraction_inside(points: Tensor, centres: Tensor, radii: Tensor) -> float:
    """Fraction of points inside at least one ball (centres_i, radii_i)."""
    hits = []
    for start in range(0, points.shape[0], _BLOCK):
        d = _sq_dists(points[start : start + _BLOCK], centres).sqrt()
        hits.append((d <= radii[None, :]).any(1))
    return float(torch.cat(hits).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of feature sets (n, F), (m, F).

    Each set's manifold is the union of balls around its points with radius the distance to the
    k-th nearest neighbour within the set. precision: fraction of fake points inside the real
    manifold; recall: fraction of real points inside the fake manifold.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    real, fake = _pair(real, fake)
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(
            f"each set needs more than k = {k} points, got {real.shape[0]} and {fake.shape[0]}"
        )
    precision = _fraction_inside(fake, real, _kth_nn_radius(real, k))
    recall = _fraction_inside(real, fake, _kth_nn_radius(fake, k))
    return precision, recall


# ---- the digits feature network -----------------------------------------------------------------

DIGITS_CLASSIFIER_VERSION = 1


class DigitsClassifier(nn.Module):
    """A small MLP on scikit-learn's 8x8 digits: 64 -> 256 -> 64 (features) -> 10 classes.

    Input: images in [-1, 1] (the package's scaling of the digits, pixel / 8 - 1), of shape
    (B, 1, 8, 8), (B, 8, 8) or (B, 64).
    """

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, self.feature_dim), nn.ReLU()
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def _check(self, x: Tensor) -> Tensor:
        if x[0].numel() != 64:
            raise ValueError(f"digits images have 64 pixels, got shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], 64).to(self.head.weight.dtype)

    def features(self, x: Tensor) -> Tensor:
        """The 64-d penultimate activations used for Fréchet distance and precision/recall."""
        return self.body(self._check(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _digits_split(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's 8x8 digits in [-1, 1], split 80/20 by a permutation from `seed`."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.images, dtype=torch.float32).reshape(-1, 64) / 8 - 1
    y = torch.as_tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


@torch.enable_grad()
def train_digits_classifier(seed: int = 0, epochs: int = 25) -> tuple[DigitsClassifier, float]:
    """Train the feature network by a fixed procedure; return it and its held-out accuracy.

    Everything random comes from `seed`: the 80/20 split, the initial weights (drawn under a
    forked global RNG, which is left untouched), the batch order and the Gaussian pixel noise
    (std 0.1) added as augmentation so the features tolerate slightly noisy samples. Adam, lr 1e-3,
    batch 64, on CPU in float32. Gradients are on whatever the caller's mode: a first
    `image_metrics` call under `torch.no_grad()` (a benchmark's) trains the network it caches.
    """
    x_tr, y_tr, x_te, y_te = _digits_split(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(y_tr), generator=g)
        for start in range(0, len(perm), 64):
            idx = perm[start : start + 64]
            xb = x_tr[idx] + 0.1 * torch.randn(len(idx), 64, generator=g)
            loss = nn.functional.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_te).argmax(1) == y_te).float().mean())
    return model, accuracy


def default_cache_dir() -> Path:
    """$SDE_DIFFUSION_CACHE, else $XDG_CACHE_HOME/sde_diffusion, else ~/.cache/sde_diffusion."""
    if os.environ.get("SDE_DIFFUSION_CACHE"):
        return Path(os.environ["SDE_DIFFUSION_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sde_diffusion"


def digits_classifier(
    cache_dir: str | Path | None = None, seed: int = 0, device: torch.device | str | None = None
) -> DigitsClassifier:
    """The digits feature network: loaded from the local cache, or trained once and cached.

    Weights live in `cache_dir` (default `default_cache_dir()`) as safetensors; nothing is ever
    downloaded. The file is written to a temporary name and renamed, so concurrent first calls
    never read a half-written file.
    """
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir or default_cache_dir()) / (
        f"digits_classifier_v{DIGITS_CLASSIFIER_VERSION}_seed{seed}.safetensors"
    )
    model = DigitsClassifier()
    if path.exists():
        model.load_state_dict(load_file(path))
    else:
        model, accuracy = train_digits_classifier(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(model.state_dict(), tmp, metadata={"test_accuracy": f"{accuracy:.4f}"})
        os.replace(tmp, path)
    return model.eval().requires_grad_(False).to(device)


def image_metrics(
    samples: Tensor,
    reference: Tensor,
    classifier: DigitsClassifier | None = None,
    k: int = 3,
) -> dict[str, float]:
    """Fréchet distance and precision/recall of digit samples against reference images, in the
    features of the digits classifier (images in [-1, 1], 64 pixels each)."""
    net = classifier or digits_classifier(device=samples.device)
    with torch.no_grad():
        fs, fr = net.features(samples), net.features(reference.to(samples.device))
    precision, recall = precision_recall(fr, fs, k)
    return {
        "frechet_distance": float(frechet_distance(fs, fr)),
        "precision": precision,
        "recall": recall,
    }
