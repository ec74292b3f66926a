"""SparsyFed (SPEC 1-5): Powerprop + activation pruning tied to weight density + end-of-fit pruning."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from torch import nn

from sparsyfed_lightning.checks import check_flag, check_number
from sparsyfed_lightning.client.callbacks import ActivationPruningCallback, EndOfFitPruning, FrozenSupportCallback
from sparsyfed_lightning.methods.base import Method, layers_left_plain
from sparsyfed_lightning.sparse import powerpropify


def check_threshold(threshold: str) -> str:
    """Return `threshold` if it names an activation-threshold mode, else a one-line ValueError."""
    if threshold not in ("first_batch", "per_step"):
        raise ValueError(f"method.threshold must be 'first_batch' or 'per_step', got {threshold!r}")
    return threshold


class SparsyFed(Method):
    """SparsyFed with a fixed Powerprop exponent.

    Args:
        sparsity: target sparsity of the uplink model, in [0, 1) (the paper: 0.9 ... 0.999).
        beta: Powerprop exponent, >= 1 (the paper: 1.25). beta = 1 is the "no Powerprop" ablation
            (zeros can regrow, so layer densities are re-read at every step).
        activation_pruning: prune the activations saved for the weight gradient (False is the
            paper's "no activation pruning" ablation).
        threshold: "first_batch" (faithful: a conv layer's activation threshold is selected on the
            first batch of a fit and reused) or "per_step" (selected at every step).
        min_layer_density: layer-collapse guard of end-of-fit pruning (0: none, faithful).
        wrap_downsample: also wrap the 1x1 downsample convs of the paper's ResNet-18s (False,
            faithful: they stay plain convs as the authors' layer walk leaves them, SPEC 3.2: no
            Powerprop, so their zeros can regrow, no activation pruning, and end-of-fit pruning
            ranks their |w| beside the |v| of the wrapped layers). Other backbones are wrapped whole.
    """

    name = "sparsyfed"

    def __init__(
        self,
        sparsity: float = 0.95,
        beta: float = 1.25,
        activation_pruning: bool = True,
        threshold: Literal["first_batch", "per_step"] = "first_batch",
        min_layer_density: float = 0.0,
        wrap_downsample: bool = False,
    ) -> None:
        super().__init__(sparsity=sparsity, min_layer_density=min_layer_density)
        self.beta = check_number(beta, "method.beta", low=1.0)
        self.activation_pruning = check_flag(activation_pruning, "method.activation_pruning")
        self.threshold = check_threshold(threshold)
        self.wrap_downsample = check_flag(wrap_downsample, "method.wrap_downsample")
        self._plain_layers: list[str] = []

    def prepare_model(self, net: nn.Module) -> nn.Module:
        net = super().prepare_model(net)
        self._plain_layers = layers_left_plain(net, self.wrap_downsample)
        return powerpropify(net, self.beta, skip=self._plain_layers)

    def build_callbacks(self) -> list[L.Callback]:
        callbacks: list[L.Callback] = [FrozenSupportCallback()] if self.beta > 1.0 else []
        if self.activation_pruning:
            callbacks.append(
                ActivationPruningCallback(
                    threshold=self.threshold, refresh_every_step=self.beta == 1.0, skip_layers=self._plain_layers
                )
            )
        callbacks.append(EndOfFitPruning(self.sparsity, self.min_layer_density))
        return callbacks

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "beta": self.beta,
            "activation_pruning": self.activation_pruning,
            "threshold": self.threshold,
            "wrap_downsample": self.wrap_downsample,
        }
