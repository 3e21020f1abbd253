"""What the Hydra apps (train, sample, likelihood) share: the config directory, the schemas of
the shared config groups, composition with clear errors, and the entry point that runs an app.

Only the apps import this module; the library never imports Hydra.
"""

from __future__ import annotations

import difflib
import json
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..solvers import IncompatibleSDEError
from ..solvers.tuning import UntunableSolverError
from .config import (
    CheckpointModelConfig,
    DDPMConfig,
    OracleConfig,
    SubVPConfig,
    VEConfig,
    VPConfig,
    VPCosineConfig,
)

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
#: the config groups of each app (for the override check)
GROUPS = {
    "train": ("sde", "model", "data", "loss", "train"),
    "sample": ("sde", "solver", "model"),
    "likelihood": ("sde", "model"),
}
#: the `model` options each app can use (the group's folder holds both kinds)
MODEL_OPTIONS = {
    "train": ("mlp", "unet"),
    "sample": ("ckpt", "oracle"),
    "likelihood": ("ckpt", "oracle"),
}

#: what a user can get wrong (a bad value, an impossible combination, a missing or bad file): one
#: line is the whole story, where any other exception is a bug and keeps its traceback
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, IncompatibleSDEError)
#: a run that cannot happen by construction (ddpm on VE): recorded as invalid, a sweep goes on
INVALID = (IncompatibleSDEError, UntunableSolverError)
STATUS_FILE = "status.json"

__all__ = [
    "CONF_DIR",
    "RunFailed",
    "SweepStatus",
    "check_override_keys",
    "compose_config",
    "register_shared_schemas",
    "run_app",
]


def register_shared_schemas(cs: ConfigStore) -> None:
    """Type the `sde` group's options and the `model` group's oracle / ckpt options that the apps
    share (conf/sde/*.yaml and conf/model/*.yaml extend these schemas)."""
    cs.store(group="model", name="oracle_schema", node=OracleConfig)
    cs.store(group="model", name="ckpt_schema", node=CheckpointModelConfig)
    for name, node in (
        ("vp", VPConfig),
        ("vp_cosine", VPCosineConfig),
        ("subvp", SubVPConfig),
        ("ve", VEConfig),
        ("ddpm", DDPMConfig),
    ):
        cs.store(group="sde", name=f"{name}_schema", node=node)


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=overrides)
    with initialize_config_dir(CONF_DIR, version_base=None):
        return compose(config_name, overrides=overrides)


def group_options(config_name: str, group: str) -> list[str]:
    """The options of an app's config group: its yaml files (not the schemas they extend)."""
    if group == "model":
        return list(MODEL_OPTIONS[config_name])
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def check_override_keys(config_name: str, overrides: list[str]) -> None:
    """Raise ValueError for an option of a config group or a key that does not exist, listing
    the valid options or keys.

    Hydra would also reject them, but its list of options includes the internal *_schema entries
    and it does not say which keys exist; additions (+key=value) are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    parsed = OverridesParser.create().parse_overrides(overrides)
    groups = [o for o in parsed if o.key_or_group in GROUPS[config_name]]
    for o in groups:
        swept = isinstance(o.value(), ChoiceSweep)
        if o.is_sweep_override() and not swept:
            continue  # a glob or range over options: Hydra expands it from the options themselves
        valid = group_options(config_name, o.key_or_group)
        for option in o.sweep_string_iterator() if swept else [o.value()]:
            if option not in valid:
                raise ValueError(
                    f"unknown {o.key_or_group}={option}; valid choices: {', '.join(valid)}"
                )
    choices = [o.input_line for o in groups if not o.is_sweep_override()]
    # keys under a swept group (sde=vp,ve) depend on the option: left to Hydra
    skip = {"hydra"} | {o.key_or_group for o in groups if o.is_sweep_override()}
    keyed = [
        o
        for o in parsed
        if "." in o.key_or_group
        and not (o.is_add() or o.is_force_add() or o.is_delete())
        and o.key_or_group.split(".")[0] not in skip
    ]
    if not keyed:
        return
    cfg = _compose(config_name, choices)
    for o in keyed:
        node, path = cfg, []
        for part in o.key_or_group.split("."):
            if not isinstance(node, DictConfig) or part not in node:
                valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
                close = difflib.get_close_matches(part, [str(k) for k in valid], n=1)
                where = ".".join(path) or "the top level"
                hint = f" Did you mean {'.'.join([*path, close[0]])!r}?" if close else ""
                raise ValueError(
                    f"unknown config key {o.key_or_group!r}: {where} has no {part!r}.{hint} "
                    f"Valid keys under {where}: {', '.join(map(str, valid))}"
                )
            node, path = node[part], [*path, part]


def compose_config(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """The composed config of an app for these command-line overrides (checked as the app does)."""
    from hydra.errors import ConfigCompositionException

    overrides = list(overrides or [])
    check_override_keys(config_name, overrides)
    try:
        return _compose(config_name, overrides)
    except ConfigCompositionException as e:
        raise ValueError(f"{e}: {e.__cause__}" if e.__cause__ else str(e)) from e


class RunFailed(Exception):
    """A run that was recorded as failed (status "error" or "invalid") without raising."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def _status_of(e: BaseException) -> str:
    if isinstance(e, RunFailed):
        return e.status
    return "invalid" if isinstance(e, INVALID) else "error"


def run_app(config_name: str, task: Callable[[DictConfig, Path], Any]) -> None:
    """Run `task(cfg, out_dir)` as the Hydra app `config_name` on the command-line arguments.

    A misspelt key fails before Hydra starts, naming the valid keys. A single run that raises
    exits with status 1 and one line, "error: <what went wrong>" (the traceback too when the
    exception is not a user error, i.e. a bug). In a multirun every run records its outcome in
    status.json in its own directory and the sweep goes on; at its end `SweepStatus` (a Hydra
    callback in every app's config) counts the failed runs, and that count is the exit status.
    """
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        check_override_keys(config_name, [a for a in sys.argv[1:] if not a.startswith("-")])
    except ValueError as e:
        sys.exit(f"error: {e}")

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base=None)
    def _app(cfg: DictConfig) -> None:
        hydra_cfg = HydraConfig.get()
        out = Path(hydra_cfg.runtime.output_dir)
        try:
            task(cfg, out)
        except Exception as e:
            if not isinstance(e, USER_ERRORS + INVALID + (RunFailed,)):
                traceback.print_exc()
            if hydra_cfg.mode != RunMode.MULTIRUN:
                sys.exit(f"error: {e}")
            status = {"status": _status_of(e), "error": f"{e}"}
            if not isinstance(e, RunFailed):  # a RunFailed run has said why itself
                print(f"{status['status']}: {e}", file=sys.stderr)
        else:
            status = {"status": "ok", "error": None}
        (out / STATUS_FILE).write_text(json.dumps(status))

    SweepStatus.failed = 0
    _app()
    if SweepStatus.failed:
        sys.exit(min(SweepStatus.failed, 255))


class SweepStatus(Callback):
    """Counts a finished sweep's runs by the status.json each wrote and prints the tally; the
    number of failed runs (status "error", or no status at all: a run that died) is kept for
    the app's exit status. Runs where the launcher executes them; this hook runs where the sweep
    was started, after every run has returned."""

    failed = 0

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        runs = [p.parent.parent for p in sweep.glob("**/.hydra/overrides.yaml")]
        tally: Counter[str] = Counter()
        for run in runs:
            path = run / STATUS_FILE
            tally[json.loads(path.read_text())["status"] if path.is_file() else "error"] += 1
        SweepStatus.failed = tally["error"]
        counts = ", ".join(f"{tally[k]} {k}" for k in ("ok", "invalid", "error") if tally[k])
        print(f"sweep {sweep}: {len(runs)} runs ({counts})", file=sys.stderr)
