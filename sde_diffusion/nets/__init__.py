"""Networks that predict eps: an MLP for low-dimensional data and a U-Net for images.

`build_model(name, data_shape, num_classes, **kwargs)` builds one by name, so a checkpoint can
store (name, kwargs) and be rebuilt without pickling code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .embeddings import (
    TIME_EMBEDDINGS,
    GaussianFourierEmbedding,
    LabelEmbedding,
    SinusoidalEmbedding,
)
from .mlp import MLP
from .unet import UNet

NETS: dict[str, type[nn.Module]] = {"mlp": MLP, "unet": UNet}

__all__ = [
    "MLP",
    "NETS",
    "TIME_EMBEDDINGS",
    "GaussianFourierEmbedding",
    "LabelEmbedding",
    "SinusoidalEmbedding",
    "UNet",
    "build_model",
]


def build_model(
    name: str, data_shape: Sequence[int], num_classes: int = 0, **kwargs: Any
) -> nn.Module:
    """Build the network `name` (mlp or unet) for samples of shape data_shape."""
    if name not in NETS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(NETS)}")
    return NETS[name](data_shape=tuple(data_shape), num_classes=num_classes, **kwargs)
