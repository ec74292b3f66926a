"""SparsyFed's hyperparameter-free variant: a per-layer spectral exponent instead of beta (SPEC 10)."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from torch import nn

from sparsyfed_lightning.client.callbacks import (
    ActivationPruningCallback,
    EndOfFitPruning,
    FrozenSupportCallback,
    SpectralExponentCallback,
)
from sparsyfed_lightning.methods.base import Method
from sparsyfed_lightning.methods.sparsyfed import check_threshold
from sparsyfed_lightning.sparse import powerpropify, update_spectral_exponents


class SparsyFedSpectral(Method):
    """SparsyFed whose exponents `1 + mean(|V|)/sigma_hat` are recomputed per layer each round.

    The stored weights start as the initial weights themselves (no 1/beta transform, SPEC 3.3).
    End-of-fit pruning ranks |v| as the authors did, which for per-layer exponents is not the same
    ranking as |w| (SPEC 15, quirk 8).

    Args:
        sparsity: target sparsity of the uplink model, in [0, 1).
        activation_pruning: prune the activations saved for the weight gradient.
        threshold: "first_batch" (faithful) or "per_step"; see `SparsyFed`.
        seed: seed of the power-iteration start vectors.
        min_layer_density: layer-collapse guard of end-of-fit pruning (0: none, faithful).
    """

    name = "sparsyfed_spectral"

    def __init__(
        self,
        sparsity: float = 0.95,
        activation_pruning: bool = True,
        threshold: Literal["first_batch", "per_step"] = "first_batch",
        seed: int = 0,
        min_layer_density: float = 0.0,
    ) -> None:
        super().__init__(sparsity=sparsity, min_layer_density=min_layer_density)
        self.activation_pruning = activation_pruning
        self.threshold = check_threshold(threshold)
        self.seed = seed

    def prepare_model(self, net: nn.Module) -> nn.Module:
        # Any exponent > 1 registers the parametrization; the real per-layer ones are set next.
        powerpropify(net, 2.0, keep_effective_weights=False)
        update_spectral_exponents(net, self.seed)
        return net

    def build_callbacks(self) -> list[L.Callback]:
        callbacks: list[L.Callback] = [SpectralExponentCallback(self.seed), FrozenSupportCallback()]
        if self.activation_pruning:
            callbacks.append(ActivationPruningCallback(threshold=self.threshold))
        callbacks.append(EndOfFitPruning(self.sparsity, self.min_layer_density))
        return callbacks

    def on_global_loaded(self, net: nn.Module) -> None:
        update_spectral_exponents(net, self.seed)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "activation_pruning": self.activation_pruning,
            "threshold": self.threshold,
            "seed": self.seed,
        }
