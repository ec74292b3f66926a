"""FLASH's server-side mask search (SPEC 12.4): a layer-wise density profile from the clients."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from sparsyfed_lightning.sparse import prune_smallest_


class DensityProfile:
    """Sample-weighted average density of every state tensor over the clients of a round (streamed)."""

    def __init__(self) -> None:
        self._weighted: dict[str, float] = {}
        self._total_weight = 0.0

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        counts = {k: torch.count_nonzero(t) for k, t in state.items()}
        for key, count in counts.items():
            density = float(count) / max(state[key].numel(), 1)
            self._weighted[key] = self._weighted.get(key, 0.0) + weight * density
        self._total_weight += weight

    def densities(self) -> dict[str, float]:
        """Average density per key (1.0 for an empty profile)."""
        if self._total_weight == 0:
            return {}
        return {k: v / self._total_weight for k, v in self._weighted.items()}


@torch.no_grad()
def prune_to_profile(state: Mapping[str, torch.Tensor], densities: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Keep the floor(d_i * numel) largest magnitudes of each floating tensor i (d_i = 1: untouched)."""
    pruned = {}
    for key, tensor in state.items():
        tensor = tensor.clone()
        density = densities.get(key, 1.0)
        if tensor.is_floating_point() and density < 1.0:
            keep = math.floor(density * tensor.numel())
            prune_smallest_([tensor], tensor.numel() - keep)
        pruned[key] = tensor
    return pruned
