"""The federated Trainer's own Lightning callbacks, loggers and loop counters: a round is an epoch.

`FederatedTrainer(callbacks=[...])` (or `--trainer.callbacks`) gets these hooks, with the
`ClientModule` as `pl_module`:

* `setup(stage="fit")`, `on_fit_start`, `on_train_start` once when the rounds start (also on resume);
* per round: `on_train_epoch_start` before its clients train; after the round is aggregated (and
  evaluated on the central test set when it is an evaluation round: `on_validation_start`,
  `on_validation_epoch_start`, `on_validation_epoch_end`, `on_validation_end` around nothing, once
  its metrics are known), `on_train_epoch_end`; monitoring callbacks (`EarlyStopping`, checkpoints)
  run after the others, as in Lightning;
* `on_train_end`, `on_fit_end`, `teardown(stage="fit")` at the end; `on_exception` when the run fails.

During round `r`, `trainer.current_epoch == r`; after it, `trainer.global_step == r`, and
`trainer.callback_metrics` holds the round's numeric metrics (`test_accuracy`, `test_loss` of the
latest evaluation, `density`, `train_loss`, `lr`, bytes, ...), so `EarlyStopping(monitor=
"test_accuracy", mode="max")` and `ModelCheckpoint(monitor=...)` work; a checkpoint callback saves the
federated checkpoint of the global model (`trainer.save_checkpoint`), which `sparsyfed test
--ckpt_path` evaluates. `trainer.optimizers` holds the round's client optimizer (a fresh SGD with the
round's learning rate, as every client builds it), so `LearningRateMonitor` logs the client learning
rate per round. `trainer.should_stop = True` from a callback ends the run after the current round,
as a complete run (exit status 0, final model and checkpoint written). The callbacks' states are
stored in the run's checkpoints and restored on resume.

Client fits run on inner Trainers (`ClientRunner`) and do not call these callbacks: their batches
are the clients', not the federated run's.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.states import RunningStage, TrainerFn, TrainerStatus

# Lightning Trainer options that have no meaning for a federated run, with their defaults and what to
# use instead. A value other than the default is an error, not silently ignored.
NOT_FEDERATED: dict[str, tuple[Any, str]] = {
    "max_epochs": (None, "trainer.rounds (a round is an epoch) and trainer.local_epochs"),
    "min_epochs": (None, "trainer.rounds"),
    "max_steps": (-1, "trainer.rounds"),
    "min_steps": (None, "trainer.rounds"),
    "max_time": (None, "trainer.rounds"),
    "limit_val_batches": (None, "the central test set is always evaluated whole"),
    "limit_test_batches": (None, "the central test set is always evaluated whole"),
    "limit_predict_batches": (None, "there is no predict"),
    "overfit_batches": (0.0, "data.samples_per_client"),
    "val_check_interval": (None, "trainer.eval_every"),
    "check_val_every_n_epoch": (1, "trainer.eval_every"),
    "num_sanity_val_steps": (None, "round 0 evaluates the initial model"),
    "fast_dev_run": (False, "trainer.rounds 1 and data.samples_per_client"),
    "reload_dataloaders_every_n_epochs": (0, "client loaders are rebuilt every round"),
    "enable_progress_bar": (None, "trainer.progress"),
    "profiler": (None, "benchmarks/ and trainer.progress (time_train_s, time_eval_s per round)"),
}


def check_federated_options(kwargs: dict[str, Any]) -> None:
    """A one-line ValueError for a Lightning option set to something a federated run cannot honour."""
    for key, (default, instead) in NOT_FEDERATED.items():
        value = kwargs.get(key, default)
        if value != default and not (key == "enable_progress_bar" and value is False):
            raise ValueError(f"trainer.{key}={value!r} has no meaning for a federated run; use {instead} instead")


class RoundHooks:
    """Drives the federated Trainer's callbacks and loop counters (see the module doc)."""

    def __init__(self, trainer: Any, model: Any) -> None:
        self.trainer = trainer
        self.model = model
        trainer.strategy.connect(model)  # `trainer.lightning_module` is the client module

    def fit_start(self, completed_rounds: int) -> None:
        trainer = self.trainer
        trainer.state.fn = TrainerFn.FITTING
        trainer.state.status = TrainerStatus.RUNNING
        trainer.state.stage = RunningStage.TRAINING
        trainer.should_stop = False
        self._set_counters(epoch=completed_rounds, steps=completed_rounds)
        call._call_callback_hooks(trainer, "setup", stage="fit")
        call._call_callback_hooks(trainer, "on_fit_start")
        call._call_callback_hooks(trainer, "on_train_start")

    def round_start(self, round_index: int, lr: float) -> None:
        self._set_counters(epoch=round_index, steps=round_index - 1)
        self.model.lr = lr
        self.trainer.strategy.optimizers = [self.model.configure_optimizers()]  # what every client builds
        call._call_callback_hooks(self.trainer, "on_train_epoch_start")

    def round_end(self, metrics: dict[str, Any]) -> bool:
        """Publish the round's metrics to the callbacks; returns whether a callback asked to stop."""
        trainer = self.trainer
        self._set_counters(epoch=metrics["round"], steps=metrics["round"])
        trainer.callback_metrics.update(
            {key: torch.tensor(float(value)) for key, value in _numeric(metrics).items()}
        )
        if "test_accuracy" in metrics:
            trainer.state.stage = RunningStage.VALIDATING
            for hook in ("on_validation_start", "on_validation_epoch_start", "on_validation_epoch_end",
                         "on_validation_end"):
                call._call_callback_hooks(trainer, hook)
            trainer.state.stage = RunningStage.TRAINING
        call._call_callback_hooks(trainer, "on_train_epoch_end", monitoring_callbacks=False)
        call._call_callback_hooks(trainer, "on_train_epoch_end", monitoring_callbacks=True)
        return bool(trainer.should_stop)

    def fit_end(self) -> None:
        trainer = self.trainer
        call._call_callback_hooks(trainer, "on_train_end")
        call._call_callback_hooks(trainer, "on_fit_end")
        call._call_callback_hooks(trainer, "teardown", stage="fit")
        trainer.state.status = TrainerStatus.FINISHED
        trainer.state.stage = None

    def exception(self, error: BaseException) -> None:
        self.trainer.state.status = TrainerStatus.INTERRUPTED
        call._call_callback_hooks(self.trainer, "on_exception", error)

    def _set_counters(self, epoch: int, steps: int) -> None:
        loop = self.trainer.fit_loop
        loop.epoch_progress.current.completed = epoch
        loop.epoch_progress.current.processed = epoch
        loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = steps
        loop.epoch_loop._batches_that_stepped = steps


def callback_states(trainer: Any) -> dict[str, Any]:
    """The states of the trainer's callbacks, for its checkpoints (`Callback.state_dict`)."""
    return {callback.state_key: callback.state_dict() for callback in trainer.callbacks if callback.state_dict()}


def restore_callback_states(trainer: Any, states: dict[str, Any]) -> None:
    """Load `callback_states` back into the callbacks with the same state keys."""
    for callback in trainer.callbacks:
        if callback.state_key in states:
            callback.load_state_dict(states[callback.state_key])


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        key: value for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and key != "round"
    }


def loggable(metrics: dict[str, Any]) -> dict[str, float]:
    """A round's metrics as logger rows: the numbers, and the per-layer densities as `layer_density/<key>`."""
    row = {key: float(value) for key, value in _numeric(metrics).items()}
    for key, value in metrics.get("layer_density", {}).items():
        row[f"layer_density/{key}"] = float(value)
    return row
