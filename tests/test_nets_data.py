"""Networks (shapes, embeddings, null label) and datasets (toys, digits, files, splits, batches)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sde_diffusion.data import (
    TOYS,
    DataConfig,
    batches,
    load_array,
    load_data,
    load_image_folder,
    toy_data,
)
from sde_diffusion.nets import GaussianFourierEmbedding, SinusoidalEmbedding, build_model

SMALL_UNET = {
    "base_channels": 8,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [4],
    "num_heads": 2,
}


def test_sinusoidal_embedding_matches_formula():
    emb = SinusoidalEmbedding(8, scale=1000.0, max_period=10000.0)
    t = torch.tensor([0.0, 0.25])
    out = emb(t)
    for i, ti in enumerate(t.tolist()):
        freqs = [1000.0 * 10000.0 ** (-k / 4) for k in range(4)]
        expected = [math.sin(ti * f) for f in freqs] + [math.cos(ti * f) for f in freqs]
        assert out[i].tolist() == pytest.approx(expected, abs=1e-4)


def test_fourier_embedding_is_reproducible_and_unit_norm():
    t = torch.rand(5)
    a, b = GaussianFourierEmbedding(16)(t), GaussianFourierEmbedding(16)(t)
    assert torch.equal(a, b)  # the same features when a checkpoint's model is rebuilt
    torch.testing.assert_close(a.square().sum(1), torch.full((5,), 8.0))  # sin^2 + cos^2 per pair


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_models_map_x_to_same_shape_and_use_the_null_label(dtype):
    g = torch.Generator().manual_seed(0)
    for name, shape, kw in (
        ("mlp", (3,), {"width": 16, "depth": 2}),
        ("unet", (1, 8, 8), SMALL_UNET),
    ):
        torch.manual_seed(0)
        model = build_model(name, shape, num_classes=4, **kw).to(dtype)
        for p in model.parameters():  # zero-initialised output layers would hide the labels
            torch.nn.init.normal_(p, std=0.1, generator=g)
        x, t = (
            torch.randn(6, *shape, dtype=dtype, generator=g),
            torch.rand(6, dtype=dtype, generator=g),
        )
        out_null = model(x, t)
        assert out_null.shape == x.shape and out_null.dtype == dtype
        torch.testing.assert_close(model(x, t, torch.full((6,), 4)), out_null)  # None == null label
        assert not torch.allclose(model(x, t, torch.zeros(6, dtype=torch.long)), out_null)
        assert model(x, t[0]).shape == x.shape  # a scalar time broadcasts


def test_model_errors():
    with pytest.raises(ValueError, match="valid choices: mlp, unet"):
        build_model("resnet", (2,))
    with pytest.raises(ValueError, match="not divisible by 2"):
        build_model("unet", (1, 7, 7), **SMALL_UNET)
    with pytest.raises(ValueError, match="valid choices: sinusoidal, fourier"):
        build_model("mlp", (2,), time_embedding="rff")
    with pytest.raises(ValueError, match="num_classes = 0"):
        build_model("mlp", (2,))(
            torch.zeros(1, 2), torch.zeros(1), torch.zeros(1, dtype=torch.long)
        )


@pytest.mark.parametrize("name", TOYS)
def test_toys_are_reproducible_and_unit_scale(name):
    a = toy_data(name, 4000, torch.Generator().manual_seed(0))
    assert torch.equal(a, toy_data(name, 4000, torch.Generator().manual_seed(0)))
    assert a.shape == (4000, 2) and a.dtype == torch.float32
    assert 0.3 < float(a.std()) < 2.5 and float(a.mean(0).abs().max()) < 0.5


def test_checkerboard_occupies_alternate_squares():
    x = toy_data("checkerboard", 5000, torch.Generator().manual_seed(0))
    parity = (torch.floor(x[:, 0]) + torch.floor(x[:, 1])) % 2
    assert bool((parity == parity[0]).all())
    assert float(x.abs().max()) <= 2.0


def test_circles_and_gaussian_grid_have_their_stated_geometry():
    g = torch.Generator().manual_seed(0)
    r = toy_data("circles", 5000, g).norm(dim=1)
    off = torch.minimum((r - 1).abs(), (r - 2).abs())  # radii 1 and 2, noise sd 0.05
    assert float(off.max()) < 0.35 and 0.4 < float((r < 1.5).double().mean()) < 0.6
    x = toy_data("gaussian_grid", 5000, g)
    centre = x.round().clamp(-2, 2)  # 25 components of sd 0.05 on {-2, ..., 2}^2
    assert float((x - centre).std()) == pytest.approx(0.05, rel=0.05)
    assert torch.unique(centre, dim=0).shape[0] == 25


def test_digits_and_holdout_split():
    d = load_data(DataConfig(name="digits", holdout=0.2))
    assert d.shape == (1, 8, 8) and d.num_classes == 10
    assert d.train.shape[0] + d.test.shape[0] == 1797 and d.test.shape[0] == round(0.2 * 1797)
    assert float(d.train.min()) == -1.0 and float(d.train.max()) == 1.0
    # disjoint: no held-out image appears in the training part (digits has few exact duplicates)
    tr = {tuple(v) for v in d.train.flatten(1).tolist()}
    overlap = sum(tuple(v) in tr for v in d.test.flatten(1).tolist())
    assert overlap <= 2


def test_gmm_data_carries_its_oracle():
    d = load_data(DataConfig(name="gmm", gmm="random", gmm_components=3, gmm_dim=4, n=500))
    assert d.shape == (4,) and d.num_classes == 3 and d.info["oracle"].num_components == 3


def test_user_arrays_and_images_scale_to_unit_range(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 6, 6), dtype=np.uint8)
    imgs[0, 0, 0], imgs[0, 0, 1] = 0, 255
    np.save(tmp_path / "a.npy", imgs)
    x, y = load_array(tmp_path / "a.npy")
    assert x.shape == (5, 1, 6, 6) and y is None
    torch.testing.assert_close(x, torch.from_numpy(imgs[:, None].astype(np.float32)) / 127.5 - 1)
    np.savez(tmp_path / "b.npz", x=rng.normal(size=(7, 3)) * 5, y=np.arange(7) % 2)
    x, y = load_array(tmp_path / "b.npz")
    assert (
        x.shape == (7, 3)
        and float(x.min()) == -1.0
        and float(x.max()) == 1.0
        and y.tolist()[:3] == [0, 1, 0]
    )
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(imgs[i]).save(tmp_path / "imgs" / f"{i}.png")
    x = load_image_folder(tmp_path / "imgs")
    torch.testing.assert_close(x, torch.from_numpy(imgs[:3, None].astype(np.float32)) / 127.5 - 1)
    assert load_image_folder(tmp_path / "imgs", image_size=4, channels=3).shape == (3, 3, 4, 4)
    d = load_data(DataConfig(name="folder", path=str(tmp_path / "b.npz"), holdout=0.0))
    assert d.num_classes == 2 and d.test.shape[0] == 0
    with pytest.raises(ValueError, match=r"no \.png"):
        load_image_folder(tmp_path / "nothing_here")


def test_batches_resume_exactly_and_shard_disjointly():
    x = torch.arange(50.0)[:, None]
    full = [b for _, (b, _) in zip(range(12), batches(x, None, 8, seed=3), strict=False)]
    late = [
        b for _, (b, _) in zip(range(5), batches(x, None, 8, seed=3, start_step=7), strict=False)
    ]
    for a, b in zip(full[7:], late, strict=True):
        assert torch.equal(a, b)
    first_epoch = torch.cat(full[:6]).flatten()
    assert first_epoch.unique().numel() == 48  # 6 batches of 8 without repetition
    r0 = next(batches(x, None, 25, seed=0, num_replicas=2, rank=0))[0]
    r1 = next(batches(x, None, 25, seed=0, num_replicas=2, rank=1))[0]
    assert set(r0.flatten().tolist()).isdisjoint(r1.flatten().tolist())
    with pytest.raises(ValueError, match="exceeds"):
        next(batches(x, None, 64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "mnist"}, "valid choices"),
        ({"holdout": 1.0}, r"\[0, 1\)"),
        ({"name": "folder"}, "data.path"),
    ],
)
def test_bad_data_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)
