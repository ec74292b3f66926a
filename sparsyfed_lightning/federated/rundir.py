"""Run directories: which folders are ours, one writer at a time, and what may be replaced.

* Ownership: a run directory holds a marker file `.sparsyfed-run` written when the project creates
  it. `overwrite` only ever deletes a folder that carries the marker; any other non-empty folder is
  refused, so a mistyped `--trainer.run_dir ~` cannot delete a home directory.
* One writer: the process that runs (or resumes) a run holds an exclusive `flock` on
  `.sparsyfed-lock` inside it until the run ends. A second `fit` or `--resume` on the same folder
  is refused with one line naming the holder's pid. The operating system drops the lock when the
  holder dies, even by SIGKILL, so a crashed run never blocks its own resumption. (`flock` is
  advisory and per machine; on network file systems that do not support it two machines are not
  kept apart.)
* Every check runs before anything is written: a folder that is a file, not writable, held by
  another process or not ours is an error with nothing created or deleted.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from sparsyfed_lightning.federated.errors import RunDirectoryError

MARKER_NAME = ".sparsyfed-run"
LOCK_NAME = ".sparsyfed-lock"

# Run directories this process holds the lock of, by resolved path: a second claim from the same
# process (the CLI claims before writing config.yaml, then `fit` claims again) reuses the lock.
_HELD: dict[Path, RunDirectory] = {}


class RunDirectory:
    """A run directory claimed by this process (see the module doc). Use `claim`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    # -- the public entry points -----------------------------------------------------------------
    @classmethod
    def claim(cls, path: str | os.PathLike[str], *, resume: bool, overwrite: bool = False,
              resume_hint: str = "", overwrite_hint: str = "") -> RunDirectory:
        """Check `path` and lock it for this process: a resumed run, or a new one (created, marked).

        `resume_hint`/`overwrite_hint` say in error lines how to ask for resuming/overwriting.
        """
        path = Path(path)
        held = _HELD.get(_key(path))
        if held is not None:
            return held
        run_dir = cls(path)
        run_dir._check_location()
        if resume:
            if not path.is_dir() or not run_dir.is_marked():
                raise RunDirectoryError(f"{path} is not a sparsyfed run directory (no {MARKER_NAME} marker)")
            run_dir._lock()
        elif path.exists() and any(path.iterdir()):
            if not overwrite:
                raise RunDirectoryError(
                    f"trainer.run_dir={path} already exists; {resume_hint or 'resume it'} to continue it or "
                    f"{overwrite_hint or 'overwrite it'} to replace it"
                )
            if not run_dir.is_marked():
                raise RunDirectoryError(
                    f"overwrite refuses to delete {path}: it is not a sparsyfed run directory "
                    f"(no {MARKER_NAME} marker); choose another trainer.run_dir or remove it yourself"
                )
            run_dir._lock()  # refuse to delete a run that another process is writing
            shutil.rmtree(path)
            run_dir._lock_fd = None  # its lock file is gone with the folder; lock the new one
            run_dir._create()
        else:
            run_dir._create()
        _HELD[_key(path)] = run_dir
        return run_dir

    def release(self) -> None:
        """Drop the lock (the run is over)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        _HELD.pop(_key(self.path), None)

    def is_marked(self) -> bool:
        """Whether the folder carries this project's run-directory marker."""
        return (self.path / MARKER_NAME).is_file()

    # -- internals -------------------------------------------------------------------------------
    def _check_location(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunDirectoryError(f"trainer.run_dir={path} is a file, not a folder")
        existing = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise RunDirectoryError(f"trainer.run_dir={path} is not writable ({existing} is read-only for this user)")

    def _create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            marker = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid()}
            (self.path / MARKER_NAME).write_text(json.dumps(marker) + "\n")
        except OSError as error:
            reason = error.strerror or error
            raise RunDirectoryError(f"trainer.run_dir={self.path} cannot be created: {reason}") from error
        self._lock()

    def _lock(self) -> None:
        try:
            self._lock_fd = acquire_lock(self.path / LOCK_NAME)
        except LockHeldError as held:
            raise RunDirectoryError(
                f"trainer.run_dir={self.path} is in use by another process (pid {held.holder}); wait for it to end "
                "or stop it first (one writer per run directory)"
            ) from None
        except OSError as error:
            reason = error.strerror or error
            raise RunDirectoryError(f"trainer.run_dir={self.path} cannot be locked: {reason}") from error


class LockHeldError(Exception):
    """Another process holds a lock file; `holder` is the pid it wrote into it."""

    def __init__(self, holder: str) -> None:
        super().__init__(f"held by pid {holder}")
        self.holder = holder


def acquire_lock(lock_path: Path) -> int:
    """Lock `lock_path` (created if needed) for this process and write its pid into it; returns the
    open descriptor (closing it releases the lock). `LockHeldError` when another process holds it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockHeldError(holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_holder(lock_path: Path) -> str | None:
    """The pid holding `lock_path`, or None when nobody does (or the file does not exist). Only looks."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # also drops the shared lock taken to look
    return None


def release_all() -> None:
    """Release every run directory this process holds (end of a CLI command)."""
    for run_dir in list(_HELD.values()):
        run_dir.release()


def _key(path: Path) -> Path:
    return path.absolute().resolve()
