"""Sample-weighted averaging of client states: the one aggregation path every method shares.

SPEC 7.1: `w_g[j] = sum_k n_k w_k[j] / sum_k n_k` over *every* state entry, BatchNorm running
statistics and `num_batches_tracked` included (the authors' FedAvg and FedAvgNZ are identical).

Decisions:

* Streaming: `WeightedAverage.add` folds a client in and keeps nothing of it, so a round holds one
  float64 accumulator per entry however many clients it has.
* Accumulation is float64 whatever the entry's dtype (the authors summed in the arrays' own dtype,
  float32 for weights); the result is cast back to each entry's dtype. Integer and bool entries are
  cast back by truncation toward zero, which is what loading the authors' float average into an
  int64 buffer did. With integer weights (sample counts) the float64 sums are exact up to 2**53, so
  clients that agree on an integer keep it exactly.
* Accumulators start from +0.0 and clients are added to them, so `-0.0` entries (left by pruning
  through multiplication) come out as `+0.0`, the canonical zero the codec encodes most cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch


def _check_weight(weight: float) -> float:
    value = float(weight)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"client weight must be a finite number > 0, got {weight!r}")
    return value


def check_same_keys(reference: Iterable[str], other: Iterable[str], what: str) -> None:
    """Raise a ValueError naming the missing and extra keys of `other` against `reference`."""
    ref, got = list(reference), set(other)
    missing = [k for k in ref if k not in got]
    extra = sorted(got.difference(ref))
    if missing or extra:
        raise ValueError(f"{what} keys differ: missing {missing}, extra {extra}")


class WeightedAverage:
    """Streaming weighted mean of state dicts, accumulated in float64.

    >>> avg = WeightedAverage()
    >>> avg.add(client_state, weight=num_samples)   # for each client
    >>> global_state = avg.result()
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    @torch.no_grad()
    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one client's state in with weight `weight` (> 0, typically its sample count)."""
        weight = _check_weight(weight)
        if not self._sums:
            self._dtypes = {k: t.dtype for k, t in state.items()}
            self._sums = {
                k: torch.zeros(t.shape, dtype=torch.float64, device=t.device) for k, t in state.items()
            }
        else:
            check_same_keys(self._sums, state, "client state")
        for key, acc in self._sums.items():
            value = state[key]
            if value.shape != acc.shape:
                raise ValueError(
                    f"client state entry {key!r} has shape {tuple(value.shape)}, expected {tuple(acc.shape)}"
                )
            acc.add_(value.to(device=acc.device, dtype=torch.float64), alpha=weight)
        self.total_weight += weight
        self.count += 1

    @torch.no_grad()
    def result(self) -> dict[str, torch.Tensor]:
        """The weighted mean, each entry in its original dtype (integers truncated toward zero)."""
        if not self.count:
            raise ValueError("WeightedAverage.result() called before any client state was added")
        out = {}
        for key, acc in self._sums.items():
            mean = acc / self.total_weight
            dtype = self._dtypes[key]
            if not dtype.is_floating_point:
                mean = mean.trunc()
            out[key] = mean.to(dtype)
        return out


def weighted_average(
    states: Iterable[Mapping[str, torch.Tensor]], weights: Iterable[float]
) -> dict[str, torch.Tensor]:
    """Weighted mean of `states` with `weights` (same code path as `WeightedAverage`)."""
    states, weights = list(states), list(weights)
    if len(states) != len(weights):
        raise ValueError(f"got {len(states)} states but {len(weights)} weights")
    avg = WeightedAverage()
    for state, weight in zip(states, weights, strict=True):
        avg.add(state, weight)
    return avg.result()
