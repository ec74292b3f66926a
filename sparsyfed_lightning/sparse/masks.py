"""Mask metrics as pure functions on tensor dicts (SPEC 9): density, regrowth, mask IoU, density gain.

Shared by the client (regrowth against the received model) and the server (round metrics).

The caller picks the tensors (all parameters, conv/linear weights only, the whole state dict); the
functions pool over whatever they are given. Decisions:

* A non-zero is `x != 0` numerically, as in the authors' analyses: `-0.0` counts as zero and NaN as
  non-zero. (The codec, which must be bit-exact, compares raw bits instead.)
* Pooled quantities sum counts over tensors before dividing, as SPEC 9.3's pooled IoU does.
* The IoU of two empty masks is 1.0: two models that keep nothing agree perfectly, and a run that
  collapses a layer should not log NaN.
* Per-tensor density leaves out tensors with no entries (their density is undefined).
* Mask snapshots for lagged IoU are bit-packed with `sparse.pack_bits` (8 entries per byte) and kept
  together with the shape, as plain `(uint8 tensor, shape tuple)` pairs that `torch.save` and
  `torch.load(weights_only=True)` handle; padding bits are zero and are masked out anyway.
* Counts come back as Python numbers: one host sync per call, not per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from sparsyfed_lightning.sparse.activations import pack_bits, unpack_bits

PackedMask = tuple[torch.Tensor, tuple[int, ...]]
"""A bit-packed boolean mask: `(uint8 bits, original shape)`."""

# Number of set bits of every byte value, for popcounts of packed masks.
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _matching(a: Mapping[str, object], b: Mapping[str, object], what: str) -> list[str]:
    """Keys of `a`, after checking that `b` has exactly the same ones."""
    missing, extra = [k for k in a if k not in b], [k for k in b if k not in a]
    if missing or extra:
        raise ValueError(f"{what}: keys differ (only in first: {missing}, only in second: {extra})")
    return list(a)


def _total(counts: list[torch.Tensor]) -> int:
    return int(torch.stack([c.cpu() for c in counts]).sum()) if counts else 0


def nonzero_masks(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Boolean non-zero pattern of each tensor."""
    return {k: t.detach() != 0 for k, t in tensors.items()}


def density(tensors: Mapping[str, torch.Tensor]) -> float:
    """Fraction of non-zero entries pooled over all tensors (SPEC 9.1)."""
    numel = sum(t.numel() for t in tensors.values())
    if numel == 0:
        raise ValueError("density of no entries is undefined")
    return _total([torch.count_nonzero(t.detach()) for t in tensors.values()]) / numel


def per_tensor_density(tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of non-zero entries of each tensor; tensors without entries are left out."""
    kept = {k: t.detach() for k, t in tensors.items() if t.numel()}
    if not kept:
        return {}
    counts = torch.stack([torch.count_nonzero(t).cpu() for t in kept.values()]).tolist()
    return {k: c / t.numel() for (k, t), c in zip(kept.items(), counts, strict=True)}


def regrowth_counts(
    global_tensors: Mapping[str, torch.Tensor], local_tensors: Mapping[str, torch.Tensor]
) -> tuple[int, int]:
    """`(activated, deactivated)` of SPEC 9.2, pooled over tensors.

    activated = #{G == 0 and X != 0} (weights that appeared), deactivated = #{G != 0 and X == 0}.
    """
    activated, deactivated = [], []
    for key in _matching(global_tensors, local_tensors, "regrowth_counts"):
        g, x = global_tensors[key].detach(), local_tensors[key].detach().to(global_tensors[key].device)
        if g.shape != x.shape:
            raise ValueError(f"regrowth_counts: {key!r} has shapes {tuple(g.shape)} and {tuple(x.shape)}")
        g_nz, x_nz = g != 0, x != 0
        activated.append(torch.count_nonzero(~g_nz & x_nz))
        deactivated.append(torch.count_nonzero(g_nz & ~x_nz))
    return _total(activated), _total(deactivated)


def _iou(intersection: int, union: int) -> float:
    return 1.0 if union == 0 else intersection / union


def mask_iou(masks_a: Mapping[str, torch.Tensor], masks_b: Mapping[str, torch.Tensor]) -> float:
    """Pooled IoU `sum |A & B| / sum |A | B|` of boolean masks (SPEC 9.3); 1.0 if both are empty."""
    inter, union = [], []
    for key in _matching(masks_a, masks_b, "mask_iou"):
        a, b = masks_a[key].bool(), masks_b[key].bool().to(masks_a[key].device)
        if a.shape != b.shape:
            raise ValueError(f"mask_iou: {key!r} has shapes {tuple(a.shape)} and {tuple(b.shape)}")
        inter.append(torch.count_nonzero(a & b))
        union.append(torch.count_nonzero(a | b))
    return _iou(_total(inter), _total(union))


def pack_masks(masks: Mapping[str, torch.Tensor]) -> dict[str, PackedMask]:
    """Bit-pack boolean masks (1 bit per entry) for cheap per-round snapshots."""
    return {k: (pack_bits(m.detach().bool()), tuple(m.shape)) for k, m in masks.items()}


def unpack_masks(packed: Mapping[str, PackedMask]) -> dict[str, torch.Tensor]:
    """Inverse of `pack_masks`."""
    return {k: unpack_bits(bits, math.prod(shape)).reshape(shape) for k, (bits, shape) in packed.items()}


def _popcount(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Set bits among the first `numel` bits of a packed mask (padding bits never count)."""
    tail = numel % 8
    if tail:
        # Packing `tail` ones yields exactly the valid bits of a last byte, whatever bit order
        # `pack_bits` uses.
        bits = bits.clone()
        bits[-1] &= pack_bits(torch.ones(tail, dtype=torch.bool, device=bits.device))[0]
    return _POPCOUNT.to(bits.device)[bits.long()].sum()


def packed_mask_iou(packed_a: Mapping[str, PackedMask], packed_b: Mapping[str, PackedMask]) -> float:
    """`mask_iou` of two `pack_masks` snapshots, computed on the packed bytes."""
    inter, union = [], []
    for key in _matching(packed_a, packed_b, "packed_mask_iou"):
        (a, shape_a), (b, shape_b) = packed_a[key], packed_b[key]
        if tuple(shape_a) != tuple(shape_b):
            raise ValueError(f"packed_mask_iou: {key!r} has shapes {tuple(shape_a)} and {tuple(shape_b)}")
        numel = math.prod(shape_a)
        b = b.to(a.device)
        inter.append(_popcount(a & b, numel))
        union.append(_popcount(a | b, numel))
    return _iou(_total(inter), _total(union))


def density_gain(global_density_after_aggregation: float, target_density: float) -> float:
    """Server-side density gain `density(global after aggregation) - (1 - target sparsity)` (SPEC 9.2)."""
    for name, value in (
        ("global_density_after_aggregation", global_density_after_aggregation),
        ("target_density", target_density),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(global_density_after_aggregation) - float(target_density)
