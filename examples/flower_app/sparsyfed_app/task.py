"""What the ServerApp and the ClientApp share: the sparsyfed config of the run and how to read it."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context

from sparsyfed_lightning.client.module import ClientModule
from sparsyfed_lightning.data.module import FederatedDataModule
from sparsyfed_lightning.federated.flower_app import ClientSpec
from sparsyfed_lightning.federated.trainer import FederatedTrainer

APP_DIR = Path(__file__).resolve().parent.parent  # the installed app (FAB) directory


def config_args(context: Context) -> list[str]:
    """`sparsyfed fit` arguments of the run: its config (relative to the app directory) and overrides."""
    path = Path(str(context.run_config["config"]))
    config = str(path if path.is_absolute() else APP_DIR / path)
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    return ["--config", config, *overrides, "--trainer.engine", "flower"]


@contextmanager
def own_argv() -> Iterator[None]:
    """Hide this process's argv from LightningCLI, which would echo it (Flower's token) in a warning."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


def client_spec(context: Context) -> ClientSpec:
    """The client side of the run, built from the same config the ServerApp runs (no live objects cross)."""
    from sparsyfed_lightning.lightning_cli import SparsyFedCLI

    with own_argv():
        cli = SparsyFedCLI(
            ClientModule,
            FederatedDataModule,
            trainer_class=FederatedTrainer,
            run=False,
            args=config_args(context),
            save_config_callback=None,
            parser_kwargs={"parser_mode": "omegaconf"},
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            seed_everything_default=False,
        )
    trainer: FederatedTrainer = cli.trainer  # type: ignore[assignment]
    return ClientSpec.from_objects(
        cli.model, trainer.method, cli.datamodule, trainer.local_epochs, trainer.client_trainer_kwargs,
        key=str(context.run_id),
    )
