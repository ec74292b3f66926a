"""Files a run writes and reads back: atomic, integrity-checked, and safe to load from strangers.

* Atomic (`atomic_files.py`): every file is written to a temporary file in the same folder, then
  renamed over its target, so a reader or a crash never sees half a file.
* Integrity: a checkpoint or model file is a dict `{"format", "kind", "sha256", "content"}`; the
  SHA-256 covers every tensor's bytes, dtype and shape and every other value of `content` in a fixed
  traversal order, and is verified on load. A truncated, empty or bit-flipped file is a
  `CheckpointError` naming the file.
* Untrusted files: everything is loaded with `torch.load(weights_only=True)`, which unpickles only
  tensors and plain containers/numbers/strings: a crafted pickle that names `os.system` is rejected
  instead of run. Everything this project stores in a checkpoint is of those types.
* Disk full: an `OSError` with `ENOSPC` while writing becomes a `DiskFullError`; the previous file at
  the target path stays as it was.

`RunCheckpoints` keeps the latest checkpoint (`checkpoint.pt`) and the one before it
(`checkpoint.prev.pt`), so a damaged latest one can be resumed from the previous one.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from sparsyfed_lightning.federated.atomic_files import TEMP_MARK, disk_error, write_atomic
from sparsyfed_lightning.federated.errors import CheckpointError

FORMAT = "sparsyfed-lightning/2"
CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pt"


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """`torch.save` to `path` so that a reader (or a crash) never sees a half-written file."""
    write_atomic(path, "wb", lambda handle: torch.save(obj, handle))


def content_digest(content: Any) -> str:
    """SHA-256 over `content`: tensors by dtype, shape and bytes; other values by type and repr."""
    digest = hashlib.sha256()
    _feed(digest, content)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}|".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, list | tuple):
        digest.update(f"{type(value).__name__}{len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__}:{value!r}|".encode())


def save_verified(content: Any, path: str | os.PathLike[str], kind: str) -> None:
    """Write `content` atomically with its SHA-256 (see the module doc); `kind` names what it is."""
    save_atomic({"format": FORMAT, "kind": kind, "sha256": content_digest(content), "content": content}, path)


def load_verified(path: str | os.PathLike[str], kinds: tuple[str, ...]) -> tuple[str, Any]:
    """Load a file written by `save_verified` whose kind is one of `kinds`; returns `(kind, content)`.

    Raises `CheckpointError` (one line naming the file) for a missing, empty, truncated, corrupted,
    foreign or unsafe file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error.strerror or error}") from error
    if not data:
        raise CheckpointError(f"{path} is empty (an interrupted copy or write?)")
    if not zipfile.is_zipfile(io.BytesIO(data)):  # torch.save writes a zip archive
        raise CheckpointError(f"{path} is damaged or not a checkpoint (truncated or corrupted file)")
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} was refused by the safe loader (weights_only=True): {_unpickler_reason(error)}; "
            "it holds objects other than tensors and plain data, and loading it could run code"
        ) from error
    except Exception as error:  # noqa: BLE001 - a corrupted archive or pickle fails in many ways
        raise CheckpointError(f"{path} is damaged or not a checkpoint (truncated or corrupted file)") from error
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or "content" not in saved:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"{path} is not a {FORMAT} file (found {found!r}); it was not written by this version")
    if saved.get("kind") not in kinds:
        raise CheckpointError(f"{path} holds a {saved.get('kind')!r}, expected {' or '.join(map(repr, kinds))}")
    if content_digest(saved["content"]) != saved.get("sha256"):
        raise CheckpointError(f"{path} is damaged: its integrity check (SHA-256) does not match its content")
    return saved["kind"], saved["content"]


def _unpickler_reason(error: Exception) -> str:
    """The specific part of torch's weights-only refusal (e.g. `Unsupported global: GLOBAL posix.system`)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return (rest or (lines[index + 1] if index + 1 < len(lines) else "")).rstrip(".")
    return lines[0] if lines else type(error).__name__


def load_model_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The global model state held by a run's `global_model.pt` or a `checkpoint.pt`."""
    kind, content = load_verified(path, ("global_model", "checkpoint"))
    state = content if kind == "global_model" else content["server"]["global_state"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no model state")
    return state


class RunCheckpoints:
    """The latest checkpoint of a run directory and the previous one.

    `save` writes the new checkpoint to a temporary file first; only when it is complete does the
    current `checkpoint.pt` become `checkpoint.prev.pt` and the new file `checkpoint.pt`, so a full
    disk or a crash never leaves the run without a good checkpoint. A current file that is not
    known to be good (e.g. it failed its integrity check and the run resumed from the previous one)
    is not rotated into `checkpoint.prev.pt`; it is simply replaced.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.latest = self.run_dir / CHECKPOINT_NAME
        self.previous = self.run_dir / PREVIOUS_CHECKPOINT_NAME
        self.latest_is_good = False  # True once this process wrote or verified `latest`
        self.saved_round: int | None = None  # the round of the last checkpoint this process wrote

    def save(self, content: dict[str, Any], round_index: int) -> None:
        """Write `content` (a checkpoint of round `round_index`) as the latest checkpoint."""
        staged = self.run_dir / f".{CHECKPOINT_NAME}{TEMP_MARK}staged"
        save_verified(content, staged, "checkpoint")
        try:
            if self.latest.exists() and self.latest_is_good:
                os.replace(self.latest, self.previous)
            os.replace(staged, self.latest)
        except OSError as error:
            staged.unlink(missing_ok=True)
            raise disk_error(error, self.latest) from error
        self.latest_is_good = True
        self.saved_round = round_index

    def load(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """The content of `path` (default: the latest checkpoint), verified."""
        path = Path(path) if path is not None else self.latest
        _, content = load_verified(path, ("checkpoint",))
        self.latest_is_good = path.resolve() == self.latest.resolve()
        return content

    def resume_hint(self) -> str:
        """How to go on from the previous checkpoint, for error lines about a damaged latest one."""
        if self.previous.is_file():
            return f"resume from the previous checkpoint by adding --ckpt_path {self.previous}"
        return "no previous checkpoint exists; start the run again with --overwrite"
