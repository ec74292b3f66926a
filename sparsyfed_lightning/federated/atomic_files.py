"""File writes a crash never leaves half-done, without torch (the plots and mask snapshots use them).

* `write_atomic`: the content goes to a temporary file in the same folder (`.<name>.tmp-<random>`),
  is flushed to disk, then renamed over the target: a reader or a crash sees either the old file or
  the complete new one. A killed write leaves only such a temporary file; `remove_temp_files`
  cleans them up on the next start.
* A full disk (`ENOSPC`) becomes a `DiskFullError` naming the file; the temporary file is removed and
  the previous file at the target path stays as it was.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsyfed_lightning.federated.errors import DiskFullError

TEMP_MARK = ".tmp-"


def write_atomic(path: str | os.PathLike[str], mode: str, write: Callable[[Any], None]) -> None:
    """Run `write(handle)` on a temporary file beside `path` (opened with `mode`), then rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    except OSError as error:
        raise disk_error(error, path) from error
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise disk_error(error, path) from error
        raise


def write_text_atomic(text: str, path: str | os.PathLike[str]) -> None:
    """Write a text file atomically."""
    write_atomic(path, "w", lambda handle: handle.write(text))


def append_line(line: str, path: str | os.PathLike[str]) -> None:
    """Append one line to a text file (e.g. `metrics.jsonl`), with disk-full errors made readable."""
    path = Path(path)
    try:
        with open(path, "a") as handle:
            handle.write(line if line.endswith("\n") else line + "\n")
            handle.flush()
    except OSError as error:
        raise disk_error(error, path) from error


def remove_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that killed atomic writes left in `folder` (and its subfolders)."""
    removed = []
    for path in Path(folder).rglob(f".*{TEMP_MARK}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def disk_error(error: OSError, path: Path) -> OSError:
    """`error`, or a `DiskFullError` naming `path` when the disk is full."""
    if error.errno == errno.ENOSPC and not isinstance(error, DiskFullError):
        return DiskFullError(f"the disk is full: writing {path} failed (no space left on device)")
    return error
