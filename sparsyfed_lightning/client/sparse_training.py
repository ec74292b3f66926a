"""`SparseTraining`: a method's sparse training in a plain `lightning.Trainer.fit` of any LightningModule.

Centralized sparse training with the federated methods' client side (Powerprop, activation pruning,
end-of-fit pruning, ...), without federation::

    trainer = L.Trainer(max_epochs=20, callbacks=[SparseTraining(SparsyFed(sparsity=0.95))])
    trainer.fit(model, datamodule=dm)     # any LightningModule; `model.net` when it has one

Every training epoch plays the part of a federated round for the method's client callbacks
(`Method.client_callbacks()`): their `on_fit_start` runs when the epoch starts (read the layer
densities, freeze Powerprop supports, attach activation pruning) and their `on_fit_end` after the
epoch's last training batch (end-of-round pruning to the target sparsity, hooks removed), before
that epoch's validation, so validation sees the pruned model, as the federated evaluation does. The
first epoch therefore trains densely (all layers at density 1, as round 1 of SparsyFed) and later
epochs train the pruned model with activations pruned to each layer's density.

`setup` applies the method's `prepare_model` once (Powerprop on every Conv1d/Conv2d/Linear weight for
SparsyFed), before Lightning builds the optimizer from the parameters. In a federated run the optimizer
is fresh every round; here it lives across epochs, so after each pruning the optimizer state of the
pruned weights (momentum, Adam's moments) is zeroed: otherwise momentum would regrow them.
"""

from __future__ import annotations

from typing import Any, Protocol

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from sparsyfed_lightning.client.callbacks import network_of
from sparsyfed_lightning.sparse import prunable_weights


class RoundRecipe(Protocol):
    """What `SparseTraining` needs from a method (every `sparsyfed_lightning.methods.Method` has it)."""

    name: str

    def prepare_model(self, net: nn.Module) -> nn.Module: ...

    def client_callbacks(self) -> list[L.Callback]: ...

    def on_round_start(self, round_index: int) -> None: ...


class SparseTraining(L.Callback):
    """Run a method's client-side sparse training in an ordinary Lightning fit, one epoch per round.

    Args:
        method: a method object, e.g. `SparsyFed(sparsity=0.95)`, `TopK(0.9)`, `ZeroFL(0.9)`.
    """

    def __init__(self, method: RoundRecipe) -> None:
        self.method = method
        self.callbacks: list[L.Callback] = []
        self._in_round = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        net = network_of(pl_module)
        if not getattr(net, "_sparse_training_prepared", False):
            prepared = self.method.prepare_model(net)
            if prepared is not net:
                if net is pl_module:
                    raise ValueError(f"method {self.method.name} replaces the network; give the module a `net`")
                pl_module.net = prepared  # type: ignore[assignment]
            prepared._sparse_training_prepared = True  # type: ignore[assignment]
        self.callbacks = self.method.client_callbacks()  # after prepare_model: some read what it set

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.method.on_round_start(trainer.current_epoch + 1)
        for callback in self.callbacks:
            callback.on_fit_start(trainer, pl_module)
        self._in_round = True

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for callback in self.callbacks:
            callback.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if batch_idx + 1 >= trainer.num_training_batches:  # the epoch's last batch: end the round here
            self._end_round(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_round(trainer, pl_module)  # an epoch cut short (max_steps, unknown length)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_round(trainer, pl_module)

    def _end_round(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._in_round:
            return
        self._in_round = False
        for callback in self.callbacks:
            callback.on_fit_end(trainer, pl_module)
        clear_pruned_optimizer_state(trainer.optimizers, network_of(pl_module))

    # Hooks inside a training epoch that the method's callbacks use (FLASH masks gradients), forwarded as they are.
    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for callback in self.callbacks:
            callback.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in self.callbacks:
            callback.on_after_backward(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for callback in self.callbacks:
            callback.on_before_optimizer_step(trainer, pl_module, optimizer)


@torch.no_grad()
def clear_pruned_optimizer_state(optimizers: list[torch.optim.Optimizer], net: nn.Module) -> None:
    """Zero the optimizer state (momentum, moments) of every stored conv/linear weight entry that is 0."""
    weights = {id(w): w for w in prunable_weights(net).values()}
    for optimizer in optimizers:
        for parameter, state in optimizer.state.items():
            weight = weights.get(id(parameter))
            if weight is None:
                continue
            pruned = weight == 0
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                    value.masked_fill_(pruned, 0)
