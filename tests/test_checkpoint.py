"""Checkpoints: round trip, atomic writes under a simulated kill, pruning, loading as a score_fn."""

from __future__ import annotations

import pytest
import torch

from sde_diffusion import get_sde
from sde_diffusion.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    prune_checkpoints,
    save_checkpoint,
    sde_from_spec,
    sde_spec,
)


def test_round_trip_tensors_and_meta(tmp_path):
    tensors = {
        "a/x": torch.randn(3, 4, dtype=torch.float64),
        "b": torch.arange(5),
        "s": torch.tensor(2.5),
    }
    meta = {"step": 7, "config": {"lr": 1e-3, "betas": [0.9, 0.99]}}
    path = save_checkpoint(tmp_path / "c.safetensors", tensors, meta)
    back, m = load_checkpoint(path)
    assert m["step"] == 7 and m["config"] == meta["config"]
    for k, v in tensors.items():
        assert torch.equal(back[k], v) and back[k].dtype == v.dtype


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.01)
    for _ in range(3):
        opt.zero_grad()
        p.square().sum().backward()
        opt.step()
    tensors, rest = optimizer_to_tensors(opt.state_dict())
    tensors = {k: v.clone() for k, v in tensors.items()}  # as read back from a file
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=0.5)
    opt2.load_state_dict(optimizer_from_tensors(tensors, rest))
    for o in (opt, opt2):
        o.zero_grad()
    p.square().sum().backward()
    q.square().sum().backward()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [(n, {}) for n in ("vp", "vp_cosine", "subvp", "ve", "ddpm")]
    + [("ddpm", {"schedule": "scaled_linear"})],
)
def test_sde_spec_rebuilds_the_same_sde(name, kwargs):
    sde = get_sde(name, **kwargs)
    back = sde_from_spec(sde_spec(sde))
    t = torch.linspace(0.01, 0.9, 5, dtype=torch.float64)
    assert type(back) is type(sde)
    for a, b in zip(sde.marginal(t), back.marginal(t), strict=True):
        assert torch.equal(a, b)


def test_kill_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    import sde_diffusion.checkpoint as ck

    good = save_checkpoint(checkpoint_path(tmp_path, 10), {"w": torch.ones(3)}, {"step": 10})

    def killed(src, dst):  # the process dies after writing the temporary file, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(checkpoint_path(tmp_path, 20), {"w": torch.zeros(3)}, {"step": 20})
    monkeypatch.undo()
    # a hard kill (SIGKILL) would skip the clean-up too: leave a truncated temporary file behind
    (tmp_path / ".step_00000030.safetensors.tmp").write_bytes(b"\x00\x01garbage")
    assert latest_checkpoint(tmp_path) == good
    tensors, meta = load_checkpoint(good)
    assert meta["step"] == 10 and torch.equal(tensors["w"], torch.ones(3))


def test_prune_keeps_last_k(tmp_path):
    for s in (5, 10, 15, 20):
        save_checkpoint(checkpoint_path(tmp_path, s), {"w": torch.zeros(1)}, {"step": s})
    prune_checkpoints(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_00000015.safetensors",
        "step_00000020.safetensors",
    ]


def test_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(
        CheckpointError, match="found a safetensors file without its 'sde_diffusion' metadata"
    ):
        load_checkpoint(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*missing\.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    ("kind", "found"),
    [
        ("pickle", "a Python pickle"),
        ("torch_save", "a zip archive"),
        ("truncated", "a truncated or foreign file"),
        ("empty", "an empty file"),
        ("text", "not valid safetensors"),
    ],
)
def test_a_file_that_is_no_checkpoint_gets_one_clear_line(tmp_path, kind, found):
    """Each is refused before anything is unpickled, naming the path, what was expected and
    what was found, never safetensors' own 'header too large'."""
    import pickle

    good = save_checkpoint(checkpoint_path(tmp_path, 1), {"w": torch.ones(4)}, {"step": 1})
    path = tmp_path / f"{kind}.safetensors"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    elif kind == "torch_save":
        torch.save({"w": torch.ones(2)}, path)
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:40])
    elif kind == "text":
        path.write_bytes(b"ab")
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "expected a safetensors checkpoint" in message
    assert found in message and "\n" not in message
