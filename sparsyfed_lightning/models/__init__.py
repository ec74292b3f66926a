"""Backbones (plain `nn.Module`s) and their name registry; sparsity is applied from outside."""

from sparsyfed_lightning.models.init import truncated_normal_init
from sparsyfed_lightning.models.registry import MODELS, build_model, register_model

__all__ = ["MODELS", "build_model", "register_model", "truncated_normal_init"]
