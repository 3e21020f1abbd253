"""The Hydra training app: composition, clear errors for bad configs, a tiny end-to-end run."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from sde_diffusion import DiscreteVPSDE
from sde_diffusion.apps.config import build_sde
from sde_diffusion.apps.train import compose_config, run
from sde_diffusion.trainer import load_score_fn


def _build(overrides):
    return OmegaConf.to_object(compose_config(overrides))


def test_defaults_and_groups_compose():
    cfg = _build([])
    assert (cfg.sde.name, cfg.model.name, cfg.data.name, cfg.loss.weighting) == (
        "vp",
        "mlp",
        "swiss_roll",
        "simple",
    )
    cfg = _build(["sde=ve", "model=unet", "data=digits", "loss=likelihood_is", "train=digits"])
    assert (
        cfg.sde.sigma_max == 50.0 and cfg.model.base_channels == 32 and cfg.loss.importance_sampling
    )
    for sde in ("vp", "vp_cosine", "subvp", "ve"):
        assert _build([f"sde={sde}"]).sde.name == sde
    sd = _build(["sde=ddpm_scaled_linear"]).sde  # Stable Diffusion's betas, by name
    assert (sd.name, sd.schedule, sd.beta_start, sd.beta_end) == (
        "ddpm",
        "scaled_linear",
        8.5e-4,
        0.012,
    )
    assert torch.equal(build_sde(sd).betas, DiscreteVPSDE.scaled_linear().betas)
    cfg = _build(["loss=lognormal", "data=gaussian_grid"])
    assert (cfg.loss.time, cfg.loss.p_mean, cfg.data.name) == ("lognormal", -1.2, "gaussian_grid")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["train.stpes=5"],
            r"train has no 'stpes'\. Did you mean 'train\.steps'\?.*Valid keys under train: .*lr",
        ),
        (["trian.lr=1"], r"Did you mean 'train'\?.*data, loss, model, sde, train"),
        (["sde=ve", "sde.beta_max=3"], r"sde has no 'beta_max'.*sigma_max"),
        (["train.steps=many"], r"could not be converted to Integer"),
        (["train.progress=maybe"], r"not a valid bool"),
        (
            ["model=transformer"],
            r"unknown model=transformer; valid choices: mlp, unet",
        ),
        (["loss.weighting=l1"], r"valid choices: simple, likelihood, score"),
        (["train.precision=fp16"], r"valid choices: fp32, bf16"),
        (["train.lr=-0.1"], r"train.lr must be a finite number > 0, got -0.1"),
        (["data.name=cifar"], r"unknown dataset 'cifar'; valid choices: swiss_roll"),
        (["model.time_embedding=rff"], r"valid choices: sinusoidal, fourier"),
        (["model.param=score"], r"unknown model.param 'score'; valid choices: eps, x0, v, edm"),
    ],
)
def test_bad_configs_fail_with_clear_messages(overrides, match):
    with pytest.raises(Exception, match="(?s)" + match) as info:
        _build(overrides)
    assert isinstance(info.value, ValueError) or "MissingConfig" in type(info.value).__name__


def test_app_trains_and_writes_a_loadable_checkpoint(tmp_path):
    cfg = compose_config(
        [
            "data=two_moons", "data.n=500", "model.width=16", "model.depth=1", "model.embed_dim=8",
            "train.steps=6", "train.batch_size=32", "train.log_every=3", "train.sample_every=-1",
            "train.device=cpu", "train.progress=false", "train.tensorboard=false",
        ]
    )  # fmt: skip
    trainer = run(cfg, tmp_path)
    _, sde, meta = load_score_fn(trainer.last_checkpoint, device="cpu")
    assert meta["step"] == 6 and meta["config"]["data"]["name"] == "two_moons"
    assert meta["config"]["train"]["steps"] == 6 and type(sde).__name__ == "VPSDE"
    assert meta["param"] == "edm" and meta["sigma_data"] == pytest.approx(trainer.sigma_data)


def test_keys_under_a_swept_group_are_left_to_hydra():
    from sde_diffusion.apps.train import check_override_keys

    check_override_keys(["sde=vp,ve", "sde.sigma_max=3", "train.lr=1e-3,1e-4"])
    with pytest.raises(ValueError, match=r"Did you mean 'train\.lr'"):
        check_override_keys(["sde=vp,ve", "train.lrr=1e-3,1e-4"])
