"""Model registry: `build_model(name, num_classes, **kw)` builds and initialises a backbone."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sparsyfed_lightning.models.init import truncated_normal_init
from sparsyfed_lightning.models.resnet import resnet18_cifar, resnet18_speech
from sparsyfed_lightning.models.small import logmel_cnn, small_cnn, small_resnet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet18_speech": resnet18_speech,
    "logmel_cnn": logmel_cnn,
    "small_cnn": small_cnn,
    "small_resnet": small_resnet,
}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make `builder(num_classes, **kw)` available to `build_model` under `name`."""
    MODELS[name] = builder


def build_model(name: str, num_classes: int, *, seed: int | None = None, **kwargs: object) -> nn.Module:
    """Build a registered backbone with the authors' truncated-normal initialisation (SPEC 3.3)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = MODELS[name](num_classes=num_classes, **kwargs)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return truncated_normal_init(model, generator)
