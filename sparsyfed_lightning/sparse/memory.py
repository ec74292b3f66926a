"""Counting the bytes autograd keeps for backward (the activation memory of a training step).

`SavedTensorMeter` is an outermost `saved_tensors_hooks` pair that records every tensor saved for
backward, counting each storage once (the ReLU output that is also the next conv's input is one
tensor, not two). Parameters are tallied apart because they are alive anyway. Compact encodings
made by `ActivationPruning` (which installs inner hooks that take precedence) report their own
bytes through `record_compact`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.graph import saved_tensors_hooks

_ACTIVE_METERS: list[SavedTensorMeter] = []


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


@dataclass
class SavedTensorMeter:
    """Context manager: `activation_bytes` (non-parameter saved tensors) and `parameter_bytes`."""

    activation_bytes: int = 0
    parameter_bytes: int = 0
    _seen: set[int] = field(default_factory=set)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            if t.is_leaf and t.requires_grad:
                self.parameter_bytes += _storage_bytes(t)
            else:
                self.activation_bytes += _storage_bytes(t)
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        _ACTIVE_METERS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE_METERS.remove(self)
        self._hooks.__exit__(*exc)
        self._seen.clear()


def record_compact(tensors: tuple[torch.Tensor, ...]) -> None:
    """Report the tensors of a compact encoding to every active meter (each storage once)."""
    for meter in _ACTIVE_METERS:
        for t in tensors:
            meter._pack(t)
