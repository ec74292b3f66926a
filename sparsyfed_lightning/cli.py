"""The `sparsyfed` command (placeholder until the federated loop lands)."""

from __future__ import annotations

import sys

from sparsyfed_lightning import __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--version", "-V"):
        print(f"sparsyfed-lightning {__version__}")
        return 0
    print("usage: sparsyfed [--version]")
    return 0
