"""Global-mask snapshots of a run (`run_dir/masks/round_XXXXX.npz`) and their pooled IoU; numpy only.

The trainer saves the non-zero mask of every conv/linear stored weight of the global model every
`mask_snapshot_every` rounds; `sparsyfed plot` reads them for the mask-IoU heat-map without importing
torch. Format: one `.npz` (no pickle) holding `names` (the state-dict keys, in order) and, for the
`i`-th name, `bits_i` (the flattened mask bit-packed by `np.packbits`, 8 entries per byte) and
`shape_i`. Files are written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sparsyfed_lightning.federated.atomic_files import write_atomic


def save_mask_snapshot(masks: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> None:
    """Write boolean masks (keyed by state-dict name) bit-packed to an `.npz` file, atomically."""
    arrays: dict[str, np.ndarray] = {"names": np.array(list(masks), dtype=np.str_)}
    for i, mask in enumerate(masks.values()):
        mask = np.asarray(mask)
        arrays[f"bits_{i}"] = np.packbits(mask.astype(bool, copy=False).reshape(-1))
        arrays[f"shape_{i}"] = np.array(mask.shape, dtype=np.int64)
    write_atomic(path, "wb", lambda handle: np.savez(handle, **arrays))


def load_mask_snapshot(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The boolean masks saved by `save_mask_snapshot`, in their original shapes."""
    with np.load(Path(path), allow_pickle=False) as stored:
        masks = {}
        for i, name in enumerate(stored["names"].tolist()):
            shape = tuple(int(n) for n in stored[f"shape_{i}"])
            bits = np.unpackbits(stored[f"bits_{i}"], count=math.prod(shape))
            masks[name] = bits.astype(bool).reshape(shape)
    return masks


def pooled_mask_iou(masks_a: Mapping[str, np.ndarray], masks_b: Mapping[str, np.ndarray]) -> float:
    """`sum |A & B| / sum |A | B|` over all masks (SPEC 9.3); 1.0 when both keep nothing.

    Both must hold the same names with the same shapes (one run's snapshots always do).
    """
    if set(masks_a) != set(masks_b):
        raise ValueError(f"mask snapshots hold different tensors: {sorted(set(masks_a) ^ set(masks_b))}")
    intersection = union = 0
    for name, a in masks_a.items():
        b = masks_b[name]
        if a.shape != b.shape:
            raise ValueError(f"mask snapshots disagree on the shape of {name!r}: {a.shape} and {b.shape}")
        intersection += int(np.count_nonzero(a & b))
        union += int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else intersection / union
