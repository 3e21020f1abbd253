"""The training loop: AdamW with warm-up, gradient clipping, EMA, logging, checkpoints, DDP.

`Trainer(model, sde, data, cfg, loss)` takes plain objects (no Hydra): a network name and its
keyword arguments (or any nn.Module), an SDE, a DataSplit, a TrainConfig and a LossConfig. The
keyword `param` (eps, x0, v or edm; precondition.py) says what the network is trained to predict;
sigma_data (edm's data scale) is estimated from the training data. Both go into every checkpoint,
and load_model / load_score_fn rebuild the same model from them. `fit()` trains to cfg.steps,
resuming from the newest checkpoint in `out_dir/checkpoints` when cfg.resume is set.

Exact resume on CPU: the checkpoint at step k holds the weights, EMA weights, AdamW state, the
noise generator's state and the global RNG state; the learning rate is a function of the step and
the data order a function of (seed, epoch), so steps k+1, k+2, ... repeat bit for bit.

Losses are kept on the device and checked for NaN/inf once per log interval and before every
checkpoint (one host synchronisation per interval, not per step): a non-finite loss raises
NonFiniteLossError naming the step, and no checkpoint is written after it.

Distributed: under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel
(gloo on CPU, NCCL on CUDA), every rank reads its own shard through a DistributedSampler, and
train.batch_size is the global batch. Rank 0 alone writes checkpoints, metrics and figures.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._tensor import check_device, mps_available
from .checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    prune_checkpoints,
    save_checkpoint,
    sde_from_spec,
    sde_spec,
)
from .data import DataSplit, batches
from .figures import save_sample_figure
from .losses import LossConfig, dsm_loss
from .nets import build_model
from .parametrize import model_score_fn
from .precondition import DEFAULT_PARAM, Preconditioned, estimate_sigma_data
from .sde import SDE, ScoreFn
from .solvers import sample

PRECISIONS = ("fp32", "bf16")

__all__ = [
    "PRECISIONS",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "load_model",
    "load_score_fn",
    "resolve_device",
]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss; the message names the step and the last checkpoint."""


@dataclass
class TrainConfig:
    """How to train (every field is validated on construction).

    steps: total optimizer steps. batch_size: global batch (split across DDP ranks).
    lr, weight_decay, betas: AdamW. warmup_steps: linear LR warm-up from lr/warmup_steps.
    grad_clip: max global grad norm (0 disables). ema_decay: EMA of the weights (used for sampling),
    warmed up as min(ema_decay, (1 + n) / (10 + n)) at step n.
    log_every: steps per metrics row / NaN check. checkpoint_every, keep_last: checkpoints kept.
    sample_every: steps between sample figures (0: only at the end; -1: never); sample_steps and
    num_samples: Euler-Maruyama steps and samples per figure. device: auto, cpu, cuda, cuda:N, mps.
    precision: fp32 or bf16 (autocast). compile: torch.compile the network. resume: continue from
    the newest checkpoint in out_dir/checkpoints if there is one. max_minutes: stop (with a
    checkpoint) once this much wall time has passed, 0 for no limit.
    """

    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_last: int = 3
    sample_every: int = 0
    sample_steps: int = 500
    num_samples: int = 1000
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    progress: bool = True
    tensorboard: bool = True
    resume: bool = False
    max_minutes: float = 0.0

    def __post_init__(self) -> None:
        positive = (
            "steps",
            "batch_size",
            "log_every",
            "checkpoint_every",
            "sample_steps",
            "num_samples",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.grad_clip >= 0:
            raise ValueError(
                f"train.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"train.ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.sample_every < -1:
            raise ValueError(
                "train.sample_every must be >= -1 (0: at the end, -1: never), "
                f"got {self.sample_every}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"unknown train.precision {self.precision!r}; "
                f"valid choices: {', '.join(PRECISIONS)}"
            )
        if not self.max_minutes >= 0:
            raise ValueError(
                f"train.max_minutes must be >= 0 (0: no limit), got {self.max_minutes}"
            )
        resolve_device(self.device)


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """'auto' picks cuda (this rank's LOCAL_RANK), then mps, then cpu; else the named device,
    checked to exist here (errors name the config `key` and the devices available)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("mps" if mps_available() else "cpu")
    return check_device(name, key)


def _dist() -> tuple[int, int]:
    """(rank, world_size), (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes in the environment (if any, and not yet joined)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


class Trainer:
    """Train a network with denoising score matching.

    model: a network name from sde_diffusion.nets (built here for data.shape, seeded by cfg.seed,
    class-conditional when model_kwargs has class_cond=True and the data has labels; such
    checkpoints load back with load_score_fn), or any nn.Module model(x, t[, y]).
    model_kwargs["param"] (default DEFAULT_PARAM) is what the network predicts: eps, x0, v or edm
    (EDM's preconditioning, with sigma_data estimated from data.train); self.ema_precond is the
    EMA network in that parametrisation as an eps-model.
    out_dir receives checkpoints/, metrics.csv, tb/ and samples/. config: the resolved config to
    store in checkpoints beside this trainer's own settings.
    """

    def __init__(
        self,
        model: str | nn.Module,
        sde: SDE,
        data: DataSplit,
        cfg: TrainConfig | None = None,
        loss: LossConfig | None = None,
        out_dir: str | Path = "outputs",
        model_kwargs: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        self.cfg, self.loss_cfg = cfg or TrainConfig(), loss or LossConfig()
        self.sde, self.data, self.out_dir = sde, data, Path(out_dir)
        self.device = resolve_device(self.cfg.device)
        _init_distributed(self.device)
        self.rank, self.world = _dist()
        if self.cfg.batch_size % self.world:
            raise ValueError(
                f"train.batch_size = {self.cfg.batch_size} is not divisible by "
                f"{self.world} processes"
            )
        self.config = dict(config or {})
        kwargs = dict(model_kwargs or {})
        self.param = str(kwargs.pop("param", DEFAULT_PARAM))
        self.sigma_data = estimate_sigma_data(data.train)
        if isinstance(model, str):
            cond = bool(kwargs.pop("class_cond", False)) and data.num_classes > 0
            self.model_spec: dict | None = {
                "name": model,
                "data_shape": list(data.shape),
                "num_classes": data.num_classes if cond else 0,
                "kwargs": kwargs,
            }
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                model = build_model(model, data.shape, self.model_spec["num_classes"], **kwargs)
        else:
            self.model_spec = None
        self.model = model.to(self.device)
        label = getattr(getattr(self.model, "cond", None), "label", None)
        self.num_classes = label.num_classes if label is not None else 0
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema_params = [
            e
            for e, p in zip(self.ema_model.parameters(), self.model.parameters(), strict=True)
            if p.requires_grad
        ]
        self.opt = torch.optim.AdamW(  # foreach: one kernel per op for all tensors, also on CPU
            self.params,
            lr=self.cfg.lr,
            betas=tuple(self.cfg.betas),
            weight_decay=self.cfg.weight_decay,
            foreach=True,
        )
        self.generator = torch.Generator(self.device).manual_seed(self.cfg.seed + self.rank)
        net: nn.Module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        net = torch.compile(net) if self.cfg.compile else net
        self.net = Preconditioned(net, sde, self.param, self.sigma_data)
        self.ema_precond = Preconditioned(self.ema_model, sde, self.param, self.sigma_data)
        self.step = 0
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.last_checkpoint: Path | None = None
        self._tb = None

    # ---- state -------------------------------------------------------------------------------

    def _rng_tensors(self) -> dict[str, Tensor]:
        out = {"rng/noise": self.generator.get_state(), "rng/torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            out["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def state_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """Every tensor of the training state (by name) and the JSON-serialisable rest."""
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        tensors |= {f"ema/{k}": v for k, v in self.ema_model.state_dict().items()}
        opt_tensors, opt_rest = optimizer_to_tensors(self.opt.state_dict())
        tensors |= opt_tensors | self._rng_tensors()
        meta = {
            "step": self.step,
            "prediction": "eps",  # of the module load_model returns
            "param": self.param,
            "sigma_data": self.sigma_data,
            "model": self.model_spec,
            "sde": sde_spec(self.sde),
            "optim": opt_rest,
            "train": dataclasses.asdict(self.cfg),
            "loss": dataclasses.asdict(self.loss_cfg),
            "config": self.config,
        }
        return tensors, meta

    def save(self) -> Path:
        """Write the checkpoint of the current step (rank 0) and prune to the last keep_last."""
        path = checkpoint_path(self.ckpt_dir, self.step)
        if self.rank == 0:
            save_checkpoint(path, *self.state_tensors())
            if self.cfg.keep_last:
                prune_checkpoints(self.ckpt_dir, self.cfg.keep_last)
        self.last_checkpoint = path
        return path

    def load(self, path: str | Path) -> None:
        """Restore weights, EMA, optimizer, step and RNG states from a checkpoint."""
        tensors, meta = load_checkpoint(path)

        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.model.load_state_dict(part("model/"))
        self.ema_model.load_state_dict(part("ema/"))
        self.opt.load_state_dict(optimizer_from_tensors(tensors, meta["optim"]))
        self.generator.set_state(tensors["rng/noise"])
        torch.set_rng_state(tensors["rng/torch"])
        if "rng/cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng/cuda"], self.device)
        self.step = int(meta["step"])
        self.last_checkpoint = Path(path)

    # ---- training ------------------------------------------------------------------------------

    def _lr(self, step: int) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / max(self.cfg.warmup_steps, 1))

    def _train_step(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        for group in self.opt.param_groups:
            group["lr"] = self._lr(self.step)
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"
        ):
            loss = dsm_loss(
                self.net,
                self.sde,
                x,
                self.loss_cfg,
                self.generator,
                labels=y,
                num_classes=self.num_classes,
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        else:
            gnorm = torch.zeros((), device=self.device)
        self.opt.step()
        # EMA: e <- e + (1 - decay) (p - e), with the decay warmed up as (1 + n) / (10 + n) so that
        # short runs are not dominated by the initial weights
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(self.ema_params, self.params, 1.0 - decay)
        self.step += 1
        return loss.detach(), gnorm.detach()

    def _flush(
        self, pending: list[tuple[Tensor, Tensor]], first_step: int, seconds: float
    ) -> dict[str, float]:
        """Move the interval's losses to the host (one sync), stop on NaN/inf, log a row."""
        losses, gnorms = (torch.stack(v).float().cpu() for v in zip(*pending, strict=True))
        bad = (~torch.isfinite(losses)).nonzero()
        if bad.numel():
            i = int(bad[0])
            last = self.last_checkpoint or "none (no checkpoint was written yet)"
            raise NonFiniteLossError(
                f"loss is {losses[i].item()} at step {first_step + i + 1}: training stopped. "
                f"The last good checkpoint is {last}; nothing was saved after the bad step. "
                "Try a lower train.lr, train.grad_clip > 0 or train.precision=fp32."
            )
        row = {
            "step": self.step,
            "loss": losses.mean().item(),
            "grad_norm": gnorms.mean().item(),
            "lr": self._lr(self.step - 1),
            "steps_per_sec": len(pending) / max(seconds, 1e-9),
        }
        self.history.extend(losses.tolist())
        if self.rank == 0:
            self._log(row)
        pending.clear()
        return row

    def _log(self, row: dict[str, float]) -> None:
        path = self.out_dir / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(f"train/{k}", v, int(row["step"]))

    def _resume(self) -> None:
        """Load the latest checkpoint, if any, saying which (or that there is none), and cut the
        metrics log back to that step: rows logged after it are logged again by the resumed run,
        so the log reads as an uninterrupted run's, without a repeated step. A checkpoint write
        that a crash cut short left only a temporary file: it is removed."""
        if self.rank == 0 and self.ckpt_dir.is_dir():
            for stale in self.ckpt_dir.glob(".*.tmp"):
                stale.unlink()
        last = latest_checkpoint(self.ckpt_dir)
        if last is not None:
            self.load(last)
        if self.rank == 0:
            if last is None:
                print(f"train.resume: no checkpoint in {self.ckpt_dir}; starting from step 0")
            else:
                print(f"train.resume: resuming from {last} (step {self.step} of {self.cfg.steps})")
            self._truncate_log(self.step)

    def _truncate_log(self, step: int) -> None:
        path = self.out_dir / "metrics.csv"
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            # a row cut short by a crash mid-write has missing fields: it goes too
            rows = [r for r in reader if None not in r.values() and int(r["step"]) <= step]
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)

    def _open_tensorboard(self) -> None:
        if self.cfg.tensorboard and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self._tb = SummaryWriter(str(self.out_dir / "tb"))

    def fit(self) -> list[float]:
        """Train until cfg.steps; returns the per-step losses of this call (host floats)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if cfg.resume:
            self._resume()
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._open_tensorboard()
        self.history: list[float] = []
        stream = batches(
            self.data.train,
            self.data.train_labels if self.num_classes else None,
            cfg.batch_size // self.world,
            seed=cfg.seed,
            start_step=self.step,
            num_replicas=self.world,
            rank=self.rank,
        )
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not cfg.progress or self.rank != 0,
            unit="step",
        )
        pending: list[tuple[Tensor, Tensor]] = []
        first, tic = self.step, time.perf_counter()
        deadline = tic + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
        self.model.train()
        try:
            while self.step < cfg.steps:
                x, y = next(stream)
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True) if y is not None else None
                pending.append(self._train_step(x, y))
                bar.update(1)
                out_of_time = time.perf_counter() > deadline
                save_now = (
                    self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or out_of_time
                )
                if self.step % cfg.log_every == 0 or save_now:
                    row = self._flush(pending, first, time.perf_counter() - tic)
                    bar.set_postfix(
                        loss=f"{row['loss']:.4f}", steps_s=f"{row['steps_per_sec']:.1f}"
                    )
                    first, tic = self.step, time.perf_counter()
                if save_now:
                    self.save()
                if out_of_time:
                    break
                if (
                    cfg.sample_every > 0
                    and self.step % cfg.sample_every == 0
                    and self.step < cfg.steps
                ):
                    self.sample_figure()
            if cfg.sample_every >= 0:
                self.sample_figure()
        finally:
            bar.close()
            if self._tb is not None:
                self._tb.close()
                self._tb = None
        return self.history

    # ---- sampling ------------------------------------------------------------------------------

    def score_fn(self, labels: Tensor | None = None) -> ScoreFn:
        """The EMA network as a score_fn(x, t) (labels: class conditioning, else the null label)."""
        kwargs = {"y": labels} if labels is not None else {}
        return model_score_fn(self.ema_precond, self.sde, "eps", "t", model_kwargs=kwargs)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int | None = None,
        seed: int = 0,
        labels: Tensor | None = None,
        solver: str | None = "euler_maruyama",
        **solver_params: object,
    ) -> Tensor:
        """n samples from the EMA network with any registered solver (Euler–Maruyama default;
        None: `sample()`'s default, the configuration its pilot picks)."""
        y = labels.to(self.device) if labels is not None else None
        return sample(
            self.score_fn(y),
            self.sde,
            (n, *self.data.shape),
            solver=solver,
            steps=steps or self.cfg.sample_steps,
            generator=torch.Generator(self.device).manual_seed(seed),
            device=self.device,
            **solver_params,
        )

    def sample_figure(self) -> Path | None:
        """Write samples/step_XXXXXXXX.png: held-out data beside EMA samples (rank 0)."""
        if self.rank != 0:
            return None
        images = len(self.data.shape) == 3
        n = min(self.cfg.num_samples, 100 if images else self.cfg.num_samples)
        labels = None
        if self.num_classes and images:
            labels = torch.arange(n, device=self.device) % self.num_classes
        x = self.sample(n, labels=labels)
        ref = self.data.test if self.data.test.shape[0] else self.data.train
        path = self.out_dir / "samples" / f"step_{self.step:08d}.png"
        nrow = self.num_classes if labels is not None else None
        return save_sample_figure(ref[:n], x, path, title=f"step {self.step}", nrow=nrow)


def load_model(
    path: str | Path, device: torch.device | str | None = None, ema: bool = True
) -> tuple[nn.Module, SDE, dict]:
    """Rebuild a checkpoint's model with its EMA (or raw) weights: (model, sde, meta).

    The model is the network in the checkpoint's parametrisation (meta "param", "sigma_data") as
    a Preconditioned eps-model, so model(x, t[, y]) is eps whatever the network predicts
    (meta["prediction"] says so). Checkpoints without "param" hold eps-networks.
    """
    tensors, meta = load_checkpoint(path)
    spec = meta.get("model")
    if spec is None:
        raise ValueError(
            f"{path} was trained with a custom nn.Module; rebuild it and load the 'ema/' "
            "tensors yourself"
        )
    model = build_model(spec["name"], spec["data_shape"], spec["num_classes"], **spec["kwargs"])
    prefix = "ema/" if ema else "model/"
    model.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    dev = check_device(device) if device is not None else resolve_device("auto")
    sde = sde_from_spec(meta["sde"])
    model = Preconditioned(model, sde, meta.get("param", "eps"), meta.get("sigma_data", 1.0))
    return model.to(dev).eval().requires_grad_(False), sde, meta


def load_score_fn(
    path: str | Path,
    device: torch.device | str | None = None,
    labels: Tensor | None = None,
    ema: bool = True,
) -> tuple[ScoreFn, SDE, dict]:
    """A checkpoint as (score_fn, sde, meta), ready for any solver; EMA weights by default.

    labels (shape (batch,)) condition a class-conditional network; without them it gets the
    null label.
    """
    model, sde, meta = load_model(path, device, ema)
    kwargs = {"y": labels.to(next(model.parameters()).device)} if labels is not None else {}
    return model_score_fn(model, sde, meta["prediction"], "t", model_kwargs=kwargs), sde, meta
