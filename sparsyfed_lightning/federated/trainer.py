"""`FederatedTrainer`: a `lightning.Trainer` whose `fit` runs federated rounds.

LightningCLI accepts only a `Trainer` subclass as `trainer_class`; its extra typed keyword
arguments (rounds, clients per round, method, server optimizer, ...) are parsed from the config like
any Trainer argument. `fit(model, datamodule=...)` runs the round loop:

    sample -> broadcast (encoded) -> fit each client with Lightning -> prune/encode uplink ->
    aggregate (sample-weighted, every state entry) -> method server rule -> server optimizer ->
    evaluate on the central test set (round 0, every `eval_every` rounds, the last round) -> log.

Client fits run on an inner, quiet `lightning.Trainer` reused for every client (see
`ClientRunner`); this Trainer's own `logger` receives one row of metrics per round. With a
`run_dir`, every round is also appended to `run_dir/metrics.jsonl`, a checkpoint is written
atomically every `checkpoint_every` rounds and at the end, and the final global model is saved as
`run_dir/global_model.pt`. `fit(..., ckpt_path=run_dir/checkpoint.pt)` resumes exactly.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from sparsyfed_lightning.client.module import ClientModule
from sparsyfed_lightning.federated.checkpoint import load_checkpoint, save_atomic
from sparsyfed_lightning.federated.client_runner import ClientRunner, quiet_lightning, state_on_cpu
from sparsyfed_lightning.federated.engines import InProcessEngine
from sparsyfed_lightning.federated.engines_flower import FlowerConfig, require_flower
from sparsyfed_lightning.federated.progress import ProgressMode, RoundProgress
from sparsyfed_lightning.federated.sampling import ClientSampler, UniformSampler
from sparsyfed_lightning.federated.schedule import exponential_lr
from sparsyfed_lightning.federated.server import FederatedServer
from sparsyfed_lightning.federated.snapshots import save_mask_snapshot
from sparsyfed_lightning.methods.base import Method
from sparsyfed_lightning.methods.sparsyfed import SparsyFed
from sparsyfed_lightning.server.optimizers import FedAvg, ServerOptimizer
from sparsyfed_lightning.sparse import prunable_weights

# Trainer arguments that also shape a client fit (the rest - logger, callbacks, ... - are the
# federated run's own).
_CLIENT_TRAINER_KEYS = (
    "accelerator",
    "strategy",
    "devices",
    "num_nodes",
    "precision",
    "deterministic",
    "benchmark",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "accumulate_grad_batches",
    "limit_train_batches",
)
# `stack_clients: auto`. On a GPU stacking pays (DESIGN.md: ResNet-18, 10 clients, 5x faster on an
# H200). On a CPU grouped convolutions run slower than plain ones, which only the per-step overhead
# saved makes up for on small steps: measured here (2 cores, 10 clients stacked against one after
# the other), small_cnn at batch 16 took 0.75x the time at 8x8 inputs (57 MFLOP per forward pass),
# 0.95x at 12x12 (129 MFLOP), 1.23x at 16x16 (229 MFLOP), 1.51x at 32x32; logmel_cnn 1.74x,
# resnet18_cifar 1.3x.
AUTO_STACK_CLIENTS = 10
STACK_ON_CPU_BELOW_FLOPS = 100e6
CHECKPOINT_NAME = "checkpoint.pt"
FINAL_MODEL_NAME = "global_model.pt"
METRICS_NAME = "metrics.jsonl"


class FederatedTrainer(L.Trainer):
    """Runs federated rounds; every other Trainer argument is passed to Lightning.

    Args:
        method: the federated method (default `SparsyFed()`: 95% sparsity, beta 1.25).
        server_optimizer: applied to the pseudo-gradient (default `FedAvg()`).
        rounds: number of federated rounds.
        clients_per_round: clients sampled per round.
        local_epochs: local epochs per client fit.
        lr_final: client learning rate reached at round `lr_decay_rounds` with exponential decay
            from the model's `lr` (SPEC 4.4); None keeps the learning rate constant.
        lr_decay_rounds: T of the decay (default: `rounds`).
        eval_every: evaluate the global model every this many rounds (and at rounds 0 and last).
        sampler: client sampler (default uniform without replacement, seeded by `seed`).
        seed: seed of sampling and of every client's local training.
        accept_failures: continue a round when clients fail (else the run stops at the first).
        min_successful_clients: fewest successful clients a round needs when failures are accepted.
        iou_lag: rounds between pooled lagged mask-IoU snapshots (SPEC 9.3: 11; 0 disables).
        run_dir: folder for metrics.jsonl, checkpoints and the final model (None: keep in memory).
        checkpoint_every: write a checkpoint every this many rounds (0: only at the end).
        mask_snapshot_every: save the global mask (bit-packed) to `run_dir/masks/` every this many
            rounds, for the IoU heat-map of `sparsyfed plot` (0: about 20 snapshots per run).
        optimizer_on_buffers: the server optimizer also steps BatchNorm buffers (faithful: True);
            False gives them the plain weighted average (safer with momentum/adaptive optimizers).
        engine: "inprocess" (default) or "flower" (docs/FLOWER.md).
        stack_clients: train up to this many of a round's clients at once, as one network with
            grouped convolutions, when their loaders yield the same batch sizes (the paper's LDA
            partitions have equal sizes); 1 trains each client alone. The result is the same up to
            floating-point rounding; a round is faster wherever steps are overhead-bound, slower
            where grouped convolutions are less efficient than plain ones (large steps on a CPU).
            "auto" (default): 10 on a GPU, and on a CPU 10 when one client step's forward pass costs
            under `STACK_ON_CPU_BELOW_FLOPS`, else 1 (docs/PERFORMANCE.md). Clients train alone
            anyway for zerofl and sparsyfed_spectral, for models with layers that cannot be
            stacked, with gradient clipping, and on the Flower engine.
        flower: options of the Flower engine (client resources, routing, timeouts).
        progress: "auto" (a bar on a terminal, lines otherwise), "rich", "plain" or "none".
    """

    def __init__(
        self,
        *,
        method: Method | None = None,
        server_optimizer: ServerOptimizer | None = None,
        rounds: int = 10,
        clients_per_round: int = 10,
        local_epochs: int = 1,
        lr_final: float | None = None,
        lr_decay_rounds: int | None = None,
        eval_every: int = 1,
        sampler: ClientSampler | None = None,
        seed: int = 0,
        accept_failures: bool = False,
        min_successful_clients: int = 1,
        iou_lag: int = 11,
        run_dir: str | None = None,
        checkpoint_every: int = 0,
        mask_snapshot_every: int = 0,
        optimizer_on_buffers: bool = True,
        engine: Literal["inprocess", "flower"] = "inprocess",
        stack_clients: int | Literal["auto"] = "auto",
        flower: FlowerConfig | None = None,
        progress: ProgressMode = "auto",
        **kwargs: Any,
    ) -> None:
        for name, value, minimum in (
            ("rounds", rounds, 1),
            ("clients_per_round", clients_per_round, 1),
            ("local_epochs", local_epochs, 1),
            ("eval_every", eval_every, 1),
            ("min_successful_clients", min_successful_clients, 1),
            ("iou_lag", iou_lag, 0),
            ("checkpoint_every", checkpoint_every, 0),
            ("mask_snapshot_every", mask_snapshot_every, 0),
        ):
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"trainer.{name} must be an integer >= {minimum}, got {value!r}")
        if lr_final is not None and not (math.isfinite(lr_final) and lr_final > 0):
            raise ValueError(f"trainer.lr_final must be > 0 or null, got {lr_final!r}")
        if lr_decay_rounds is not None and lr_decay_rounds < 1:
            raise ValueError(f"trainer.lr_decay_rounds must be >= 1 or null, got {lr_decay_rounds!r}")
        if engine not in ("inprocess", "flower"):
            raise ValueError(f"trainer.engine must be 'inprocess' or 'flower', got {engine!r}")
        if engine == "flower":
            require_flower()
        if stack_clients != "auto" and (not isinstance(stack_clients, int) or stack_clients < 1):
            raise ValueError(f"trainer.stack_clients must be 'auto' or an integer >= 1, got {stack_clients!r}")
        self.method = method if method is not None else SparsyFed()
        self.stack_clients = stack_clients
        self.server_optimizer = server_optimizer if server_optimizer is not None else FedAvg()
        self.rounds = rounds
        self.clients_per_round = clients_per_round
        self.local_epochs = local_epochs
        self.lr_final = lr_final
        self.lr_decay_rounds = lr_decay_rounds
        self.eval_every = eval_every
        self.sampler = sampler if sampler is not None else UniformSampler(seed)
        self.seed = seed
        self.accept_failures = accept_failures
        self.min_successful_clients = min_successful_clients
        self.iou_lag = iou_lag
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.mask_snapshot_every = mask_snapshot_every
        self.engine_name = engine
        self.flower = flower if flower is not None else FlowerConfig()
        self.optimizer_on_buffers = optimizer_on_buffers
        self.progress_mode = progress
        # A client fit runs on one device (see _check_one_device), so "auto" means one device here
        # instead of every visible GPU.
        if kwargs.get("devices", "auto") == "auto":
            kwargs["devices"] = 1
        self.client_trainer_kwargs = {k: kwargs[k] for k in _CLIENT_TRAINER_KEYS if k in kwargs}
        # The round loop logs, checkpoints and reports progress itself; Lightning's own versions of
        # these belong to single fits. None (what LightningCLI passes for "unset") means off too.
        for key in ("logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary"):
            if kwargs.get(key) is None:
                kwargs[key] = False
        quiet_lightning()
        super().__init__(**kwargs)
        self._check_one_device()
        self.history: list[dict[str, Any]] = []
        self.server: FederatedServer | None = None
        self.runner: ClientRunner | None = None

    # -- public entry points ---------------------------------------------------------------------
    def fit(  # type: ignore[override]
        self,
        model: ClientModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: Any = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
    ) -> None:
        """Run the federated rounds on `datamodule` (a `FederatedDataModule`)."""
        if datamodule is None:
            raise ValueError("FederatedTrainer.fit needs datamodule=FederatedDataModule(...)")
        self.check_datamodule(datamodule)
        datamodule.setup("fit")
        self._prepare(model)
        server, runner = self.server, self.runner
        assert server is not None and runner is not None
        engine = self._build_engine(runner, datamodule)
        try:
            start = 1
            if ckpt_path is not None:
                start = self._restore(ckpt_path) + 1
            else:
                self.history = []
                self._record(self._evaluate({"round": 0}, datamodule))
            with RoundProgress(self.rounds, start=start - 1, mode=self.progress_mode) as progress:
                for round_index in range(start, self.rounds + 1):
                    metrics = self._run_round(round_index, engine, datamodule)
                    self._record(metrics)
                    progress.update(metrics)
                    if self.run_dir is not None and (
                        round_index == self.rounds
                        or (self.checkpoint_every and round_index % self.checkpoint_every == 0)
                    ):
                        self.save_checkpoint(self.run_dir / CHECKPOINT_NAME)
        finally:
            if hasattr(engine, "close"):  # the Flower engine stops its simulation, also on errors
                engine.close()
        model.net.load_state_dict(server.global_state)
        if self.run_dir is not None:
            save_atomic(server.global_state, self.run_dir / FINAL_MODEL_NAME)

    def validate(self, model: Any = None, dataloaders: Any = None, ckpt_path: str | None = None,  # type: ignore[override]
                 verbose: bool = True, datamodule: Any = None, weights_only: bool | None = None) -> list[dict]:
        """Evaluate a saved global model (`ckpt_path`: a checkpoint or final model file) on the test set."""
        return self._evaluate_saved(model, datamodule, ckpt_path, verbose)

    def test(self, model: Any = None, dataloaders: Any = None, ckpt_path: str | None = None,  # type: ignore[override]
             verbose: bool = True, datamodule: Any = None, weights_only: bool | None = None) -> list[dict]:
        """Same as `validate`: the central test set is the only held-out set."""
        return self._evaluate_saved(model, datamodule, ckpt_path, verbose)

    def check_datamodule(self, datamodule: Any) -> None:
        """Reject a data module the run cannot sample from (needs only its configuration)."""
        if self.clients_per_round > datamodule.num_clients:
            raise ValueError(
                f"trainer.clients_per_round={self.clients_per_round} is invalid; it must be <= "
                f"data.num_clients={datamodule.num_clients}"
            )

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        """The current global model state (CPU tensors)."""
        if self.server is None:
            raise RuntimeError("no federated run yet: call fit() first")
        return self.server.global_state

    def save_checkpoint(self, filepath: str | Path, weights_only: bool = False, storage_options: Any = None) -> None:  # type: ignore[override]
        """Atomically write everything a resumed run needs."""
        assert self.server is not None
        save_atomic(
            {
                "format": "sparsyfed-lightning/1",
                "server": self.server.state_dict(),
                "history": self.history,
                "settings": self.settings(),
            },
            filepath,
        )

    def settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        return {
            "method": self.method.describe(),
            "server_optimizer": repr(self.server_optimizer),
            "rounds": self.rounds,
            "clients_per_round": self.clients_per_round,
            "local_epochs": self.local_epochs,
            "lr_final": self.lr_final,
            "seed": self.seed,
            "optimizer_on_buffers": self.optimizer_on_buffers,
        }

    # -- internals -------------------------------------------------------------------------------
    def _check_one_device(self) -> None:
        # Lightning's multi-device strategies cannot serve a client fit: DDP's launcher re-runs the
        # whole script (every rank would run the federated loop), and the client loaders are in-memory
        # `TensorBatchLoader`s, not DataLoaders Lightning could shard, so every rank would train on the
        # whole client partition. Several GPUs are used by training several clients in parallel.
        if self.num_devices > 1 or self.num_nodes > 1:
            raise ValueError(
                f"trainer.devices={self.num_devices} (num_nodes={self.num_nodes}) is not supported: each client's "
                "fit runs on one device (Lightning's DDP would re-launch the federated loop in every rank and "
                "cannot shard the in-memory client loaders); use devices=1, and engine='flower' with "
                "flower.num_gpus per client to train clients in parallel on several GPUs"
            )

    def _prepare(self, model: ClientModule) -> None:
        if not getattr(model, "_federated_prepared", False):
            model.net = self.method.prepare_model(model.net)
            model._federated_prepared = True  # type: ignore[attr-defined]
        self.runner = ClientRunner(model, self.method, self.local_epochs, **self.client_trainer_kwargs)
        global_state = state_on_cpu(model.net)
        self.server = FederatedServer(
            global_state,
            list(prunable_weights(model.net)),
            self.method,
            self.server_optimizer,
            iou_lag=self.iou_lag,
            buffer_keys=[name for name, _ in model.net.named_buffers()],
            optimizer_on_buffers=self.optimizer_on_buffers,
        )

    def _build_engine(self, runner: ClientRunner, datamodule: Any) -> Any:
        if self.engine_name == "flower":
            from sparsyfed_lightning.federated.engines_flower import FlowerEngine

            return FlowerEngine(self, datamodule)
        return InProcessEngine(runner, datamodule, self.seed, self._clients_per_stacked_fit(runner, datamodule))

    def _clients_per_stacked_fit(self, runner: ClientRunner, datamodule: Any) -> int:
        """`stack_clients` with "auto" resolved; 1 where stacking is unavailable (see its doc)."""
        if not runner.can_stack():
            return 1
        if self.stack_clients != "auto":
            return self.stack_clients
        if runner.trainer.strategy.root_device.type != "cpu":
            return AUTO_STACK_CLIENTS
        try:
            flops = runner.forward_flops(datamodule.client_train_dataloader(0))
        except Exception:  # noqa: BLE001 - a client that cannot load fails in its round, not here
            flops = None
        return AUTO_STACK_CLIENTS if flops is not None and flops < STACK_ON_CPU_BELOW_FLOPS else 1

    def _client_lr(self, round_index: int, model: ClientModule) -> float:
        total = self.lr_decay_rounds if self.lr_decay_rounds is not None else self.rounds
        return exponential_lr(round_index, model.hparams.lr, self.lr_final, total)

    def _run_round(self, round_index: int, engine: Any, datamodule: Any) -> dict[str, Any]:
        server, runner = self.server, self.runner
        assert server is not None and runner is not None
        started = time.perf_counter()
        downlink = server.begin_round(round_index)
        clients = self.sampler.sample(round_index, datamodule.num_clients, self.clients_per_round)
        lr = self._client_lr(round_index, runner.module)
        failures = engine.fit_round(round_index, clients, downlink, lr, server.receive)
        succeeded = len(clients) - len(failures)
        if failures and not self.accept_failures:
            cid, error = next(iter(failures.items()))
            raise RuntimeError(f"round {round_index}: client {cid} failed ({error}); set "
                               f"trainer.accept_failures=true to continue without it")
        if succeeded < self.min_successful_clients:
            raise RuntimeError(
                f"round {round_index}: only {succeeded} of {len(clients)} clients succeeded, fewer than "
                f"trainer.min_successful_clients={self.min_successful_clients}; failures: {failures}"
            )
        trained = time.perf_counter()
        metrics = server.end_round()
        aggregated = time.perf_counter()
        metrics.update(round=round_index, lr=lr, clients=clients, failures=failures)
        metrics["stacked_clients"] = getattr(engine, "largest_fit", 1)
        metrics["time_train_s"] = trained - started
        metrics["time_aggregate_s"] = aggregated - trained
        if round_index % self.eval_every == 0 or round_index == self.rounds:
            self._evaluate(metrics, datamodule)
        return metrics

    def _evaluate(self, metrics: dict[str, Any], datamodule: Any) -> dict[str, Any]:
        assert self.server is not None and self.runner is not None
        started = time.perf_counter()
        metrics.update(self.runner.evaluate(self.server.global_state, datamodule.test_dataloader()))
        metrics["time_eval_s"] = time.perf_counter() - started
        if metrics["round"] == 0:
            metrics.update(self.server.model_metrics())
        return metrics

    def _log_to_loggers(self, metrics: dict[str, Any]) -> None:
        numeric = {
            k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "round"
        }
        for logger in self.loggers:
            logger.log_metrics(numeric, step=metrics["round"])
            logger.save()

    def _record(self, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)
        self._log_to_loggers(metrics)
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / METRICS_NAME, "a") as handle:
            handle.write(json.dumps(metrics, default=_json_default) + "\n")
        every = self.mask_snapshot_every or max(1, self.rounds // 20)
        round_index = metrics["round"]
        if round_index % every == 0 or round_index == self.rounds:
            assert self.server is not None
            masks = {key: mask.cpu().numpy() for key, mask in self.server.current_masks().items()}
            save_mask_snapshot(masks, self.run_dir / "masks" / f"round_{round_index:05d}.npz")

    def _restore(self, ckpt_path: str) -> int:
        assert self.server is not None
        checkpoint = load_checkpoint(ckpt_path)
        if checkpoint.get("format") != "sparsyfed-lightning/1":
            raise ValueError(f"{ckpt_path} is not a sparsyfed-lightning checkpoint")
        saved, current = checkpoint["settings"], self.settings()
        differing = {k: (saved.get(k), v) for k, v in current.items() if k != "rounds" and saved.get(k) != v}
        if differing:
            key, (old, new) = next(iter(differing.items()))
            raise ValueError(f"cannot resume {ckpt_path}: trainer.{key} is {new!r} but the run used {old!r}")
        self.server.load_state_dict(checkpoint["server"])
        self.history = checkpoint["history"]
        for metrics in self.history:  # loggers that restart their files get the whole history again
            self._log_to_loggers(metrics)
        if self.run_dir is not None:
            # Rewrite metrics.jsonl from the checkpoint: rounds logged after it are recomputed.
            self.run_dir.mkdir(parents=True, exist_ok=True)
            lines = [json.dumps(m, default=_json_default) + "\n" for m in self.history]
            (self.run_dir / METRICS_NAME).write_text("".join(lines))
        return self.server.round

    def _evaluate_saved(self, model: Any, datamodule: Any, ckpt_path: str | None, verbose: bool) -> list[dict]:
        if model is None or datamodule is None or ckpt_path is None:
            raise ValueError("validate/test need a model, a datamodule and ckpt_path (a run's global_model.pt)")
        datamodule.setup("test")
        self._prepare(model)
        assert self.server is not None and self.runner is not None
        saved = load_checkpoint(ckpt_path)
        state = saved["server"]["global_state"] if isinstance(saved, dict) and "server" in saved else saved
        self.server.global_state = state
        metrics = self.runner.evaluate(state, datamodule.test_dataloader())
        metrics.update(self.server.model_metrics())
        if verbose:
            print(json.dumps({k: v for k, v in metrics.items() if k != "layer_density"}, indent=2))
        return [metrics]


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
