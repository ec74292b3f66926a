"""`Method`: one small object per federated sparse-training method (its client recipe + server rule).

The orchestrator (any engine) drives a method through these hooks, in this order per round:

1. `on_round_start(round)`;
2. for each client fit, the callbacks of `client_callbacks()` run inside Lightning's `Trainer.fit`
   (built once per run, reused for every client); afterwards `client_stats()` is read;
3. `observe_client(round, state, weight)` for each returned model (streamed, not stored);
4. `server_update(round, aggregate)` on the sample-weighted average, before the server optimizer;
5. `on_global_loaded(net)` whenever the server loads a global state for evaluation.

`prepare_model(net)` is applied once to the freshly built backbone (e.g. Powerprop wrapping); it
first refuses layers the method cannot sparsify (`check_model`).
A method is configured by plain typed constructor arguments, so LightningCLI/jsonargparse can build
it from `class_path`/`init_args` or the short form `--method SparsyFed --method.sparsity 0.99`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from sparsyfed_lightning.checks import check_number
from sparsyfed_lightning.client.callbacks import ActivationPruningCallback, EndOfFitPruning
from sparsyfed_lightning.sparse import check_sparsity, layers_outside_authors_walk
from sparsyfed_lightning.sparse.layers import check_supported_layers


def layers_left_plain(net: nn.Module, wrap_downsample: bool) -> list[str]:
    """The layers a wrapping method leaves plain: those the authors' layer walk does not reach on the
    paper's ResNet-18s (its three 1x1 downsample convs, SPEC 3.2), none when `wrap_downsample`."""
    return [] if wrap_downsample else layers_outside_authors_walk(net)


class Method:
    """Base class: dense local training, no pruning, plain aggregation.

    Args:
        sparsity: target sparsity of the uplink model, in [0, 1).
        min_layer_density: end-of-fit pruning keeps at least this fraction of every layer (a guard
            against layer collapse at extreme sparsity; 0, the authors' behaviour, has no guard).
    """

    name: ClassVar[str] = "base"
    # Whether clients can be trained as one stacked network (`trainer.stack_clients`): every client
    # callback must treat the stacked clients separately (see `client.callbacks.stacked_clients`).
    supports_stacking: ClassVar[bool] = True

    def __init__(self, sparsity: float = 0.0, min_layer_density: float = 0.0) -> None:
        self.sparsity = check_sparsity(sparsity, "method.sparsity")
        check_number(min_layer_density, "method.min_layer_density", low=0.0)
        if not 0.0 <= min_layer_density < 1.0 - self.sparsity:
            raise ValueError(
                f"method.min_layer_density={min_layer_density!r} is invalid; it must be in "
                f"[0, 1 - sparsity = {1.0 - self.sparsity:g})"
            )
        self.min_layer_density = float(min_layer_density)
        self._callbacks: list[L.Callback] | None = None
        self.round = 0

    def prepare_model(self, net: nn.Module) -> nn.Module:
        """Wrap the freshly built backbone (once per run); returns the network to train.

        Subclasses that wrap the network call this first: it checks the layers (`check_model`).
        """
        self.check_model(net)
        return net

    def check_model(self, net: nn.Module) -> None:
        """Refuse, in one line, a network with layers this method cannot sparsify correctly."""
        check_supported_layers(net, self.name)

    def build_callbacks(self) -> list[L.Callback]:
        """The client-side callbacks of this method (called once; see `client_callbacks`)."""
        return [EndOfFitPruning(self.sparsity, self.min_layer_density)]

    def client_callbacks(self) -> list[L.Callback]:
        """The callbacks every client fit runs with; the same objects for the whole run."""
        if self._callbacks is None:
            self._callbacks = self.build_callbacks()
        return self._callbacks

    def client_stats(self, index: int = 0) -> dict[str, float]:
        """Per-client numbers of the last fit of stacked client `index`.

        Weight regrowth counts (SPEC 9.2) and, with activation pruning, `activation_overflows`.
        """
        stats: dict[str, float] = {}
        for callback in self.client_callbacks():
            if isinstance(callback, EndOfFitPruning):
                stats.update(callback.regrowth.stats[index])
            elif isinstance(callback, ActivationPruningCallback):
                stats["activation_overflows"] = callback.overflows[index]
        return stats

    def on_round_start(self, round_index: int) -> None:
        """Called before the clients of round `round_index` (1-based) train."""
        self.round = round_index

    def observe_client(self, round_index: int, state: dict[str, torch.Tensor], weight: float) -> None:
        """See each returned client model once, as it arrives (default: nothing)."""

    def server_update(self, round_index: int, aggregate: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Server-side rule applied to the aggregate before the server optimizer (default: none)."""
        return aggregate

    def on_global_loaded(self, net: nn.Module) -> None:
        """Called after the server loads a global state into `net` for evaluation."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this method exactly."""
        return {"round": self.round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state.get("round", 0))

    def describe(self) -> dict[str, Any]:
        """Name and settings, for logs and run directories."""
        return {"name": self.name, "sparsity": self.sparsity, "min_layer_density": self.min_layer_density}
