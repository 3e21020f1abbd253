"""Metrics on cases with known answers: identical sets, shifted Gaussians, closed forms, scipy."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from sde_diffusion import GaussianMixture
from sde_diffusion import metrics as M

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=_gen(seed), dtype=F64)
    return a @ a.T / d + 0.2 * torch.eye(d, dtype=F64)


# ---- sliced Wasserstein -------------------------------------------------------------------------


def test_sliced_w2_of_identical_sets_is_zero():
    x = torch.randn(300, 5, generator=_gen(0), dtype=F64)
    assert float(M.sliced_wasserstein(x, x.clone(), 64, _gen(1))) == 0.0


def test_sliced_w2_of_shifted_isotropic_gaussians_is_shift_over_sqrt_d():
    # theta uniform on the sphere: E (theta . delta)^2 = |delta|^2 / D, and the 1-D W2 of two
    # equal-variance Gaussians is the distance of their means, so SW2^2 = |delta|^2 / D = 1 here
    d, n = 4, 3000
    delta = torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=F64)
    x = 0.7 * torch.randn(n, d, generator=_gen(2), dtype=F64)
    y = 0.7 * torch.randn(n, d, generator=_gen(3), dtype=F64) + delta
    sw = M.sliced_wasserstein(x, y, 1000, _gen(4))
    # std from 1000 directions about 0.03, from the samples' means about 0.02
    assert float(sw) ** 2 == pytest.approx(1.0, abs=0.12)


def _w2_1d(x: torch.Tensor, y: torch.Tensor) -> float:
    """W2 of two 1-D empirical measures: the quantile step functions integrated at midpoints of
    a grid that refines every breakpoint i / len(x) and j / len(y)."""
    m = len(x) * len(y) * 8
    u = (torch.arange(m, dtype=F64) + 0.5) / m
    qx = torch.sort(x[:, 0]).values[(u * len(x)).floor().long()]
    qy = torch.sort(y[:, 0]).values[(u * len(y)).floor().long()]
    return float((qx - qy).square().mean().sqrt())


def test_one_dimensional_w2_is_exact_for_unequal_sizes():
    # in 1-D every projection is +-1, so SW2 = W2
    x = torch.randn(7, 1, generator=_gen(5), dtype=F64)
    y = torch.randn(5, 1, generator=_gen(6), dtype=F64) + 0.5
    ref = _w2_1d(x, y)
    assert float(M.sliced_wasserstein(x, y, 3, _gen(7))) == pytest.approx(ref, rel=1e-12)


def test_sliced_w2_floor_scores_each_disjoint_subset():
    pool = torch.randn(23, 1, generator=_gen(10), dtype=F64)  # three subsets of 7, two left over
    y = torch.randn(5, 1, generator=_gen(11), dtype=F64) + 0.5
    floor = M.sliced_wasserstein_floor(pool, y, 7, 3, _gen(12))
    refs = [_w2_1d(pool[i : i + 7], y) for i in (0, 7, 14)]
    torch.testing.assert_close(floor, torch.tensor(refs, dtype=F64), rtol=1e-12, atol=0)
    for n in (0, 24, 2.5):
        with pytest.raises(ValueError, match="pool's size"):
            M.sliced_wasserstein_floor(pool, y, n)


def test_sliced_w2_reproducible_and_validates():
    x = torch.randn(50, 3, generator=_gen(8))
    y = torch.randn(60, 3, generator=_gen(9))
    a = M.sliced_wasserstein(x, y, 100, _gen(1))
    assert torch.equal(a, M.sliced_wasserstein(x, y, 100, _gen(1)))
    assert a.dtype == torch.float32
    with pytest.raises(ValueError, match="num_projections"):
        M.sliced_wasserstein(x, y, 0)
    with pytest.raises(ValueError, match="features per sample"):
        M.sliced_wasserstein(x, torch.zeros(5, 4))


# ---- MMD ----------------------------------------------------------------------------------------


def test_mmd_of_shifted_gaussians_matches_closed_form():
    # X - X' ~ N(0, 2 s^2 I), X - Y ~ N(delta, 2 s^2 I), and E exp(-|Z|^2 / (2 h^2)) for
    # Z ~ N(m, v I) is (h^2 / (h^2 + v))^(D/2) exp(-|m|^2 / (2 (h^2 + v))), so
    # MMD^2 = 2 c (1 - exp(-|delta|^2 / (2 (h^2 + 2 s^2)))) with c = (h^2 / (h^2 + 2 s^2))^(D/2)
    d, s, h = 3, 1.0, 1.5
    delta = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    x = s * torch.randn(1500, d, generator=_gen(10), dtype=F64)
    y = s * torch.randn(1500, d, generator=_gen(11), dtype=F64) + delta
    v = h * h + 2 * s * s
    expected = 2 * (h * h / v) ** (d / 2) * (1 - math.exp(-float(delta @ delta) / (2 * v)))
    assert float(M.mmd2(x, y, h)) == pytest.approx(expected, abs=0.01)


def test_mmd_same_distribution_and_identical_sets():
    x = torch.randn(1000, 2, generator=_gen(12), dtype=F64)
    y = torch.randn(1000, 2, generator=_gen(13), dtype=F64)
    assert abs(float(M.mmd2(x, y, 1.0))) < 3e-3
    # x against itself: the cross term keeps its diagonal, so the value lies in [-2/n, 0]
    same = float(M.mmd2(x, x, 1.0))
    assert -2 / 1000 <= same <= 0


def test_mmd_with_several_bandwidths_is_the_sum_of_kernels():
    x = torch.randn(100, 2, generator=_gen(14), dtype=F64)
    y = torch.randn(120, 2, generator=_gen(15), dtype=F64) + 0.3
    both = M.mmd2(x, y, [0.5, 2.0])
    assert torch.allclose(both, M.mmd2(x, y, 0.5) + M.mmd2(x, y, 2.0))


def test_median_bandwidth_and_validation():
    pts = torch.tensor([[0.0], [1.0], [3.0]], dtype=F64)
    # pairwise distances 1, 2, 3 (twice each); the lower median of the six is 2
    assert M.median_bandwidth(pts[:2], pts[2:]) == pytest.approx(2.0)
    x = torch.randn(50, 2, generator=_gen(16))
    assert float(M.mmd2(x, x + 0.5)) == float(M.mmd2(x, x + 0.5, M.median_bandwidth(x, x + 0.5)))
    with pytest.raises(ValueError, match="bandwidths"):
        M.mmd2(x, x, -1.0)
    with pytest.raises(ValueError, match="at least 2"):
        M.mmd2(x[:1], x)


# ---- Gaussian KL --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_kl_matches_torch_distributions(seed):
    d = 4
    m1, m2 = (torch.randn(d, generator=_gen(seed + s), dtype=F64) for s in (10, 20))
    c1, c2 = _spd(d, seed), _spd(d, seed + 100)
    ref = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(m1, c1),
        torch.distributions.MultivariateNormal(m2, c2),
    )
    assert float(M.gaussian_kl(m1, c1, m2, c2)) == pytest.approx(float(ref), rel=1e-10)


def test_kl_from_samples_of_the_target_is_its_known_bias():
    # 2 n KL(N(m_hat, C_hat) || N(m, C)) is asymptotically chi-square with D + D (D + 1) / 2 dof
    d, n = 3, 5000
    mean, cov = torch.tensor([1.0, -1.0, 0.5], dtype=F64), _spd(d, 3)
    x = GaussianMixture.gaussian(mean, cov).sample(n, _gen(17))
    dof = d + d * (d + 1) / 2
    kl = float(M.gaussian_kl_from_samples(x, mean, cov))
    assert abs(kl - dof / (2 * n)) < 4 * math.sqrt(2 * dof) / (2 * n)


def test_kl_from_samples_of_shifted_and_scaled_gaussians_matches_closed_form():
    d, n = 3, 20000
    mean, cov = torch.zeros(d, dtype=F64), _spd(d, 4)
    chol = torch.linalg.cholesky(cov)
    delta = chol @ torch.tensor([1.0, 0.0, 0.0], dtype=F64)  # delta^T C^-1 delta = 1
    z = torch.randn(n, d, generator=_gen(18), dtype=F64)
    shifted = z @ chol.T + delta
    bias = (d + d * (d + 1) / 2) / (2 * n)
    assert float(M.gaussian_kl_from_samples(shifted, mean, cov)) == pytest.approx(
        0.5 + bias, abs=0.03
    )
    a = 2.0  # N(0, a C) against N(0, C): 0.5 D (a - 1 - log a)
    scaled = math.sqrt(a) * (z @ chol.T)
    expected = 0.5 * d * (a - 1 - math.log(a))
    assert float(M.gaussian_kl_from_samples(scaled, mean, cov)) == pytest.approx(expected, abs=0.03)


def test_kl_from_samples_validates():
    with pytest.raises(ValueError, match="more samples than dimensions"):
        M.gaussian_kl_from_samples(torch.zeros(3, 3), torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="target mean/cov"):
        M.gaussian_kl_from_samples(torch.zeros(10, 3), torch.zeros(2), torch.eye(3))


# ---- oracle metrics -----------------------------------------------------------------------------


def test_mean_log_prob_of_gaussian_samples_is_minus_the_entropy():
    cov = _spd(3, 5)
    gm = GaussianMixture.gaussian(torch.zeros(3), cov)
    x = gm.sample(20000, _gen(19))
    entropy = 0.5 * float(torch.logdet(2 * math.pi * math.e * cov))
    lp = M.exact_log_prob(x, gm)
    se = float(lp.std()) / math.sqrt(len(lp))
    assert float(M.mean_log_prob(x, gm)) == pytest.approx(-entropy, abs=4 * se)


def test_chi2_quantile_matches_scipy():
    import scipy.stats

    for level, dof in [(0.999, 2), (0.5, 1), (0.95, 64)]:
        expected = scipy.stats.chi2.ppf(level, dof)
        assert M._chi2_quantile(level, dof) == pytest.approx(expected, rel=1e-10)


def test_mode_coverage_on_known_cases():
    gm = GaussianMixture.ring(k=8, radius=5.0, std=0.3)
    x = gm.sample(8000, _gen(20))
    full = M.mode_coverage(x, gm)
    assert full.coverage == 1.0
    # each sample is in its own mode with probability 0.999 (components are far apart)
    assert full.in_mode_fraction == pytest.approx(0.999, abs=3 * math.sqrt(0.001 / 8000) + 1e-4)
    assert full.weight_error < 0.03
    assert sum(full.counts) == round(full.in_mode_fraction * 8000)
    one = M.mode_coverage(gm.sample(500, _gen(21), component=0), gm)
    assert one.coverage == 1 / 8
    assert one.weight_error == pytest.approx(7 / 8)
    far = M.mode_coverage(torch.full((10, 2), 100.0), gm)
    assert (far.coverage, far.in_mode_fraction) == (0.0, 0.0)
    by_radius = M.mode_coverage(gm.means + 0.5, gm, radius=0.8)
    assert (by_radius.coverage, by_radius.in_mode_fraction) == (1.0, 1.0)
    assert M.mode_coverage(gm.means + 0.5, gm, radius=0.6).in_mode_fraction == 0.0


def test_oracle_metrics_reports_every_applicable_metric():
    ring = GaussianMixture.ring()
    out = M.oracle_metrics(ring.sample(500, _gen(22)), ring, generator=_gen(23))
    assert set(out) == {
        "sliced_w2",
        "mmd2",
        "mean_log_p0",
        "mode_coverage",
        "in_mode_fraction",
        "mode_weight_error",
    }
    assert out["mode_coverage"] == 1.0
    gauss = GaussianMixture.gaussian([0.0, 1.0], 2.0)
    out = M.oracle_metrics(gauss.sample(2000, _gen(24)), gauss, generator=_gen(25))
    assert out["gaussian_kl"] < 0.01
    assert out["sliced_w2"] < 0.15


# ---- Fréchet distance and precision / recall ----------------------------------------------------


def _scipy_frechet(m1, c1, m2, c2) -> float:
    root = scipy.linalg.sqrtm(c1 @ c2).real
    return float(np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * root))


@pytest.mark.parametrize("seed", [0, 1])
def test_gaussian_frechet_matches_scipy_sqrtm(seed):
    d = 6
    m1, m2 = (torch.randn(d, generator=_gen(seed + s), dtype=F64) for s in (30, 40))
    c1, c2 = _spd(d, seed + 7), _spd(d, seed + 8)
    ours = float(M.gaussian_frechet_distance(m1, c1, m2, c2))
    ref = _scipy_frechet(m1.numpy(), c1.numpy(), m2.numpy(), c2.numpy())
    assert ours == pytest.approx(ref, rel=1e-8)
    a, b = torch.rand(d, dtype=F64) + 0.1, torch.rand(d, dtype=F64) + 0.1  # commuting case
    diag = float(M.gaussian_frechet_distance(m1, torch.diag(a), m1, torch.diag(b)))
    assert diag == pytest.approx(float((a.sqrt() - b.sqrt()).square().sum()), rel=1e-10)


def test_frechet_distance_of_feature_sets():
    gm = GaussianMixture.gaussian(torch.zeros(5), 0.5)
    f1, f2 = gm.sample(3000, _gen(26)), gm.sample(3000, _gen(27)) + 1.0
    ours = float(M.frechet_distance(f1, f2))
    m1, m2 = f1.mean(0).numpy(), f2.mean(0).numpy()
    c1, c2 = np.cov(f1.numpy(), rowvar=False), np.cov(f2.numpy(), rowvar=False)
    assert ours == pytest.approx(_scipy_frechet(m1, c1, m2, c2), rel=1e-6)
    # population value |delta|^2 = 5; the mean term's sampling std is sqrt(8 * 0.5 * 5 / n) = 0.08
    assert ours == pytest.approx(5.0, abs=0.3)
    assert abs(float(M.frechet_distance(f1, f1))) < 1e-8


def test_precision_recall_identical_disjoint_and_dropped_mode():
    x = torch.randn(400, 3, generator=_gen(28), dtype=F64)
    assert M.precision_recall(x, x) == (1.0, 1.0)
    assert M.precision_recall(x, x + 100.0) == (0.0, 0.0)
    two = torch.cat([x[:200] - 20, x[200:] + 20])
    precision, recall = M.precision_recall(two, x[:200] - 20)  # fake covers one of two modes
    assert precision == 1.0
    assert recall == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="k must"):
        M.precision_recall(x, x, k=0)


# ---- the digits feature network -----------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, M.digits_classifier(cache_dir=cache)


def test_digits_classifier_is_accurate_reproducible_and_cached(digits_cache, monkeypatch):
    cache, net = digits_cache
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1
    with torch.no_grad():  # a caller's mode (the trained benchmark's) does not stop training
        fresh, accuracy = M.train_digits_classifier(seed=0)
    assert accuracy >= 0.95
    for a, b in zip(net.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached weights must be used")

    monkeypatch.setattr(M, "train_digits_classifier", no_training)
    again = M.digits_classifier(cache_dir=cache)
    for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_image_metrics_separate_real_digits_from_noise(digits_cache):
    _, net = digits_cache
    x_tr, y_tr, x_te, _ = M._digits_split(0)
    real = M.image_metrics(x_te.reshape(-1, 1, 8, 8), x_tr, net)
    noise = M.image_metrics(torch.rand(360, 64, generator=_gen(29)) * 2 - 1, x_tr, net)
    dropped = M.image_metrics(x_tr[y_tr < 5], x_tr, net)  # half of the classes missing
    assert real["precision"] > 0.85 and real["recall"] > 0.85
    assert noise["precision"] < 0.05 and noise["recall"] < 0.05
    assert noise["frechet_distance"] > 50 * real["frechet_distance"]
    assert dropped["precision"] > 0.95 and dropped["recall"] < 0.7
    assert dropped["frechet_distance"] > 5 * real["frechet_distance"]
    with pytest.raises(ValueError, match="64 pixels"):
        net.features(torch.zeros(2, 1, 16, 16))


def test_mode_membership_uses_the_component_covariance():
    # chi-square(2) quantile at 0.999 is 13.8: (3, 0) is 2.25 from a diag(4, 0.01) component in
    # squared Mahalanobis distance, (0, 0.5) is 25, although it is closer in Euclidean distance
    gm = GaussianMixture([0.5, 0.5], [[0.0, 0.0], [50.0, 0.0]], torch.tensor([[4.0, 0.01]] * 2))
    assert M.mode_coverage(torch.tensor([[3.0, 0.0]]), gm).in_mode_fraction == 1.0
    assert M.mode_coverage(torch.tensor([[0.0, 0.5]]), gm).in_mode_fraction == 0.0
    both = M.mode_coverage(torch.tensor([[3.0, 0.0], [47.0, 0.0], [50.0, 0.5]]), gm)
    assert both.counts == (1, 1) and both.coverage == 1.0
