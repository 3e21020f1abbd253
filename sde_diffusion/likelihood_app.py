"""Hydra app: negative log-likelihood and bits/dim of a score model.

    python -m sde_diffusion.likelihood model=oracle sde.name=vp
    sde-diffusion-likelihood model=ckpt ckpt=outputs/run/checkpoint.safetensors data.path=x.npz

Computes the PF-ODE log-likelihood (exact or Hutchinson divergence), the DDPM variational bound
for VP-family SDEs and, for model=oracle, the exact -log p_0 beside them; prints a table and writes
metrics.json into Hydra's output directory. The config is conf/likelihood.yaml.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .likelihood import bits_per_dim, ddpm_bound, dequantize, ode_log_likelihood
from .metrics import exact_log_prob
from .oracle import GaussianMixture
from .sde import SDE, ScoreFn, VPFamilySDE, get_sde

MODELS = ("oracle", "ckpt")
ORACLES = ("ring", "gaussian", "random")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_oracle(cfg: DictConfig, generator: torch.Generator) -> GaussianMixture:
    """The Gaussian mixture named by cfg.oracle (ring, gaussian or random)."""
    o = cfg.oracle
    if o.kind == "ring":
        return GaussianMixture.ring(k=o.k, radius=o.radius, std=o.std, dim=o.dim)
    if o.kind == "gaussian":
        return GaussianMixture.gaussian(torch.zeros(o.dim), o.std**2)
    if o.kind == "random":
        return GaussianMixture.random(o.k, o.dim, generator=generator)
    raise ValueError(f"unknown oracle.kind {o.kind!r}; valid choices: {', '.join(ORACLES)}")


def load_model(
    cfg: DictConfig, generator: torch.Generator
) -> tuple[ScoreFn, SDE, GaussianMixture | None]:
    """(score_fn, sde, oracle or None) for cfg.model: the exact oracle, or a training checkpoint.

    The checkpoint branch calls `sde_diffusion.load_score_fn(path) -> (score_fn, sde)`, the
    training package's loader; the SDE then comes from the checkpoint, not from cfg.sde.
    """
    if cfg.model == "oracle":
        sde = get_sde(cfg.sde.name, **OmegaConf.to_container(cfg.sde.kwargs))
        mixture = build_oracle(cfg, generator)
        return mixture.score_fn(sde), sde, mixture
    if cfg.model == "ckpt":
        if not cfg.ckpt:
            raise ValueError("model=ckpt needs ckpt=<path to a training checkpoint>")
        import sde_diffusion

        loader = getattr(sde_diffusion, "load_score_fn", None)
        if loader is None:
            raise ValueError(
                "this installation has no checkpoint loader (sde_diffusion.load_score_fn)"
            )
        score_fn, sde = loader(cfg.ckpt)
        return score_fn, sde, None
    raise ValueError(f"unknown model {cfg.model!r}; valid choices: {', '.join(MODELS)}")


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
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {cfg.dtype!r}; valid choices: {', '.join(DTYPES)}")
    dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)
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
                None if cfg.sde.name == "ddpm" else cfg.ddpm_bound.num_steps,
                decoder=cfg.ddpm_bound.decoder,
                variance=cfg.ddpm_bound.variance,
                generator=generator,
                num_levels=cfg.data.num_levels,
                low=cfg.data.low,
                high=cfg.data.high,
            )
            bound.append(b.total.cpu())
    out: dict[str, Any] = {
        "model": cfg.model,
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


@hydra.main(config_path="conf", config_name="likelihood", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    results = evaluate(cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    print(_table(results))
    print(f"metrics written to {out_dir / 'metrics.json'}")


def main() -> None:
    """Console-script entry point (sde-diffusion-likelihood)."""
    _hydra_main()


if __name__ == "__main__":
    main()
