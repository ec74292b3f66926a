"""FLASH's server-side mask search (SPEC 12.4): a layer-wise density profile from the clients.

The server keeps, for every state tensor, the clients' non-zero counts of the mask-search round
with their sample counts, and prunes each aggregated tensor to the clients' average density. Two
ways to compute that density and the cut:

* the authors' (default): `d = sum_k density_k * (n_k / n)` summed in floating point, `k =
  int(numel * d)` entries kept by magnitude with ties at the threshold kept, and `k = 0` keeping
  the tensor whole. The floating sum is a bug with a visible effect: for a tensor every client
  keeps whole it comes out just below 1 (ten clients of 500 samples: 0.1 added ten times is
  0.9999999999999999), so `k = numel - 1` and the smallest entry of every BatchNorm weight, bias
  and running statistic and of every bias is pruned (SPEC 15, quirk 25);
* exact: `floor(sum_k n_k * nonzeros_k / n)` entries kept (integer arithmetic), exactly that many by
  magnitude (ties broken by index, as all other pruning here); a tensor every client keeps whole
  stays whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction

import torch

from sparsyfed_lightning.sparse import keep_largest_with_ties_, prune_smallest_


class DensityProfile:
    """The non-zero counts of every state tensor in each client model of a round, with its weight."""

    def __init__(self) -> None:
        self._clients: list[tuple[float, dict[str, int]]] = []
        self._numels: dict[str, int] = {}

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        self._clients.append((weight, {k: int(torch.count_nonzero(t)) for k, t in state.items()}))
        self._numels.update({k: t.numel() for k, t in state.items()})

    def densities(self) -> dict[str, float]:
        """The authors' average density per key: `sum_k (nonzeros_k / numel) * (n_k / n)` in floats."""
        total = sum(weight for weight, _ in self._clients)
        if not total:
            return {}  # no client weight: nothing to prune to
        averaged: dict[str, float] = {}
        for weight, counts in self._clients:
            for key, count in counts.items():
                averaged[key] = averaged.get(key, 0.0) + count / max(self._numels[key], 1) * (weight / total)
        return averaged

    def kept_counts(self) -> dict[str, int]:
        """The exact sample-weighted mean number of non-zeros per key, rounded down."""
        total = sum(Fraction(weight) for weight, _ in self._clients)
        if not total:
            return {}
        weighted: dict[str, Fraction] = {}
        for weight, counts in self._clients:
            for key, count in counts.items():
                weighted[key] = weighted.get(key, Fraction(0)) + Fraction(weight) * count
        return {key: int(value / total) for key, value in weighted.items()}


@torch.no_grad()
def prune_to_profile(
    state: Mapping[str, torch.Tensor], profile: DensityProfile, exact: bool = False
) -> dict[str, torch.Tensor]:
    """Each floating tensor of `state` pruned layer-wise to the profile's density (see module doc).

    Integer tensors (`num_batches_tracked`) stay whole, as they do in the authors' code (one entry:
    `k` is 0 or 1).
    """
    keep = profile.kept_counts() if exact else None
    densities = None if exact else profile.densities()
    pruned = {}
    for key, tensor in state.items():
        tensor = tensor.clone()
        if tensor.is_floating_point():
            if keep is not None:
                prune_smallest_([tensor], tensor.numel() - keep.get(key, tensor.numel()))
            elif densities is not None and key in densities:
                keep_largest_with_ties_(tensor, int(tensor.numel() * densities[key]))
        pruned[key] = tensor
    return pruned
