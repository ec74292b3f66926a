"""`ClientRunner`: fits one client with Lightning, the same way on every engine.

One `ClientModule` and one inner `lightning.Trainer` serve every client of a run: each fit loads
the received global state, sets the round's learning rate and raises `fit_loop.max_epochs` by the
number of local epochs (the Trainer-reuse pattern NVFlare uses). A fresh Trainer per client costs
about 2.6x a plain PyTorch loop on GPU (DESIGN.md); reuse removes the construction and most setup.
The fitting Trainer runs in Lightning's barebones mode (no logging, progress bar, checkpointing or
model summary machinery in the step: measured here, 1.17x a plain loop's step instead of 1.35x with
those features merely switched off), and unless gradient clipping, accumulation or a subclass
overriding a step of Lightning's automatic optimization loop needs that loop, the module steps its
optimizer itself (`automatic_optimization = False`: the same zero-grad, backward and step, with the
same hooks, minus the closure machinery, about 0.1 ms a batch); evaluation, which logs its metrics, has its own Trainer.

Client stacking (`fit_stacked`): clients whose loaders yield the same batch sizes can be fitted
together as one stacked network (`models.stacked`) by a second module and Trainer, built once per
number of clients. Each client keeps its own data order, keep fractions, thresholds and end-of-fit
pruning, so the result is the sequential one up to floating-point rounding (grouped convolutions
add in another order).

Determinism: before each fit the global RNGs are seeded from (seed, round, client) and the client's
loader shuffles with the same seed, so a client's update is a pure function of what it received.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from sparsyfed_lightning.client.callbacks import CallbackGroup
from sparsyfed_lightning.client.module import ClientModule
from sparsyfed_lightning.data.loaders import StackedBatchLoader
from sparsyfed_lightning.federated import ddp
from sparsyfed_lightning.federated.codec import MessageStats, decode_state, encode_state_with_stats
from sparsyfed_lightning.federated.ddp import ShardedBatchLoader
from sparsyfed_lightning.federated.errors import NonFiniteError
from sparsyfed_lightning.methods.base import Method
from sparsyfed_lightning.models.stacked import stack_network, stack_states, stacking_mismatch, unstack_state

# Lightning repeats these on every fit of a reused Trainer; they say nothing about a client fit.
_QUIET_WARNINGS = (
    ".*defined a `validation_step` but have no `val_dataloader`.*",
    ".*does not have many workers.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    ".*The number of training batches .* is smaller than the logging interval.*",
    ".*Experiment logs directory .* exists and is not empty.*",
    # Under DDP every rank evaluates the whole test set alone: nothing to synchronise.
    ".*It is recommended to use `self.log\\('val_.*sync_dist=True.*",
)


def quiet_lightning() -> None:
    """Silence Lightning's per-fit info lines and repeated warnings for the client Trainer."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


# LightningModule methods of the automatic optimization loop: a `ClientModule` subclass that
# overrides one of them keeps that loop for its fits (see `ClientRunner._needs_automatic_optimization`).
AUTOMATIC_LOOP_HOOKS = ("training_step", "optimizer_step", "optimizer_zero_grad", "on_before_zero_grad")


@dataclass
class ClientResult:
    """What a client sends back: the encoded model and a few numbers."""

    cid: int
    num_samples: int
    payload: bytes
    uplink: MessageStats
    metrics: dict[str, float] = field(default_factory=dict)


def state_on_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class ClientRunner:
    """Fits clients on one `ClientModule` with one reused inner Trainer.

    Args:
        module: the client LightningModule (its `net` already prepared by the method).
        method: the method whose client callbacks run in every fit.
        local_epochs: epochs per client fit.
        eval_trainer_kwargs: the evaluation Trainer's device arguments when they differ from the
            fits' (DDP fits run on every rank's device; each rank evaluates on its own device).
        trainer_kwargs: passed to the inner `lightning.Trainer` (accelerator, devices, precision...).
            With `strategy="ddp"` every fit is data-parallel over the ranks (`ddp.py`): each rank
            takes its share of every batch, and BatchNorm statistics and the loss are averaged.
    """

    def __init__(
        self,
        module: ClientModule,
        method: Method,
        local_epochs: int = 1,
        eval_trainer_kwargs: dict[str, Any] | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        quiet_lightning()
        self.module = module
        self.method = method
        self.local_epochs = local_epochs
        self.trainer_kwargs = trainer_kwargs
        self.distributed = trainer_kwargs.get("strategy") == "ddp"
        self.trainer = self._fit_trainer()
        self._stacked: dict[int, tuple[ClientModule, L.Trainer]] = {}
        self._stacking_refused: str | None = None
        self._stacking_checked = False  # whether `stacking_mismatch` has run on real inputs
        self._plain_net: torch.nn.Module | None = None
        eval_kwargs = {**trainer_kwargs, **(eval_trainer_kwargs or {})}
        eval_kwargs.pop("sync_batchnorm", None)
        if self.distributed:
            eval_kwargs.pop("strategy")
        self.eval_trainer = L.Trainer(
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **eval_kwargs,
        )

    def _fit_trainer(self) -> L.Trainer:
        callbacks = [CallbackGroup(self.method.client_callbacks())]
        return L.Trainer(max_epochs=0, barebones=True, callbacks=callbacks, **self.trainer_kwargs)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Load a global state into the module's network."""
        self.module.net.load_state_dict(state)

    def fit(
        self, cid: int, global_state: dict[str, torch.Tensor], loader: Any, lr: float, seed: int
    ) -> ClientResult:
        """Train client `cid` from `global_state`; return its encoded model (the uplink message)."""
        self.load(global_state)
        if not self.distributed:
            self._fit_epochs(self.module, self.trainer, loader, lr, seed)
            loss = self.module.mean_train_loss()
        else:
            shard = ShardedBatchLoader(loader, ddp.local_rank(), ddp.world_size())
            self._fit_epochs(self.module, self.trainer, shard, lr, seed)
            ddp.average_buffers(self.module.net)  # BatchNorm statistics of each rank's share: the ranks' mean
            loss = ddp.mean_over_ranks(self.module.mean_train_loss())
        return self._result(cid, 0, state_on_cpu(self.module.net), loader.num_samples, loss)

    def _fit_epochs(self, module: ClientModule, trainer: L.Trainer, loader: Any, lr: float, seed: int) -> None:
        """Run `local_epochs` more epochs of `module` on its reused `trainer`, from a seeded start."""
        module.lr = lr
        module.automatic_optimization = self._needs_automatic_optimization(module)
        L.seed_everything(seed, verbose=False)
        trainer.fit_loop.max_epochs = trainer.current_epoch + self.local_epochs
        try:
            trainer.fit(module, train_dataloaders=loader)
        finally:  # the module leaves the fit as it came (a later plain Trainer may clip gradients)
            module.automatic_optimization = True

    def _needs_automatic_optimization(self, module: ClientModule) -> bool:
        """Whether a fit needs Lightning's automatic optimization loop rather than the lean step.

        The lean step (`ClientModule.training_step`) is the same arithmetic with less Python per
        batch; gradient clipping and accumulation are features of the automatic loop only, and a
        subclass that overrides a step of that loop (`AUTOMATIC_LOOP_HOOKS`) expects it to run.
        """
        accumulate = self.trainer_kwargs.get("accumulate_grad_batches", 1)
        overridden = any(
            getattr(type(module), name) is not getattr(ClientModule, name) for name in AUTOMATIC_LOOP_HOOKS
        )
        return bool(self.trainer_kwargs.get("gradient_clip_val") or accumulate != 1 or overridden)

    def _result(
        self, cid: int, index: int, state: dict[str, torch.Tensor], num_samples: int, train_loss: float
    ) -> ClientResult:
        """The uplink message of a trained client (`index`: its place in a stacked fit, else 0).

        A state with NaN or Inf (a diverged client) raises `NonFiniteError`: it is a client failure,
        never something to aggregate.
        """
        bad = first_non_finite(state)
        if bad is not None:
            raise NonFiniteError(f"its update has non-finite values (NaN/Inf) in {bad}")
        payload, stats = encode_state_with_stats(state)
        metrics = {"train_loss": train_loss, **self.method.client_stats(index)}
        return ClientResult(cid, num_samples, payload, stats, metrics)

    def fit_stacked(
        self, cids: list[int], global_state: dict[str, torch.Tensor], loaders: list[Any], lr: float, seeds: list[int]
    ) -> list[ClientResult | NonFiniteError]:
        """Train clients `cids` together as one stacked network; their loaders must share a batch layout.

        `seeds[i]` is client i's seed, as `fit` takes it: its loader's shuffling and its transform's
        random draws follow it (`StackedBatchLoader`). The global RNGs are seeded with the first;
        models that draw from them while training (dropout) therefore draw differently than alone.
        Stacked clients are independent, so a client that diverges (NaN/Inf) fails alone: its entry
        is the `NonFiniteError` instead of a result.
        """
        if not self.method.supports_stacking:
            raise ValueError(f"method {self.method.name!r} cannot train stacked clients")
        if not self.can_stack(loaders[0]):  # the model's forward mixes stacked clients: train them alone
            return [
                self.fit(cid, global_state, loader, lr, seed)
                for cid, loader, seed in zip(cids, loaders, seeds, strict=True)
            ]
        module, trainer = self._stacked_module(len(cids))
        module.net.load_state_dict(stack_states([global_state] * len(cids), module.net.state_dict()))
        self._fit_epochs(module, trainer, StackedBatchLoader(loaders, seeds), lr, seeds[0])
        states = unstack_state(state_on_cpu(module.net), len(cids), global_state)
        losses = module.mean_train_losses()
        results: list[ClientResult | NonFiniteError] = []
        for index, (cid, state, loader) in enumerate(zip(cids, states, loaders, strict=True)):
            try:
                results.append(self._result(cid, index, state, loader.num_samples, losses[index]))
            except NonFiniteError as error:
                results.append(error)
        return results

    def request_stop(self) -> None:
        """Make a running client fit or evaluation stop after its current batch (a stop signal arrived).

        Uses Lightning's own flag, which its loops check at batch boundaries (they raise
        `SIGTERMException`, a `SystemExit`).
        """
        trainers = [self.trainer, self.eval_trainer, *(trainer for _, trainer in self._stacked.values())]
        for trainer in trainers:
            trainer._signal_connector.received_sigterm = True

    def can_stack(self, loader: Any = None) -> bool:
        """Whether `fit_stacked` is available: the method supports it and the model's layers stack.

        Gradient clipping rules it out: the norm would be taken over all stacked clients together;
        so does DDP (its use is few clients with much data, where stacking has nothing to gain).
        Given a client `loader` (and at the first stacked fit), it also checks on a few of its
        inputs that the model's forward keeps stacked clients apart (`stacking_mismatch`).
        """
        if not self.method.supports_stacking or self.trainer_kwargs.get("gradient_clip_val") or self.distributed:
            return False
        if self._stacking_refused is None:
            try:
                stack_network(self._plain_network(), 1)  # refuses unsupported layer types
                self._stacking_refused = ""
            except ValueError as error:  # a layer type stacking cannot split per client
                self._stacking_refused = str(error)
        if not self._stacking_refused and not self._stacking_checked and loader is not None:
            sample = _sample_inputs(loader, 4)
            if sample is not None:
                self._stacking_refused = stacking_mismatch(self._plain_network(), sample) or ""
                self._stacking_checked = True
        return not self._stacking_refused

    def forward_flops(self, loader: Any) -> int | None:
        """FLOPs of one forward pass of the client network on a full batch of `loader` (None: unknown).

        Reads the batch shape without iterating, so the loader's shuffling is left untouched.
        """
        batch_size = getattr(loader, "batch_size", None)
        sample = _sample_inputs(loader, 1)
        if sample is None or not batch_size:
            return None
        sample = torch.zeros(batch_size, *sample.shape[1:], dtype=torch.float32)
        net = self._plain_network()
        try:
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                net(sample)
        except Exception:  # noqa: BLE001 - e.g. a transform changes the shape: the cost stays unknown
            return None
        return counter.get_total_flops()

    def _plain_network(self) -> torch.nn.Module:
        """The client backbone before the method's wrapping, in eval mode, built once (never trained).

        `stack_network` copies it, so it stays as built; it serves the stacking checks and FLOP count.
        """
        if self._plain_net is None:
            self._plain_net = ClientModule(**self.module.hparams).net.eval()
        return self._plain_net

    def _stacked_module(self, clients: int) -> tuple[ClientModule, L.Trainer]:
        """The module stacking `clients` copies of the client network, and its Trainer (built once)."""
        if clients not in self._stacked:
            module = ClientModule(**self.module.hparams)
            # The copy inherits the plain network's eval mode; a fit needs it in training mode.
            module.net = self.method.prepare_model(stack_network(self._plain_network(), clients).train())
            module.stacked_clients = clients
            self._stacked[clients] = (module, self._fit_trainer())
        return self._stacked[clients]

    def evaluate(self, global_state: dict[str, torch.Tensor], loader: Any) -> dict[str, float]:
        """Loss and accuracy of `global_state` on `loader` (eval mode: no activation pruning)."""
        self.load(global_state)
        self.method.on_global_loaded(self.module.net)
        results = self.eval_trainer.validate(self.module, dataloaders=loader, verbose=False)
        return {"test_loss": float(results[0]["val_loss"]), "test_accuracy": float(results[0]["val_accuracy"])}


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The key of the first floating entry of `state` holding NaN or Inf, or None."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return key
    return None


def _sample_inputs(loader: Any, rows: int) -> torch.Tensor | None:
    """The first `rows` inputs a `TensorBatchLoader` covers, as float32 on the CPU (None: not such a loader).

    Read without iterating, so the loader's shuffling is left untouched.
    """
    inputs, indices = getattr(loader, "inputs", None), getattr(loader, "indices", None)
    if not isinstance(inputs, torch.Tensor) or inputs.shape[0] == 0:
        return None
    selected = inputs[indices[:rows]] if isinstance(indices, torch.Tensor) else inputs[:rows]
    return selected.detach().to("cpu", torch.float32)


def decode_result(result: ClientResult) -> dict[str, torch.Tensor]:
    """The client's state, decoded from its message (what the server aggregates)."""
    return decode_state(result.payload)
