"""SWAT-style weight Top-K in the forward of training steps (the ZeroFL baseline, SPEC 12.3).

Before every training forward of a selected layer its stored weights below a magnitude threshold
are zeroed in place, keeping the top `1 - sparsity` fraction of the layer. Conv layers select the
threshold on the first training forward of a fit and reuse it (the authors' behaviour, default);
linear layers select it at every step. Pruned weights still receive gradients (beta = 1), so they
can regrow after the optimizer step and are pruned again at the next forward.

A client-stacked network (`models.stacked`) holds each client's part of a layer as one consecutive
chunk of the stored weight; every client gets its own threshold over its own chunk (one batched
`topk`), exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sparsyfed_lightning.sparse.layers import is_linear, prunable_layers, stored_weight
from sparsyfed_lightning.sparse.pruning import check_sparsity, magnitude_threshold


class WeightTopK:
    """Keep the top `1 - sparsity` stored weights of each selected layer at every training forward.

    `clients`: the number of clients `model` stacks; each keeps its own top weights of every layer.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        threshold: Literal["first_batch", "per_step"] = "first_batch",
        layer_names: Iterable[str] | None = None,
        clients: int = 1,
    ) -> None:
        self.model = model
        self.clients = clients
        self.keep_fraction = 1.0 - check_sparsity(sparsity)
        if threshold not in ("first_batch", "per_step"):
            raise ValueError(f"threshold must be 'first_batch' or 'per_step', got {threshold!r}")
        wanted = None if layer_names is None else set(layer_names)
        self.layers = {n: m for n, m in prunable_layers(model) if wanted is None or n in wanted}
        self._frozen = {
            n: threshold == "first_batch" and not is_linear(m) for n, m in self.layers.items()
        }
        self._thresholds: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def attach(self) -> WeightTopK:
        """Install the forward pre-hooks; forget cached thresholds. Idempotent."""
        self._thresholds.clear()
        if not self._handles:
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Forget cached thresholds (call at the start of every local fit)."""
        self._thresholds.clear()

    def _hook(self, name: str):  # noqa: ANN202 - a forward pre-hook
        def hook(module: nn.Module, args: object) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            weight = stored_weight(module)
            threshold = self._thresholds.get(name)
            if threshold is None or not self._frozen[name]:
                threshold = magnitude_threshold(weight, self.keep_fraction, groups=self.clients)
                self._thresholds[name] = threshold
            with torch.no_grad():
                parts = weight.view(self.clients, -1)  # in-place edits reach `weight`
                parts.masked_fill_(parts.abs() < threshold.view(-1, 1), 0)

        return hook
