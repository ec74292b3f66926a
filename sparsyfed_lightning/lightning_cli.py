"""`sparsyfed fit/validate/test`: a LightningCLI over the federated run (the front is `cli.py`).

    sparsyfed fit --config configs/demo.yaml [--method.sparsity 0.99] [--trainer.rounds 50]
    sparsyfed fit --config ... --resume runs/<run>          # continue a stopped or finished run
    sparsyfed test --config runs/<run>/config.yaml --ckpt_path runs/<run>/global_model.pt

`fit`/`validate`/`test` are a LightningCLI over `ClientModule` (model), `FederatedDataModule`
(data) and `FederatedTrainer` (trainer), with two more top-level groups: `method` and
`server_optimizer` (jsonargparse `class_path`/`init_args`, or short names: `--method TopK`).
Several `--config` files compose (later ones override earlier ones) and YAML values may use
OmegaConf interpolation (`${trainer.rounds}`).

Run directories: `trainer.run_dir` (default `runs/<method>-<timestamp>`) receives the resolved
`config.yaml`, `metrics.jsonl`, Lightning's CSV logs, `class_counts.json`, checkpoints and the final
`global_model.pt`. An existing run directory is never overwritten unless `--overwrite` is given (and
then only if it is a run directory of this project); `--resume DIR` continues the run in DIR after
checking that the given config matches the saved one and that its checkpoint is intact, before
anything is written (`--ckpt_path` picks another checkpoint, e.g. `checkpoint.prev.pt`).

Every configuration or input error ends the command with one line on stderr naming the key, the
value and what is allowed, exit status 2, no traceback and nothing written. Runs that fail or are
interrupted end with one line and the exit statuses of `federated/errors.py`.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import lazy_instance
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sparsyfed_lightning.client.module import ClientModule
from sparsyfed_lightning.data.hub import DatasetUnavailableError
from sparsyfed_lightning.data.module import FederatedDataModule
from sparsyfed_lightning.federated import ddp
from sparsyfed_lightning.federated.atomic_files import write_text_atomic
from sparsyfed_lightning.federated.checkpoint import CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, load_model_state
from sparsyfed_lightning.federated.errors import SparsyFedError, UsageError
from sparsyfed_lightning.federated.rundir import MARKER_NAME, release_all
from sparsyfed_lightning.federated.trainer import FederatedTrainer
from sparsyfed_lightning.methods import Method, SparsyFed
from sparsyfed_lightning.server.optimizers import FedAvg, ServerOptimizer

CONFIG_NAME = "config.yaml"
_DATA_KEYS = set(inspect.signature(FederatedDataModule.__init__).parameters) - {"self"}
# Keys that may differ between a run and its resumption. `stack_clients` changes results only by
# float rounding, and a run whose stacked fit ran out of memory must be able to go on with fewer.
_RESUME_FREE_KEYS = {"config", "resume", "overwrite", "trainer.overwrite", "trainer.run_dir", "trainer.progress",
                     "trainer.rounds", "trainer.checkpoint_every", "trainer.stack_clients", "ckpt_path"}


class SparsyFedCLI(LightningCLI):
    """LightningCLI with the federated groups, run directories and resume."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (`predict` has no meaning for a federated run)."""
        return {key: value for key, value in LightningCLI.subcommands().items() if key != "predict"}

    def _parse_ckpt_path(self) -> None:
        """Verify a given `ckpt_path` early (Lightning would unpickle it to look for hyperparameters,
        which this project's files do not carry)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and subcommand != "fit":
            load_model_state(ckpt_path)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_subclass_arguments(Method, "method", default=lazy_instance(SparsyFed), required=False)
        parser.add_subclass_arguments(
            ServerOptimizer, "server_optimizer", default=lazy_instance(FedAvg), required=False
        )
        parser.link_arguments("method", "trainer.method", apply_on="instantiate")
        parser.link_arguments("server_optimizer", "trainer.server_optimizer", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")
        parser.add_argument("--resume", type=str | None, default=None, help="Continue the run in this directory.")
        parser.add_argument("--overwrite", action="store_true",
                            help="Replace an existing run directory (only one this project created).")

    # -- fit -------------------------------------------------------------------------------------
    def before_fit(self) -> None:
        trainer: FederatedTrainer = self.trainer  # type: ignore[assignment]
        config = self.config["fit"]
        resume = config.get("resume")
        run_dir = self._choose_run_dir(trainer, config)
        trainer.run_dir = run_dir
        trainer.overwrite = bool(config.get("overwrite")) or trainer.overwrite
        trainer.resume_hint = f"pass --resume {run_dir}"
        trainer.overwrite_hint = "--overwrite"
        trainer.resume_command = f"sparsyfed fit --config {run_dir / CONFIG_NAME} --resume {run_dir}"
        self._ckpt_path = self._checkpoint_to_resume(run_dir, config) if resume else None
        if resume and self._ckpt_path is None:  # killed before its first checkpoint: start it again
            trainer.overwrite = True
        # Every check (data, model against data, checkpoint, run directory) before anything is written.
        trainer.prepare_run(self.model, self.datamodule, self._ckpt_path)  # type: ignore[arg-type]
        if not trainer.is_writer:  # a DDP rank other than 0: rank 0 writes the run directory
            return
        if config.get("trainer", {}).get("lr_decay_rounds") is None:
            config["trainer"]["lr_decay_rounds"] = trainer.settings()["lr_decay_rounds"]  # fixed at the start
        write_text_atomic(self._dump(config), run_dir / CONFIG_NAME)
        if not self._ckpt_path:
            counts = self.datamodule.class_counts().tolist()  # type: ignore[attr-defined]
            write_text_atomic(json.dumps(counts), run_dir / "class_counts.json")
        trainer.logged_config = _flatten(yaml.safe_load(self._dump(config)))
        print(f"run directory: {run_dir}", file=sys.stderr)

    def fit(self, model: ClientModule, datamodule: FederatedDataModule, **kwargs: Any) -> None:
        kwargs["ckpt_path"] = self._ckpt_path
        self.trainer.fit(model, datamodule=datamodule, **kwargs)

    def _dump(self, config: Any) -> str:
        return self._parser(self.subcommand).dump(config, skip_none=False)  # type: ignore[arg-type]

    def _choose_run_dir(self, trainer: FederatedTrainer, config: Any) -> Path:
        resume = config.get("resume")
        if resume:
            run_dir = Path(resume)
            saved = run_dir / CONFIG_NAME
            if not saved.is_file() or not (run_dir / MARKER_NAME).is_file():
                raise UsageError(f"--resume {resume} is invalid; it is not a run directory (no {saved} or marker)")
            try:
                saved_config = yaml.safe_load(saved.read_text())
            except (yaml.YAMLError, OSError, UnicodeDecodeError) as error:
                reason = _first_line(error)
                raise UsageError(f"--resume {resume} is invalid; {saved} cannot be read: {reason}") from None
            if not isinstance(saved_config, dict):
                raise UsageError(f"--resume {resume} is invalid; {saved} is not a sparsyfed configuration")
            given = yaml.safe_load(self._dump(config))
            if given.get("trainer", {}).get("lr_decay_rounds") is None:  # the run fixed it when it started
                given["trainer"]["lr_decay_rounds"] = saved_config.get("trainer", {}).get("lr_decay_rounds")
                config["trainer"]["lr_decay_rounds"] = given["trainer"]["lr_decay_rounds"]
                trainer.lr_decay_rounds = given["trainer"]["lr_decay_rounds"]
            self._check_same_config(saved_config, given, resume)
            return run_dir
        if trainer.run_dir is not None:
            return trainer.run_dir
        return Path("runs") / f"{trainer.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    @staticmethod
    def _checkpoint_to_resume(run_dir: Path, config: Any) -> str | None:
        """`--ckpt_path` if given, else the run's latest checkpoint (the previous one if the latest is missing)."""
        if config.get("ckpt_path"):
            return str(config["ckpt_path"])
        for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME):  # a crash between the two renames of a save
            if (run_dir / name).is_file():
                return str(run_dir / name)
        return None

    @staticmethod
    def _check_same_config(saved: dict, given: dict, run_dir: str) -> None:
        flat_saved, flat_given = _flatten(saved), _flatten(given)
        for key in sorted(set(flat_saved) | set(flat_given)):
            if key in _RESUME_FREE_KEYS or any(key.startswith(f"{k}.") for k in _RESUME_FREE_KEYS):
                continue
            old, new = flat_saved.get(key), flat_given.get(key)
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


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


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
    if first.startswith("Parser key") and first.endswith(":"):
        # jsonargparse puts the reason on the following lines: keep the most specific one.
        first = f"{first} {_parser_reason(lines[1:])}"
    # The data module names its arguments without the group; the CLI user knows them as data.<key>.
    name = first.split("=", 1)[0]
    if "=" in first and name in _DATA_KEYS:
        first = f"data.{first}"
    return first


def _parser_reason(lines: list[str]) -> str:
    """The informative part of a jsonargparse error's detail lines (the deepest 'Problem'/'Expected' line)."""
    for marker in ("is not accepted", "Expected", "Not a valid", "does not", "Problem"):
        for line in reversed(lines):
            if marker in line:
                return line.lstrip("- ")
    return lines[0] if lines else "invalid value"


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"sparsyfed: error: {message}", file=sys.stderr)


def _cli_kwargs() -> dict[str, Any]:
    """The LightningCLI arguments of every `sparsyfed` command (and of `check_fit_arguments`)."""
    return {
        "trainer_class": FederatedTrainer,
        "save_config_callback": None,
        "parser_kwargs": {"parser_mode": "omegaconf", "exit_on_error": False},
        "auto_configure_optimizers": False,
        "load_from_checkpoint_support": False,
        "seed_everything_default": False,
    }


def _error_line(error: BaseException, args: list[str]) -> tuple[str, int] | None:
    """The one line and exit status of a configuration or run error; None for anything else (a bug)."""
    if isinstance(error, SparsyFedError):
        return _first_line(error), error.exit_status
    if isinstance(error, ValueError | FileNotFoundError | DatasetUnavailableError | MisconfigurationException):
        return _one_line(error, args), 2
    from jsonargparse import ArgumentError

    if isinstance(error, ArgumentError) or type(error).__name__ == "ArgumentError":
        return _one_line(error, args), 2
    return None


def run_lightning_cli(args: list[str] | None) -> int:
    """Run `fit`/`validate`/`test`; return the exit status (one line on stderr for every error)."""
    shown = sys.argv[1:] if args is None else args
    if args is not None:  # DDP ranks 1..N-1 run this command, not the caller's own sys.argv
        ddp.RELAUNCH_COMMAND = [sys.executable, "-m", "sparsyfed_lightning.cli", *args]
    quiet = ddp.local_rank() != 0  # DDP ranks other than 0 leave the messages to rank 0
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run.*")
    try:
        SparsyFedCLI(ClientModule, FederatedDataModule, args=args, **_cli_kwargs())
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    except KeyboardInterrupt:
        _say("interrupted (a second Ctrl-C stops at once, without a checkpoint)", quiet)
        return 130
    except Exception as error:
        known = _error_line(error, shown)
        if known is None:
            raise
        _say(known[0], quiet)
        return known[1]
    finally:
        release_all()
    return 0


# -- checking many runs' arguments at once (sparsyfed sweep) -----------------------------------------
@dataclass
class FitCheck:
    """What `check_fit_arguments` found for one argument list."""

    error: str | None  # the one line `sparsyfed fit` would print, None when the arguments are good
    rounds: int = 0  # trainer.rounds
    uses_cuda: bool = False  # the run trains on a CUDA device


class _Checked(Exception):
    """Ends `_FitArgumentChecker` once every argument list was checked."""


class _FitArgumentChecker(SparsyFedCLI):
    """Parses and builds `fit` argument lists with one parser; runs nothing, writes nothing.

    Building the parser is most of the cost of a `--print_config`, so one parser serves every list.
    The objects are built under `torch.device("meta")`: the options are checked by the same
    constructors as a real run, but no weights are allocated or initialised (a ResNet-18 takes
    seconds to initialise on a CPU). A list that fails there is built again for real, and only that
    error counts, so that nothing meta tensors cannot do is taken for a configuration error. What
    needs the data (the model against the data) is checked when the run starts.
    """

    def __init__(self, arg_lists: list[list[str]], checks: list[FitCheck]) -> None:
        self.arg_lists = arg_lists
        self.checks = checks  # filled in by parse_arguments, which then ends the constructor
        super().__init__(ClientModule, FederatedDataModule, args=["fit"], **_cli_kwargs())

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        for arguments in self.arg_lists:
            self.checks.append(self._check(parser, arguments))
        raise _Checked

    def _check(self, parser: LightningArgumentParser, arguments: list[str]) -> FitCheck:
        import torch

        try:
            with contextlib.redirect_stdout(io.StringIO()):  # what --print_config would print
                self.config = parser.parse_args(["fit", *arguments])
        except SystemExit:  # --help or --print_config among the arguments
            return FitCheck("--help and --print_config cannot be given to the runs of a sweep")
        except Exception as error:  # noqa: BLE001 - sorted by _failed
            return _failed(error, arguments)
        self.subcommand = "fit"
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                self.instantiate_classes()
        except Exception:  # noqa: BLE001 - only an error that also happens for real is the configuration's
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.instantiate_classes()
            except Exception as error:  # noqa: BLE001 - sorted by _failed
                return _failed(error, arguments)
        trainer: FederatedTrainer = self.trainer  # type: ignore[assignment]
        return FitCheck(None, trainer.rounds, type(trainer.accelerator).__name__ == "CUDAAccelerator")


def _failed(error: Exception, arguments: list[str]) -> FitCheck:
    """The check of a configuration error; anything else is a bug and raised again."""
    known = _error_line(error, arguments)
    if known is None:
        raise error
    return FitCheck(known[0])


def check_fit_arguments(arg_lists: list[list[str]]) -> list[FitCheck]:
    """Check `sparsyfed fit` argument lists (without the `fit`) as `fit` would, running nothing.

    Unknown keys, values of the wrong type or out of range, unknown classes and unusable devices
    give the one line `sparsyfed fit` would print. About 0.25 s per list on a 2-core CPU.
    """
    if not arg_lists:
        return []
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run.*")
    checks: list[FitCheck] = []
    try:
        _FitArgumentChecker(arg_lists, checks)
    except _Checked:
        pass
    return checks
