"""SparsyFed's hyperparameter-free variant: a per-layer spectral exponent instead of beta (SPEC 10)."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from torch import nn

from sparsyfed_lightning.checks import check_flag
from sparsyfed_lightning.client.callbacks import (
    ActivationPruningCallback,
    EndOfFitPruning,
    FrozenSupportCallback,
    SpectralExponentCallback,
)
from sparsyfed_lightning.methods.base import Method, layers_left_plain
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
        wrap_downsample: also wrap the ResNet-18 downsample convs (False, faithful); see `SparsyFed`.
    """

    name = "sparsyfed_spectral"

    def __init__(
        self,
        sparsity: float = 0.95,
        activation_pruning: bool = True,
        threshold: Literal["first_batch", "per_step"] = "first_batch",
        seed: int = 0,
        min_layer_density: float = 0.0,
        wrap_downsample: bool = False,
    ) -> None:
        super().__init__(sparsity=sparsity, min_layer_density=min_layer_density)
        self.activation_pruning = check_flag(activation_pruning, "method.activation_pruning")
        self.threshold = check_threshold(threshold)
        self.seed = seed
        self.wrap_downsample = check_flag(wrap_downsample, "method.wrap_downsample")
        self._plain_layers: list[str] = []

    def prepare_model(self, net: nn.Module) -> nn.Module:
        self._plain_layers = layers_left_plain(net, self.wrap_downsample)
        # Any exponent > 1 registers the parametrization; the real per-layer ones are set next.
        powerpropify(super().prepare_model(net), 2.0, keep_effective_weights=False, skip=self._plain_layers)
        update_spectral_exponents(net, self.seed)
        return net

    def build_callbacks(self) -> list[L.Callback]:
        callbacks: list[L.Callback] = [SpectralExponentCallback(self.seed), FrozenSupportCallback()]
        if self.activation_pruning:
            callbacks.append(ActivationPruningCallback(threshold=self.threshold, skip_layers=self._plain_layers))
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
            "wrap_downsample": self.wrap_downsample,
        }
