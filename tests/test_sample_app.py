"""The sampling app: config -> samples.npz, metrics.json and a figure, for the oracle and for a
training checkpoint; nonsensical combinations are recorded as invalid, bad input fails clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sde_diffusion import train
from sde_diffusion.apps import compose_config
from sde_diffusion.sample import run

FAST = ["num_samples=300", "device=cpu"]


def _run(tmp_path, *overrides):
    return run(compose_config("sample", [*FAST, *overrides]), tmp_path)


def test_oracle_run_writes_samples_metrics_and_figure(tmp_path):
    record = _run(tmp_path, "model=oracle", "sde=subvp", "solver=dpm_solver", "steps=10")
    assert record["status"] == "ok" and record["nfe"] == 11  # 10 steps + the Tweedie step
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(record))
    samples = np.load(tmp_path / "samples.npz")["samples"]
    assert samples.shape == (300, 2) and np.isfinite(samples).all()
    assert (tmp_path / "samples.png").stat().st_size > 0
    m = saved["metrics"]
    assert m["mode_coverage"] == 1.0 and m["sliced_w2"] < 0.5  # all 8 modes, close in W2


def test_nonsensical_combination_is_recorded_as_invalid(tmp_path):
    record = _run(tmp_path, "sde=ve", "solver=ddpm", "steps=5")
    assert record["status"] == "invalid" and "variance-preserving" in record["error"]
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "invalid"
    assert not (tmp_path / "samples.npz").exists()


def test_oracle_guidance_samples_the_chosen_component(tmp_path):
    record = _run(tmp_path, "solver=ode", "steps=20", "guidance.label=3", "guidance.scale=1.0")
    x = np.load(tmp_path / "samples.npz")["samples"]
    angle = np.degrees(np.arctan2(x[:, 1], x[:, 0])) % 360
    assert record["status"] == "ok" and np.mean(np.abs(angle - 135) < 22.5) > 0.99


def test_checkpoint_run(tmp_path):
    cfg = train.compose_config(
        [
            "data=two_moons", "data.n=500", "model.width=16", "model.depth=1", "model.embed_dim=8",
            "train.steps=6", "train.batch_size=32", "train.log_every=3", "train.sample_every=-1",
            "train.device=cpu", "train.progress=false", "train.tensorboard=false",
        ]
    )  # fmt: skip
    ckpt = train.run(cfg, tmp_path / "train").last_checkpoint
    record = _run(tmp_path / "s", "model=ckpt", f"ckpt={ckpt}", "solver=euler_maruyama", "steps=5")
    assert record["status"] == "ok" and record["nfe"] == 6
    assert set(record["metrics"]) == {"sliced_w2"}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model=ckpt"], "needs ckpt="),
        (["model=ckpt", "ckpt=/nonexistent.safetensors"], "does not exist"),
        (["solver.name=rk4"], "valid choices: .*euler_maruyama"),
        (["steps=0"], "steps must be >= 1"),
        (["dtype=float16"], "valid choices: float32, float64"),
        (["model.kind=moons"], "valid choices: ring, gaussian, random"),
        (["guidance.label=9"], r"guidance.label must lie in \[0, 7\]"),
    ],
)
def test_bad_config_fails_clearly(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _run(tmp_path, *overrides)


def test_unknown_keys_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"Did you mean 'solver\.name'"):
        compose_config("sample", ["solver.nmae=ode"])
