"""On-disk cache of partitions and materialised features.

* Location: `cache_dir` if given, else `$XDG_CACHE_HOME/sparsyfed_lightning` (default
  `~/.cache/sparsyfed_lightning`).
* Keys: a SHA-256 over a JSON dump of everything the cached object depends on (dataset fingerprint,
  partitioner settings, seed, feature settings, a format version), so a changed input is a cache
  miss rather than a stale hit.
* Writes are atomic (temporary file in the same folder, then `os.replace`), so a crash or two
  processes writing the same entry never leave a half-written file behind. An unreadable entry is
  treated as a miss and rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

# Bump when the layout of a cached object or the algorithm producing it changes.
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/sparsyfed_lightning`, falling back to `~/.cache/sparsyfed_lightning`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsyfed_lightning"


def cache_key(**parts: object) -> str:
    """Stable short hash of keyword parts (JSON-serialisable values)."""
    payload = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def array_digest(*arrays: np.ndarray) -> str:
    """SHA-256 of the arrays' dtypes, shapes and bytes (a content fingerprint)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:24]


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path` for writing; it replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically save named NumPy arrays as an `.npz` file."""
    with atomic_writer(path) as handle:
        np.savez(handle, **arrays)


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """Named arrays saved by `save_arrays`, or None when missing or unreadable."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except Exception:  # a truncated or foreign file (BadZipFile, ValueError, ...) is just a miss
        return None


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Atomically save named tensors with `torch.save`."""
    with atomic_writer(path) as handle:
        torch.save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, handle)


def load_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """Named tensors saved by `save_tensors`, or None when missing or unreadable."""
    if not path.exists():
        return None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file (UnpicklingError, RuntimeError, ...) is just a miss
        return None
    return loaded if isinstance(loaded, dict) else None
