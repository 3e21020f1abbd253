"""Classifier and classifier-free guidance against the Gaussian-mixture oracle.

Mixture components are the classes: p_t(y | x) is exactly `responsibilities`, and the exact
class-conditional score is `score(..., component=y)` (math.md sections 6 and 7).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sde_diffusion import VESDE, VPSDE, GaussianMixture, SubVPSDE
from sde_diffusion.classifier import (
    NoisyClassifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from sde_diffusion.guidance import cfg_eps, cfg_score_fn, classifier_guided_score_fn
from sde_diffusion.solvers import sample

SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_max=20.0)}
MIX = GaussianMixture.random(3, 3, torch.Generator().manual_seed(0))
RING = GaussianMixture.ring(k=8, radius=4.0, std=0.5)


def exact_logits(gm: GaussianMixture, sde):
    """The Bayes classifier's logits: log p_t(k | x)."""
    return lambda x, t: torch.log(gm.responsibilities(x, t, sde))


def exact_log_prob(gm: GaussianMixture, sde):
    """log p_t(y | x) directly."""
    return lambda x, t, y: torch.log(gm.responsibilities(x, t, sde)).gather(1, y[:, None])[:, 0]


def oracle_conditional_model(gm: GaussianMixture, sde, prediction: str = "eps"):
    """A conditional 'network' model(x, t, labels): label K (= null) gives the unconditional
    output, label k < K that of component k; predicts eps (or x0), and counts its calls."""
    K = gm.num_components

    def model(x, t, labels):
        model.calls += 1
        t = sde.time(t, x).expand(x.shape[0])
        cond = gm.score(x, t, sde, component=labels.clamp(max=K - 1))
        score = torch.where((labels == K)[:, None], gm.score(x, t, sde), cond)
        gamma, sigma = sde.marginal(t)
        eps = -sigma[:, None] * score
        return eps if prediction == "eps" else (x - sigma[:, None] * eps) / gamma[:, None]

    model.calls = 0
    return model


@settings(max_examples=30, deadline=None)
@given(
    t=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**31 - 1),
    sde_name=st.sampled_from(sorted(SDES)),
    y=st.integers(0, 2),
    output=st.sampled_from(["logits", "log_prob"]),
)
def test_classifier_gradient_gives_conditional_score(t, seed, sde_name, y, output):
    """s(x, t) + grad log p_t(y | x) = grad log p_t(x | y) exactly (w = 1, Bayes' rule)."""
    sde = SDES[sde_name]
    x = MIX.sample_t(16, t, sde, torch.Generator().manual_seed(seed))
    x = x + 2 * torch.randn(
        x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=x.dtype
    )
    clf = exact_logits(MIX, sde) if output == "logits" else exact_log_prob(MIX, sde)
    guided = classifier_guided_score_fn(MIX.score_fn(sde), clf, y, scale=1.0, output=output)
    tt = torch.full((16,), t, dtype=x.dtype)
    expected = MIX.score(x, tt, sde, component=y)
    torch.testing.assert_close(guided(x, tt), expected, rtol=1e-5, atol=1e-5)


def test_classifier_guidance_scale_and_per_sample_labels():
    """w scales the classifier gradient linearly; labels may differ per sample; the gradient is
    taken even when the caller samples under torch.no_grad()."""
    sde = VPSDE()
    x = MIX.sample_t(6, 0.3, sde, torch.Generator().manual_seed(3))
    t = torch.full((6,), 0.3, dtype=x.dtype)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    s, clf = MIX.score(x, t, sde), exact_logits(MIX, sde)
    cond = MIX.score(x, t, sde, component=y)
    with torch.no_grad():
        guided = classifier_guided_score_fn(MIX.score_fn(sde), clf, y, scale=2.5)(x, t)
    torch.testing.assert_close(guided, s + 2.5 * (cond - s), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cfg_identities_in_both_conventions(dtype):
    """lerp: w = 0 unconditional, w = 1 conditional; ho: w = 0 conditional, w = -1 unconditional;
    ho at w equals lerp at w + 1; one batched model call per evaluation."""
    sde = VPSDE()
    x = MIX.sample_t(8, 0.5, sde, torch.Generator().manual_seed(1)).to(dtype)
    t = torch.full((8,), 0.5, dtype=dtype)
    model, y, null = oracle_conditional_model(MIX, sde), 1, MIX.num_components
    sigma = sde.marginal(t)[1][:, None]
    eps_u, eps_c = -sigma * MIX.score(x, t, sde), -sigma * MIX.score(x, t, sde, component=y)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(cfg_eps(model, y, null, 0.0, "lerp")(x, t), eps_u, **tol)
    torch.testing.assert_close(cfg_eps(model, y, null, 1.0, "lerp")(x, t), eps_c, **tol)
    torch.testing.assert_close(cfg_eps(model, y, null, 0.0, "ho")(x, t), eps_c, **tol)
    torch.testing.assert_close(cfg_eps(model, y, null, -1.0, "ho")(x, t), eps_u, **tol)
    model.calls = 0
    ho = cfg_eps(model, y, null, 2.7, "ho")(x, t)
    assert model.calls == 1
    torch.testing.assert_close(ho, cfg_eps(model, y, null, 3.7, "lerp")(x, t), **tol)
    torch.testing.assert_close(ho, 3.7 * eps_c - 2.7 * eps_u, **tol)


def test_cfg_score_fn_is_the_conditional_score_in_any_parametrisation():
    """At w = 0 (ho) the guided score_fn is the exact conditional score, whether the network
    predicts eps or x0 (the combination commutes with the affine conversions)."""
    sde = VESDE(sigma_max=20.0)
    x = MIX.sample_t(8, 0.4, sde, torch.Generator().manual_seed(2))
    t = torch.full((8,), 0.4, dtype=x.dtype)
    y = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1])
    for prediction in ("eps", "x0"):
        model = oracle_conditional_model(MIX, sde, prediction)
        fn = cfg_score_fn(model, sde, y, MIX.num_components, 0.0, "ho", prediction=prediction)
        torch.testing.assert_close(fn(x, t), MIX.score(x, t, sde, component=y))
        w = 1.8
        fn = cfg_score_fn(model, sde, y, MIX.num_components, w, "lerp", prediction=prediction)
        s_u, s_c = MIX.score(x, t, sde), MIX.score(x, t, sde, component=y)
        torch.testing.assert_close(fn(x, t), s_u + w * (s_c - s_u))


def coverage(samples: torch.Tensor, y: int, sde) -> float:
    """Fraction of samples the exact t = 0 classifier assigns to component y."""
    resp = RING.responsibilities(samples, torch.tensor(0.0, dtype=samples.dtype), sde)
    return (resp.argmax(1) == y).double().mean().item()


@pytest.mark.parametrize(
    ("solver", "kw"), [("ode", {"steps": 10}), ("euler_maruyama", {"steps": 100})]
)
def test_guided_sampling_reaches_the_chosen_component(solver, kw):
    """Classifier guidance (w = 1, 3) and classifier-free guidance (ho w = 2) sample class y:
    >= 99% of samples belong to component y by the exact t = 0 responsibilities."""
    sde, y = VPSDE(), 3
    fns = {
        "classifier w=1": classifier_guided_score_fn(
            RING.score_fn(sde), exact_logits(RING, sde), y, 1.0
        ),
        "classifier w=3": classifier_guided_score_fn(
            RING.score_fn(sde), exact_logits(RING, sde), y, 3.0
        ),
        "cfg ho w=2": cfg_score_fn(oracle_conditional_model(RING, sde), sde, y, 8, 2.0, "ho"),
    }
    for name, fn in fns.items():
        g = torch.Generator().manual_seed(0)
        x = sample(fn, sde, (400, 2), solver=solver, generator=g, dtype=torch.float64, **kw)
        assert coverage(x, y, sde) >= 0.99, name
    # the data visit every component: the guidance is what selects y
    assert coverage(RING.sample(500, torch.Generator().manual_seed(0)), y, sde) < 0.25


def test_trained_mlp_classifier_is_near_bayes_optimal():
    """A NoisyClassifier trained on noisy samples of the ring reaches within 0.05 nats of the
    exact (Bayes) cross-entropy on fresh noisy data, and its guidance reaches the class."""
    torch.manual_seed(0)
    sde, g = VPSDE(), torch.Generator().manual_seed(0)
    x0, labels = RING.sample(10000, g, return_labels=True)
    clf = NoisyClassifier((2,), 8, sde, width=64, depth=2, data_var=8.25)
    losses = train_classifier(clf.double(), sde, x0, labels, steps=300, batch_size=256, generator=g)
    assert all(math.isfinite(v) for v in losses)
    x0, labels = RING.sample(2000, g, return_labels=True)
    t = sde.t_min + (1 - sde.t_min) * torch.rand(2000, generator=g, dtype=torch.float64)
    xt = sde.perturb(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(clf(xt, t), labels).item()
    bayes = torch.nn.functional.nll_loss(
        torch.log(RING.responsibilities(xt, t, sde)), labels
    ).item()
    print(f"\ncross-entropy {ce:.4f}, Bayes {bayes:.4f}")
    assert ce - bayes < 0.05, (ce, bayes)
    fn = classifier_guided_score_fn(RING.score_fn(sde), clf, 5, scale=2.0)
    x = sample(fn, sde, (300, 2), solver="ode", steps=10, generator=g, dtype=torch.float64)
    assert coverage(x, 5, sde) >= 0.99


def test_conv_classifier_treats_samples_independently():
    """Guidance takes the gradient of a batch sum: sample b's gradient must depend on x_b alone.
    Also: logits shape and float32/float64."""
    sde = VPSDE()
    clf = NoisyClassifier((1, 8, 8), 10, sde, width=8, depth=3).eval()
    for dtype in (torch.float32, torch.float64):
        clf = clf.to(dtype)
        x = torch.randn(4, 1, 8, 8, dtype=dtype, requires_grad=True)
        t = torch.tensor([0.1, 0.4, 0.7, 1.0], dtype=dtype)
        logits = clf(x, t)
        assert logits.shape == (4, 10) and logits.dtype == dtype
        (grad,) = torch.autograd.grad(logits[0].sum(), x)
        assert grad[1:].abs().max() == 0 and grad[0].abs().max() > 0


def test_saved_classifier_is_rebuilt_with_its_architecture_and_sde(tmp_path):
    """save_classifier / load_classifier: same logits, SDE and hyper-parameters after the trip;
    a safetensors file that is not a classifier is refused."""
    sde = VESDE(sigma_min=0.02, sigma_max=30.0)
    clf = NoisyClassifier((1, 8, 8), 7, sde, width=6, depth=2, time_features=5, data_var=0.3)
    path = save_classifier(clf, tmp_path / "clf.safetensors")
    back = load_classifier(path)
    assert back.config == clf.config and back.num_classes == 7 and back.data_var == 0.3
    assert isinstance(back.sde, VESDE) and back.sde.sigma_max == 30.0
    assert not any(p.requires_grad for p in back.parameters()) and not back.training
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(back(x, t), clf.eval()(x, t), rtol=0, atol=0)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(
        ValueError, match="expected a safetensors classifier written by save_classifier"
    ):
        load_classifier(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="no classifier at"):
        load_classifier(tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_conv_classifier_learns_noisy_digits():
    """The conv NoisyClassifier on sklearn's 8x8 digits (scaled to [-1, 1]): >= 90% held-out
    accuracy at t = 0.05 and at least twice chance (0.2) at t = 0.5 (VP SDE)."""
    datasets = pytest.importorskip("sklearn.datasets")
    torch.manual_seed(0)
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8 - 1
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1500], perm[1500:]
    sde = VPSDE()
    clf = NoisyClassifier((1, 8, 8), 10, sde, width=32, data_var=0.5)
    train_classifier(clf, sde, x[train], y[train], steps=1500, batch_size=128, generator=g)
    for t, need in ((0.05, 0.9), (0.5, 0.2)):
        tt = torch.full((len(test),), t)
        xt = sde.perturb(x[test], tt, torch.randn(x[test].shape, generator=g))
        with torch.no_grad():
            acc = (clf(xt, tt).argmax(1) == y[test]).float().mean().item()
        print(f"digits: noisy accuracy at t={t}: {acc:.3f}")
        assert acc >= need


def test_bad_input():
    sde = VPSDE()
    clf = exact_logits(MIX, sde)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        classifier_guided_score_fn(MIX.score_fn(sde), clf, 0, scale=float("nan"))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        cfg_eps(oracle_conditional_model(MIX, sde), 0, 3, float("inf"))
    with pytest.raises(ValueError, match="unknown guidance convention 'foo'"):
        cfg_eps(oracle_conditional_model(MIX, sde), 0, 3, 1.0, "foo")
    with pytest.raises(ValueError, match="unknown classifier output 'probs'"):
        classifier_guided_score_fn(MIX.score_fn(sde), clf, 0, output="probs")
    x, t = torch.zeros(4, 3, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="labels must be an integer"):
        classifier_guided_score_fn(MIX.score_fn(sde), clf, torch.tensor([0.5]))(x, t)
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        bad = classifier_guided_score_fn(MIX.score_fn(sde), lambda x, t, y: x, 0, output="log_prob")
        bad(x, t)
    with pytest.raises(ValueError, match="data_shape must be"):
        NoisyClassifier((2, 8), 10, sde)
