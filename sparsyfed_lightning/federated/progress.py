"""Progress output over rounds: a rich progress bar on a terminal, one plain line per round otherwise."""

from __future__ import annotations

import sys
from typing import Any, Literal

ProgressMode = Literal["auto", "rich", "plain", "none"]


def _format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def summary_line(metrics: dict[str, Any]) -> str:
    """One human line for a round's metrics."""
    parts = [f"round {metrics['round']}"]
    if "test_accuracy" in metrics:
        parts.append(f"acc {100 * metrics['test_accuracy']:.2f}%")
    if "density" in metrics:
        parts.append(f"density {100 * metrics['density']:.2f}%")
    if "cumulative_uplink_bytes" in metrics:
        total = metrics["cumulative_uplink_bytes"] + metrics["cumulative_downlink_bytes"]
        parts.append(f"comm {_format_bytes(total)}")
    if metrics.get("failures"):
        parts.append(f"failed clients {sorted(metrics['failures'])}")
    return " | ".join(parts)


class RoundProgress:
    """Shows progress over `total` rounds. Use as a context manager; call `update(metrics)`."""

    def __init__(self, total: int, start: int = 0, mode: ProgressMode = "auto") -> None:
        if mode not in ("auto", "rich", "plain", "none"):
            raise ValueError(f"trainer.progress must be one of auto, rich, plain, none; got {mode!r}")
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode
        self.total = total
        self.start = start
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> RoundProgress:
        if self.mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]rounds"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("", total=self.total, completed=self.start)
        return self

    def update(self, metrics: dict[str, Any]) -> None:
        line = summary_line(metrics)
        if self.mode == "rich":
            self._progress.update(self._task, completed=metrics["round"], description=line)
        elif self.mode == "plain":
            print(line, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def summary_of_run(history: list[dict[str, Any]], seconds: float) -> str:
    """The one line printed when a run ends: final accuracy, density, communication against dense, time."""
    last = history[-1]
    evaluated = [m for m in history if "test_accuracy" in m]
    parts = [f"done: {last['round']} rounds"]
    if evaluated:
        parts.append(f"test accuracy {100 * evaluated[-1]['test_accuracy']:.2f}% (round {evaluated[-1]['round']})")
    if "density" in last:
        parts.append(f"density {100 * last['density']:.2f}%")
    if "cumulative_uplink_bytes" in last:
        total = last["cumulative_uplink_bytes"] + last["cumulative_downlink_bytes"]
        parts.append(f"communication {_format_bytes(total)} ({last['cumulative_ratio_to_dense']:.3f}x dense)")
    parts.append(f"{seconds:.0f} s")
    return " | ".join(parts)
