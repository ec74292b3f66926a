"""Atomic checkpoint files: written to a temporary file in the same folder, then renamed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _write_atomic(path: str | os.PathLike[str], mode: str, write: Callable[[Any], None]) -> None:
    """Run `write(handle)` on a temporary file beside `path`, then rename it over `path`."""
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


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """`torch.save` to `path` so that a reader (or a crash) never sees a half-written file."""
    _write_atomic(path, "wb", lambda handle: torch.save(obj, handle))


def write_text_atomic(text: str, path: str | os.PathLike[str]) -> None:
    """Write a text file atomically."""
    _write_atomic(path, "w", lambda handle: handle.write(text))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by `save_atomic` (CPU tensors)."""
    return torch.load(path, map_location="cpu", weights_only=False)
