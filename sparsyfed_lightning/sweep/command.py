"""`sparsyfed sweep`: run a grid of `sparsyfed fit` runs over this machine's CPU cores or GPUs.

    sparsyfed sweep --config base.yaml [--config more.yaml ...] --grid grid.yaml [--out SWEEP_DIR]
                    [--workers N|auto] [--threads T] [--runs_per_device K] [--dry_run] [-- fit arguments]

Everything is checked before anything starts or is written: the grid file (`grid.py`), every run's
configuration (parsed and built as `sparsyfed fit` would, in this process, through
`lightning_cli.check_fit_arguments`), the options, and an existing SWEEP_DIR's definition
(`definition.py`). Then SWEEP_DIR is locked for this sweep, the runs that are not finished are run
by the pool (`pool.py`) with a live overview (`overview.py`), and the sweep ends with a summary.

Exit status: 0 when every run is finished; 1 when a run failed or stopped (they are listed with
their logs; re-running the same command resumes them); 2 for a bad grid, configuration or option
(nothing started); 128 + signal when the sweep was stopped by SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from sparsyfed_lightning.federated.rundir import LockHeldError, acquire_lock, lock_holder
from sparsyfed_lightning.sweep.arguments import OneLineParser, SweepUsageError
from sparsyfed_lightning.sweep.definition import (
    DEFINITION_NAME,
    LOGS_DIR,
    RUNS_DIR,
    SweepDefinition,
    SweepDefinitionError,
    is_sweep_dir,
)
from sparsyfed_lightning.sweep.grid import GridError, expand_grid, load_grid
from sparsyfed_lightning.sweep.overview import SweepOverview
from sparsyfed_lightning.sweep.pool import (
    RunPool,
    RunTask,
    Slot,
    cpu_cores,
    plan_slots,
    run_lock_holder,
    run_state,
    visible_gpus,
)

SWEEP_LOCK_NAME = ".sparsyfed-sweep-lock"
# Arguments the sweep sets for every run itself (or that would not make a run).
_RESERVED_FIT_ARGS = ("--trainer.run_dir", "--resume", "--overwrite", "--config", "-c", "--print_config",
                      "--help", "-h", "--ckpt_path")
ORPHAN_WAIT_S = 120.0  # how long to wait for runs of a killed sweep to checkpoint and release their locks


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _workers(text: str) -> int | None:
    return None if text == "auto" else _positive(text)


_workers.__name__ = "integer >= 1 or auto"  # argparse names the expected type after the function
_positive.__name__ = "integer >= 1"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="sparsyfed sweep",
        description="Run a grid of `sparsyfed fit` runs (one run directory per point under SWEEP_DIR) over "
                    "this machine's CPU cores or GPUs. Re-running the same command skips finished runs and "
                    "resumes the others. Arguments after `--` are given to every run's `sparsyfed fit`.",
    )
    parser.add_argument("--config", "-c", action="append", required=True, metavar="YAML",
                        help="base configuration of every run (several compose, later ones win)")
    parser.add_argument("--grid", required=True, metavar="YAML",
                        help="dotted keys to lists of values (their product), or a list of such mappings "
                             "(the union of their products)")
    parser.add_argument("--out", metavar="SWEEP_DIR", help="sweep directory (default: sweeps/<grid file name>)")
    parser.add_argument("--workers", type=_workers, default=None, metavar="N|auto",
                        help="runs at a time (default auto: CPU cores // threads, or GPUs x runs_per_device)")
    parser.add_argument("--threads", type=_positive, default=None, metavar="T",
                        help="threads per run (default: 1 on the CPU; the cores shared out on GPUs)")
    parser.add_argument("--runs_per_device", type=_positive, default=1, metavar="K",
                        help="runs sharing one GPU at a time (default 1; ignored for CPU runs)")
    parser.add_argument("--dry_run", action="store_true",
                        help="check everything and list the runs and their state, start nothing")
    return parser


def sweep_main(argv: list[str]) -> int:
    """`sparsyfed sweep ...`; returns the exit status (module doc)."""
    if "--" in argv:
        split = argv.index("--")
        argv, fit_args = argv[:split], argv[split + 1:]
    else:
        fit_args = []
    parser = build_parser()
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv)
        return _sweep(args, fit_args)
    except (SweepUsageError, GridError, SweepDefinitionError) as error:
        print(f"sparsyfed: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the pool (which handles signals itself): nothing was started
        print("sparsyfed: error: interrupted before any run started", file=sys.stderr)
        return 130


def _check_inputs(args: argparse.Namespace, fit_args: list[str]) -> None:
    """The arguments after `--` leave the sweep's own to it; the base configs exist."""
    for item in fit_args:
        if item.split("=", 1)[0] in _RESERVED_FIT_ARGS:
            raise SweepUsageError(f"{item.split('=', 1)[0]} cannot be given to the runs of a sweep after `--`; the "
                                  "sweep sets it (use the sweep's own --config for configuration files)")
    for config in args.config:
        if not Path(config).is_file():
            raise SweepUsageError(f"--config {config} does not exist or is not a file")


def _sweep(args: argparse.Namespace, fit_args: list[str]) -> int:
    """Check everything, then run what is not finished (module doc)."""
    _check_inputs(args, fit_args)
    grid = load_grid(args.grid)
    points = expand_grid(grid, f"--grid {args.grid}")
    sweep_dir = Path(args.out) if args.out else Path("sweeps") / Path(args.grid).stem
    definition = SweepDefinition.create(args.config, grid, fit_args, points)
    new_sweep = _check_sweep_dir(sweep_dir, definition)

    from sparsyfed_lightning.lightning_cli import check_fit_arguments  # Lightning: seconds of imports

    arguments = [definition.fit_arguments(p, definition.run_dir(sweep_dir, p)) for p in points]
    checks = check_fit_arguments(arguments)
    bad = [(p, c.error) for p, c in zip(points, checks, strict=True) if c.error]
    if bad:
        more = f" (and {len(bad) - 1} more runs with errors)" if len(bad) > 1 else ""
        raise SweepUsageError(f"run {bad[0][0].name}: {bad[0][1]}{more}")
    uses_cuda = any(c.uses_cuda for c in checks)
    gpus = visible_gpus() if uses_cuda else []
    slots = plan_slots(gpus, args.workers, args.threads, args.runs_per_device, cpu_cores())
    tasks = [RunTask(p, definition.run_dir(sweep_dir, p), definition.log_path(sweep_dir, p), a, c.rounds)
             for p, a, c in zip(points, arguments, checks, strict=True)]
    states = {task.point.name: run_state(task.run_dir) for task in tasks}
    where = (f"{len(slots)} worker(s) on GPU(s) {', '.join(sorted(set(gpus)))}" if gpus
             else f"{len(slots)} CPU worker(s)") + f" x {slots[0].threads} thread(s)"
    finished = sum(state == "finished" for state in states.values())
    print(f"sweep {sweep_dir}: {len(tasks)} runs, {finished} finished before, {len(tasks) - finished} to run on "
          f"{where}", flush=True)
    if args.dry_run:
        for task in tasks:
            print(f"  {states[task.point.name]:8s} {task.point.name}")
        return 0
    with _locked_sweep_dir(sweep_dir):
        if new_sweep:
            from sparsyfed_lightning.federated.atomic_files import write_text_atomic

            write_text_atomic(definition.to_yaml(), sweep_dir / DEFINITION_NAME)
        to_run = [task for task in tasks if states[task.point.name] != "finished"]
        _wait_for_orphans([task.run_dir for task in to_run])
        return _run(sweep_dir, tasks, to_run, slots, finished)


def _check_sweep_dir(sweep_dir: Path, definition: SweepDefinition) -> bool:
    """Whether `sweep_dir` is a new sweep; an error if it holds something else or another sweep."""
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise SweepUsageError(f"--out {sweep_dir} is a file, not a folder")
    if not is_sweep_dir(sweep_dir):
        if sweep_dir.is_dir() and any(sweep_dir.iterdir()):
            raise SweepUsageError(f"--out {sweep_dir} holds files and is not a sweep directory (no {DEFINITION_NAME}); "
                                  "choose another --out")
        return True
    difference = definition.difference(SweepDefinition.read(sweep_dir))
    if difference:
        raise SweepUsageError(f"--out {sweep_dir} holds another sweep: {difference}; re-run it with its own "
                              "--config/--grid/-- arguments, or choose another --out")
    holder = lock_holder(sweep_dir / SWEEP_LOCK_NAME)
    if holder is not None:
        raise SweepUsageError(f"--out {sweep_dir} is in use by another sweep (pid {holder})")
    return False


@contextlib.contextmanager
def _locked_sweep_dir(sweep_dir: Path) -> Iterator[None]:
    """Create SWEEP_DIR (with runs/ and logs/) and hold its lock while the sweep runs."""
    for folder in (sweep_dir, sweep_dir / RUNS_DIR, sweep_dir / LOGS_DIR):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SweepUsageError(f"--out {sweep_dir} cannot be created: {error.strerror or error}") from None
    try:
        fd = acquire_lock(sweep_dir / SWEEP_LOCK_NAME)
    except LockHeldError as held:
        raise SweepUsageError(f"--out {sweep_dir} is in use by another sweep (pid {held.holder})") from None
    try:
        yield
    finally:
        os.close(fd)


def _wait_for_orphans(run_dirs: list[Path]) -> None:
    """Wait for runs still held by other processes (a killed sweep's runs checkpointing) to let go."""
    deadline = time.monotonic() + ORPHAN_WAIT_S
    told = False
    while True:
        held = {str(d): h for d in run_dirs if (h := run_lock_holder(d)) is not None}
        if not held or time.monotonic() > deadline:
            return  # still held after the wait: those runs fail with `fit`'s one line naming the holder
        if not told:
            print(f"waiting for {len(held)} run(s) still held by other processes (pids "
                  f"{', '.join(sorted(set(held.values())))}; a stopped sweep's runs saving their checkpoints)",
                  flush=True)
            told = True
        time.sleep(0.2)


def _run(sweep_dir: Path, tasks: list[RunTask], to_run: list[RunTask], slots: list[Slot],
         finished_before: int) -> int:
    """Run `to_run` and summarise; returns the sweep's exit status."""
    with SweepOverview(len(tasks), finished_before) as overview:
        pool = RunPool(slots, overview)
        outcomes = pool.run(to_run)
    failed = [o for o in outcomes if o.outcome == "failed"]
    stopped = [o for o in outcomes if o.outcome == "stopped"]
    done = finished_before + sum(o.outcome == "finished" for o in outcomes)
    print(f"sweep {sweep_dir}: {done} of {len(tasks)} runs finished, {len(failed)} failed, {len(stopped)} stopped, "
          f"{len(to_run) - len(outcomes)} not started", flush=True)
    for outcome in failed + stopped:
        print(f"  {outcome.outcome} {outcome.task.point.name} (exit {outcome.exit_status}): {outcome.error}; "
              f"log {outcome.task.log}", flush=True)
    if pool.stop_signal is not None:
        name = signal.Signals(pool.stop_signal).name
        print(f"sparsyfed: error: sweep interrupted by {name}; run the same command again to resume it",
              file=sys.stderr)
        return 128 + pool.stop_signal
    if failed or stopped:
        print(f"sparsyfed: error: {len(failed) + len(stopped)} of {len(tasks)} runs did not finish (listed above); "
              "fix the cause and run the same command again to resume them", file=sys.stderr)
        return 1
    print(f"all runs finished; tables: sparsyfed table {sweep_dir}; figures: sparsyfed plot {sweep_dir}", flush=True)
    return 0
