"""The likelihood app: config -> library calls -> metrics.json, with the oracle as the model."""

import json
import math
import sys

import numpy as np
import pytest

from sde_diffusion.apps import likelihood as likelihood_app
from sde_diffusion.apps.hydra_app import compose_config


def _cfg(*overrides):
    return compose_config("likelihood", list(overrides))


def test_oracle_bits_per_dim_match_the_exact_values():
    cfg = _cfg("num_samples=64", "batch_size=32", "ddpm_bound.num_steps=50")
    res = likelihood_app.evaluate(cfg)
    assert res["num_samples"] == 64 and res["num_dims"] == 2
    assert len(res["pf_ode"]["nfe_per_batch"]) == 2
    assert abs(res["pf_ode_minus_exact"]["nll"]) < 1e-2  # the SDE's prior, not the exact p_T
    assert res["pf_ode"]["bpd"] == pytest.approx(res["pf_ode"]["nll"] / (2 * math.log(2)))
    assert res["ddpm_bound"]["bpd"] == pytest.approx(res["ddpm_bound"]["nll"] / (2 * math.log(2)))


def test_integer_data_is_dequantised_with_its_bin_width(tmp_path):
    k = np.random.default_rng(0).integers(100, 156, size=(16, 2), dtype=np.uint8)
    np.savez(tmp_path / "bytes.npz", images=k)
    cfg = _cfg(
        f"data.path={tmp_path / 'bytes.npz'}", "ddpm_bound.enabled=false", "model.kind=gaussian"
    )
    res = likelihood_app.evaluate(cfg)
    r = res["pf_ode"]
    # bits/dim of dequantised 8-bit data in [-1, 1): (nll / D - log(2 / 256)) / log 2
    assert r["bpd"] == pytest.approx((r["nll"] / 2 - math.log(2 / 256)) / math.log(2))
    assert "exact" not in res and "ddpm_bound" not in res


def test_bad_choices_fail_clearly():
    with pytest.raises(ValueError, match="unknown model=net; valid choices: ckpt, oracle"):
        _cfg("model=net")
    with pytest.raises(ValueError, match="needs ckpt="):
        likelihood_app.evaluate(_cfg("model=ckpt"))
    with pytest.raises(ValueError, match="valid choices: ring, gaussian, random"):
        likelihood_app.evaluate(_cfg("model.kind=moons"))


def test_main_writes_metrics_json(tmp_path, monkeypatch, capsys):
    argv = ["sde-diffusion likelihood", "num_samples=8", "ddpm_bound.num_steps=20"]
    monkeypatch.setattr(sys, "argv", [*argv, f"hydra.run.dir={tmp_path}"])
    likelihood_app.main()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"pf_ode", "ddpm_bound", "exact"} <= set(metrics)
    assert "| PF-ODE |" in capsys.readouterr().out


def test_exact_column_works_for_the_cosine_schedule():
    cfg = _cfg("sde=vp_cosine", "num_samples=16", "ddpm_bound.enabled=false")
    res = likelihood_app.evaluate(cfg)
    assert math.isfinite(res["exact"]["nll"])
    assert abs(res["pf_ode_minus_exact"]["nll"]) < 1e-2
