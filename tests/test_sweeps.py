"""Multirun sweeps of the sampling app through real Hydra launchers, in fresh processes as a user
runs them: joblib (parallel on one machine); submitit's local executor, which goes through the
same submitit launcher as `hydra/launcher=submitit_slurm` (pickled job, separate process per
run, results written by the job) short of the SLURM queue itself; and `submitit_slurm` itself
against a fake SLURM, the shims for sbatch, srun, sacct and scancel in `tests/fake_slurm/` first
on PATH. The fake runs the sbatch script submitit generates as written, the sweep as one job
array (`--array=0-3%2`: every task with its SLURM_ARRAY_JOB_ID / SLURM_ARRAY_TASK_ID, two at a
time, output in the `--output/--error` files with %A/%a substituted), through the script's srun
line, and answers submitit's state polling by sacct (PENDING, RUNNING, then COMPLETED or FAILED
from the exit code). It is no scheduler: no queue, resources, time limit, signals or requeue,
one machine. The report app then collects each sweep; the nonsensical combination (ddpm on VE) is
a row marked invalid, not a crash."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["model=oracle", "sde=vp,ve", "solver=ddim,ddpm", "steps=5", "num_samples=200"]
LAUNCHERS = {
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"],
}
SLURM = [
    "hydra/launcher=submitit_slurm",
    "hydra.launcher.partition=fake",
    "hydra.launcher.timeout_min=5",
    "hydra.launcher.array_parallelism=2",
]

# The fake SLURM: executable shims, first on PATH. State lives in $FAKE_SLURM_SPOOL:
# <id>_<task>.state (one word, what sacct reports), <id>.sh (the submitted script), <id>.pgid (the
# process group of a job still running), calls (one line per shim call).
FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm"


def _python(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _sweep_and_report(sweep_dir: Path, launcher: list[str], env: dict | None = None) -> None:
    """Runs SWEEP through the launcher and the report app on it; checks the collected results."""
    _python(
        "-m",
        "sde_diffusion",
        "sample",
        "-m",
        *SWEEP,
        *launcher,
        f"hydra.sweep.dir={sweep_dir}",
        cwd=ROOT,
        env=env,
    )
    _python("-m", "sde_diffusion", "report", str(sweep_dir), cwd=ROOT)
    with open(sweep_dir / "results.csv") as f:
        rows = {(r["sde"], r["solver"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(s, m) for s in ("vp", "ve") for m in ("ddim", "ddpm")}
    assert rows["ve", "ddpm"]["status"] == "invalid"
    for key in [("vp", "ddim"), ("vp", "ddpm"), ("ve", "ddim")]:
        assert rows[key]["status"] == "ok" and float(rows[key]["nfe"]) == 6
    assert (sweep_dir / "results.md").exists() and (sweep_dir / "sliced_w2_vs_nfe.png").exists()


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_sweep_runs_through_the_launcher_and_the_report_collects_it(tmp_path, launcher):
    _sweep_and_report(tmp_path / "sweep", LAUNCHERS[launcher])


@pytest.fixture
def fake_slurm(tmp_path):
    """(env with the shims in tests/fake_slurm first on PATH, spool folder); cancels whatever job
    is left at teardown."""
    spool = tmp_path / "slurm"
    spool.mkdir()
    path = f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}"
    env = dict(os.environ, PATH=path, FAKE_SLURM_SPOOL=str(spool))
    yield env, spool
    for pgid in list(spool.glob("*.pgid")):  # a job still running: the test failed or timed out
        subprocess.run([FAKE_SLURM / "scancel", pgid.stem], env=env, check=False)


def test_sweep_runs_through_submitit_slurm_on_a_fake_cluster(tmp_path, fake_slurm):
    """The same sweep through `hydra/launcher=submitit_slurm` on the fake SLURM: one array job
    (the generated script's #SBATCH lines), four srun tasks, each with its own array id, all
    COMPLETED by sacct afterwards, no process left."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    env, spool = fake_slurm
    sweep_dir = tmp_path / "sweep"
    _sweep_and_report(sweep_dir, SLURM, env=env)
    calls = (spool / "calls").read_text().splitlines()
    assert sum(c.startswith("sbatch ") for c in calls) == 1  # the sweep is one job array
    script = (spool / "1000.sh").read_text()
    for line in ["#SBATCH --array=0-3%2", "#SBATCH --partition=fake", "#SBATCH --time=5"]:
        assert line in script.splitlines()
    assert sum(c.startswith("srun --unbuffered ") for c in calls) == 4
    assert any(c.startswith("sacct ") for c in calls)  # submitit polled the states
    for task in range(4):  # each task ran as itself: its logs under %A_%a, its own id
        log = sweep_dir / ".submitit" / f"1000_{task}" / f"1000_{task}_0_log"
        assert f"Starting with JobEnvironment(job_id=1000_{task}," in Path(f"{log}.out").read_text()
        assert Path(f"{log}.err").exists()
    deadline = time.monotonic() + 30  # the jobs' processes exit a moment after their results
    while (spool / "1000.pgid").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (spool / "1000.pgid").exists()
    sacct = ["sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", "1000"]
    out = subprocess.run(sacct, env=env, capture_output=True, text=True, check=True).stdout
    states = {k: v["State"] for k, v in SlurmInfoWatcher().read_info(out).items()}
    assert states == {f"1000_{task}": "COMPLETED" for task in range(4)}


def test_fake_slurm_reports_a_failed_job_and_cancels_a_running_one(tmp_path, fake_slurm):
    """The shims themselves, on plain (non-array) jobs: FAILED from the exit code, CANCELLED and
    its processes gone after scancel."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    env, spool = fake_slurm

    def sbatch(command: str) -> str:
        script = tmp_path / "job.sh"
        script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/%j.out\n{command}\n")
        out = subprocess.run(["sbatch", script], env=env, capture_output=True, text=True).stdout
        assert out.startswith("Submitted batch job ")
        return out.split()[-1]

    def state(job_id: str) -> str:
        sacct = ["sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", job_id]
        out = subprocess.run(sacct, env=env, capture_output=True, text=True, check=True).stdout
        return SlurmInfoWatcher().read_info(out)[job_id]["State"]

    failed, running = sbatch("echo $SLURM_JOB_ID; exit 3"), sbatch("sleep 60")
    deadline = time.monotonic() + 10
    while state(failed) != "FAILED" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state(failed) == "FAILED" and (tmp_path / f"{failed}.out").read_text() == f"{failed}\n"
    pgid = int((spool / f"{running}.pgid").read_text())
    subprocess.run(["scancel", running], env=env, check=True)
    assert state(running) == "CANCELLED"
    deadline = time.monotonic() + 10  # SIGKILLed, gone once reaped
    with pytest.raises(ProcessLookupError):
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.1)
