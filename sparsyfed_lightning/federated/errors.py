"""Why a federated run stopped, as exceptions that carry their one-line message and exit status.

The CLI prints `sparsyfed: error: <message>` and exits with `exit_status` (docs/RELIABILITY.md):

| exception | meaning | exit status |
|---|---|---|
| `CheckpointError` | a checkpoint/model file is missing, damaged, foreign or unsafe | 2 |
| `RunDirectoryError` | the run directory cannot be used (exists, in use, not ours, not writable) | 2 |
| `RunFailedError` | the run itself failed: a client failed, too few succeeded, ... | 1 |
| `NonFiniteError` | NaN/Inf in a client update (a client failure) or in the global model | 1 |
| `DiskFullError` | no space left while writing; the last good checkpoint is intact | 1 |
| `RunInterrupted` | SIGINT/SIGTERM: stopped at a safe point with a checkpoint | 128 + signal |
"""

from __future__ import annotations


class SparsyFedError(Exception):
    """Base class: an error whose message is one line meant for the user."""

    exit_status = 1


class CheckpointError(SparsyFedError):
    """A checkpoint or model file cannot be used (the message names the file)."""

    exit_status = 2


class RunDirectoryError(SparsyFedError):
    """The run directory cannot be used as asked (the message names it and says what to do)."""

    exit_status = 2


class RunFailedError(SparsyFedError):
    """The federated run failed while running (clients failed, too few clients succeeded)."""


class NonFiniteError(RunFailedError):
    """NaN or Inf in a client's update or in the aggregated global model."""


class DiskFullError(RunFailedError, OSError):
    """No space left on the device while writing a run file."""


class RunInterrupted(SparsyFedError):
    """The run stopped at a safe point because of a signal (SIGINT, SIGTERM)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


class UsageError(SparsyFedError):
    """A configuration or command-line error (the message names the key, the value, what is allowed)."""

    exit_status = 2
