"""Hydra app: negative log-likelihood and bits/dim of a score model.

    sde-diffusion likelihood model=oracle sde=vp
    sde-diffusion likelihood model=ckpt ckpt=outputs/run/checkpoint.safetensors data.path=x.npz

Computes the PF-ODE log-likelihood (exact or Hutchinson divergence), the DDPM variational bound
for VP-family SDEs and, for model=oracle, the exact -log p_0 beside them; prints a table and writes
metrics.json into Hydra's output directory. The config is apps/conf/likelihood.yaml.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ..likelihood import bits_per_dim, ddpm_bound, dequantize, ode_log_likelihood
from ..metrics import exact_log_prob
from ..oracle import GaussianMixture
from ..sde import SDE, DiscreteVPSDE, ScoreFn, VPFamilySDE
from ..trainer import load_score_fn, resolve_device
from .config import build_oracle, build_sde, dtype_of
from .hydra_app import register_shared_schemas, run_app

MODELS = ("oracle", "ckpt")
DIVERGENCES, PROBES = ("exact", "hutchinson"), ("rademacher", "gaussian")
DECODERS, VARIANCES = ("gaussian", "discretized"), ("beta", "beta_tilde")


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {key} {value!r}; valid choices: {', '.join(valid)}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ValueError(f"{key} must be >= {low}, got {value}")


@dataclass
class DataSource:
    """Samples to evaluate: an .npy / .npz file (`path`, array `key`), integer arrays dequantised
    from `num_levels` levels on [low, high); None: the oracle's own samples."""

    path: str | None = None
    key: str | None = None
    num_levels: int = 256
    low: float = -1.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if self.path is not None and not Path(self.path).is_file():
            raise FileNotFoundError(f"data.path: no file at {self.path}")
        _at_least("data.num_levels", self.num_levels, 2)
        if not self.low < self.high:
            raise ValueError(f"data.low must be below data.high, got {self.low}, {self.high}")


@dataclass
class ODEConfig:
    """The PF-ODE likelihood: torchdiffeq `method` at rtol/atol from t_eps, exact or Hutchinson
    divergence."""

    t_eps: float = 1e-5
    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    divergence: str = "exact"
    num_probes: int = 1
    probe: str = "rademacher"

    def __post_init__(self) -> None:
        if not 0 < self.t_eps < 1:
            raise ValueError(f"ode.t_eps must lie in (0, 1), got {self.t_eps}")
        if self.rtol <= 0 or self.atol <= 0:
            raise ValueError(f"ode.rtol and ode.atol must be > 0, got {self.rtol}, {self.atol}")
        _choice("ode.divergence", self.divergence, DIVERGENCES)
        _choice("ode.probe", self.probe, PROBES)
        _at_least("ode.num_probes", self.num_probes, 1)


@dataclass
class BoundConfig:
    """The DDPM variational bound (VP-family SDEs only)."""

    enabled: bool = True
    num_steps: int = 1000
    decoder: str = "gaussian"
    variance: str = "beta"

    def __post_init__(self) -> None:
        _at_least("ddpm_bound.num_steps", self.num_steps, 1)
        _choice("ddpm_bound.decoder", self.decoder, DECODERS)
        _choice("ddpm_bound.variance", self.variance, VARIANCES)


@dataclass
class LikelihoodAppConfig:
    """The root of the likelihood config; each part checks its values when it is built."""

    sde: Any = MISSING
    model: Any = MISSING
    ckpt: str | None = None
    seed: int = 0
    num_samples: int = 512
    batch_size: int = 512
    device: str = "cpu"
    dtype: str = "float64"
    data: DataSource = field(default_factory=DataSource)
    ode: ODEConfig = field(default_factory=ODEConfig)
    ddpm_bound: BoundConfig = field(default_factory=BoundConfig)

    def __post_init__(self) -> None:
        _choice("model", self.model.name, MODELS)
        _at_least("num_samples", self.num_samples, 1)
        _at_least("batch_size", self.batch_size, 1)
        dtype_of(self.dtype)
        resolve_device(self.device, "device")


cs = ConfigStore.instance()
cs.store(name="likelihood_app", node=LikelihoodAppConfig)
register_shared_schemas(cs)


def load_model(
    cfg: DictConfig, generator: torch.Generator
) -> tuple[ScoreFn, SDE, GaussianMixture | None]:
    """(score_fn, sde, oracle or None) for cfg.model: the exact oracle, or a training checkpoint
    (whose SDE comes from the checkpoint, not from cfg.sde)."""
    model = OmegaConf.to_object(cfg.model)
    if model.name == "oracle":
        sde = build_sde(OmegaConf.to_object(cfg.sde))
        mixture = build_oracle(model, generator)
        return mixture.score_fn(sde), sde, mixture
    if not cfg.ckpt:
        raise ValueError("model=ckpt needs ckpt=<path to a training checkpoint>")
    score_fn, sde, _ = load_score_fn(cfg.ckpt, cfg.device)
    return score_fn, sde, None


def load_data(
    cfg: DictConfig, mixture: GaussianMixture | None, generator: torch.Generator, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """(x for the ODE, x0 for the DDPM bound, bin width or None) from cfg.data or the oracle.

    Integer arrays are levels 0..num_levels-1: uniformly dequantised for the ODE (with the bin
    width that bits/dim needs), and put on Ho et al.'s grid for the discretised DDPM decoder.
    """
    if cfg.data.path is None:
        if mixture is None:
            raise ValueError("model=ckpt needs data.path=<.npy or .npz of samples>")
        x = mixture.sample(cfg.num_samples, generator).to(dtype)
        return x, x, None
    arr = np.load(cfg.data.path)
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr = arr[cfg.data.key or arr.files[0]]
    arr = torch.as_tensor(arr[: cfg.num_samples])
    if arr.is_floating_point():
        x = arr.to(dtype)
        return x, x, None
    d = cfg.data
    x = dequantize(arr, generator, d.num_levels, d.low, d.high, dtype=dtype)
    grid = d.low + arr.to(dtype) * (d.high - d.low) / (d.num_levels - 1)
    x0 = grid if cfg.ddpm_bound.decoder == "discretized" else x
    return x, x0, (d.high - d.low) / d.num_levels


def _summary(nll: torch.Tensor, num_dims: int, bin_width: float | None) -> dict[str, float]:
    bpd = bits_per_dim(-nll, num_dims, bin_width)
    n = len(nll)
    return {
        "nll": float(nll.mean()),
        "nll_se": float(nll.std() / math.sqrt(n)) if n > 1 else float("nan"),
        "bpd": float(bpd.mean()),
        "bpd_se": float(bpd.std() / math.sqrt(n)) if n > 1 else float("nan"),
    }


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run every likelihood the config asks for; return the results as plain numbers."""
    OmegaConf.to_object(cfg)  # builds the dataclasses: their checks name what is wrong
    dtype, device = dtype_of(cfg.dtype), resolve_device(cfg.device, "device")
    generator = torch.Generator().manual_seed(cfg.seed)
    score_fn, sde, mixture = load_model(cfg, generator)
    x, x0, bin_width = load_data(cfg, mixture, generator, dtype)
    num_dims = x[0].numel()
    o = cfg.ode
    nll, nfe = [], []
    bound = []
    for start in range(0, len(x), cfg.batch_size):
        xb = x[start : start + cfg.batch_size].to(device)
        res = ode_log_likelihood(
            xb,
            sde,
            score_fn,
            t_eps=o.t_eps,
            divergence=o.divergence,
            num_probes=o.num_probes,
            probe=o.probe,
            generator=generator,
            method=o.method,
            rtol=o.rtol,
            atol=o.atol,
        )
        nll.append(-res.logp.cpu())
        nfe.append(res.nfe)
        if cfg.ddpm_bound.enabled and isinstance(sde, VPFamilySDE):
            b = ddpm_bound(
                x0[start : start + cfg.batch_size].to(device),
                sde,
                score_fn,
                None if isinstance(sde, DiscreteVPSDE) else cfg.ddpm_bound.num_steps,
                decoder=cfg.ddpm_bound.decoder,
                variance=cfg.ddpm_bound.variance,
                generator=generator,
                num_levels=cfg.data.num_levels,
                low=cfg.data.low,
                high=cfg.data.high,
            )
            bound.append(b.total.cpu())
    out: dict[str, Any] = {
        "model": cfg.model.name,
        "sde": repr(sde),
        "num_samples": len(x),
        "num_dims": num_dims,
        "pf_ode": {**_summary(torch.cat(nll), num_dims, bin_width), "nfe_per_batch": nfe},
    }
    if bound:
        discrete = cfg.ddpm_bound.decoder == "discretized"
        out["ddpm_bound"] = _summary(torch.cat(bound), num_dims, None if discrete else bin_width)
    if mixture is not None and cfg.data.path is None:
        exact = -exact_log_prob(x.double(), mixture)
        out["exact"] = _summary(exact, num_dims, None)
        # paired differences: far smaller standard errors than the difference of two means
        for key, values in (("pf_ode_minus_exact", nll), ("ddpm_bound_minus_exact", bound)):
            if values:
                out[key] = _summary(torch.cat(values).double() - exact, num_dims, None)
    return out


def _table(results: dict[str, Any]) -> str:
    rows = ["| -log p (± standard error) | nats/sample | bits/dim |", "| --- | --- | --- |"]
    names = {
        "exact": "exact -log p_0",
        "pf_ode": "PF-ODE",
        "ddpm_bound": "DDPM bound",
        "pf_ode_minus_exact": "PF-ODE − exact (paired)",
        "ddpm_bound_minus_exact": "DDPM bound − exact (paired)",
    }
    for key, label in names.items():
        if key in results:
            r = results[key]
            nats = f"{r['nll']:.4f} ± {r['nll_se']:.4f}"
            rows.append(f"| {label} | {nats} | {r['bpd']:.4f} ± {r['bpd_se']:.4f} |")
    return "\n".join(rows)


def _task(cfg: DictConfig, out_dir: Path) -> None:
    results = evaluate(cfg)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    print(_table(results))
    print(f"metrics written to {out_dir / 'metrics.json'}")


def main() -> None:
    """`sde-diffusion likelihood`: the Hydra app over `evaluate`."""
    run_app("likelihood", _task)
