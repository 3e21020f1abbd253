"""What the sampling app samples: the score function of the oracle or of a checkpoint, with
classifier-free or classifier guidance toward a label, and the reference it is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoint import sde_spec
from ..classifier import load_classifier
from ..data import DataConfig, load_data
from ..guidance import cfg_score_fn, classifier_guided_score_fn
from ..parametrize import model_score_fn
from ..sde import SDE, ScoreFn
from ..trainer import load_model
from .config import build_oracle, build_sde
from .sample_config import SampleAppConfig

__all__ = ["Target", "build_target"]


@dataclass
class Target:
    """What is sampled and what the samples are measured against."""

    score_fn: ScoreFn
    sde: SDE
    data_shape: tuple[int, ...]
    reference: torch.Tensor | None = None
    oracle: Any = None
    name: str = ""


def build_target(cfg: SampleAppConfig, device: torch.device, dtype: torch.dtype) -> Target:
    """The score function, SDE and evaluation reference named by the config."""
    label, scale = cfg.guidance.label, cfg.guidance.scale
    if cfg.model.name == "oracle":
        sde = build_sde(cfg.sde)
        mixture = build_oracle(cfg.model, torch.Generator().manual_seed(cfg.seed))
        score_fn = mixture.score_fn(sde)
        if label is not None:
            if not 0 <= label < mixture.num_components:
                raise ValueError(
                    f"guidance.label must lie in [0, {mixture.num_components - 1}], got {label}"
                )

            def log_p_y(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return mixture.log_responsibilities(x, t, sde).gather(1, y[:, None])[:, 0]

            score_fn = classifier_guided_score_fn(score_fn, log_p_y, label, scale, "log_prob")
        return Target(score_fn, sde, mixture.dims, oracle=mixture, name=f"oracle-{cfg.model.kind}")
    model, sde, meta = load_model(cfg.ckpt, device)
    model = model.to(dtype)
    if not (meta.get("config") or {}).get("data"):
        raise ValueError(f"{cfg.ckpt} records no data config to evaluate against")
    data = load_data(DataConfig(**meta["config"]["data"]))
    score_fn = model_score_fn(model, sde, meta["prediction"], "t")
    if label is not None and cfg.guidance.kind == "classifier":
        classifier = load_classifier(cfg.guidance.classifier, device).to(dtype)
        if sde_spec(classifier.sde) != sde_spec(sde):
            raise ValueError(
                f"the classifier {cfg.guidance.classifier} was trained on {classifier.sde!r}, "
                f"the checkpoint on {sde!r}"
            )
        if not 0 <= label < classifier.num_classes:
            raise ValueError(
                f"guidance.label must lie in [0, {classifier.num_classes - 1}], got {label}"
            )
        score_fn = classifier_guided_score_fn(score_fn, classifier, label, scale)
    elif label is not None:
        num_classes = meta["model"]["num_classes"]
        if not num_classes:
            raise ValueError(
                f"guidance.label needs a class-conditional checkpoint; {cfg.ckpt} is not"
            )
        score_fn = cfg_score_fn(model, sde, label, num_classes, scale, "ho", meta["prediction"])
    labelled = label is not None and data.test_labels is not None
    reference = data.test[data.test_labels == label] if labelled else data.test
    return Target(score_fn, sde, data.shape, reference, name=str(cfg.ckpt))
