"""SIGKILL during training and during checkpoint writes (the short version of
benchmarks/fault_injection.py): after 3 kills and resumes, every checkpoint on disk loads and the
loss log equals an uninterrupted run's with the same seed, with no repeated step."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "fault_injection.py"
spec = importlib.util.spec_from_file_location("fault_injection", PATH)
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench
spec.loader.exec_module(bench)


def test_three_kills_lose_nothing(tmp_path):
    report = bench.run(kills=3, steps=160, seed=3, out=tmp_path, width=256)
    assert report.kills == 3
    assert report.checkpoints_checked > 0 and report.unreadable == []
    assert report.rows == 160 // 5
    assert report.identical_log
    steps = [int(row[0]) for row in bench.loss_log(tmp_path / "killed")]
    assert steps == sorted(set(steps))
