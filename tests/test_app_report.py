"""The sweep report: a fake Hydra multirun directory (ok, invalid and errored runs) goes to a CSV,
a Markdown table and a plot, with every run accounted for."""

from __future__ import annotations

import csv
import json

import pytest

from sde_diffusion.apps import report

RUNS = [
    # (subdir, sde, solver, steps, nfe, seed, status, error, metrics)
    ("0", "vp", "ddim", 10, 11, 0, "ok", None, {"sliced_w2": 0.25, "mmd": 0.01}),
    ("1", "vp", "ddim", 100, 101, 0, "ok", None, {"sliced_w2": 0.05, "mmd": 0.002}),
    ("2", "vp", "heun", 10, 20, 0, "ok", None, {"sliced_w2": 0.125}),
    ("3", "vp", "heun", 10, 20, 1, "ok", None, {"sliced_w2": 0.375}),
    ("4", "ve", "ddpm", 10, None, 0, "invalid", "ddpm needs a VP SDE", {}),
    ("5", "ve", "heun", 10, None, 0, "error", "Traceback ...\nValueError: boom", {}),
    ("6", "ve", "heun", 100, 200, 0, "ok", None, {"sliced_w2": 0.5}),
]


def _write_sweep(root):
    for sub, sde, solver, steps, nfe, seed, status, error, metrics in RUNS:
        d = root / sub
        d.mkdir(parents=True)
        record = {
            "model": "oracle",
            "sde": sde,
            "solver": solver,
            "steps": steps,
            "nfe": nfe,
            "seed": seed,
            "num_samples": 1000,
            "status": status,
            "error": error,
            "wall_time_s": 1.5,
            "metrics": metrics,
        }
        (d / "metrics.json").write_text(json.dumps(record))
    (root / "multirun.yaml").write_text("hydra: {}\n")  # Hydra's own file is ignored
    return root


def test_report_writes_csv_markdown_and_plot(tmp_path, capsys):
    sweep = _write_sweep(tmp_path / "sweep")
    out = tmp_path / "out"
    report.main([str(sweep), "--out", str(out)])

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(RUNS)
    assert list(rows[0])[: len(report.COLUMNS)] == list(report.COLUMNS)
    by_run = {r["run"]: r for r in rows}
    assert by_run["4"]["status"] == "invalid" and by_run["4"]["nfe"] == ""
    assert by_run["4"]["error"] == "ddpm needs a VP SDE"
    assert by_run["5"]["status"] == "error"
    assert float(by_run["1"]["sliced_w2"]) == 0.05 and float(by_run["1"]["mmd"]) == 0.002
    assert by_run["2"]["mmd"] == ""  # a run without that metric leaves the cell empty

    md = (out / "results.md").read_text()
    assert md == capsys.readouterr().out.split("\n7 runs")[0]
    ve, vp = md.split("## model=oracle, sde=ve")[1].split("## model=oracle, sde=vp")
    assert "| solver \\ steps | 10 | 100 |" in vp
    assert "| ddim | 0.25 (11) | 0.05 (101) |" in vp
    # two seeds: mean 0.25, sample std 0.18 (= 0.25 * sqrt(2) / 2)
    assert "| heun | 0.25 ± 0.18 (20) |  |" in vp
    assert "| ddpm | invalid |  |" in ve
    assert "| heun | error | 0.5 (200) |" in ve
    failed = md.split("## Runs without a result")[1]
    assert "| 4 | oracle | ve | ddpm | 10 | invalid | ddpm needs a VP SDE |" in failed
    assert "| 5 | oracle | ve | heun | 10 | error | ValueError: boom |" in failed

    png = out / "sliced_w2_vs_nfe.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_defaults_to_the_sweep_dir_and_checks_the_metric(tmp_path):
    sweep = _write_sweep(tmp_path / "sweep")
    report.main([str(sweep), "--metric", "mmd"])
    assert "| ddim | 0.01 (11) | 0.002 (101) |" in (sweep / "results.md").read_text()
    assert (sweep / "mmd_vs_nfe.png").exists()
    with pytest.raises(SystemExit):
        report.main([str(sweep), "--metric", "fid"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"status": "crashed"}, "status 'crashed'"),
        ({"steps": "10"}, "steps='10'"),
        ({"metrics": {"sliced_w2": "low"}}, "must be numbers"),
        ({"nfe": True}, "nfe=True"),
    ],
)
def test_malformed_runs_are_errors_naming_the_file(tmp_path, change, message):
    sweep = _write_sweep(tmp_path / "sweep")
    path = sweep / "1" / "metrics.json"
    record = json.loads(path.read_text())
    record.update(change)
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=message) as err:
        report.load_sweep(sweep)
    assert str(path) in str(err.value)


def test_missing_keys_and_empty_dirs(tmp_path):
    sweep = _write_sweep(tmp_path / "sweep")
    path = sweep / "0" / "metrics.json"
    record = json.loads(path.read_text())
    del record["wall_time_s"]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"missing keys \['wall_time_s'\]"):
        report.load_sweep(sweep)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no metrics\.json"):
        report.load_sweep(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        report.load_sweep(tmp_path / "nowhere")


def test_a_non_default_grid_gets_its_own_row(tmp_path):
    """Runs of one solver on its own grid and on a tuned one are two rows, not one mean."""
    sweep = _write_sweep(tmp_path / "sweep")
    path = sweep / "1" / "metrics.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "steps": 10, "grid": "tuned"}))
    table = report.markdown_table(report.load_sweep(sweep), "sliced_w2")
    assert "| ddim | 0.25 (11) |" in table and "| ddim grid=tuned | 0.05 (101) |" in table
