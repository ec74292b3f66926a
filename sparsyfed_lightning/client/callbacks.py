"""Lightning callbacks that carry each method's client-side behaviour.

Every callback is built once per run and reused by every client fit: `on_fit_start` re-reads the
freshly loaded global model (layer densities, masks, thresholds), so nothing carries over between
clients. They act on `pl_module.net` when the module has one (`ClientModule`), else on the module
itself (`network_of`), so they also serve a plain, non-federated Lightning fit (`client.sparse_training`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Literal

import lightning as L
import torch
from typing_extensions import override

from sparsyfed_lightning.models.stacked import client_slices
from sparsyfed_lightning.sparse import (
    ActivationPruning,
    WeightTopK,
    freeze_support,
    global_magnitude_prune,
    prunable_layers,
    prunable_weights,
    release_support,
    update_spectral_exponents,
)
from sparsyfed_lightning.sparse.activations import HEADROOM
from sparsyfed_lightning.sparse.masks import nonzero_masks, regrowth_counts
from sparsyfed_lightning.sparse.powerprop import FUSE_MAX_NUMEL

OVERFLOW_WARNING = (
    "activation pruning: a batch kept more activations above its threshold than its compact copy "
    "holds (a capacity of headroom x the expected count); the weight gradient of that step used the "
    "first ones only. The round metric activation_overflows counts these copies; see "
    "docs/PERFORMANCE.md."
)


def network_of(pl_module: L.LightningModule) -> torch.nn.Module:
    """The network the sparse callbacks act on: `pl_module.net` when it is a module, else `pl_module`."""
    net = getattr(pl_module, "net", None)
    return net if isinstance(net, torch.nn.Module) else pl_module


class CallbackGroup(L.Callback):
    """Several callbacks as one, for a Trainer that runs many short fits (the client fits).

    Lightning calls every hook of every callback at every step (six per training step), through a
    profiler context each; a method's callbacks implement only a few hooks, mostly at the start and
    the end of a fit. The group implements exactly the hooks its members implement and calls those
    members, in their order, so each other hook costs one empty call however many members there are.
    """

    def __init__(self, callbacks: Iterable[L.Callback]) -> None:
        self.callbacks = list(callbacks)
        for name in _HOOK_NAMES:
            base = getattr(L.Callback, name)
            members = [getattr(c, name) for c in self.callbacks if getattr(type(c), name) is not base]
            if members:
                setattr(self, name, _call_each(members))


_HOOK_NAMES = [n for n in dir(L.Callback) if n.startswith("on_") or n in ("setup", "teardown")]


def _call_each(hooks: list) -> object:
    def call(*args: object, **kwargs: object) -> None:
        for hook in hooks:
            hook(*args, **kwargs)

    return call


class ActivationPruningCallback(L.Callback):
    """Prune the activations saved for the weight gradient (SPEC 4; see `ActivationPruning`).

    Args:
        threshold: "first_batch" (faithful, conv thresholds frozen after a fit's first batch) or
            "per_step".
        keep_fraction: None to follow each layer's weight density (SparsyFed), or a fixed fraction
            (ZeroFL).
        refresh_every_step: re-read layer densities at every step (when zeros can regrow, beta = 1).
        skip_layers: layer names left unpruned (ZeroFL's dense stem).
        headroom: capacity of the compact copies as a multiple of the entries expected to be kept.

    After each fit, `overflows[i]` is the number of compact copies of stacked client `i` (0 when
    not stacked) that kept fewer entries than the threshold marked (see `ActivationPruning`).
    """

    def __init__(
        self,
        threshold: Literal["first_batch", "per_step"] = "first_batch",
        keep_fraction: float | None = None,
        refresh_every_step: bool = False,
        skip_layers: Iterable[str] = (),
        headroom: float = HEADROOM,
    ) -> None:
        self.threshold = threshold
        self.keep_fraction = keep_fraction
        self.refresh_every_step = refresh_every_step
        self.skip_layers = set(skip_layers)
        self.headroom = headroom
        self.pruning: ActivationPruning | None = None
        self.overflows: list[int] = [0]

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = network_of(pl_module)
        if self.pruning is None or self.pruning.model is not net:
            names = [n for n, _ in prunable_layers(net) if n not in self.skip_layers]
            self.pruning = ActivationPruning(
                net,
                threshold=self.threshold,
                keep_fraction=self.keep_fraction,
                refresh_every_step=self.refresh_every_step,
                layer_names=names,
                clients=stacked_clients(pl_module),
                headroom=self.headroom,
            )
        self.pruning.attach()  # reads this fit's layer densities; thresholds start afresh

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.pruning is not None:
            per_layer = self.pruning.take_overflows()  # the fit's one read of the device counters
            self.overflows = [sum(row[i] for row in per_layer.values()) for i in range(self.pruning.clients)]
            if any(self.overflows):
                warnings.warn(OVERFLOW_WARNING, stacklevel=2)
            self.pruning.detach()


class FrozenSupportCallback(L.Callback):
    """Compute Powerprop weights on their non-zeros only during a fit, the small layers fused (see
    `freeze_support`).

    A pure speed-up, exact because zeros of `v` stay zero while training with beta > 1.
    """

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A stacked layer holds every client's weights: fuse what each client would fuse alone.
        freeze_support(network_of(pl_module), FUSE_MAX_NUMEL * stacked_clients(pl_module))

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        release_support(network_of(pl_module))


class WeightTopKCallback(L.Callback):
    """ZeroFL's SWAT weight Top-K in every training forward (SPEC 12.3)."""

    def __init__(self, sparsity: float, skip_layers: Iterable[str] = ()) -> None:
        self.sparsity = sparsity
        self.skip_layers = set(skip_layers)
        self.topk: WeightTopK | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = network_of(pl_module)
        if self.topk is None or self.topk.model is not net:
            names = [n for n, _ in prunable_layers(net) if n not in self.skip_layers]
            self.topk = WeightTopK(net, self.sparsity, layer_names=names, clients=stacked_clients(pl_module))
        self.topk.attach()

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.topk is not None:
            self.topk.detach()


class GradientMaskCallback(L.Callback):
    """FLASH: freeze the support of the received model by masking every gradient (SPEC 12.4).

    The mask is `param != 0` for every parameter at the start of the fit; with weight decay a
    masked weight stays 0 because its decay term is 0 too.
    """

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.masks = [p.detach() != 0 for p in pl_module.parameters()]

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for p, mask in zip(pl_module.parameters(), self.masks, strict=True):
            if p.grad is not None:
                p.grad.mul_(mask)


class SpectralExponentCallback(L.Callback):
    """Recompute every Powerprop layer's spectral exponent when a fit starts (SPEC 10)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        update_spectral_exponents(network_of(pl_module), self.seed, stacked_clients(pl_module))


class RegrowthStats:
    """Activated/deactivated counts of each client against the model it received (SPEC 9.2).

    `stats[i]` holds the counts of stacked client `i` (`models.stacked`); `stats[0]` when not stacked.
    """

    def __init__(self) -> None:
        self.reference: dict[str, torch.Tensor] = {}
        self.stats: list[dict[str, int]] = [{}]

    def snapshot(self, module: torch.nn.Module, clients: int = 1) -> None:
        self.reference = nonzero_masks(dict(module.named_parameters()))
        self.stats = [{} for _ in range(clients)]

    def measure(self, module: torch.nn.Module, prefix: str) -> None:
        params = dict(module.named_parameters())
        clients = len(self.stats)
        for i, stats in enumerate(self.stats):
            activated, deactivated = regrowth_counts(
                _client_part(self.reference, i, clients), _client_part(params, i, clients)
            )
            stats[f"{prefix}_activated"] = activated
            stats[f"{prefix}_deactivated"] = deactivated


def _client_part(tensors: dict[str, torch.Tensor], index: int, clients: int) -> dict[str, torch.Tensor]:
    """Stacked client `index`'s part of every tensor (the tensors themselves when not stacked)."""
    if clients == 1:
        return tensors
    return {key: client_slices(t, clients)[index] for key, t in tensors.items()}


def stacked_clients(pl_module: L.LightningModule) -> int:
    """How many clients the module's network stacks (1: an ordinary network)."""
    return getattr(pl_module, "stacked_clients", 1)


class EndOfFitPruning(L.Callback):
    """Global magnitude pruning of the local model's stored conv/linear weights (SPEC 5).

    Also measures weight regrowth against the received model after training and after pruning over
    all parameters (SPEC 9.2): `after_training_activated`, `after_pruning_deactivated`, ...
    `min_layer_density` > 0 guards every layer against collapse (not the authors' behaviour).
    """

    def __init__(self, sparsity: float, min_layer_density: float = 0.0) -> None:
        self.sparsity = sparsity
        self.min_layer_density = min_layer_density
        self.regrowth = RegrowthStats()

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.regrowth.snapshot(network_of(pl_module), stacked_clients(pl_module))

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = network_of(pl_module)
        self.regrowth.measure(net, "after_training")
        if self.sparsity > 0:
            weights = list(prunable_weights(net).values())
            clients = stacked_clients(pl_module)
            # Each stacked client prunes its own model, exactly as it would alone.
            for parts in zip(*(client_slices(w, clients) for w in weights), strict=True):
                global_magnitude_prune(parts, self.sparsity, self.min_layer_density)
        self.regrowth.measure(net, "after_pruning")
