"""Collect a sweep into a CSV, a Markdown table and a log–log plot of quality against NFE.

    sde-diffusion report <sweep dir> [--out DIR] [--metric sliced_w2]

A sweep directory is Hydra's multirun layout: one subdirectory per run, each holding the
`metrics.json` that `sde-diffusion sample` writes:

    {"model": str, "sde": str, "solver": str, "steps": int, "nfe": int | null, "seed": int,
     "num_samples": int, "status": "ok" | "invalid" | "error", "error": str | null,
     "wall_time_s": float, "metrics": {name: float}}

and optionally "grid" (a non-default time grid, e.g. "tuned"), which the tables and the plot
append to the solver's name.

Runs whose combination makes no sense ("invalid", e.g. ddpm on VE) or that failed ("error") stay
in the CSV and the tables, marked as such; only the plot leaves them out, having no value.
The functions work on plain dicts of that schema, so benchmarks reuse them on their own records.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

Record = dict[str, Any]

STATUSES = ("ok", "invalid", "error")
FIELDS = {
    "model": str,
    "sde": str,
    "solver": str,
    "steps": int,
    "nfe": (int, type(None)),
    "seed": int,
    "num_samples": int,
    "status": str,
    "error": (str, type(None)),
    "wall_time_s": (int, float),
    "metrics": dict,
}
#: the CSV's leading columns; one column per metric follows, then the run directory
COLUMNS = ("model", "sde", "solver", "steps", "nfe", "seed", "num_samples", "status", "error")

__all__ = [
    "COLUMNS",
    "FIELDS",
    "STATUSES",
    "load_run",
    "load_sweep",
    "main",
    "markdown_report",
    "markdown_table",
    "metric_names",
    "plot_quality",
    "write_csv",
]


def load_run(path: Path | str) -> Record:
    """Read and check one metrics.json; a missing key, a wrong type or an unknown status is a
    ValueError naming the file, so a malformed run is never silently dropped or mis-tabled."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in FIELDS if k not in record]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; the schema has {list(FIELDS)}")
    for key, kind in FIELDS.items():
        value = record[key]
        # bool is an int subclass in Python; a JSON true in "steps" is still wrong
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{path}: {key}={value!r} has the wrong type")
    if record["status"] not in STATUSES:
        raise ValueError(
            f"{path}: status {record['status']!r}; valid choices: {', '.join(STATUSES)}"
        )
    bad = {k: v for k, v in record["metrics"].items() if not isinstance(v, int | float)}
    if bad:
        raise ValueError(f"{path}: metric values must be numbers, got {bad}")
    if record.get("grid"):  # a sweep over grids keeps one row per solver and grid
        record["solver"] = f"{record['solver']} grid={record['grid']}"
    record["run"] = path.parent.name
    return record


def load_sweep(sweep_dir: Path | str) -> list[Record]:
    """All runs below sweep_dir (every metrics.json at any depth), in a stable order."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ValueError(f"sweep directory {str(root)!r} does not exist or is not a directory")
    paths = sorted(root.rglob("metrics.json"))
    if not paths:
        raise ValueError(f"no metrics.json below {str(root)!r}: is it a sweep directory?")
    records = []
    for p in paths:
        record = load_run(p)
        record["run"] = str(p.parent.relative_to(root))
        records.append(record)
    return sorted(records, key=_order)


def _order(r: Record) -> tuple:
    return (r["model"], r["sde"], r["solver"], r["steps"], r["seed"], r.get("run", ""))


def metric_names(records: Iterable[Record]) -> list[str]:
    """The union of the metric names of all runs, sorted."""
    return sorted({name for r in records for name in r["metrics"]})


def write_csv(records: Sequence[Record], path: Path | str) -> None:
    """One row per run: the schema's fields, one column per metric (empty where a run has none),
    then the wall time and the run directory."""
    names = metric_names(records)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*COLUMNS, *names, "wall_time_s", "run"])
        for r in records:
            row = ["" if r[c] is None else r[c] for c in COLUMNS]
            row += [r["metrics"].get(n, "") for n in names]
            w.writerow([*row, r["wall_time_s"], r.get("run", "")])


def _cell(runs: Sequence[Record], metric: str) -> str:
    """A table cell: the metric (mean over seeds of the runs that have it) and the NFE, or the
    status of runs that produced no value."""
    values = [r["metrics"][metric] for r in runs if r["status"] == "ok" and metric in r["metrics"]]
    if not values:
        return " / ".join(sorted({r["status"] if r["status"] != "ok" else "n/a" for r in runs}))
    nfes = sorted({r["nfe"] for r in runs if r["status"] == "ok" and r["nfe"] is not None})
    text = f"{statistics.fmean(values):.4g}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.2g}"
    return text + (f" ({'/'.join(map(str, nfes))})" if nfes else "")


def markdown_table(
    records: Sequence[Record], metric: str, row: str = "solver", column: str = "steps"
) -> str:
    """A Markdown pivot of `metric`: one row per value of `row`, one column per value of
    `column`; each cell reads "value (NFE)" (mean ± std over seeds when there are several) or
    the status ("invalid", "error") of runs without a value."""
    cells: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        cells[r[row], r[column]].append(r)
    rows = list(dict.fromkeys(r[row] for r in records))
    cols = sorted({r[column] for r in records})
    lines = [
        f"| {row} \\ {column} | " + " | ".join(map(str, cols)) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name in rows:
        entries = [_cell(cells[name, c], metric) if cells[name, c] else "" for c in cols]
        lines.append(f"| {name} | " + " | ".join(entries) + " |")
    return "\n".join(lines)


def _groups(records: Sequence[Record], keys: Sequence[str]) -> dict[tuple, list[Record]]:
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in keys)].append(r)
    return groups


def markdown_report(records: Sequence[Record], metric: str) -> str:
    """The whole sweep in Markdown: one pivot (solver x steps) per model and SDE, then every
    invalid or errored run with its message."""
    parts = [f"# {metric} by solver and steps (NFE in parentheses)"]
    for (model, sde), runs in _groups(records, ("model", "sde")).items():
        parts += [f"\n## model={model}, sde={sde}\n", markdown_table(runs, metric)]
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        parts += [
            "\n## Runs without a result\n",
            "| run | model | sde | solver | steps | status | message |",
        ]
        parts.append("|---|---|---|---|---|---|---|")
        for r in failed:
            message = (r["error"] or "").strip().splitlines()
            message = message[-1] if message else ""
            parts.append(
                f"| {r.get('run', '')} | {r['model']} | {r['sde']} | {r['solver']} | "
                f"{r['steps']} | {r['status']} | {message.replace('|', '/')} |"
            )
    return "\n".join(parts) + "\n"


LINESTYLES = ("-", "--", ":", "-.")


def plot_quality(
    records: Sequence[Record],
    metric: str | Sequence[str],
    path: Path | str,
    panel: Sequence[str] = ("model", "sde"),
    line: str = "solver",
    floors: dict[tuple, float] | None = None,
) -> None:
    """Log–log plot of `metric` against the counted NFE: one panel per value of the `panel`
    keys (one row of panels per metric when several are given), one line per `line` value
    (mean over seeds). Runs without a positive value or without an NFE are left out. `floors`
    maps a panel key to a horizontal reference line (e.g. the data-vs-data value) drawn in the
    first row. Lines cycle through ten colours, then the next line style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [metric] if isinstance(metric, str) else list(metric)
    panels = _groups(records, panel)
    names = list(dict.fromkeys(r[line] for r in records))
    fig, axes = plt.subplots(
        len(metrics),
        len(panels),
        figsize=(5.5 * len(panels), 4.5 * len(metrics)),
        squeeze=False,
        constrained_layout=True,
    )
    for row, name_of_metric in enumerate(metrics):
        for ax, (key, runs) in zip(axes[row], panels.items(), strict=True):
            for (name,), group in _groups(runs, (line,)).items():
                by_nfe: dict[int, list[float]] = defaultdict(list)
                for r in group:
                    value = r["metrics"].get(name_of_metric)
                    if r["status"] == "ok" and r["nfe"] and value is not None and value > 0:
                        by_nfe[r["nfe"]].append(value)
                if by_nfe:
                    i = names.index(name)
                    nfes = sorted(by_nfe)
                    ys = [statistics.fmean(by_nfe[n]) for n in nfes]
                    style = {"color": f"C{i % 10}", "ls": LINESTYLES[i // 10 % len(LINESTYLES)]}
                    ax.plot(nfes, ys, marker="o", ms=3, label=str(name), **style)
            if row == 0 and floors and key in floors and floors[key] > 0:
                ax.axhline(floors[key], color="k", ls=":", lw=1, label="floor")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("NFE")
            ax.set_ylabel(name_of_metric)
            ax.set_title(", ".join(f"{k}={v}" for k, v in zip(panel, key, strict=True)))
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """`sde-diffusion report`: collect a sweep directory into tables and a plot."""
    parser = argparse.ArgumentParser(
        prog="sde-diffusion report",
        description="Collect a sweep (one metrics.json per run) into a CSV, a Markdown table "
        "and a log-log plot of quality against NFE.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep (Hydra multirun) directory")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: sweep_dir)")
    parser.add_argument(
        "--metric", default="sliced_w2", help="the quality metric to tabulate and plot"
    )
    args = parser.parse_args(argv)
    records = load_sweep(args.sweep_dir)
    names = metric_names(records)
    if args.metric not in names:
        # a sweep of nothing but invalid/errored runs has no metric at all: still tabulate it
        if names:
            parser.error(f"metric {args.metric!r} is in no run; valid choices: {', '.join(names)}")
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    write_csv(records, out / "results.csv")
    text = markdown_report(records, args.metric)
    (out / "results.md").write_text(text)
    plot_quality(records, args.metric, out / f"{args.metric}_vs_nfe.png")
    print(text)
    ok = sum(r["status"] == "ok" for r in records)
    print(
        f"{len(records)} runs ({ok} ok); wrote {out / 'results.csv'}, {out / 'results.md'}, "
        f"{out / f'{args.metric}_vs_nfe.png'}"
    )
