"""Quality of trained models (slow: minutes on a CPU; run with `make test-slow`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_swiss_roll_mlp_is_within_twice_the_data_vs_data_distance(tmp_path):
    """The demo's bar: Euler-Maruyama within 2x, every solver of its closing table within 1.5x
    of the data-vs-data distance (the deterministic ones too, since the preconditioned default)."""
    from sde_diffusion.apps.demo import run

    r = run(out=tmp_path, progress=False)
    assert r["sw"] < 2 * r["sw_data"], r
    assert all(v < 1.5 * r["sw_data"] for v in r["solvers"].values()), r


@pytest.mark.slow
def test_digits_unet_in_20_cpu_minutes_gives_recognisable_digits(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "digits_quality", ROOT / "benchmarks" / "digits_quality.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.run(out=tmp_path, grid=tmp_path / "digits_samples.png")
    assert r["train_s"] <= 20 * 60
    # a classifier trained on real digits (97% on held-out real ones) reads the requested digit
    assert r["sample_accuracy"] >= 0.7, r
