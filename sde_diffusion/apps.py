"""What the Hydra apps (train, sample, likelihood) share: the config directory, the SDE config
group, the oracle's config, composition with clear errors, and dtype names.

The library never imports this module's Hydra parts at import time; only the apps do.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from .config import DDPMConfig, SubVPConfig, VEConfig, VPConfig, VPCosineConfig
from .oracle import GaussianMixture

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
#: the config groups of each app (for the override-key check)
GROUPS = {
    "train": ("sde", "model", "data", "loss", "train"),
    "sample": ("sde", "solver"),
    "likelihood": ("sde",),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
ORACLES = ("ring", "gaussian", "random")

__all__ = [
    "CONF_DIR",
    "DTYPES",
    "CheckpointModelConfig",
    "OracleConfig",
    "build_oracle",
    "check_override_keys",
    "compose_config",
    "dtype_of",
    "register_shared_schemas",
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


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=overrides)
    with initialize_config_dir(CONF_DIR, version_base=None):
        return compose(config_name, overrides=overrides)


def check_override_keys(config_name: str, overrides: list[str]) -> None:
    """Raise ValueError for an override of a key that does not exist, listing the valid keys.

    Hydra would also reject it, but without saying which keys are there; group choices
    (model=unet) and additions (+key=value) are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    groups = [o for o in parsed if o.key_or_group in GROUPS[config_name]]
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
