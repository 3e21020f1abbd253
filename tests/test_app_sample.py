"""The sampling app: config -> samples.npz, metrics.json and a figure, for the oracle and for a
training checkpoint; nonsensical combinations are recorded as invalid, bad input fails clearly."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from sde_diffusion.apps import train
from sde_diffusion.apps.hydra_app import compose_config
from sde_diffusion.apps.sample import run
from sde_diffusion.solvers import SOLVERS
from sde_diffusion.solvers.pilot import CONVERGED

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


def test_the_default_runs_its_pilot_and_records_the_choice(tmp_path):
    """solver=default is `sample()` with no solver named: NFE = steps, the pilot's choice and
    cost in metrics.json (paid once for all batches), and the configuration that ran; a grid
    kind restricts the choice, denoise skips the pilot, and so do steps of at most 0.1 in
    log-SNR, where `pilot.CONVERGED` runs; inpainting needs a named solver."""
    record = _run(tmp_path / "a", "solver=default", "steps=8", "batch_size=100")
    assert record["status"] == "ok" and record["nfe"] == 8 and record["metrics"]["sliced_w2"] < 0.5
    assert record["pilot"]["evaluations"] > 8 * 256 and "grid" in record["pilot"]["choice"]
    assert record["configuration"] == record["pilot"]["choice"]
    edm = _run(tmp_path / "b", "solver=default", "steps=8", "solver.grid=edm")
    assert "edm grid" in edm["pilot"]["choice"]
    fixed = _run(tmp_path / "c", "solver=default", "steps=8", "denoise=false")
    assert fixed["nfe"] == 8 and "pilot" not in fixed and "configuration" not in fixed
    many = _run(tmp_path / "e", "solver=default", "steps=100")
    assert many["nfe"] == 100 and "pilot" not in many
    assert many["configuration"] == CONVERGED.label
    with pytest.raises(ValueError, match="inpainting needs a named solver"):
        _run(tmp_path / "d", "solver=default", "model.dim=4", "model.kind=random",
             "inpaint.mask=half")  # fmt: skip


def test_denoise_names_the_last_step(tmp_path):
    """denoise=trapezoid ends a named solver's grid at t_min with the trapezoidal step (one
    evaluation, as the Tweedie step); an unknown name, or the trapezoid for inpainting, is refused
    before anything is written."""
    record = _run(tmp_path / "a", "model=oracle", "solver=unipc", "steps=8", "denoise=trapezoid")
    assert record["status"] == "ok" and record["nfe"] == 9 and record["metrics"]["sliced_w2"] < 0.5
    with pytest.raises(ValueError, match="unknown denoise 'heun'; valid choices: True, False"):
        _run(tmp_path / "b", "solver=unipc", "denoise=heun")
    with pytest.raises(ValueError, match="inpainting ends with the Tweedie step"):
        _run(tmp_path / "c", "solver=unipc", "denoise=trapezoid", "model.dim=4",
             "model.kind=random", "inpaint.mask=half")  # fmt: skip
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_sweep_over_ddpm_schedules_keeps_them_apart(tmp_path):
    """sde=ddpm and sde=ddpm_scaled_linear are both DiscreteVPSDEs named "ddpm": the record (and
    so the report's grouping) names the option, and the schedules differ."""
    linear = _run(tmp_path / "a", "model=oracle", "sde=ddpm", "steps=5")
    scaled = _run(tmp_path / "b", "model=oracle", "sde=ddpm_scaled_linear", "steps=5")
    assert (linear["sde"], scaled["sde"]) == ("ddpm", "ddpm_scaled_linear")
    assert linear["metrics"] != scaled["metrics"]


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


def test_tuned_grid_is_fitted_written_and_reused(tmp_path):
    """solver.grid=tuned fits the grid (its cost and pilot errors in metrics.json), writes
    grid.json, and a run on that file samples the very same grid: same samples."""
    tuned = ["solver=unipc", "steps=6", "solver.grid=tuned", "tune.pilot=64", "tune.trials=40"]
    record = _run(tmp_path / "tuned", *tuned)
    assert record["status"] == "ok" and record["nfe"] == 7 and record["grid"] == "tuned"
    info = record["tuning"]
    assert info["trials"] == 40 and info["nfe"] > 40 * 7 and info["error"] < info["initial_error"]
    grid_file = tmp_path / "tuned" / "grid.json"
    assert len(json.loads(grid_file.read_text())["ts"]) == 7
    again = _run(tmp_path / "again", "solver=unipc", f"solver.grid={grid_file}")
    assert again["steps"] == 6 and again["nfe"] == 7 and again["tuning"] is None
    np.testing.assert_array_equal(
        np.load(tmp_path / "again" / "samples.npz")["samples"],
        np.load(tmp_path / "tuned" / "samples.npz")["samples"],
    )
    stochastic = _run(tmp_path / "em", "solver=euler_maruyama", "solver.grid=tuned")
    assert stochastic["status"] == "invalid" and "dpm_solver, unipc" in stochastic["error"]


def test_the_default_tunes_and_its_grid_file_keeps_the_configuration(tmp_path):
    """solver=default solver.grid=tuned tunes the default (`tune_grid(None)`): grid.json records
    the configuration that tuned closest, with its parameters and last step, the run samples it
    (NFE = steps), and solver=default on that file samples it again without tuning: the same
    samples. denoise beside it is refused (the grid's configuration fixes its last step), and
    t_end beside any tuned or saved grid (it ends at its own last time)."""
    tuned = ["solver=default", "steps=6", "solver.grid=tuned", "tune.pilot=64", "tune.trials=20"]
    record = _run(tmp_path / "tuned", *tuned)
    assert record["status"] == "ok" and record["nfe"] == 6 and record["steps"] < 6
    saved = json.loads((tmp_path / "tuned" / "grid.json").read_text())
    assert record["configuration"] == saved["configuration"] == record["tuning"]["configuration"]
    assert saved["solver"] in ("dpm_solver", "unipc") and saved["params"]["order"] in (2, 3)
    assert saved["denoise"] in ("tweedie", "trapezoid")  # steps < 6: the last step to sigma = 0
    assert record["tuning"]["trials"] == 4 * 20
    assert record["tuning"]["holdout_error"] <= record["tuning"]["initial_holdout_error"]
    grid_file = tmp_path / "tuned" / "grid.json"
    again = _run(tmp_path / "again", "solver=default", f"solver.grid={grid_file}")
    assert again["configuration"] == saved["configuration"] and again["tuning"] is None
    assert again["nfe"] == 6 and "pilot" not in again
    np.testing.assert_array_equal(
        np.load(tmp_path / "again" / "samples.npz")["samples"],
        np.load(tmp_path / "tuned" / "samples.npz")["samples"],
    )
    with pytest.raises(ValueError, match="tuned for, its last step included: drop denoise"):
        _run(tmp_path / "b", "solver=default", f"solver.grid={grid_file}", "denoise=false")
    with pytest.raises(ValueError, match="ends at its own last time: drop t_end"):
        _run(tmp_path / "c", "solver=unipc", f"solver.grid={grid_file}", "t_end=0.01")


def test_checkpoint_run(tmp_path, tiny_checkpoint):
    """A checkpoint samples on its own SDE (subvp here, the config's sde=vp ignored) and the
    record names that SDE."""
    ckpt = tiny_checkpoint(tmp_path / "train", "two_moons", 500, "sde=subvp")
    record = _run(tmp_path / "s", "model=ckpt", f"ckpt={ckpt}", "solver=euler_maruyama", "steps=5")
    assert record["status"] == "ok" and record["nfe"] == 6 and record["sde"] == "subvp"
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
        (["solver.grid=squares"], "valid choices: uniform, log_snr, edm, quadratic, tuned, or"),
        (["tune.trials=0"], "tune.pilot and tune.trials must be >= 1"),
    ],
)
def test_bad_config_fails_clearly(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _run(tmp_path, *overrides)


def test_unknown_keys_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"Did you mean 'solver\.name'"):
        compose_config("sample", ["solver.nmae=ode"])


@pytest.fixture(scope="module")
def ring_ckpt_and_classifier(tmp_path_factory, tiny_checkpoint):
    """A tiny unconditional checkpoint on the 8-component ring and a noisy classifier of it."""
    from sde_diffusion.classifier import NoisyClassifier, save_classifier, train_classifier
    from sde_diffusion.data import DataConfig, load_data
    from sde_diffusion.trainer import load_model

    tmp = tmp_path_factory.mktemp("cg")
    ckpt = tiny_checkpoint(tmp / "train", "gmm", 2000)
    _, sde, _ = load_model(ckpt, "cpu")
    data = load_data(DataConfig(name="gmm", n=2000))
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clf = NoisyClassifier((2,), 8, sde, width=32, depth=2, data_var=float(data.train.var()))
    train_classifier(clf, sde, data.train, data.train_labels, steps=300, generator=g)
    return ckpt, save_classifier(clf, tmp / "clf.safetensors")


def _sector_share(x, label, k=8):
    angle = np.degrees(np.arctan2(x[:, 1], x[:, 0])) % 360
    return float(np.mean(np.abs((angle - 360 * label / k + 180) % 360 - 180) < 180 / k))


def test_checkpoint_classifier_guidance(tmp_path, ring_ckpt_and_classifier):
    """guidance.kind=classifier samples the checkpoint's score plus the saved classifier's
    gradient: the same samples as composing the library by hand, and pulled to the label."""
    from sde_diffusion.classifier import load_classifier
    from sde_diffusion.guidance import classifier_guided_score_fn
    from sde_diffusion.solvers import sample
    from sde_diffusion.trainer import load_score_fn

    ckpt, clf_path = ring_ckpt_and_classifier
    args = ["model=ckpt", f"ckpt={ckpt}", "solver=euler_maruyama", "steps=20"]
    guide = ["guidance.kind=classifier", f"guidance.classifier={clf_path}", "guidance.label=2"]
    record = _run(tmp_path / "g", *args, *guide, "guidance.scale=4")
    assert record["status"] == "ok"
    x = np.load(tmp_path / "g" / "samples.npz")["samples"]

    score_fn, sde, _ = load_score_fn(ckpt, "cpu")
    guided = classifier_guided_score_fn(score_fn, load_classifier(clf_path), 2, 4.0)
    by_hand = sample(
        guided,
        sde,
        (300, 2),
        "euler_maruyama",
        steps=20,
        generator=torch.Generator().manual_seed(0),
    )
    np.testing.assert_allclose(x, by_hand.numpy(), rtol=1e-5, atol=1e-5)

    _run(tmp_path / "u", *args)
    unguided = np.load(tmp_path / "u" / "samples.npz")["samples"]
    assert _sector_share(x, 2) > max(0.5, 2 * _sector_share(unguided, 2))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["guidance.kind=clf"], "valid choices: cfg, classifier"),
        (["guidance.kind=classifier"], "needs guidance.classifier="),
        (["guidance.classifier=/nonexistent.safetensors"], "does not exist"),
    ],
)
def test_bad_guidance_config_fails_clearly(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _run(tmp_path, "guidance.label=1", *overrides)


def test_classifier_of_another_sde_is_refused(tmp_path, ring_ckpt_and_classifier):
    from sde_diffusion import get_sde
    from sde_diffusion.classifier import NoisyClassifier, save_classifier

    ckpt, _ = ring_ckpt_and_classifier
    other = save_classifier(NoisyClassifier((2,), 8, get_sde("ve")), tmp_path / "ve.safetensors")
    guide = ["guidance.kind=classifier", f"guidance.classifier={other}", "guidance.label=1"]
    with pytest.raises(ValueError, match="was trained on VESDE"):
        _run(tmp_path / "s", "model=ckpt", f"ckpt={ckpt}", *guide)


def test_checkpoint_inpainting_keeps_the_known_pixels_exactly(tmp_path):
    cfg = train.compose_config(
        [
            "model=unet", "data=digits", "model.base_channels=8", "model.channel_mult=[1]",
            "model.num_res_blocks=1", "model.attn_resolutions=[]", "model.num_heads=1",
            "train.steps=2", "train.batch_size=8", "train.log_every=1", "train.sample_every=-1",
            "train.device=cpu", "train.progress=false", "train.tensorboard=false",
        ]
    )  # fmt: skip
    ckpt = train.run(cfg, tmp_path / "train").last_checkpoint
    for mask in ("half", "box", "random"):
        record = _run(
            tmp_path / mask, "model=ckpt", f"ckpt={ckpt}", "solver=euler_maruyama", "steps=4",
            "num_samples=16", f"inpaint.mask={mask}", "inpaint.resample=2",
        )  # fmt: skip
        assert record["status"] == "ok", record["error"]
        assert record["metrics"]["known_max_abs_error"] == 0.0
        assert record["nfe"] == 4 + 4 + 1  # 4 steps, each walked twice by RePaint, the Tweedie step
    with pytest.raises(ValueError, match="valid choices: half, box, random"):
        _run(tmp_path, f"ckpt={ckpt}", "model=ckpt", "inpaint.mask=circle")


def test_every_registered_solver_has_a_config_with_its_own_parameters():
    """conf/solver/<name>.yaml exists for each registered solver, and every parameter it sets is
    a keyword of that solver's function (a renamed parameter fails here, not in a sweep)."""
    for name, spec in SOLVERS.items():
        cfg = compose_config("sample", [f"solver={name}"])
        assert cfg.solver.name == name
        accepted = set(inspect.signature(spec.fn).parameters)
        assert set(cfg.solver.params) <= accepted, (name, set(cfg.solver.params) - accepted)
