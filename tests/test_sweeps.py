"""Multirun sweeps of the sampling app through real Hydra launchers, in fresh processes as a user
runs them: joblib (parallel on one machine) and submitit's local executor, which goes through the
same submitit launcher as `hydra/launcher=submitit_slurm` (pickled job, separate process per
run, results written by the job) short of the SLURM queue itself. The report app then collects
each sweep; the nonsensical combination (ddpm on VE) is a row marked invalid, not a crash."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["model=oracle", "sde=vp,ve", "solver=ddim,ddpm", "steps=5", "num_samples=200"]
LAUNCHERS = {
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"],
}


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_sweep_runs_through_the_launcher_and_the_report_collects_it(tmp_path, launcher):
    sweep_dir = tmp_path / "sweep"
    _python(
        "-m",
        "sde_diffusion.sample",
        "-m",
        *SWEEP,
        *LAUNCHERS[launcher],
        f"hydra.sweep.dir={sweep_dir}",
        cwd=ROOT,
    )
    _python("-m", "sde_diffusion.report", str(sweep_dir), cwd=ROOT)
    with open(sweep_dir / "results.csv") as f:
        rows = {(r["sde"], r["solver"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(s, m) for s in ("vp", "ve") for m in ("ddim", "ddpm")}
    assert rows["ve", "ddpm"]["status"] == "invalid"
    for key in [("vp", "ddim"), ("vp", "ddpm"), ("ve", "ddim")]:
        assert rows[key]["status"] == "ok" and float(rows[key]["nfe"]) == 6
    assert (sweep_dir / "results.md").exists() and (sweep_dir / "sliced_w2_vs_nfe.png").exists()
