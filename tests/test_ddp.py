"""DDP: two CPU processes (gloo) train a few steps and end with identical weights."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from sde_diffusion import get_sde
from sde_diffusion.data import DataConfig, batches, load_data
from sde_diffusion.trainer import TrainConfig, Trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    # GLOO_SOCKET_IFNAME: gloo binds to loopback instead of whatever the host name resolves to
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        GLOO_SOCKET_IFNAME="lo",
    )  # fmt: skip
    torch.set_num_threads(1)
    data = load_data(DataConfig(name="two_moons", n=600))
    cfg = TrainConfig(
        steps=6, batch_size=64, log_every=3, checkpoint_every=6, sample_every=-1, device="cpu",
        progress=False, tensorboard=False,
    )  # fmt: skip
    tr = Trainer(
        "mlp",
        get_sde("vp"),
        data,
        cfg,
        out_dir=os.path.join(out, "run"),
        model_kwargs={"width": 16, "depth": 1, "embed_dim": 8},
    )
    assert tr.world == 2 and tr.rank == rank
    first_batch = next(iter(_rank_batches(tr)))
    losses = tr.fit()
    tensors = {f"model/{k}": v for k, v in tr.model.state_dict().items()}
    tensors |= {f"ema/{k}": v for k, v in tr.ema_model.state_dict().items()}
    tensors["first_batch"], tensors["losses"] = first_batch, torch.tensor(losses)
    save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))
    # both ranks done with every collective before either tears its group down. A worker died
    # of SIGABRT once at this point; a rank that exits while its peer's gloo threads still talk
    # to it is the suspected cause
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _rank_batches(tr):
    return (
        x for x, _ in batches(tr.data.train, None, 32, seed=0, num_replicas=tr.world, rank=tr.rank)
    )


DEADLINE_S = 240.0


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    # spawn, not fork: a fork copies the locks that the test process's other threads (torch's
    # pool, tqdm's monitor) hold at that instant, and a worker that needs one waits forever
    args = (2, _free_port(), str(tmp_path))
    workers = mp.start_processes(_worker, args=args, nprocs=2, join=False, start_method="spawn")
    start = time.monotonic()
    while not workers.join(timeout=1.0):
        if time.monotonic() - start > DEADLINE_S:
            for p in workers.processes:
                p.kill()
            pytest.fail(f"the two DDP workers did not finish within {DEADLINE_S:.0f} s")
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert not torch.equal(r0["first_batch"], r1["first_batch"])  # each rank saw its own shard
    assert not torch.equal(r0["losses"], r1["losses"])  # and its own noise
    for k in r0:
        if k.startswith(("model/", "ema/")):
            assert torch.equal(r0[k], r1[k]), k
    assert (tmp_path / "run" / "checkpoints" / "step_00000006.safetensors").exists()
