"""Plain dataclass configs shared by the apps: SDEs, networks, the oracle (no Hydra here).

The apps register these (and DataConfig, LossConfig, TrainConfig) in Hydra's ConfigStore, so a
misspelt key or a wrong type fails at composition; the value checks run in __post_init__, when
OmegaConf.to_object builds the dataclasses, and name the valid range or choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..nets import NETS, TIME_EMBEDDINGS
from ..oracle import GaussianMixture
from ..precondition import DEFAULT_PARAM, PARAMS
from ..sde import SDE, SDE_NAMES, get_sde

DTYPES = {"float32": torch.float32, "float64": torch.float64}
ORACLES = ("ring", "gaussian", "random")

__all__ = [
    "DTYPES",
    "CheckpointModelConfig",
    "DDPMConfig",
    "MLPConfig",
    "OracleConfig",
    "SubVPConfig",
    "UNetConfig",
    "VEConfig",
    "VPConfig",
    "VPCosineConfig",
    "build_oracle",
    "build_sde",
    "dtype_of",
    "model_kwargs",
    "sde_label",
]


@dataclass
class VPConfig:
    """Linear VP SDE (DDPM's continuous limit)."""

    name: str = "vp"
    beta_min: float = 0.1
    beta_max: float = 20.0
    T: float = 1.0


@dataclass
class VPCosineConfig:
    """VP SDE with the cosine schedule (T below 1: beta diverges at t = 1)."""

    name: str = "vp_cosine"
    s: float = 0.008
    T: float = 0.9946


@dataclass
class SubVPConfig(VPConfig):
    """The sub-VP SDE (the same linear beta(t) as VP)."""

    name: str = "subvp"


@dataclass
class VEConfig:
    """Variance-exploding SDE; sigma_max should be about the largest distance between data."""

    name: str = "ve"
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    T: float = 1.0


@dataclass
class DDPMConfig:
    """A discrete schedule of N betas from beta_start to beta_end: DDPM's linear one, or
    Stable Diffusion's scaled_linear (sqrt(beta) linear; conf/sde/ddpm_scaled_linear.yaml)."""

    name: str = "ddpm"
    schedule: str = "linear"
    N: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


def sde_label(cfg: Any) -> str:
    """The SDE's name in records and reports, as its conf/sde option: `name`, with a ddpm
    schedule other than DDPM's own appended (ddpm_scaled_linear), so that a sweep over both keeps
    them apart."""
    name, schedule = getattr(cfg, "name", str(cfg)), getattr(cfg, "schedule", "linear")
    return name if schedule == "linear" else f"{name}_{schedule}"


def build_sde(cfg: Any) -> SDE:
    """The SDE of a config above (its `name` and the remaining fields as keyword arguments)."""
    kwargs = dataclasses.asdict(cfg)
    name = kwargs.pop("name")
    if name not in SDE_NAMES:
        raise ValueError(f"unknown sde.name {name!r}; valid choices: {', '.join(SDE_NAMES)}")
    return get_sde(name, **kwargs)


@dataclass
class MLPConfig:
    """The residual MLP (sde_diffusion.nets.MLP) for low-dimensional data; param: what it
    predicts (eps, x0, v or edm, sde_diffusion.precondition)."""

    name: str = "mlp"
    width: int = 256
    depth: int = 4
    time_embedding: str = "fourier"
    embed_dim: int = 128
    class_cond: bool = False
    param: str = DEFAULT_PARAM

    def __post_init__(self) -> None:
        _check_model(self)


@dataclass
class UNetConfig:
    """The U-Net (sde_diffusion.nets.UNet) for images; param as for the MLP."""

    name: str = "unet"
    base_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [4])
    num_heads: int = 4
    dropout: float = 0.0
    time_embedding: str = "sinusoidal"
    class_cond: bool = False
    param: str = DEFAULT_PARAM

    def __post_init__(self) -> None:
        _check_model(self)


def _check_model(cfg: Any) -> None:
    if cfg.name not in NETS:
        raise ValueError(f"unknown model.name {cfg.name!r}; valid choices: {', '.join(NETS)}")
    if cfg.param not in PARAMS:
        raise ValueError(f"unknown model.param {cfg.param!r}; valid choices: {', '.join(PARAMS)}")
    if cfg.time_embedding not in TIME_EMBEDDINGS:
        raise ValueError(
            f"unknown model.time_embedding {cfg.time_embedding!r}; "
            f"valid choices: {', '.join(TIME_EMBEDDINGS)}"
        )


def model_kwargs(cfg: Any) -> tuple[str, dict[str, Any]]:
    """(name, keyword arguments) for Trainer / build_model from a model config."""
    kwargs = dataclasses.asdict(cfg)
    return kwargs.pop("name"), kwargs


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype named float32 or float64."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid choices: {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class OracleConfig:
    """The Gaussian mixture whose exact score stands in for a network (model=oracle).

    ring: k isotropic components of std `std` on a circle of `radius` (in `dim` dimensions);
    gaussian: one N(0, std^2 I); random: k components with random means and full covariances.
    """

    name: str = "oracle"
    kind: str = "ring"
    k: int = 8
    dim: int = 2
    radius: float = 4.0
    std: float = 0.5

    def __post_init__(self) -> None:
        if self.name != "oracle":
            raise ValueError(f"an oracle model config has name 'oracle', got {self.name!r}")
        if self.kind not in ORACLES:
            raise ValueError(
                f"unknown oracle.kind {self.kind!r}; valid choices: {', '.join(ORACLES)}"
            )
        if self.k < 1 or self.dim < 1 or self.std <= 0:
            raise ValueError(f"oracle needs k >= 1, dim >= 1, std > 0; got {self}")


@dataclass
class CheckpointModelConfig:
    """model=ckpt: the training checkpoint named by the app's top-level `ckpt` key."""

    name: str = "ckpt"


def build_oracle(cfg: OracleConfig, generator: torch.Generator) -> GaussianMixture:
    """The Gaussian mixture of an OracleConfig (the generator draws the 'random' kind)."""
    if cfg.kind == "ring":
        return GaussianMixture.ring(k=cfg.k, radius=cfg.radius, std=cfg.std, dim=cfg.dim)
    if cfg.kind == "gaussian":
        return GaussianMixture.gaussian(torch.zeros(cfg.dim), cfg.std**2)
    return GaussianMixture.random(cfg.k, cfg.dim, generator=generator)
