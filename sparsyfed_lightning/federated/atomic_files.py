"""Atomic file writes without torch: a temporary file in the same folder, then `os.replace`.

A reader (or a crash) never sees a half-written file: either the old file or the complete new one.
Torch-free so that `sparsyfed plot` and the mask snapshots can use it without importing torch.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike[str], mode: str, write: Callable[[Any], None]) -> None:
    """Run `write(handle)` on a temporary file beside `path` (opened with `mode`), then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
