"""The federated Trainer behaves like a Lightning Trainer: rounds are epochs to callbacks and loggers."""

from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import yaml
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from sparsyfed_lightning.cli import main
from sparsyfed_lightning.federated.checkpoint import load_model_state, load_verified
from sparsyfed_lightning.federated.schedule import exponential_lr
from sparsyfed_lightning.methods import SparsyFed


class Recorder(L.Callback):
    """Counts every hook and keeps what a callback sees at the end of each round."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.rounds: list[dict[str, float]] = []

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def setup(self, trainer, pl_module, stage):
        self._count(f"setup:{stage}")

    def on_fit_start(self, trainer, pl_module):
        self._count("on_fit_start")
        assert pl_module is trainer.lightning_module and hasattr(pl_module, "net")

    def on_train_epoch_start(self, trainer, pl_module):
        self._count("on_train_epoch_start")
        self.epoch_at_start = trainer.current_epoch

    def on_validation_end(self, trainer, pl_module):
        self._count("on_validation_end")

    def on_train_epoch_end(self, trainer, pl_module):
        self._count("on_train_epoch_end")
        metrics = trainer.callback_metrics
        self.rounds.append({
            "epoch": trainer.current_epoch, "epoch_at_start": self.epoch_at_start, "step": trainer.global_step,
            "test_accuracy": float(metrics["test_accuracy"]), "density": float(metrics["density"]),
            "lr": float(metrics["lr"]),
        })

    def on_fit_end(self, trainer, pl_module):
        self._count("on_fit_end")


def test_callbacks_fire_once_per_round_with_the_rounds_metrics(run_rounds):
    recorder = Recorder()
    trainer = run_rounds(SparsyFed(0.9), rounds=3, callbacks=[recorder], lr_final=0.01)
    assert recorder.calls == {"setup:fit": 1, "on_fit_start": 1, "on_train_epoch_start": 3, "on_validation_end": 3,
                              "on_train_epoch_end": 3, "on_fit_end": 1}
    for round_index, seen in enumerate(recorder.rounds, start=1):
        logged = trainer.history[round_index]
        assert seen["epoch"] == seen["epoch_at_start"] == seen["step"] == round_index
        assert seen["test_accuracy"] == pytest.approx(logged["test_accuracy"])
        assert seen["density"] == pytest.approx(logged["density"]) and seen["lr"] == pytest.approx(logged["lr"])


def test_early_stopping_on_test_accuracy_ends_the_run_cleanly(run_rounds, tmp_path):
    stopper = EarlyStopping(monitor="test_accuracy", mode="max", patience=1, min_delta=2.0)  # never "improves"
    trainer = run_rounds(SparsyFed(0.9), rounds=8, callbacks=[stopper], run_dir=str(tmp_path / "run"))
    assert [m["round"] for m in trainer.history] == [0, 1, 2]  # round 1 sets the best, round 2 exhausts patience
    assert stopper.stopped_epoch == 2
    _, content = load_verified(tmp_path / "run" / "checkpoint.pt", ("checkpoint",))
    assert content["server"]["round"] == 2 and content["callbacks"]  # the callback's state travels with it
    assert (tmp_path / "run" / "global_model.pt").is_file()


def test_model_checkpoint_saves_the_best_global_model(run_rounds, tmp_path):
    best = ModelCheckpoint(dirpath=str(tmp_path / "best"), monitor="test_accuracy", mode="max", save_top_k=1)
    trainer = run_rounds(SparsyFed(0.9), rounds=4, callbacks=[best])
    assert best.best_model_path and best.best_model_score is not None
    accuracies = {m["round"]: m["test_accuracy"] for m in trainer.history[1:]}
    assert float(best.best_model_score) == pytest.approx(max(accuracies.values()))
    saved = load_model_state(best.best_model_path)  # a federated checkpoint of the global model
    assert saved.keys() == trainer.global_state.keys()
    assert len(list((tmp_path / "best").iterdir())) == 1


def test_learning_rate_monitor_logs_the_client_learning_rate_per_round(run_rounds, tmp_path):
    logger = CSVLogger(save_dir=str(tmp_path), name="lr", version="")
    run_rounds(SparsyFed(0.9), rounds=3, callbacks=[LearningRateMonitor(logging_interval="epoch")], logger=logger,
               lr_final=0.005)
    rows = list(csv.DictReader(open(tmp_path / "lr" / "metrics.csv")))
    logged = {int(r["step"]): float(r["lr-SGD"]) for r in rows if r.get("lr-SGD")}
    assert logged == pytest.approx({r - 1: exponential_lr(r, 0.05, 0.005, 3) for r in range(1, 4)})


@pytest.mark.parametrize(("option", "value"), [("max_epochs", 5), ("max_steps", 100), ("val_check_interval", 0.5),
                                               ("enable_progress_bar", True), ("fast_dev_run", True)])
def test_lightning_options_without_a_federated_meaning_are_refused(option, value):
    from sparsyfed_lightning.federated.trainer import FederatedTrainer

    with pytest.raises(ValueError, match=f"trainer.{option}={value!r} has no meaning for a federated run") as error:
        FederatedTrainer(progress="none", **{option: value})
    assert "\n" not in str(error.value)


def test_test_and_validate_after_fit_evaluate_the_final_global_model(run_rounds, digits_module):
    trainer = run_rounds(SparsyFed(0.9), rounds=2)
    model = trainer.runner.module
    tested = trainer.test(model, datamodule=digits_module, verbose=False)[0]
    validated = trainer.validate(model, datamodule=digits_module, verbose=False)[0]
    assert tested["test_accuracy"] == pytest.approx(trainer.history[-1]["test_accuracy"])
    assert validated["test_accuracy"] == tested["test_accuracy"]


@pytest.fixture
def tiny_config(tmp_path):
    config = {
        "trainer": {"rounds": 2, "clients_per_round": 2, "eval_every": 1, "progress": "plain",
                    "accelerator": "cpu"},
        "model": {"backbone": "small_cnn", "backbone_kwargs": {"width": 4}, "lr": 0.05},
        "data": {"dataset": "digits", "num_clients": 4, "batch_size": 64, "cache_dir": str(tmp_path / "cache")},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_logger_output_lands_in_the_run_directory_with_config_and_layer_densities(tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["fit", "--config", str(tiny_config), "--trainer.run_dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("done: 2 rounds | test accuracy ") and "x dense)" in summary
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    layer_columns = [c for c in rows[-1] if c.startswith("layer_density/")]
    assert sorted(layer_columns) == sorted(f"layer_density/{k}" for k in last["layer_density"])
    hparams = yaml.safe_load((run_dir / "logs" / "hparams.yaml").read_text())
    assert hparams["trainer.rounds"] == 2 and hparams["model.backbone"] == "small_cnn"
    quiet = tmp_path / "quiet"
    no_logger = ["--trainer.run_dir", str(quiet), "--trainer.logger", "false"]
    assert main(["fit", "--config", str(tiny_config), *no_logger]) == 0
    assert not (quiet / "logs").exists() and (quiet / "metrics.jsonl").is_file()


def test_early_stopping_from_the_cli_by_class_path(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    callbacks = ('[{"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": '
                 '{"monitor": "test_accuracy", "mode": "max", "patience": 1, "min_delta": 2.0}}]')
    assert main(["fit", "--config", str(tiny_config), "--trainer.run_dir", str(run_dir), "--trainer.rounds", "6",
                 "--trainer.callbacks", callbacks]) == 0
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2]
