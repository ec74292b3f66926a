"""Powerpropagation: `w = sign(v) * |v| ** beta` registered as a weight parametrization.

The stored parameter `v` is what the optimizer updates, what pruning ranks and what the federation
communicates. The gradient is `dL/dv = beta * |v| ** (beta - 1) * dL/dw`, which is exactly zero at
`v = 0` when `beta > 1`; with SGD without momentum a zero weight therefore stays zero for a whole
local round (SPEC 3.1), which is what makes the layer density constant within a round.

A custom autograd Function is used instead of composing `sign`, `abs` and `pow`: composed ops would
save two or three weight-sized intermediates for backward, while this one saves only `v` itself
(the parameter, already alive), so Powerprop adds no saved-tensor memory.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsyfed_lightning.sparse.layers import prunable_layers


class _SignedPower(torch.autograd.Function):
    """`sign(v) * |v| ** exponent` with a backward that saves only `v`."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, exponent: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(v)
        ctx.exponent = exponent
        return torch.sign(v) * v.abs().pow(exponent)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (v,) = ctx.saved_tensors
        return grad * (ctx.exponent * v.abs().pow(ctx.exponent - 1.0)), None


def signed_power(v: torch.Tensor, exponent: float) -> torch.Tensor:
    """Differentiable `sign(v) * |v| ** exponent`."""
    return _SignedPower.apply(v, exponent)


class Powerprop(nn.Module):
    """Parametrization `v -> sign(v)|v|^exponent`; `right_inverse` maps an effective weight to `v`.

    `exponent` is a plain float attribute (not state): the spectral variant rewrites it once per
    round, and state dicts stay identical across methods with the same layer wrapping.
    """

    def __init__(self, exponent: float) -> None:
        super().__init__()
        if exponent < 1.0:
            raise ValueError(f"Powerprop exponent must be >= 1, got {exponent}")
        self.exponent = float(exponent)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.exponent == 1.0:
            return v
        return signed_power(v, self.exponent)

    @torch.no_grad()
    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        if self.exponent == 1.0:
            return w
        return torch.sign(w) * w.abs().pow(1.0 / self.exponent)


def powerpropify(model: nn.Module, beta: float, *, keep_effective_weights: bool = True) -> nn.Module:
    """Register Powerprop on the weight of every Conv1d/Conv2d/Linear layer of `model`, in place.

    `beta == 1` leaves the model untouched (an ordinary network). With `keep_effective_weights`
    the stored `v` is set to `sign(w)|w|^(1/beta)` so the effective weights keep the distribution
    they were initialised with (SPEC 3.3); without it `v` takes the current weight values as they
    are (the spectral variant's initialisation). Returns `model` for chaining.
    """
    if not math.isfinite(beta) or beta < 1.0:
        raise ValueError(f"beta must be a finite number >= 1, got {beta}")
    if beta == 1.0:
        return model
    for _, module in prunable_layers(model):
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"{type(module).__name__} already carries a weight parametrization")
        if keep_effective_weights:
            parametrize.register_parametrization(module, "weight", Powerprop(beta))
        else:
            # Register with exponent 1 (identity inverse) so v keeps the raw values, then raise it.
            parametrization = Powerprop(1.0)
            parametrize.register_parametrization(module, "weight", parametrization)
            parametrization.exponent = float(beta)
    return model


def powerprop_of(module: nn.Module) -> Powerprop | None:
    """The Powerprop parametrization on a layer's weight, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:  # type: ignore[union-attr]
        if isinstance(p, Powerprop):
            return p
    return None
