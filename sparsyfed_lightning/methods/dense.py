"""Dense FedAvg: the accuracy reference of the paper's plots (SPEC 12.1)."""

from __future__ import annotations

from torch import nn

from sparsyfed_lightning.methods.base import Method


class Dense(Method):
    """Dense local training, no pruning (sparsity 0)."""

    name = "dense"

    def __init__(self) -> None:
        super().__init__(sparsity=0.0)

    def check_model(self, net: nn.Module) -> None:
        """Any network trains densely: nothing is sparsified."""
