"""SIGTERM and SIGINT during a federated run: stop at a safe point instead of dying mid-write.

A cluster scheduler preempts a job with SIGTERM (then SIGKILL after a grace period); a user presses
Ctrl-C (SIGINT). Python's defaults end the process at an arbitrary instruction (SIGTERM, exit 0 in
some wrappers) or raise KeyboardInterrupt wherever the interpreter happens to be (inside Lightning,
which turns it into `sys.exit(1)` and ignores further Ctrl-C). Instead, while `StopSignals` is
active, the first SIGTERM/SIGINT only records the request and tells the running client fit to stop
after its current batch (through Lightning's own `received_sigterm` flag). The round loop checks
the request between rounds and between client fits, abandons the unfinished round, makes sure a
checkpoint of the last completed round exists and raises `RunInterrupted` (exit status 128 +
signal). A second SIGINT raises KeyboardInterrupt at once, for a user who does not want to wait.

Handlers can only be installed in the main thread; elsewhere `StopSignals` does nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager recording the first SIGTERM/SIGINT; `on_signal()` is called when one arrives."""

    def __init__(self, on_signal: Callable[[], None] | None = None) -> None:
        self.on_signal = on_signal
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was requested."""
        return self.signum is not None

    def request(self, signum: int) -> None:
        """Record a stop request as if `signum` had arrived (also what the handler does)."""
        if self.signum is None:
            self.signum = signum
            if self.on_signal is not None:
                self.on_signal()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.request(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


def signal_name(signum: int) -> str:
    """`SIGTERM`, `SIGINT`, ... for a signal number."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
