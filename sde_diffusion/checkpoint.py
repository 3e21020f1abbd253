"""Checkpoints in one safetensors file, written atomically, loadable without pickle.

A checkpoint holds every tensor the run needs under a prefix (model/, ema/, optim/, rng/) and a
JSON document in the safetensors metadata: the step, how to rebuild the network and the SDE, what
the network predicts ("param": eps, x0, v or edm, and edm's "sigma_data"; a checkpoint without
them holds an eps-network), the optimizer's non-tensor state and the resolved config. Nothing is unpickled on load, so a
checkpoint from an untrusted source cannot run code.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the
target (os.replace is atomic on POSIX): a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .sde import SDE, SDE_NAMES, get_sde

FORMAT = "sde_diffusion.checkpoint/1"
_NAME = re.compile(r"^step_(\d+)\.safetensors$")

__all__ = [
    "FORMAT",
    "CheckpointError",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "prune_checkpoints",
    "read_safetensors",
    "save_checkpoint",
    "sde_from_spec",
    "sde_spec",
]


class CheckpointError(ValueError):
    """A file given as a checkpoint that is not one this package wrote (or is damaged)."""


def _what_is(path: Path) -> str:
    """A few words on what a file that safetensors refused looks like."""
    size = path.stat().st_size
    head = path.open("rb").read(8)
    if size == 0:
        return "an empty file"
    if head.startswith(b"\x80"):
        return "a Python pickle (torch.save's legacy format), which is never unpickled here"
    if head.startswith(b"PK"):
        return "a zip archive (torch.save's format), which is never unpickled here"
    if size >= 8:
        declared = int.from_bytes(head, "little")
        if declared > size - 8:
            return f"a truncated or foreign file (its header claims {declared} bytes, the file has {size})"
    return f"a file of {size} bytes that is not valid safetensors"


def checkpoint_path(folder: str | Path, step: int) -> Path:
    """The file name of the checkpoint at `step` in `folder`."""
    return Path(folder) / f"step_{step:08d}.safetensors"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints in `folder`, oldest step first (temporary files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint with the highest step in `folder`, or None."""
    found = list_checkpoints(folder)
    return found[-1] if found else None


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the `keep` most recent checkpoints in `folder`."""
    for p in list_checkpoints(folder)[: -keep if keep > 0 else None]:
        p.unlink()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    path: str | Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> Path:
    """Write `tensors` and the JSON-serialisable `meta` to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    doc = json.dumps({"format": FORMAT, **meta})
    try:
        save_file(data, str(tmp), metadata={"sde_diffusion": doc})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def read_safetensors(
    path: str | Path, key: str, noun: str, writer: str, device: torch.device | str = "cpu"
) -> tuple[dict[str, Tensor], str]:
    """(tensors, the metadata document under `key`) of a safetensors file, never unpickling.

    Anything else (a missing file, a pickle, a truncated or foreign file, a safetensors file
    without the document) is refused with one line naming the path, what was expected (a `noun`
    written by `writer`) and what was found.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {noun} at {path}")
    expected = f"expected a safetensors {noun} written by {writer}"
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            doc = (f.metadata() or {}).get(key)
            if doc is None:
                raise CheckpointError(
                    f"{path}: {expected}, found a safetensors file without its {key!r} metadata"
                )
            return {k: f.get_tensor(k) for k in f.keys()}, doc
    except SafetensorError as e:
        raise CheckpointError(f"{path}: {expected}, found {_what_is(path)}") from e


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[dict[str, Tensor], dict]:
    """Read (tensors, meta) from a checkpoint written by save_checkpoint."""
    path = Path(path)
    tensors, doc = read_safetensors(path, "sde_diffusion", "checkpoint", "sde_diffusion", device)
    meta = json.loads(doc)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {meta.get('format')!r}, expected {FORMAT!r}"
        )
    return tensors, meta


def optimizer_to_tensors(
    state: Mapping[str, Any], prefix: str = "optim/"
) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer state_dict into tensors (by name) and the JSON-serialisable rest."""
    tensors, scalars = {}, {}
    for pid, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}{pid}/{key}"] = value
            else:
                scalars[f"{pid}/{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(
    tensors: Mapping[str, Tensor], rest: Mapping[str, Any], prefix: str = "optim/"
) -> dict:
    """Inverse of optimizer_to_tensors: the state_dict to pass to optimizer.load_state_dict."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            pid, key = name[len(prefix) :].split("/", 1)
            state.setdefault(int(pid), {})[key] = value
    for name, value in rest["scalars"].items():
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def sde_spec(sde: SDE) -> dict[str, Any]:
    """{'name', 'kwargs'} that rebuild `sde` through get_sde."""
    names = {cls: name for name, cls in SDE_NAMES.items()}
    if type(sde) not in names:
        raise ValueError(
            f"cannot store an SDE of type {type(sde).__name__}; known: {', '.join(SDE_NAMES)}"
        )
    kwargs = {}
    for p in list(inspect.signature(type(sde).__init__).parameters)[1:]:
        v = getattr(sde, p)
        kwargs[p] = v.tolist() if isinstance(v, Tensor) else v
    return {"name": names[type(sde)], "kwargs": kwargs}


def sde_from_spec(spec: Mapping[str, Any]) -> SDE:
    """Inverse of sde_spec."""
    return get_sde(spec["name"], **spec["kwargs"])
