"""Hyperparameter-free spectral exponent (SPEC section 10).

Each Powerprop layer gets its own exponent `e = 1 + mean(|V| / sigma)`, where `sigma` is a one-step
power-iteration estimate of the largest singular value of `|V|` reshaped to `(out, -1)`. The mean
runs over all entries, zeros included (the authors' final code). The exponent is computed once per
round, when a fresh global state is loaded, and held fixed (a float, no gradient) while training.
A client-stacked network (`models.stacked`) gives each client its own exponents, computed from its
own chunk of every layer with its own generator, so they are exactly the ones it gets alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsyfed_lightning.sparse.layers import prunable_layers
from sparsyfed_lightning.sparse.powerprop import powerprop_of


@torch.no_grad()
def power_iteration_sigma(matrix: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One power-iteration step from a random Gaussian start: `p^T A q` with unit `p`, `q`.

    By the variational characterisation of singular values the result never exceeds the largest
    singular value of `matrix`. Clamped to at least 1e-12 so an all-zero matrix does not divide by 0.
    """
    start = torch.randn(matrix.shape[0], generator=generator, dtype=matrix.dtype, device="cpu")
    start = start.to(matrix.device)
    q = torch.nn.functional.normalize(matrix.T @ start, dim=0)
    p = torch.nn.functional.normalize(matrix @ q, dim=0)
    return (p @ (matrix @ q)).clamp_min(1e-12)


@torch.no_grad()
def spectral_exponent(stored: torch.Tensor, generator: torch.Generator | None = None) -> float:
    """`1 + mean(|V| / sigma_hat)` for one layer's stored tensor, rounded to 8 decimals; 1 if NaN."""
    magnitudes = stored.detach().abs().reshape(stored.shape[0], -1).float()
    sigma = power_iteration_sigma(magnitudes, generator)
    exponent = float(1.0 + (magnitudes / sigma).mean())
    if math.isnan(exponent):
        return 1.0
    return round(exponent, 8)


def update_spectral_exponents(model: nn.Module, seed: int, clients: int = 1) -> dict[str, float | tuple[float, ...]]:
    """Recompute and set the exponent of every Powerprop layer; returns them by layer name.

    Seeded so that a client's exponents depend only on the received state and the seed. With
    `clients` > 1 (a stacked network) every client draws from its own generator seeded with `seed`,
    as it would alone, and each layer gets one exponent per client (a tuple in the result).
    """
    generators = [torch.Generator().manual_seed(seed) for _ in range(clients)]
    exponents: dict[str, float | tuple[float, ...]] = {}
    for name, module in prunable_layers(model):
        parametrization = powerprop_of(module)
        if parametrization is None:
            continue
        stored = module.parametrizations.weight.original  # type: ignore[union-attr]
        rows = stored.shape[0] // clients  # client i owns rows [i * rows, (i + 1) * rows)
        parts = stored.detach().view(clients, -1)
        values = [spectral_exponent(part.view(rows, -1), g) for part, g in zip(parts, generators, strict=True)]
        parametrization.set_client_exponents(values)
        exponents[name] = values[0] if clients == 1 else tuple(values)
    return exponents
