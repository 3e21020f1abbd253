"""The training app: `python -m sde_diffusion.train [group=option ...] [key=value ...]`.

A thin Hydra layer over the library: the config groups in conf/ (sde, model, data, loss, train)
are typed by the library's dataclasses, registered in Hydra's ConfigStore, so a wrong type fails
at composition and a bad value fails when the dataclasses are built, naming the valid range or
choices. A misspelt key fails before Hydra runs, listing the keys that exist there. Outputs land
in Hydra's run directory.

    python -m sde_diffusion.train                                  # MLP on the swiss roll
    python -m sde_diffusion.train model=unet data=digits train=digits model.class_cond=true
    python -m sde_diffusion.train sde=ve loss=likelihood_is train.steps=20000
    torchrun --nproc_per_node 2 -m sde_diffusion.train hydra.run.dir=outputs/ddp
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .config import (
    MLPConfig,
    SubVPConfig,
    UNetConfig,
    VEConfig,
    VPConfig,
    VPCosineConfig,
    build_sde,
    model_kwargs,
)
from .data import DataConfig, load_data
from .losses import LossConfig
from .trainer import TrainConfig, Trainer

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
GROUPS = ("sde", "model", "data", "loss", "train")

__all__ = ["CONF_DIR", "TrainAppConfig", "compose_config", "main", "run"]


@dataclass
class TrainAppConfig:
    """The root of the training config: one node per group."""

    sde: Any = MISSING
    model: Any = MISSING
    data: DataConfig = MISSING
    loss: LossConfig = MISSING
    train: TrainConfig = MISSING


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (the yaml files in conf/ extend them)."""
    cs = ConfigStore.instance()
    cs.store(name="train_app", node=TrainAppConfig)
    for name, node in (
        ("vp", VPConfig),
        ("vp_cosine", VPCosineConfig),
        ("subvp", SubVPConfig),
        ("ve", VEConfig),
    ):
        cs.store(group="sde", name=f"{name}_schema", node=node)
    cs.store(group="model", name="mlp_schema", node=MLPConfig)
    cs.store(group="model", name="unet_schema", node=UNetConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="loss", name="loss_schema", node=LossConfig)
    cs.store(group="train", name="train_schema", node=TrainConfig)


register_configs()


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose("train", overrides=overrides)
    with initialize_config_dir(CONF_DIR, version_base=None):
        return compose("train", overrides=overrides)


def check_override_keys(overrides: list[str]) -> None:
    """Raise ValueError for an override of a key that does not exist, listing the valid keys.

    Hydra would also reject it, but without saying which keys are there; group choices
    (model=unet) and additions (+key=value) are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    groups = [o for o in parsed if o.key_or_group in GROUPS]
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
    cfg = _compose(choices)
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


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The composed training config for these command-line overrides (checked as the app does)."""
    from hydra.errors import ConfigCompositionException

    overrides = list(overrides or [])
    check_override_keys(overrides)
    try:
        return _compose(overrides)
    except ConfigCompositionException as e:
        raise ValueError(f"{e}: {e.__cause__}" if e.__cause__ else str(e)) from e


def run(cfg: DictConfig, out_dir: str | Path) -> Trainer:
    """Build everything from a composed config and train; returns the finished Trainer."""
    obj = OmegaConf.to_object(cfg)  # builds the dataclasses: their __post_init__ checks values
    name, kwargs = model_kwargs(obj.model)
    trainer = Trainer(
        name,
        build_sde(obj.sde),
        load_data(obj.data),
        obj.train,
        obj.loss,
        out_dir=out_dir,
        model_kwargs=kwargs,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    trainer.fit()
    if trainer.rank == 0:
        print(f"checkpoint: {trainer.last_checkpoint}")
    return trainer


def main() -> None:
    """Console entry point (sde-diffusion-train)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    try:
        check_override_keys([a for a in sys.argv[1:] if not a.startswith("-")])
    except ValueError as e:
        sys.exit(f"error: {e}")

    @hydra.main(config_path=CONF_DIR, config_name="train", version_base=None)
    def _app(cfg: DictConfig) -> None:
        run(cfg, HydraConfig.get().runtime.output_dir)

    _app()


if __name__ == "__main__":
    main()
