"""Kill `sde-diffusion train` with SIGKILL at random moments, resume it each time, and check
that nothing was lost: every checkpoint left on disk loads, and the resumed run's loss log is the
uninterrupted run's, row for row.

    python benchmarks/fault_injection.py [--kills 20] [--steps 600] [--seed 0] [--out DIR]

Each kill lands a random number of logged rows (5 to 40 steps) into the restarted run: half of
them at a random moment while it trains, the other half as soon as a checkpoint's temporary file
appears, i.e. while a checkpoint is being written (the model is wide enough that a write takes
tens of milliseconds). After every kill each complete checkpoint in the
run directory is loaded (`load_checkpoint`; a temporary file a kill left behind is not a
checkpoint and is counted apart), then the run is started again with `train.resume=true`. At the
end the loss log (step, loss, grad_norm, lr of metrics.csv) is compared with an uninterrupted run
of the same seed: on CPU it must be identical, bit for bit as printed.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sde_diffusion.checkpoint import CheckpointError, list_checkpoints, load_checkpoint

#: the columns that must match (steps_per_sec is wall-clock time and may not)
LOGGED = ("step", "loss", "grad_norm", "lr")


def train_command(run_dir: Path, steps: int, seed: int, width: int) -> list[str]:
    """`sde-diffusion train` on the swiss roll, with a checkpoint every 20 steps."""
    return [
        sys.executable,
        "-m",
        "sde_diffusion",
        "train",
        f"model.width={width}",
        "model.depth=3",
        f"train.steps={steps}",
        "train.batch_size=128",
        "train.log_every=5",
        "train.checkpoint_every=20",
        "train.keep_last=2",
        "train.sample_every=-1",
        "train.progress=false",
        "train.tensorboard=false",
        "train.device=cpu",
        f"train.seed={seed}",
        "train.resume=true",
        f"hydra.run.dir={run_dir}",
    ]


def loss_log(run_dir: Path) -> list[tuple[str, ...]]:
    """The logged columns of metrics.csv, as written."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [tuple(row[k] for k in LOGGED) for row in csv.DictReader(f)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
        start_new_session=True,
        text=True,
    )


def _rows(run_dir: Path) -> int:
    log = run_dir / "metrics.csv"
    return log.read_bytes().count(b"\n") if log.exists() else 0


def _after_rows(run_dir: Path, proc: subprocess.Popen, rows: int) -> bool:
    """Wait until the run has logged `rows` more rows (5 steps each); False if it ended first.
    A resumed run first cuts the log back to its checkpoint, so count from that cut."""
    start = None
    while proc.poll() is None:
        n = _rows(run_dir)
        start = n if start is None else min(start, n)
        if n - start >= rows:
            return True
        time.sleep(0.005)
    return False


def _writing(ckpt_dir: Path, proc: subprocess.Popen) -> bool:
    """Poll until a checkpoint's temporary file exists; False if the run finished first."""
    while proc.poll() is None:
        if any(ckpt_dir.glob(".*.tmp")):
            return True
        time.sleep(0.0005)
    return False


@dataclass
class Report:
    kills: int = 0
    kills_while_writing: int = 0
    temporaries_left: int = 0
    checkpoints_checked: int = 0
    unreadable: list[str] = field(default_factory=list)
    identical_log: bool = False
    rows: int = 0
    seconds: float = 0.0


def run(kills: int, steps: int, seed: int, out: Path, width: int = 1024) -> Report:
    """The uninterrupted reference run, then the run killed `kills` times and resumed."""
    tic = time.perf_counter()
    reference, killed = out / "reference", out / "killed"
    for d in (reference, killed):
        if (d / "metrics.csv").exists() or (d / "checkpoints").exists():
            raise ValueError(f"{d} holds an earlier run; pass an empty --out")
    subprocess.run(
        train_command(reference, steps, seed, width), check=True, env=_env(), capture_output=True
    )
    rng = random.Random(seed)
    report, ckpt_dir = Report(), killed / "checkpoints"
    while report.kills < kills:
        proc = _start(train_command(killed, steps, seed, width))
        # a random number of logged rows (5 to 40 steps) into the run, then at once (a kill
        # during a step) or at the next checkpoint write
        landed = _after_rows(killed, proc, rng.randint(1, 8))
        if report.kills % 2 == 1:
            landed = landed and _writing(ckpt_dir, proc)
        else:
            time.sleep(rng.uniform(0.0, 0.2))
            landed = landed and proc.poll() is None
        if not landed:
            raise RuntimeError(
                f"the run finished after {report.kills} kills: raise --steps for {kills} kills"
            )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        report.kills += 1
        left = list(ckpt_dir.glob(".*.tmp"))
        report.kills_while_writing += bool(left)
        report.temporaries_left = len(left)
        for path in list_checkpoints(ckpt_dir):
            report.checkpoints_checked += 1
            try:
                load_checkpoint(path)
            except (CheckpointError, OSError) as e:
                report.unreadable.append(f"{path}: {e}")
    last = subprocess.run(
        train_command(killed, steps, seed, width), env=_env(), capture_output=True
    )
    if last.returncode != 0:
        raise RuntimeError(f"the final resume failed:\n{last.stderr.decode()[-2000:]}")
    expected, got = loss_log(reference), loss_log(killed)
    report.identical_log, report.rows = got == expected, len(got)
    report.seconds = time.perf_counter() - tic
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=1024, help="the MLP's width (sets the write time)")
    p.add_argument("--out", type=Path, default=Path("outputs/fault_injection"))
    a = p.parse_args()
    r = run(a.kills, a.steps, a.seed, a.out / time.strftime("%Y%m%d-%H%M%S"), a.width)
    print(f"| kills (SIGKILL) | {r.kills} |")
    print(f"| ... of which left a checkpoint write unfinished | {r.kills_while_writing} |")
    print(f"| checkpoint loads after the kills | {r.checkpoints_checked} |")
    print(f"| unreadable checkpoints | {len(r.unreadable)} |")
    print(f"| resumed loss log == uninterrupted run's ({r.rows} rows) | {r.identical_log} |")
    print(f"| wall time | {r.seconds:.0f} s |")
    for line in r.unreadable:
        print(line)
    sys.exit(0 if r.identical_log and not r.unreadable else 1)


if __name__ == "__main__":
    main()
