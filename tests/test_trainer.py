"""Trainer: the loss goes down, EMA, exact resume, NaN stop, checkpoints load as a score_fn."""

from __future__ import annotations

import math

import pytest
import torch

from sde_diffusion import get_sde
from sde_diffusion.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from sde_diffusion.data import DataConfig, load_data
from sde_diffusion.trainer import NonFiniteLossError, TrainConfig, Trainer, load_score_fn

MLP = {"width": 32, "depth": 2, "embed_dim": 16}
SMALL_UNET = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "num_heads": 2}


def _cfg(**kw) -> TrainConfig:
    base = dict(
        steps=20, batch_size=64, lr=2e-3, warmup_steps=5, log_every=5, checkpoint_every=10,
        sample_every=-1, device="cpu", progress=False, tensorboard=False,
    )  # fmt: skip
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def toy():
    return load_data(DataConfig(name="eight_gaussians", n=2000, holdout=0.1))


def test_short_run_lowers_the_loss(toy, tmp_path):
    cfg = _cfg(steps=200, log_every=50, checkpoint_every=200)
    kwargs = MLP | {"param": "eps"}  # every parametrisation: test_precondition.py
    losses = Trainer("mlp", get_sde("vp"), toy, cfg, out_dir=tmp_path, model_kwargs=kwargs).fit()
    assert len(losses) == 200
    first, last = sum(losses[:10]) / 10, sum(losses[-50:]) / 50
    assert last < 0.75 * first  # the per-step noise of a 50-step mean is about 0.02
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,grad_norm,lr,steps_per_sec" and len(rows) == 1 + 4


def test_ema_and_warmup_follow_their_formulas(toy, tmp_path):
    cfg = _cfg(steps=100, ema_decay=0.9, warmup_steps=400, lr=1e-2, checkpoint_every=100)
    tr = Trainer("mlp", get_sde("vp"), toy, cfg, out_dir=tmp_path, model_kwargs=MLP)
    cfg.steps = 99
    tr.fit()
    before = [p.detach().clone() for p in tr.ema_model.parameters()]
    cfg.steps = 100
    tr.fit()  # step 100: lr = 1e-2 * 100 / 400; EMA decay min(0.9, 100 / 109) = 0.9
    assert tr.opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    for b, p, e in zip(before, tr.model.parameters(), tr.ema_model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach())
    first = Trainer(
        "mlp",
        get_sde("vp"),
        toy,
        _cfg(steps=1, ema_decay=0.9),
        out_dir=tmp_path / "b",
        model_kwargs=MLP,
    )
    init = [p.detach().clone() for p in first.model.parameters()]
    first.fit()  # step 1: decay min(0.9, 1 / 10) = 0.1
    for b, p, e in zip(init, first.model.parameters(), first.ema_model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.1 * b + 0.9 * p.detach())


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_exact_resume(toy, tmp_path, device):
    """On CUDA the checkpoint also carries the device's generator state (rng/cuda)."""
    sde, kw = get_sde("vp"), {"device": device}
    full = Trainer("mlp", sde, toy, _cfg(**kw), out_dir=tmp_path / "a", model_kwargs=MLP).fit()
    part1 = Trainer(
        "mlp", sde, toy, _cfg(steps=10, **kw), out_dir=tmp_path / "b", model_kwargs=MLP
    ).fit()
    resumed = Trainer(
        "mlp", sde, toy, _cfg(resume=True, **kw), out_dir=tmp_path / "b", model_kwargs=MLP
    )
    part2 = resumed.fit()
    assert len(part1) == 10 and len(part2) == 10
    assert part1 + part2 == full  # bit for bit
    a, _ = load_checkpoint(latest_checkpoint(tmp_path / "a" / "checkpoints"))
    b, _ = load_checkpoint(latest_checkpoint(tmp_path / "b" / "checkpoints"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _BreaksAt(torch.nn.Module):
    """A network whose output turns NaN from its k-th call on."""

    def __init__(self, k: int):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.k, self.calls = k, 0

    def forward(self, x, t):
        self.calls += 1
        out = self.lin(x)
        return out * float("nan") if self.calls >= self.k else out


def test_nan_loss_stops_and_keeps_last_good_checkpoint(toy, tmp_path):
    tr = Trainer(
        _BreaksAt(13), get_sde("vp"), toy, _cfg(steps=30, checkpoint_every=5), out_dir=tmp_path
    )
    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan at step 13.*step_00000010\.safetensors"
    ):
        tr.fit()
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert ckpts[-1].name == "step_00000010.safetensors"
    tensors, meta = load_checkpoint(ckpts[-1])
    assert meta["step"] == 10 and all(
        bool(torch.isfinite(v).all()) for k, v in tensors.items() if k.startswith("model/")
    )


def test_checkpoint_loads_as_score_fn_of_the_ema_network(tmp_path):
    data = load_data(DataConfig(name="gmm", n=400, gmm_components=3))
    tr = Trainer(
        "mlp",
        get_sde("subvp"),
        data,
        _cfg(steps=5),
        out_dir=tmp_path,
        model_kwargs=MLP | {"class_cond": True},
    )
    tr.fit()
    x, t = torch.randn(4, 2), torch.full((4,), 0.5)
    y = torch.tensor([0, 1, 2, 0])
    score_fn, sde, meta = load_score_fn(tr.last_checkpoint, device="cpu", labels=y)
    assert type(sde).__name__ == "SubVPSDE" and meta["model"]["num_classes"] == 3
    torch.testing.assert_close(score_fn(x, t), tr.score_fn(y)(x, t))
    sigma = sde.marginal(t)[1]
    torch.testing.assert_close(score_fn(x, t), -tr.ema_precond(x, t, y) / sigma[:, None])
    assert tr.sample(8, steps=5).shape == (8, 2)


def test_sample_figure_is_written(toy, tmp_path):
    tr = Trainer(
        "mlp",
        get_sde("vp"),
        toy,
        _cfg(steps=2, sample_every=0, sample_steps=5, num_samples=50),
        out_dir=tmp_path,
        model_kwargs=MLP,
    )
    tr.fit()
    assert (tmp_path / "samples" / "step_00000002.png").stat().st_size > 1000


def test_bf16_autocast_trains_with_finite_float32_losses(toy, tmp_path):
    cfg = _cfg(steps=10, precision="bf16")
    tr = Trainer("mlp", get_sde("vp"), toy, cfg, out_dir=tmp_path, model_kwargs=MLP)
    losses = tr.fit()
    assert len(losses) == 10 and all(map(math.isfinite, losses))
    assert next(tr.model.parameters()).dtype == torch.float32  # master weights stay fp32


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["mlp", "unet"])
def test_cuda_bf16_compiled_training_loads_on_cpu(tmp_path, model):
    """The GPU options together (bf16 autocast, torch.compile); the checkpoint then serves as a
    score_fn on a machine without CUDA, equal to the network on the GPU up to float32 rounding."""
    name, kwargs = ("eight_gaussians", MLP) if model == "mlp" else ("digits", SMALL_UNET)
    data = load_data(DataConfig(name=name, n=512))
    cfg = _cfg(steps=10, device="cuda", precision="bf16", compile=True)
    tr = Trainer(model, get_sde("vp"), data, cfg, out_dir=tmp_path, model_kwargs=kwargs)
    losses = tr.fit()
    assert len(losses) == 10 and all(map(math.isfinite, losses))
    score_cpu, _, _ = load_score_fn(tr.last_checkpoint, device="cpu")
    score_gpu, _, _ = load_score_fn(tr.last_checkpoint, device="cuda")
    x, t = torch.randn(4, *data.shape), torch.full((4,), 0.3)
    out = score_gpu(x.cuda(), t.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), score_cpu(x, t), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "train.lr"),
        ({"ema_decay": 1.0}, r"\[0, 1\)"),
        ({"precision": "fp16"}, "valid choices: fp32, bf16"),
        ({"device": "tpu9"}, "train.device"),
        ({"steps": 0}, "train.steps"),
    ],
)
def test_bad_train_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)
