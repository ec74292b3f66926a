"""The authors' initialisation of conv/linear weights (SPEC 3.3), applied before any wrapping."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsyfed_lightning.sparse.layers import PRUNABLE_TYPES

# Standard deviation of a unit normal truncated to [-2, 2]; dividing by it makes the truncated
# draw have standard deviation sqrt(1 / fan_in).
TRUNCATED_STD = 0.87962566103423978


@torch.no_grad()
def truncated_normal_init(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Draw every conv/linear weight from TruncNormal(0, s, [-2s, 2s]), s = sqrt(1/fan_in)/0.8796.

    Biases are set to zero; BatchNorm keeps PyTorch's defaults. Returns `model`.
    """
    for module in model.modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        weight = module.weight
        fan_in = weight[0].numel()  # in_channels * prod(kernel) or in_features
        std = math.sqrt(1.0 / fan_in) / TRUNCATED_STD
        sample = torch.empty(weight.shape, dtype=torch.float32)
        nn.init.trunc_normal_(sample, 0.0, std, -2 * std, 2 * std, generator=generator)
        weight.copy_(sample)
        if module.bias is not None:
            module.bias.zero_()
    return model
