"""The live overview of a sweep: a rich table on a terminal, one plain line per event otherwise.

Plain lines (logs, CI, `nohup`): one when a run starts and one when it ends, with its final test
accuracy or the one-line reason it failed, prefixed with the counts so far:

    [3 done, 2 running, 0 failed, 7 pending] done   method=TopK,sparsity=0.9,alpha=1,seed=0: test_accuracy 91.23% (35 s)

On a terminal the same counts head a table of the running runs (round reached out of the run's
rounds, elapsed time) and the runs that ended most recently, redrawn twice a second.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from sparsyfed_lightning.sweep.pool import PoolEvents, Running, RunOutcome, RunTask, Slot
from sparsyfed_lightning.sweep.results import read_metrics

_RECENT = 8  # ended runs shown in the live table


def final_accuracy(run_dir: Path) -> float | None:
    """A run's last logged test accuracy."""
    for line in reversed(read_metrics(run_dir)):
        if "test_accuracy" in line:
            return line["test_accuracy"]
    return None


def last_round(run_dir: Path) -> int | None:
    """The last round a run logged (reads only the end of `metrics.jsonl`)."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            tail = handle.read().decode(errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            return int(json.loads(line)["round"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


class SweepOverview(PoolEvents):
    """Counts and reports a sweep's runs (see the module doc). Use as a context manager."""

    def __init__(self, total: int, done_before: int, live: bool | None = None) -> None:
        self.total = total
        self.done = done_before
        self.failed = 0
        self.running = 0
        self.live = sys.stdout.isatty() if live is None else live
        self._recent: list[tuple[str, str, str]] = []
        self._running: list[Running] = []
        self._live: Any = None

    # -- PoolEvents ------------------------------------------------------------------------------
    def started(self, task: RunTask, slot: Slot) -> None:
        self.running += 1
        self._say(f"start  {task.point.name} ({slot.describe()}, log {task.log})")

    def ended(self, outcome: RunOutcome) -> None:
        self.running -= 1
        name, seconds = outcome.task.point.name, f"{outcome.seconds:.0f} s"
        if outcome.outcome == "finished":
            self.done += 1
            accuracy = final_accuracy(outcome.task.run_dir)
            result = f"test_accuracy {100 * accuracy:.2f}%" if accuracy is not None else "finished"
            self._remember(name, "done", f"{result} ({seconds})")
            self._say(f"done   {name}: {result} ({seconds})")
        elif outcome.outcome == "stopped":
            self._remember(name, "stopped", f"exit {outcome.exit_status}, resumable ({seconds})")
            self._say(f"stop   {name}: exit {outcome.exit_status}, resumes when the sweep is re-run")
        else:
            self.failed += 1
            self._remember(name, "FAILED", f"exit {outcome.exit_status}: {outcome.error}")
            self._say(f"FAILED {name}: exit {outcome.exit_status}: {outcome.error} (log {outcome.task.log})")

    def stopping(self, signum: int, running: int) -> None:
        name = signal.Signals(signum).name
        self._say(f"{name}: starting no new run; passing it on to the {running} running run(s), which "
                  "checkpoint and stop")

    def refresh(self, running: list[Running]) -> None:
        self._running = running
        if self._live is not None:
            self._live.update(self._table())

    # -- output ------------------------------------------------------------------------------------
    def counts(self) -> str:
        pending = self.total - self.done - self.failed - self.running
        return f"{self.done} done, {self.running} running, {self.failed} failed, {max(pending, 0)} pending"

    def _say(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(f"[{self.counts()}] {text}", flush=True)

    def _remember(self, name: str, state: str, detail: str) -> None:
        self._recent = [(name, state, detail), *self._recent][:_RECENT]

    def _table(self) -> Any:
        from rich.table import Table

        table = Table(title=f"sweep: {self.counts()} (of {self.total})", title_justify="left", expand=False)
        for column in ("run", "state", "progress"):
            table.add_column(column, overflow="fold")
        now = time.monotonic()
        for item in self._running:
            reached = last_round(item.task.run_dir)
            rounds = f"round {reached if reached is not None else '-'}/{item.task.rounds}"
            table.add_row(item.task.point.name, f"running ({item.slot.describe()})",
                          f"{rounds}, {now - item.started:.0f} s")
        for name, state, detail in self._recent:
            table.add_row(name, state, detail)
        return table

    def __enter__(self) -> SweepOverview:
        if self.live:
            from rich.live import Live

            self._live = Live(self._table(), refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None
