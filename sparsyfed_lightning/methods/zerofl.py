"""ZeroFL baseline (SPEC 12.3): SWAT weight and activation Top-K locally, global pruning at fit end."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn

from sparsyfed_lightning.checks import check_flag
from sparsyfed_lightning.client.callbacks import (
    ActivationPruningCallback,
    EndOfFitPruning,
    WeightTopKCallback,
)
from sparsyfed_lightning.methods.base import Method, layers_left_plain
from sparsyfed_lightning.sparse import check_sparsity, prunable_layers


class ZeroFL(Method):
    """Layer-wise weight Top-K in every training forward plus fixed-fraction activation pruning.

    Active from round 1. The first conv (the stem; in a network without convs its first linear
    layer) trains densely but is pruned at the end of the fit with the others. `mask_ratio` is
    subtracted from `sparsity` for training and uplink, as in the authors' code (0 in every run
    they report).

    Args:
        sparsity: target sparsity, in [0, 1).
        mask_ratio: ZeroFL's mask ratio, in [0, sparsity].
        first_layer_dense: keep the stem dense during local training.
        min_layer_density: layer-collapse guard of end-of-fit pruning (0: none, faithful).
        wrap_downsample: also apply SWAT to the 1x1 downsample convs of the paper's ResNet-18s
            (False, faithful: the authors' layer walk leaves them plain, SPEC 3.2, so they train
            without weight or activation Top-K; they are pruned at the end of the fit either way).
    """

    name = "zerofl"

    def __init__(
        self,
        sparsity: float = 0.95,
        mask_ratio: float = 0.0,
        first_layer_dense: bool = True,
        min_layer_density: float = 0.0,
        wrap_downsample: bool = False,
    ) -> None:
        super().__init__(sparsity=sparsity, min_layer_density=min_layer_density)
        if not 0.0 <= mask_ratio <= self.sparsity:
            raise ValueError(f"method.mask_ratio must be in [0, sparsity={self.sparsity}], got {mask_ratio!r}")
        self.mask_ratio = mask_ratio
        self.first_layer_dense = check_flag(first_layer_dense, "method.first_layer_dense")
        self.wrap_downsample = check_flag(wrap_downsample, "method.wrap_downsample")
        self.effective_sparsity = check_sparsity(self.sparsity - mask_ratio)
        self._skip: list[str] = []

    def prepare_model(self, net: nn.Module) -> nn.Module:
        net = super().prepare_model(net)
        convs = [name for name, m in prunable_layers(net) if isinstance(m, nn.Conv1d | nn.Conv2d)]
        # The stem: the first conv (the authors' models); a network without any, such as the `vit`
        # backbone, keeps its first linear layer (the patch embedding) dense instead.
        stem = convs[:1] or [name for name, _ in prunable_layers(net)][:1]
        self._skip = (stem if self.first_layer_dense else []) + layers_left_plain(net, self.wrap_downsample)
        return net

    def build_callbacks(self) -> list[L.Callback]:
        return [
            WeightTopKCallback(self.effective_sparsity, skip_layers=self._skip),
            ActivationPruningCallback(keep_fraction=1.0 - self.effective_sparsity, skip_layers=self._skip),
            EndOfFitPruning(self.effective_sparsity, self.min_layer_density),
        ]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "mask_ratio": self.mask_ratio,
            "first_layer_dense": self.first_layer_dense,
            "wrap_downsample": self.wrap_downsample,
        }
