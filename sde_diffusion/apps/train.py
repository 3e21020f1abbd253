"""The training app: `sde-diffusion train [group=option ...] [key=value ...]`.

A thin Hydra layer over the library: the config groups in conf/ (sde, model, data, loss, train)
are typed by the library's dataclasses, registered in Hydra's ConfigStore, so a wrong type fails
at composition and a bad value fails when the dataclasses are built, naming the valid range or
choices. A misspelt key fails before Hydra runs, listing the keys that exist there. Outputs land
in Hydra's run directory.

    sde-diffusion train                                  # MLP on the swiss roll
    sde-diffusion train model=unet data=digits train=digits model.class_cond=true
    sde-diffusion train sde=ve loss=likelihood_is train.steps=20000
    torchrun --nproc_per_node 2 -m sde_diffusion train hydra.run.dir=outputs/ddp
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ..data import DataConfig, load_data
from ..losses import LossConfig
from ..trainer import TrainConfig, Trainer
from . import hydra_app
from .config import MLPConfig, UNetConfig, build_sde, model_kwargs
from .hydra_app import register_shared_schemas

__all__ = ["TrainAppConfig", "compose_config", "main", "run"]


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
    register_shared_schemas(cs)
    cs.store(group="model", name="mlp_schema", node=MLPConfig)
    cs.store(group="model", name="unet_schema", node=UNetConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="loss", name="loss_schema", node=LossConfig)
    cs.store(group="train", name="train_schema", node=TrainConfig)


register_configs()


def check_override_keys(overrides: list[str]) -> None:
    """The training app's override-key check (see hydra_app.check_override_keys)."""
    hydra_app.check_override_keys("train", overrides)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The composed training config for these command-line overrides (checked as the app does)."""
    return hydra_app.compose_config("train", overrides)


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
    """`sde-diffusion train`: the Hydra app over `run`."""
    hydra_app.run_app("train", run)
