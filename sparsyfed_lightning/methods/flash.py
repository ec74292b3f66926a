"""FLASH baseline, static-mask variant (SPEC 12.4).

Round 1 (mask search): clients train and prune globally to the target; the server averages the
clients' per-tensor densities and prunes each aggregated tensor layer-wise to that density. Later
rounds: clients mask every gradient with the support they received, so the mask never changes.

Two behaviours of the authors' code are reproduced by default, each with a switch (SPEC 15, quirk 25):

* their client masks every gradient with `param != 0` in every round, the mask-search round
  included, so parameters that start at zero (the classifier bias, every BatchNorm beta) never
  train; `dense_warmup=True` trains the mask-search round densely, as FLASH's paper describes;
* their server sums the average density in floating point, which prunes the smallest entry of
  every tensor the clients keep whole (BatchNorm weights, biases and statistics);
  `exact_density=True` computes it exactly (`server.mask_search`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from sparsyfed_lightning.checks import check_flag
from sparsyfed_lightning.client.callbacks import EndOfFitPruning, GradientMaskCallback
from sparsyfed_lightning.methods.base import Method
from sparsyfed_lightning.server.mask_search import DensityProfile, prune_to_profile


class _RoundGatedGradientMask(GradientMaskCallback):
    """Gradient masking that switches on from round `first_round`."""

    def __init__(self, method: FLASH, first_round: int) -> None:
        super().__init__()
        self.method = method
        self.first_round = first_round

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.method.round >= self.first_round:
            super().on_fit_start(trainer, pl_module)
        else:
            self.masks = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        if self.masks:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)


class FLASH(Method):
    """Static sparse mask found from the clients' round-1 pruning profile.

    Args:
        sparsity: target sparsity, in [0, 1).
        mask_search_round: the round whose client models define the mask (the paper: 1).
        min_layer_density: layer-collapse guard of end-of-fit pruning (0: none, faithful).
        dense_warmup: train every parameter up to the mask-search round (False, faithful: gradients
            are masked with `param != 0` from round 1, so zero-initialised parameters never train).
        exact_density: the server's density profile computed exactly (False, faithful: summed in
            floating point, which prunes one entry of every tensor the clients keep whole).
    """

    name = "flash"

    def __init__(
        self,
        sparsity: float = 0.95,
        mask_search_round: int = 1,
        min_layer_density: float = 0.0,
        dense_warmup: bool = False,
        exact_density: bool = False,
    ) -> None:
        super().__init__(sparsity=sparsity, min_layer_density=min_layer_density)
        if not isinstance(mask_search_round, int) or mask_search_round < 1:
            raise ValueError(f"method.mask_search_round must be an integer >= 1, got {mask_search_round!r}")
        self.mask_search_round = mask_search_round
        self.dense_warmup = check_flag(dense_warmup, "method.dense_warmup")
        self.exact_density = check_flag(exact_density, "method.exact_density")
        self._profile = DensityProfile()

    def build_callbacks(self) -> list[L.Callback]:
        if self.dense_warmup:
            mask: GradientMaskCallback = _RoundGatedGradientMask(self, self.mask_search_round + 1)
        else:
            mask = GradientMaskCallback()  # the authors': from round 1
        return [mask, EndOfFitPruning(self.sparsity, self.min_layer_density)]

    def observe_client(self, round_index: int, state: dict[str, torch.Tensor], weight: float) -> None:
        if round_index == self.mask_search_round:
            self._profile.add(state, weight)

    def server_update(self, round_index: int, aggregate: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if round_index != self.mask_search_round:
            return aggregate
        return prune_to_profile(aggregate, self._profile, exact=self.exact_density)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "mask_search_round": self.mask_search_round,
            "dense_warmup": self.dense_warmup,
            "exact_density": self.exact_density,
        }
