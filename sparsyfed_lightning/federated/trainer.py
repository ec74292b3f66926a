"""`FederatedTrainer`: a `lightning.Trainer` whose `fit` runs federated rounds.

LightningCLI accepts only a `Trainer` subclass as `trainer_class`; its extra typed keyword
arguments (rounds, clients per round, method, server optimizer, ...) are parsed from the config like
any Trainer argument. `fit(model, datamodule=...)` runs the round loop:

    sample -> broadcast (encoded) -> fit each client with Lightning -> prune/encode uplink ->
    aggregate (sample-weighted, every state entry) -> method server rule -> server optimizer ->
    evaluate on the central test set (round 0, every `eval_every` rounds, the last round) -> log.

Client fits run on an inner, quiet `lightning.Trainer` reused for every client (see
`ClientRunner`); this Trainer's own `logger` receives one row of metrics per round. With a
`run_dir` the run's files are written as `run_files.py` describes (metrics.jsonl, integrity-checked
checkpoints, the final model) into a directory claimed by this process (`rundir.py`: ownership
marker, one writer at a time); `fit(..., ckpt_path=run_dir/checkpoint.pt)` resumes exactly.

Nothing fails silently (docs/RELIABILITY.md): a client update with NaN/Inf is a client failure, a
non-finite global model stops the run before it is adopted, SIGTERM/SIGINT stop at a safe point with
a checkpoint of the last completed round (`signals.py`), and every stop raises an exception from
`errors.py` carrying its one-line message and exit status.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import CSVLogger

from sparsyfed_lightning.checks import check_flag, check_integer, check_number
from sparsyfed_lightning.client.module import ClientModule
from sparsyfed_lightning.federated import ddp
from sparsyfed_lightning.federated.checkpoint import CHECKPOINT_NAME, RunCheckpoints, content_digest, load_model_state
from sparsyfed_lightning.federated.client_runner import ClientRunner, quiet_lightning, state_on_cpu
from sparsyfed_lightning.federated.compat import check_model_fits_data, check_state_fits_model
from sparsyfed_lightning.federated.devices import plan_devices
from sparsyfed_lightning.federated.engine_setup import build_engine
from sparsyfed_lightning.federated.engines import RoundAbandoned
from sparsyfed_lightning.federated.engines_flower import FlowerConfig, require_flower
from sparsyfed_lightning.federated.errors import CheckpointError, RunFailedError, RunInterrupted
from sparsyfed_lightning.federated.lightning_hooks import (
    RoundHooks,
    callback_states,
    check_federated_options,
    loggable,
    restore_callback_states,
)
from sparsyfed_lightning.federated.progress import ProgressMode, RoundProgress, summary_of_run
from sparsyfed_lightning.federated.run_files import FINAL_MODEL_NAME, METRICS_NAME, RunFiles
from sparsyfed_lightning.federated.rundir import RunDirectory
from sparsyfed_lightning.federated.sampling import ClientSampler, UniformSampler
from sparsyfed_lightning.federated.schedule import exponential_lr
from sparsyfed_lightning.federated.server import FederatedServer
from sparsyfed_lightning.federated.signals import StopSignals, signal_name
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
    "sync_batchnorm",
)
__all__ = ["CHECKPOINT_NAME", "FINAL_MODEL_NAME", "METRICS_NAME", "FederatedTrainer"]


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
        run_dir: folder for metrics.jsonl, checkpoints and the final model (None: keep in memory). A
            folder that already holds files is used only to resume (`fit(ckpt_path=...)`) or, with
            `overwrite`, replaced when it is a run directory of this project.
        overwrite: replace an existing run directory (never a folder this project did not create).
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
            anyway for models with layers that cannot be stacked, with gradient clipping, under
            DDP, and on the Flower engine.
        flower: options of the Flower engine (client resources, routing, timeouts).
        progress: "auto" (a bar on a terminal, lines otherwise), "rich", "plain" or "none".
        num_threads: torch CPU threads of this process and of each device worker (None: torch's default
            here, one per worker on a CPU). Set it when other processes share the CPU: torch's default
            of one thread per core makes two busy processes slow each other down 5-100x.
        devices / strategy: Lightning's; they choose how several devices are used (`devices.py`):
            `devices: N` trains the round's clients in parallel, one worker process per device, with
            results identical to one device; `devices: N` with `strategy: ddp` runs each client's fit
            data-parallel over the devices (`ddp.py`).
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
        overwrite: bool = False,
        checkpoint_every: int = 0,
        mask_snapshot_every: int = 0,
        optimizer_on_buffers: bool = True,
        engine: Literal["inprocess", "flower"] = "inprocess",
        stack_clients: int | Literal["auto"] = "auto",
        flower: FlowerConfig | None = None,
        progress: ProgressMode = "auto",
        num_threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        for name, value, minimum in (
            ("rounds", rounds, 1),
            ("clients_per_round", clients_per_round, 1),
            ("local_epochs", local_epochs, 1),
            ("eval_every", eval_every, 1),
            ("seed", seed, 0),
            ("min_successful_clients", min_successful_clients, 1),
            ("iou_lag", iou_lag, 0),
            ("checkpoint_every", checkpoint_every, 0),
            ("mask_snapshot_every", mask_snapshot_every, 0),
        ):
            check_integer(value, f"trainer.{name}", minimum=minimum)
        if min_successful_clients > clients_per_round:
            raise ValueError(
                f"trainer.min_successful_clients={min_successful_clients} is invalid; it must be <= "
                f"trainer.clients_per_round={clients_per_round}"
            )
        if lr_final is not None:
            check_number(lr_final, "trainer.lr_final", low=0, low_inclusive=False)
        if lr_decay_rounds is not None:
            check_integer(lr_decay_rounds, "trainer.lr_decay_rounds", minimum=1)
        for name, flag in (("accept_failures", accept_failures), ("overwrite", overwrite),
                           ("optimizer_on_buffers", optimizer_on_buffers)):
            check_flag(flag, f"trainer.{name}")
        if engine not in ("inprocess", "flower"):
            raise ValueError(f"trainer.engine must be 'inprocess' or 'flower', got {engine!r}")
        if engine == "flower":
            require_flower()
        if stack_clients != "auto" and (isinstance(stack_clients, bool) or not isinstance(stack_clients, int)
                                        or stack_clients < 1):
            raise ValueError(f"trainer.stack_clients must be 'auto' or an integer >= 1, got {stack_clients!r}")
        if method is not None and not isinstance(method, Method):
            raise ValueError(f"trainer.method must be a Method (e.g. SparsyFed()), got {method!r}")
        if server_optimizer is not None and not isinstance(server_optimizer, ServerOptimizer):
            raise ValueError(
                f"trainer.server_optimizer must be a ServerOptimizer (e.g. FedAvg()), got {server_optimizer!r}"
            )
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
        self.overwrite = overwrite
        self.checkpoint_every = checkpoint_every
        self.mask_snapshot_every = mask_snapshot_every
        self.engine_name = engine
        self.flower = flower if flower is not None else FlowerConfig()
        self.optimizer_on_buffers = optimizer_on_buffers
        self.progress_mode = progress
        if num_threads is not None:
            check_integer(num_threads, "trainer.num_threads", minimum=1)
        if "accumulate_grad_batches" in kwargs:  # Lightning accepts 0 and fails in the first client fit
            check_integer(kwargs["accumulate_grad_batches"], "trainer.accumulate_grad_batches", minimum=1)
        self.num_threads = num_threads
        check_federated_options(kwargs)
        # The round loop reports progress itself (`progress`). Lightning's default checkpointing and model
        # summary belong to single fits: None (what LightningCLI passes for "unset") means off. The default
        # logger (None) is a CSV logger inside the run directory once there is one; False means none.
        self._default_logger = kwargs.get("logger") is None
        if kwargs.get("enable_checkpointing") is None and any(
            isinstance(callback, Checkpoint) for callback in kwargs.get("callbacks") or []
        ):
            kwargs["enable_checkpointing"] = True  # a user's ModelCheckpoint is checkpointing asked for
        for key in ("logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary"):
            if kwargs.get(key) is None:
                kwargs[key] = False
        quiet_lightning()
        try:
            self.device_plan = plan_devices(
                kwargs.get("accelerator", "auto"), kwargs.get("devices", "auto"), kwargs.get("strategy", "auto"),
                kwargs.get("num_nodes", 1),
            )
            if self.device_plan.mode != "ddp":  # Lightning's Trainer sees one device; workers take the others
                kwargs["devices"] = self.device_plan.slot_devices(0)
            super().__init__(**kwargs)
        except (MisconfigurationException, TypeError) as error:
            # e.g. accelerator="gpu" on a machine without one, devices=-1 on a CPU: Lightning's reason,
            # named by the options that chose the device.
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            if not any(word in reason.lower() for word in ("accelerator", "device", "gpu", "cuda", "cpu")):
                raise ValueError(f"trainer: {reason}") from None
            chosen = ", ".join(f"trainer.{k}={kwargs[k]!r}" for k in ("accelerator", "devices") if k in kwargs)
            raise ValueError(f"{chosen or 'the trainer options'} cannot be used on this machine: {reason}") from None
        if engine == "flower" and self.device_plan.mode != "single":
            raise ValueError(
                f"trainer.devices={self.device_plan.count} is not supported with trainer.engine='flower'; use "
                "flower.num_gpus/num_cpus per client (docs/FLOWER.md), or the in-process engine"
            )
        self.client_trainer_kwargs = self._client_trainer_kwargs(kwargs)
        self.history: list[dict[str, Any]] = []
        self.server: FederatedServer | None = None
        self.runner: ClientRunner | None = None
        # How error lines tell the user to resume or overwrite; the CLI replaces these with its flags.
        self.resume_hint = "pass ckpt_path=<run_dir>/checkpoint.pt to fit()"
        self.overwrite_hint = "pass overwrite=True to FederatedTrainer"
        self.resume_command: str | None = None  # None: the Python call that resumes
        self._prepared: tuple[int, int, str | None] | None = None  # (model, datamodule, ckpt_path) prepared for
        self._resume_content: dict[str, Any] | None = None
        self._decay_horizon: int | None = None
        self._run_dir_handle: RunDirectory | None = None
        self._collapsed: set[str] = set()
        self.logged_config: dict[str, Any] | None = None  # the CLI's resolved configuration, for the loggers

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
        """Run the federated rounds on `datamodule` (a `FederatedDataModule`).

        `ckpt_path` resumes the run saved in that checkpoint. Raises the exceptions of `errors.py`
        when the run cannot start or stops early (their messages are one line).
        """
        if datamodule is None:
            raise ValueError("FederatedTrainer.fit needs datamodule=FederatedDataModule(...)")
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        if self._prepared != (id(model), id(datamodule), ckpt_path):
            self.prepare_run(model, datamodule, ckpt_path)
        self._prepared = None
        if self.device_plan.mode != "ddp":
            self._fit(model, datamodule)
            return
        children = ddp.launch_ranks(self.device_plan.count)  # rank 0 starts the others (see ddp.py)
        try:
            ddp.init_process_group(self.device_plan.accelerator, self.device_plan.count)
            self.strategy.set_world_ranks()  # this Trainer's own ranks (rank-zero-only loggers and callbacks)
            self._fit(model, datamodule)
        finally:
            codes = ddp.finish(children)
        failed = [(rank, code) for rank, code in enumerate(codes, start=1) if code != 0]
        if failed:
            raise RunFailedError(f"DDP rank {failed[0][0]} exited with status {failed[0][1]} (rank 0 finished)")

    def _fit(self, model: ClientModule, datamodule: Any) -> None:
        server, runner = self.server, self.runner
        assert server is not None and runner is not None
        files = self._run_files()
        hooks = RoundHooks(self, model)
        started = time.perf_counter()
        try:
            with StopSignals(on_signal=runner.request_stop) as stop:
                engine = self._build_engine(model, runner, datamodule, stop)
                try:
                    self._run_rounds(datamodule, engine, files, stop, hooks)
                except BaseException as error:
                    hooks.exception(error)
                    self._stop(error, files, stop)
                    raise
                finally:
                    if hasattr(engine, "close"):  # the Flower engine stops its simulation, also on errors
                        engine.close()
            model.net.load_state_dict(server.global_state)
            if files is not None:
                files.save_last_completed()  # a run stopped early by a callback ends with its checkpoint too
                files.save_final_model(server.global_state)
            hooks.fit_end()
            if self.is_writer and self.progress_mode != "none":
                print(summary_of_run(self.history, time.perf_counter() - started), flush=True)
        finally:
            if self._run_dir_handle is not None:
                self._run_dir_handle.release()
                self._run_dir_handle = None

    def prepare_run(self, model: ClientModule, datamodule: Any, ckpt_path: str | None = None) -> None:
        """Check everything a run needs and claim its run directory, before anything is written.

        Validates the data module against the run, the model against the data (one forward pass),
        and, when resuming, the checkpoint (integrity, settings, rounds done). Then claims `run_dir`
        (locked for this process; created and marked when new). `fit` calls it; the CLI calls it
        first so that it writes `config.yaml` only into a directory it may use.
        """
        self.check_datamodule(datamodule)
        datamodule.setup("fit")
        check_model_fits_data(model, datamodule)
        self._prepare(model)
        self._resume_content = None
        if ckpt_path is not None:
            self._resume_content = self._load_resumable(ckpt_path)
        else:
            self._decay_horizon = self.lr_decay_rounds if self.lr_decay_rounds is not None else self.rounds
        if self.run_dir is not None and self.is_writer and self._default_logger and not self.loggers:
            self.logger = CSVLogger(save_dir=str(self.run_dir), name="logs", version="")
        if self.run_dir is not None and self.is_writer:
            self._run_dir_handle = RunDirectory.claim(
                self.run_dir, resume=ckpt_path is not None, overwrite=self.overwrite,
                resume_hint=self.resume_hint, overwrite_hint=self.overwrite_hint,
            )
        self._prepared = (id(model), id(datamodule), ckpt_path)

    def validate(self, model: Any = None, dataloaders: Any = None, ckpt_path: str | None = None,  # type: ignore[override]
                 verbose: bool = True, datamodule: Any = None, weights_only: bool | None = None) -> list[dict]:
        """Evaluate a global model on the central test set: `ckpt_path` (a run's `global_model.pt` or
        `checkpoint.pt`), or without it the global model of the last `fit`."""
        return self._evaluate_saved(model, datamodule, ckpt_path, verbose)

    def test(self, model: Any = None, dataloaders: Any = None, ckpt_path: str | None = None,  # type: ignore[override]
             verbose: bool = True, datamodule: Any = None, weights_only: bool | None = None) -> list[dict]:
        """Same as `validate`: the central test set is the only held-out set."""
        return self._evaluate_saved(model, datamodule, ckpt_path, verbose)

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the run directory and prints (false on DDP ranks other than 0)."""
        return self.device_plan.mode != "ddp" or ddp.local_rank() == 0

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
        """Atomically write everything a resumed run needs, with its integrity check."""
        checkpoints = RunCheckpoints(Path(filepath).parent)
        checkpoints.latest = Path(filepath)
        assert self.server is not None
        checkpoints.save(self._checkpoint_content(), self.server.round)

    def settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        return {
            "method": self.method.describe(),
            "server_optimizer": repr(self.server_optimizer),
            "rounds": self.rounds,
            "clients_per_round": self.clients_per_round,
            "local_epochs": self.local_epochs,
            "lr_final": self.lr_final,
            "lr_decay_rounds": self._decay_horizon,
            "seed": self.seed,
            "optimizer_on_buffers": self.optimizer_on_buffers,
        }

    # -- the round loop ----------------------------------------------------------------------------
    def _run_rounds(
        self, datamodule: Any, engine: Any, files: RunFiles | None, stop: StopSignals, hooks: RoundHooks
    ) -> None:
        server = self.server
        assert server is not None and self.runner is not None
        if self._resume_content is not None:
            start = self._restore(self._resume_content) + 1
            self._resume_content = None
        else:
            self.history = []
            self._collapsed = set()
            start = 1
        if files is not None:
            files.start(self.history)
        self._log_hyperparameters()
        hooks.fit_start(start - 1)
        if start == 1:
            self._round_completed(self._evaluate({"round": 0}, datamodule), files)
        progress_mode = self.progress_mode if self.is_writer else "none"
        with RoundProgress(self.rounds, start=start - 1, mode=progress_mode) as progress:
            for round_index in range(start, self.rounds + 1):
                if ddp.any_rank(stop.requested):  # DDP: every rank stops at the same round
                    stop.request(stop.signum or signal.SIGTERM)
                    raise RoundAbandoned(f"stopped before round {round_index}")
                hooks.round_start(round_index, self._client_lr(round_index, self.runner.module))
                metrics = self._run_round(round_index, engine, datamodule)
                if self.device_plan.mode == "ddp":
                    self._check_ranks_agree(round_index)
                self._round_completed(metrics, files)
                progress.update(metrics)
                if hooks.round_end(metrics):
                    if self.is_writer:
                        print(f"sparsyfed: a callback stopped the run after round {round_index}", file=sys.stderr)
                    break

    def _log_hyperparameters(self) -> None:
        """The run's configuration for the loggers (the CLI's resolved config, else the settings)."""
        if not self.loggers:
            return
        hparams = self.logged_config if self.logged_config is not None else {
            **{f"trainer.{k}": v for k, v in self.settings().items()},
            **{f"model.{k}": v for k, v in getattr(self.runner.module, "hparams", {}).items()},  # type: ignore[union-attr]
        }
        for logger in self.loggers:
            logger.log_hyperparams(hparams)

    def _check_ranks_agree(self, round_index: int) -> None:
        """DDP: every rank must hold the same global model after every round (a SHA-256 per rank)."""
        assert self.server is not None
        digests = ddp.gather_strings(content_digest(self.server.global_state))
        if len(set(digests)) > 1:
            differing = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
            raise RunFailedError(
                f"round {round_index}: DDP ranks {differing} hold a different global model than rank 0 (the fits "
                "were not identical across ranks; a non-deterministic operation on some device?)"
            )

    def _round_completed(self, metrics: dict[str, Any], files: RunFiles | None) -> None:
        """Log a completed round, warn about newly collapsed layers, keep/write its checkpoint."""
        self.history.append(metrics)
        self._log_to_loggers(metrics)
        self._warn_collapsed(metrics)
        if files is not None:
            assert self.server is not None
            files.record(metrics, self.server.current_masks())
            files.round_completed(metrics["round"], self._checkpoint_content())

    def _stop(self, error: BaseException, files: RunFiles | None, stop: StopSignals) -> None:
        """A run ends early: keep a checkpoint of the last completed round, and say why in one line."""
        saved = None
        if files is not None:
            try:
                saved = files.save_last_completed()
            except OSError:  # e.g. the disk is full: the checkpoint already on disk stays the last good one
                saved = files.checkpoints.saved_round
        if not self.is_writer and isinstance(error, SystemExit) and not stop.requested:
            stop.request(signal.SIGTERM)  # rank 0 got the signal; Lightning stopped this rank's fit with it
        if stop.requested and isinstance(error, RoundAbandoned | SystemExit):
            where = f"the checkpoint of round {saved} is in {self.run_dir}" if saved is not None else (
                "no round was completed, nothing to resume" if files is not None else "no run_dir: nothing was saved")
            how = f"; resume with {self._resume_command()}" if saved is not None else ""
            raise RunInterrupted(f"interrupted by {signal_name(stop.signum)}; {where}{how}", stop.signum) from None  # type: ignore[arg-type]
        if isinstance(error, RunFailedError) and saved is not None:
            error.args = (f"{error.args[0]}; the checkpoint of the last good round ({saved}) is in {self.run_dir}",)

    def _resume_command(self) -> str:
        if self.resume_command is None:
            return f"fit(..., ckpt_path='{self.run_dir}/{CHECKPOINT_NAME}')"
        return self.resume_command

    def _checkpoint_content(self) -> dict[str, Any]:
        """What a checkpoint of the current (completed) round holds."""
        assert self.server is not None
        return {"server": self.server.state_dict(), "history": list(self.history), "settings": self.settings(),
                "callbacks": callback_states(self)}

    def _warn_collapsed(self, metrics: dict[str, Any]) -> None:
        new = [key for key in metrics.get("collapsed_layers", ()) if key not in self._collapsed]
        if new and self.is_writer:
            self._collapsed.update(new)
            print(
                f"sparsyfed: warning: round {metrics['round']}: global magnitude pruning emptied "
                f"{', '.join(_layer_name(k) for k in new)} (no weight left, the model cannot use it); "
                "set method.min_layer_density (e.g. 0.001) to keep every layer alive",
                file=sys.stderr,
            )

    # -- internals -------------------------------------------------------------------------------
    def _client_trainer_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The client Trainers' arguments: every key that shapes a fit, on this process's device(s)."""
        chosen = {k: kwargs[k] for k in _CLIENT_TRAINER_KEYS if k in kwargs}
        plan = self.device_plan
        chosen["accelerator"] = plan.accelerator
        if plan.mode == "ddp":
            chosen.update(strategy="ddp", devices=plan.count)
        else:
            chosen.pop("strategy", None)
            chosen["devices"] = plan.slot_devices(0)
        return chosen

    def _prepare(self, model: ClientModule) -> None:
        if not getattr(model, "_federated_prepared", False):
            model.net = self.method.prepare_model(model.net)
            model._federated_prepared = True  # type: ignore[attr-defined]
        eval_kwargs = None
        if self.device_plan.mode == "ddp":  # each rank evaluates alone, on its own device
            eval_kwargs = {"devices": self.device_plan.slot_devices(ddp.local_rank())}
        self.runner = ClientRunner(model, self.method, self.local_epochs, eval_kwargs, **self.client_trainer_kwargs)
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

    def _run_files(self) -> RunFiles | None:
        if self.run_dir is None or not self.is_writer:
            return None
        return RunFiles(self.run_dir, self.rounds, self.checkpoint_every, self.mask_snapshot_every)

    def _build_engine(self, model: ClientModule, runner: ClientRunner, datamodule: Any, stop: StopSignals) -> Any:
        return build_engine(self, model, runner, datamodule, stop)

    def _client_lr(self, round_index: int, model: ClientModule) -> float:
        assert self._decay_horizon is not None
        return exponential_lr(round_index, model.hparams.lr, self.lr_final, self._decay_horizon)

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
            raise RunFailedError(f"round {round_index}: client {cid} failed ({error}); set "
                                 f"trainer.accept_failures=true to continue without it")
        if succeeded < self.min_successful_clients:
            raise RunFailedError(
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
        row = loggable(metrics)
        for logger in self.loggers:
            logger.log_metrics(row, step=metrics["round"])
            logger.save()

    def _load_resumable(self, ckpt_path: str) -> dict[str, Any]:
        """Load and check a checkpoint to resume from; raises before anything is written."""
        checkpoints = RunCheckpoints(Path(ckpt_path).parent)
        try:
            content = checkpoints.load(ckpt_path)
        except CheckpointError as error:
            raise CheckpointError(f"cannot resume: {error}; {checkpoints.resume_hint()}") from None
        saved = content["settings"]
        self._decay_horizon = self.lr_decay_rounds if self.lr_decay_rounds is not None else saved.get("lr_decay_rounds")
        current = self.settings()
        for key, value in current.items():
            if key != "rounds" and saved.get(key) != value:
                raise ValueError(
                    f"cannot resume {ckpt_path}: trainer.{key} is {value!r} but the run used {saved.get(key)!r}"
                )
        done = int(content["server"]["round"])
        if self.rounds < done:
            raise ValueError(
                f"trainer.rounds={self.rounds} is invalid for resuming {ckpt_path}: the run has already done "
                f"{done} rounds (give trainer.rounds >= {done})"
            )
        return content

    def _restore(self, content: dict[str, Any]) -> int:
        assert self.server is not None
        self.server.load_state_dict(content["server"])
        restore_callback_states(self, content.get("callbacks", {}))
        self.history = list(content["history"])
        self._collapsed = {key for metrics in self.history for key in metrics.get("collapsed_layers", ())}
        for metrics in self.history:  # loggers that restart their files get the whole history again
            self._log_to_loggers(metrics)
        return self.server.round

    def _evaluate_saved(self, model: Any, datamodule: Any, ckpt_path: str | None, verbose: bool) -> list[dict]:
        if model is None or datamodule is None:
            raise ValueError("validate/test need a model and a datamodule (and ckpt_path: a run's global_model.pt)")
        if ckpt_path is None:
            if self.server is None:
                raise ValueError("validate/test without ckpt_path evaluate the global model of the last fit(); "
                                 "call fit() first or pass ckpt_path (a run's global_model.pt)")
            state = self.server.global_state
        else:
            state = load_model_state(ckpt_path)
        datamodule.setup("test")
        self._prepare(model)
        assert self.server is not None and self.runner is not None
        check_state_fits_model(state, model.net.state_dict(), ckpt_path)
        self.server.global_state = state
        metrics = self.runner.evaluate(state, datamodule.test_dataloader())
        metrics.update(self.server.model_metrics())
        if verbose:
            print(json.dumps({k: v for k, v in metrics.items() if k != "layer_density"}, indent=2))
        return [metrics]


def _layer_name(state_key: str) -> str:
    """`layer3.0.conv1` for the stored-weight key `layer3.0.conv1.parametrizations.weight.original`."""
    for suffix in (".parametrizations.weight.original", ".weight"):
        if state_key.endswith(suffix):
            return state_key[: -len(suffix)]
    return state_key
