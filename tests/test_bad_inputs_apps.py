"""The apps' bad-input catalogue: each row is a command line a user could type, run in-process
as `sde-diffusion <app> ...` would run it; it must exit non-zero with one line naming the
problem and the valid choices or range (never Hydra's internal *_schema options, never a
traceback for a user error). Then the sweep contract: a multirun goes on past failed and invalid
runs, records each in status.json and exits with the number of failed runs; and resume says what
it does."""

from __future__ import annotations

import json
import pickle
import sys

import pytest
import torch

from sde_diffusion import apps

PICKLE = "pickle"  # replaced by the path of a pickle file written in the test
MISSING = "/nonexistent/step_00000001.safetensors"
#: a CUDA index no machine has, so that the cases hold on a GPU machine too
ABSENT_CUDA = f"cuda:{max(7, torch.cuda.device_count())}"

# (id, argv after `sde-diffusion`, key words the one error line must hold)
CASES = [
    ("unknown-app", ["smaple"], ["unknown app 'smaple'", "train, sample, report"]),
    ("sample-t_end-above-T", ["sample", "t_end=5"], ["t_end", "5"]),
    ("sample-t_end-negative", ["sample", "t_end=-0.5"], ["t_end", "-0.5"]),
    ("sample-steps-zero", ["sample", "steps=0"], ["steps must be >= 1", "0"]),
    ("sample-num_samples-zero", ["sample", "num_samples=0"], ["num_samples must be >= 1"]),
    ("sample-batch_size-zero", ["sample", "batch_size=0"], ["batch_size must be >= 1"]),
    (
        "sample-unknown-sde",
        ["sample", "sde=foo"],
        ["unknown sde=foo", "ddpm, ddpm_scaled_linear, subvp, ve, vp"],
    ),
    ("sample-unknown-solver", ["sample", "solver=rk4"], ["unknown solver=rk4", "ddim", "heun"]),
    ("sample-unknown-model", ["sample", "model=net"], ["unknown model=net", "ckpt", "oracle"]),
    ("sample-swept-unknown-sde", ["sample", "-m", "sde=vp,foo"], ["unknown sde=foo"]),
    ("sample-misspelt-key", ["sample", "solver.gird=edm"], ["solver.gird", "grid"]),
    ("sample-unknown-grid", ["sample", "solver.grid=cosine"], ["solver.grid", "log_snr", "tuned"]),
    ("sample-unknown-dtype", ["sample", "dtype=float16"], ["dtype", "float32, float64"]),
    (
        "sample-cuda-absent",
        ["sample", f"device={ABSENT_CUDA}"],
        [f"device '{ABSENT_CUDA}' is not available", "cpu"],
    ),
    ("sample-unknown-device", ["sample", "device=tpu"], ["device 'tpu' is not a device", "cuda:N"]),
    ("sample-inpaint-2d", ["sample", "inpaint.mask=box"], ["'box' mask", "(C, H, W)", "(2,)"]),
    ("sample-inpaint-mask", ["sample", "inpaint.mask=circle"], ["inpaint.mask", "half, box"]),
    ("sample-oracle-label", ["sample", "guidance.label=9"], ["guidance.label", "[0, 7]", "9"]),
    ("sample-guidance-kind", ["sample", "guidance.kind=magic"], ["guidance.kind", "cfg"]),
    ("sample-ckpt-needed", ["sample", "model=ckpt"], ["model=ckpt needs ckpt="]),
    ("sample-ckpt-missing", ["sample", "model=ckpt", f"ckpt={MISSING}"], [MISSING, "not exist"]),
    (
        "sample-ckpt-pickle",
        ["sample", "model=ckpt", f"ckpt={PICKLE}"],
        ["expected a safetensors checkpoint", "a Python pickle"],
    ),
    ("sample-oracle-kind", ["sample", "model.kind=moons"], ["moons", "ring, gaussian, random"]),
    ("sample-oracle-std", ["sample", "model.std=-1"], ["std > 0"]),
    ("sample-ddpm-on-ve", ["sample", "sde=ve", "solver=ddpm"], ["variance-preserving"]),
    (
        "sample-default-tuned",
        ["sample", "solver=default", "solver.grid=tuned", "denoise=tweedie"],
        ["solver.grid=tuned samples the configuration", "drop denoise", "dpm_solver"],
    ),
    ("likelihood-num_samples", ["likelihood", "num_samples=0"], ["num_samples must be >= 1"]),
    ("likelihood-divergence", ["likelihood", "ode.divergence=trace"], ["exact, hutchinson"]),
    ("likelihood-probe", ["likelihood", "ode.probe=uniform"], ["rademacher, gaussian"]),
    ("likelihood-model", ["likelihood", "model=mlp"], ["unknown model=mlp", "ckpt, oracle"]),
    ("likelihood-data-path", ["likelihood", "data.path=/nonexistent.npz"], ["data.path"]),
    ("likelihood-decoder", ["likelihood", "ddpm_bound.decoder=x"], ["gaussian, discretized"]),
    ("likelihood-t_eps", ["likelihood", "ode.t_eps=2"], ["ode.t_eps", "(0, 1)"]),
    ("train-unknown-model", ["train", "model=resnet"], ["unknown model=resnet", "mlp", "unet"]),
    ("train-unknown-data", ["train", "data=mnist"], ["unknown data=mnist", "swiss_roll"]),
    ("train-steps-zero", ["train", "train.steps=0"], ["train.steps must be >= 1"]),
    ("train-lr-negative", ["train", "train.lr=-1"], ["train.lr", "> 0"]),
    (
        "train-cuda-absent",
        ["train", f"train.device={ABSENT_CUDA}"],
        [f"train.device '{ABSENT_CUDA}' is not available"],
    ),
    ("train-misspelt-key", ["train", "train.step=10"], ["train.step", "Did you mean"]),
]


def _run(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["sde-diffusion", *argv])
    with pytest.raises(SystemExit) as exc:
        apps.main()
    code = exc.value.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # sys.exit("error: ...") prints it and exits with 1
        return 1, err + code
    return code, err


@pytest.mark.parametrize(("argv", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_nonzero_with_one_clear_line(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pickle.safetensors").write_bytes(pickle.dumps({"w": [1.0]}))
    argv = [a.replace(f"={PICKLE}", f"={tmp_path / 'pickle.safetensors'}") for a in argv]
    if argv[0] in ("sample", "likelihood", "train") and "-m" not in argv:
        argv.append(f"hydra.run.dir={tmp_path / 'run'}")
    code, err = _run(argv, monkeypatch, capsys)
    assert code != 0
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    for word in words:
        assert word in line, (word, line)
    assert "_schema" not in err and "Traceback" not in err


def test_sweep_goes_on_and_exits_with_the_number_of_failed_runs(tmp_path, monkeypatch, capsys):
    argv = ["sample", "-m", "sde=vp,ve", "solver=ddpm", "steps=3", "num_samples=40"]
    argv += ["t_end=0.5,5", f"hydra.sweep.dir={tmp_path}"]
    code, err = _run(argv, monkeypatch, capsys)
    statuses = sorted(json.loads(p.read_text())["status"] for p in tmp_path.glob("*/status.json"))
    # t_end=5 is an error on either SDE (the grid is checked first); ddpm on VE is invalid
    assert statuses == ["error", "error", "invalid", "ok"]
    assert code == 2
    assert "4 runs (1 ok, 1 invalid, 2 error)" in err


def test_resume_says_what_it_resumed_from(tmp_path, monkeypatch, capsys):
    base = ["train", "model.width=16", "model.depth=1", "train.log_every=5", "train.progress=false"]
    base += ["train.sample_every=-1", "train.tensorboard=false", f"hydra.run.dir={tmp_path}"]
    monkeypatch.setattr(
        sys, "argv", ["sde-diffusion", *base, "train.steps=10", "train.resume=true"]
    )
    apps.main()
    assert f"no checkpoint in {tmp_path / 'checkpoints'}; starting from step 0" in (
        capsys.readouterr().out
    )
    monkeypatch.setattr(
        sys, "argv", ["sde-diffusion", *base, "train.steps=20", "train.resume=true"]
    )
    apps.main()
    last = tmp_path / "checkpoints" / "step_00000010.safetensors"
    assert f"resuming from {last} (step 10 of 20)" in capsys.readouterr().out
    steps = [line.split(",")[0] for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["5", "10", "15", "20"]
