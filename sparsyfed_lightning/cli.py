"""The `sparsyfed` command.

    sparsyfed fit --config configs/demo.yaml [--method.sparsity 0.99] [--trainer.rounds 50]
    sparsyfed fit --config ... --resume runs/<run>          # continue a killed or finished run
    sparsyfed test --config runs/<run>/config.yaml --ckpt_path runs/<run>/global_model.pt
    sparsyfed plot runs/<run>                               # paper-style figures as PNG
    sparsyfed --version

`fit`/`validate`/`test` are a LightningCLI over `ClientModule` (model), `FederatedDataModule`
(data) and `FederatedTrainer` (trainer), with two more top-level groups: `method` and
`server_optimizer` (jsonargparse `class_path`/`init_args`, or short names: `--method TopK`).
Several `--config` files compose (later ones override earlier ones) and YAML values may use
OmegaConf interpolation (`${trainer.rounds}`).

Run directories: `trainer.run_dir` (default `runs/<method>-<timestamp>`) receives the resolved
`config.yaml`, `metrics.jsonl`, Lightning's CSV logs, `class_counts.json`, checkpoints and the final
`global_model.pt`. An existing run directory is never overwritten unless `--overwrite` is given;
`--resume DIR` continues the run in DIR after checking that the given config matches the saved one.

Every configuration error ends the command with one line on stderr naming the key, the value and
what is allowed, exit status 2, no traceback and nothing written.
"""

from __future__ import annotations

import inspect
import json
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from sparsyfed_lightning import __version__
from sparsyfed_lightning.client.module import ClientModule
from sparsyfed_lightning.data.hub import DatasetUnavailableError
from sparsyfed_lightning.data.module import FederatedDataModule
from sparsyfed_lightning.federated.trainer import CHECKPOINT_NAME, FederatedTrainer
from sparsyfed_lightning.methods import Method, SparsyFed
from sparsyfed_lightning.server.optimizers import FedAvg, ServerOptimizer

CONFIG_NAME = "config.yaml"
_DATA_KEYS = set(inspect.signature(FederatedDataModule.__init__).parameters) - {"self"}
# Keys that may differ between a run and its resumption. `stack_clients` changes results only by
# float rounding, and a run whose stacked fit ran out of memory must be able to go on with fewer.
_RESUME_FREE_KEYS = {"config", "resume", "overwrite", "trainer.run_dir", "trainer.progress", "trainer.rounds",
                     "trainer.checkpoint_every", "trainer.stack_clients", "ckpt_path"}


class UsageError(Exception):
    """A configuration or run-directory error: reported as one line, exit status 2."""


class SparsyFedCLI(LightningCLI):
    """LightningCLI with the federated groups, run directories and resume."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_subclass_arguments(Method, "method", default=lazy_instance(SparsyFed), required=False)
        parser.add_subclass_arguments(
            ServerOptimizer, "server_optimizer", default=lazy_instance(FedAvg), required=False
        )
        parser.link_arguments("method", "trainer.method", apply_on="instantiate")
        parser.link_arguments("server_optimizer", "trainer.server_optimizer", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_argument("--resume", type=str | None, default=None, help="Continue the run in this directory.")
        parser.add_argument("--overwrite", type=bool, default=False, help="Replace an existing run directory.")

    # -- fit -------------------------------------------------------------------------------------
    def before_fit(self) -> None:
        trainer: FederatedTrainer = self.trainer  # type: ignore[assignment]
        datamodule: FederatedDataModule = self.datamodule  # type: ignore[assignment]
        config = self.config["fit"]
        trainer.check_datamodule(datamodule)  # before anything is written
        run_dir = self._choose_run_dir(trainer, config)
        datamodule.setup("fit")  # data errors surface here, before anything is written
        self._ckpt_path = None
        if config.get("resume"):
            (run_dir / CONFIG_NAME).write_text(self._dump(config))  # e.g. more rounds than before
            checkpoint = run_dir / CHECKPOINT_NAME
            self._ckpt_path = str(checkpoint) if checkpoint.exists() else None
            if self._ckpt_path is None:  # killed before its first checkpoint: start it again
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        else:
            if run_dir.exists():
                shutil.rmtree(run_dir)  # only reachable with --overwrite
            run_dir.mkdir(parents=True)
            (run_dir / CONFIG_NAME).write_text(self._dump(config))
            counts = datamodule.class_counts().tolist()
            (run_dir / "class_counts.json").write_text(json.dumps(counts))
        trainer.run_dir = run_dir
        if not trainer.loggers:  # on resume the CSV is rewritten with the history from the checkpoint
            trainer.logger = CSVLogger(save_dir=str(run_dir), name="logs", version="")
        print(f"run directory: {run_dir}", file=sys.stderr)

    def fit(self, model: ClientModule, datamodule: FederatedDataModule, **kwargs: Any) -> None:
        kwargs["ckpt_path"] = self._ckpt_path if self.config["fit"].get("resume") else kwargs.get("ckpt_path")
        self.trainer.fit(model, datamodule=datamodule, **kwargs)

    def _dump(self, config: Any) -> str:
        return self._parser(self.subcommand).dump(config, skip_none=False)  # type: ignore[arg-type]

    def _choose_run_dir(self, trainer: FederatedTrainer, config: Any) -> Path:
        resume, overwrite = config.get("resume"), config.get("overwrite")
        if resume:
            run_dir = Path(resume)
            saved = run_dir / CONFIG_NAME
            if not saved.is_file():
                raise UsageError(f"--resume {resume} is invalid; {saved} does not exist (not a run directory)")
            self._check_same_config(yaml.safe_load(saved.read_text()), yaml.safe_load(self._dump(config)), resume)
            return run_dir
        if trainer.run_dir is not None:
            run_dir = trainer.run_dir
        else:
            run_dir = Path("runs") / f"{trainer.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
            raise UsageError(
                f"trainer.run_dir={run_dir} already exists; pass --resume {run_dir} to continue it or "
                f"--overwrite to replace it"
            )
        return run_dir

    @staticmethod
    def _check_same_config(saved: dict, given: dict, run_dir: str) -> None:
        for key in sorted(set(_flatten(saved)) | set(_flatten(given))):
            if key in _RESUME_FREE_KEYS or any(key.startswith(f"{k}.") for k in _RESUME_FREE_KEYS):
                continue
            old, new = _flatten(saved).get(key), _flatten(given).get(key)
            if old != new:
                raise UsageError(
                    f"--resume {run_dir} is invalid; {key}={new!r} differs from the run's {old!r} "
                    f"(in {Path(run_dir) / CONFIG_NAME})"
                )


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _known_classes(base: type) -> str:
    import sparsyfed_lightning.methods  # noqa: F401 - registers the subclasses
    import sparsyfed_lightning.server.optimizers  # noqa: F401

    names = sorted({cls.__name__ for cls in _subclasses(base) if not cls.__name__.startswith("LazyInstance")})
    return ", ".join(names)


def _subclasses(base: type) -> list[type]:
    found = []
    for cls in base.__subclasses__():
        if not cls.__name__.startswith("_"):
            found.append(cls)
        found.extend(_subclasses(cls))
    return found


def _one_line(error: BaseException, args: list[str]) -> str:
    """One informative line for an error, naming the key (jsonargparse errors can span many lines)."""
    text = str(error)
    for key, base in (("method", Method), ("server_optimizer", ServerOptimizer)):
        if text.startswith(f'Parser key "{key}"') and "import path" in text:
            value = text.rsplit(":", 1)[-1].strip()
            return f"{key}={value!r} is unknown; known: {_known_classes(base)} (or a class_path)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if text.startswith("Problems parsing config"):
        config_files = [a for i, a in enumerate(args) if i and args[i - 1] in ("--config", "-c")]
        where = f" ({', '.join(config_files)})" if config_files else ""
        return f"config is not valid YAML{where}: " + " ".join(lines[1:3]).replace('"<unicode string>", ', "")
    first = lines[0] if lines else type(error).__name__
    # The data module names its arguments without the group; the CLI user knows them as data.<key>.
    name = first.split("=", 1)[0]
    if "=" in first and name in _DATA_KEYS:
        first = f"data.{first}"
    return first


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sparsyfed` console script; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in ("--version", "-V"):
        print(f"sparsyfed-lightning {__version__}")
        return 0
    if args and args[0] == "plot":
        from sparsyfed_lightning.plots import plot_main

        return plot_main(args[1:])
    # `main(argv)` called from Python (tests, notebooks) while sys.argv holds something else is fine.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run.*")
    try:
        SparsyFedCLI(
            ClientModule,
            FederatedDataModule,
            trainer_class=FederatedTrainer,
            save_config_callback=None,
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
            args=None if argv is None else args,  # None: LightningCLI reads sys.argv itself
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            seed_everything_default=False,
        )
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except (UsageError, ValueError, FileNotFoundError, DatasetUnavailableError) as error:
        print(f"sparsyfed: error: {_one_line(error, args)}", file=sys.stderr)
        return 2
    except Exception as error:
        from jsonargparse import ArgumentError

        if isinstance(error, ArgumentError) or type(error).__name__ == "ArgumentError":
            print(f"sparsyfed: error: {_one_line(error, args)}", file=sys.stderr)
            return 2
        raise
    return 0


def console_main() -> None:
    """`sparsyfed` console-script wrapper (exits with `main`'s status)."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
