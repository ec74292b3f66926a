"""Running a sweep's runs as `sparsyfed fit` processes, a fixed number at a time, over CPU cores or GPUs.

Each run is its own `python -m sparsyfed_lightning.cli fit ...` process, so everything a run
guarantees (run-directory marker and lock, `--resume`, exit statuses, a checkpoint of the last
completed round on SIGTERM; docs/RELIABILITY.md) holds inside a sweep too; the pool only decides
when and where a run starts and what its exit status means.

* Slots: on the CPU, `cores // threads` workers, each run limited to `threads` threads
  (`OMP_NUM_THREADS`, which torch follows); on GPUs, `runs_per_device` workers per visible GPU,
  each run seeing only its GPU (`CUDA_VISIBLE_DEVICES`): one small run leaves most of a large GPU
  idle, so several can share it.
* A run's directory decides how it starts: none -> a new run; marker and `config.yaml` -> `--resume`
  (which restarts a run that has no checkpoint yet); marker only (killed while starting) ->
  `--overwrite`. A finished run (`global_model.pt` that verifies) is never started.
* A run that fails does not stop the others.
* Stopping: the first SIGTERM/SIGINT to the sweep starts no new run and is passed on to every
  running one, which checkpoints its last completed round and exits 143/130; the sweep then exits
  128 + signal. A second SIGINT is passed on too (the runs then stop at once). Runs live in their own
  session, so a Ctrl-C on the terminal reaches them once, through the sweep, not twice.
* No orphans: on Linux every run asks the kernel for SIGTERM when the sweep dies (`PR_SET_PDEATHSIG`),
  so a SIGKILLed sweep's runs checkpoint and exit instead of running on (and holding their locks)
  unseen. The death signal follows the thread that started the run, so runs are started from the
  main thread only; the pool has no threads.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal

from sparsyfed_lightning.federated.rundir import LOCK_NAME, MARKER_NAME, lock_holder
from sparsyfed_lightning.sweep.grid import RunPoint

FINAL_MODEL_NAME = "global_model.pt"
CONFIG_NAME = "config.yaml"
STOPPED_STATUSES = {128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT}
RunState = Literal["finished", "new", "resume", "restart"]
Outcome = Literal["finished", "failed", "stopped"]
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Slot:
    """Where one run at a time executes: a GPU (or the CPU) and a number of threads."""

    index: int
    gpu: str | None
    threads: int

    def environment(self) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1"}
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        return env

    def describe(self) -> str:
        return f"GPU {self.gpu}" if self.gpu is not None else f"CPU worker {self.index + 1}"


def plan_slots(gpus: list[str], workers: int | None, threads: int | None, runs_per_device: int,
               cores: int) -> list[Slot]:
    """The slots of a pool: on `gpus` (empty: the CPU) with `workers` (None: as many as fit)."""
    if gpus:
        count = workers or len(gpus) * runs_per_device
        per_run = threads or max(1, cores // count)
        return [Slot(i, gpus[i % len(gpus)], per_run) for i in range(count)]
    per_run = threads or 1
    count = workers or max(1, cores // per_run)
    return [Slot(i, None, per_run) for i in range(count)]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as values for a run's `CUDA_VISIBLE_DEVICES`."""
    import torch

    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [item.strip() for item in visible.split(",") if item.strip()][:count]
    return [str(i) for i in range(count)]


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_state(run_dir: Path) -> RunState:
    """How a run starts (see the module doc); verifying `global_model.pt` reads the whole file."""
    from sparsyfed_lightning.federated.checkpoint import load_verified
    from sparsyfed_lightning.federated.errors import CheckpointError

    if (run_dir / FINAL_MODEL_NAME).is_file():
        try:
            load_verified(run_dir / FINAL_MODEL_NAME, ("global_model",))
            return "finished"
        except CheckpointError:
            pass  # damaged: the resumed run rewrites it from its last checkpoint
    if not (run_dir / MARKER_NAME).is_file():
        return "new"  # `fit` refuses, with one line, a folder that holds files but is not a run directory
    return "resume" if (run_dir / CONFIG_NAME).is_file() else "restart"


def run_lock_holder(run_dir: Path) -> str | None:
    """The pid of a process writing the run in `run_dir`, None when nobody is."""
    return lock_holder(run_dir / LOCK_NAME)


@dataclass
class RunTask:
    """A run to start: its point, directory, log file and `sparsyfed fit` arguments (no resume flags)."""

    point: RunPoint
    run_dir: Path
    log: Path
    arguments: list[str]
    rounds: int

    def command(self) -> list[str]:
        """The `fit` command for the run's current state (resume, overwrite or new)."""
        state = run_state(self.run_dir)
        flags = {"resume": ["--resume", str(self.run_dir)], "restart": ["--overwrite"]}.get(state, [])
        return [sys.executable, "-m", "sparsyfed_lightning.cli", "fit", *self.arguments, *flags]


@dataclass
class RunOutcome:
    """How a run's process ended."""

    task: RunTask
    outcome: Outcome
    exit_status: int
    error: str  # the run's last `sparsyfed: error:` line, or what ended it
    seconds: float


@dataclass
class Running:
    """A run in progress."""

    task: RunTask
    slot: Slot
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)


class RunPool:
    """Runs tasks over slots (see the module doc); `events` is told about every start and end."""

    def __init__(self, slots: list[Slot], events: PoolEvents, poll_interval: float = 0.2) -> None:
        self.slots = slots
        self.events = events
        self.poll_interval = poll_interval
        self.stop_signal: int | None = None
        self._received: list[int] = []

    def run(self, tasks: list[RunTask]) -> list[RunOutcome]:
        """Run every task unless a signal stops the pool first; returns the outcomes of those started."""
        pending, free = deque(tasks), list(self.slots)
        running: list[Running] = []
        outcomes: list[RunOutcome] = []
        with _SignalsRecorded(self._received.append):
            try:
                while pending or running:
                    self._pass_on_signals(running)
                    while pending and free and self.stop_signal is None:
                        running.append(self._start(pending.popleft(), free.pop(0)))
                    for item in [r for r in running if r.process.poll() is not None]:
                        running.remove(item)
                        free.insert(0, item.slot)
                        outcomes.append(self._ended(item))
                        self.events.ended(outcomes[-1])
                    self.events.refresh(running)
                    if self.stop_signal is not None and not running:
                        break
                    time.sleep(self.poll_interval)
            finally:  # an error in the sweep itself: its runs stop at a safe point, as for SIGTERM
                for item in running:
                    if item.process.poll() is None:
                        item.process.send_signal(signal.SIGTERM)
                for item in running:
                    item.process.wait()
        return outcomes

    def _pass_on_signals(self, running: list[Running]) -> None:
        while self._received:
            signum = self._received.pop(0)
            if self.stop_signal is None:
                self.stop_signal = signum
                self.events.stopping(signum, len(running))
            for item in running:
                if item.process.poll() is None:
                    item.process.send_signal(signum)

    def _start(self, task: RunTask, slot: Slot) -> Running:
        command = task.command()
        task.log.parent.mkdir(parents=True, exist_ok=True)
        with open(task.log, "a") as log:
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {slot.describe()}, {slot.threads} thread(s): "
                      f"{' '.join(command)}\n")
            log.flush()
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **slot.environment()}, start_new_session=True,
                preexec_fn=_death_signal_setter(),
            )
        self.events.started(task, slot)
        return Running(task, slot, process)

    def _ended(self, item: Running) -> RunOutcome:
        status = item.process.returncode
        seconds = time.monotonic() - item.started
        if status == 0:
            return RunOutcome(item.task, "finished", 0, "", seconds)
        error = last_error_line(item.task.log)
        if not error:
            error = f"killed by {signal.Signals(-status).name}" if status < 0 else f"exit status {status}"
        outcome: Outcome = "stopped" if status in STOPPED_STATUSES else "failed"
        return RunOutcome(item.task, outcome, status, error, seconds)


class PoolEvents:
    """What the pool reports; the overview implements it."""

    def started(self, task: RunTask, slot: Slot) -> None: ...

    def ended(self, outcome: RunOutcome) -> None: ...

    def stopping(self, signum: int, running: int) -> None: ...

    def refresh(self, running: list[Running]) -> None: ...


def last_error_line(log: Path) -> str:
    """The last `sparsyfed: error:` line of a run's log (its one-line reason), '' if none."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("==== "):  # the header of this attempt: earlier errors are older attempts'
            break
        if line.startswith("sparsyfed: error: "):
            return line[len("sparsyfed: error: "):]
    return ""


class _SignalsRecorded:
    """Records SIGTERM/SIGINT (calls `record(signum)`) instead of dying, while active (main thread only)."""

    def __init__(self, record: Callable[[int], None]) -> None:
        self.record = record
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.record(signum)

    def __enter__(self) -> _SignalsRecorded:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)  # type: ignore[arg-type]


@functools.cache
def _death_signal_setter() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child receive SIGTERM when this process dies (Linux; else None)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def set_death_signal() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the sweep died before the request took effect
            os._exit(128 + signal.SIGTERM)

    return set_death_signal
