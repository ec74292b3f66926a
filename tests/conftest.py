"""Shared fixtures: a tiny offline federated dataset and a fast way to run a few rounds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="session")
def digits_module(tmp_path_factory):
    """Digits split over 6 clients with the paper's LDA (alpha 1.0), set up once per session."""
    from sparsyfed_lightning.data.module import FederatedDataModule

    module = FederatedDataModule(
        "digits", num_clients=6, alpha=1.0, batch_size=32, cache_dir=str(tmp_path_factory.mktemp("cache"))
    )
    module.setup("fit")
    return module


@pytest.fixture
def run_rounds(digits_module):
    """Run `rounds` federated rounds of a tiny small_cnn with the given method; return the trainer."""
    from sparsyfed_lightning.client.module import ClientModule
    from sparsyfed_lightning.federated.trainer import FederatedTrainer

    def run(method, rounds=3, clients_per_round=3, model_kwargs=None, **trainer_kwargs):
        model = ClientModule(
            "small_cnn", digits_module.num_classes, lr=0.05, backbone_kwargs={"width": 8}, **(model_kwargs or {})
        )
        trainer = FederatedTrainer(
            method=method,
            rounds=rounds,
            clients_per_round=clients_per_round,
            accelerator="cpu",
            progress="none",
            **trainer_kwargs,
        )
        trainer.fit(model, datamodule=digits_module)
        return trainer

    return run


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    """A 2-round `sparsyfed fit` config on 4 digits clients (width-4 small_cnn, SparsyFed 90%)."""
    config = {
        "trainer": {"rounds": 2, "clients_per_round": 2, "eval_every": 2, "progress": "none",
                    "accelerator": "cpu", "devices": 1, "checkpoint_every": 1},
        "model": {"backbone": "small_cnn", "backbone_kwargs": {"width": 4}, "lr": 0.05},
        "data": {"dataset": "digits", "num_clients": 4, "batch_size": 64, "cache_dir": str(tmp_path / "cache")},
        "method": {"class_path": "sparsyfed_lightning.methods.SparsyFed", "init_args": {"sparsity": 0.9}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
