"""Top-K baseline (SPEC 12.2): dense local training, then global magnitude pruning of the weights."""

from __future__ import annotations

from sparsyfed_lightning.methods.base import Method


class TopK(Method):
    """Plain layers (zeros regrow during local training), global magnitude pruning at fit end.

    Args:
        sparsity: target sparsity of the uplink model, in [0, 1).
        min_layer_density: layer-collapse guard of end-of-fit pruning (0: none, faithful).
    """

    name = "topk"

    def __init__(self, sparsity: float = 0.95, min_layer_density: float = 0.0) -> None:
        super().__init__(sparsity=sparsity, min_layer_density=min_layer_density)
