"""Command-line parsing for `sparsyfed sweep`, `table` and `plot SWEEP_DIR`: every error is one line."""

from __future__ import annotations

import argparse
from typing import NoReturn


class SweepUsageError(ValueError):
    """A bad command line (one line; exit status 2, nothing started or written)."""


class OneLineParser(argparse.ArgumentParser):
    """An `ArgumentParser` that raises `SweepUsageError` instead of printing its usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise SweepUsageError(message)
