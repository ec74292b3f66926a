"""Magnitude pruning and threshold selection: the one pruning routine every method shares.

Count semantics follow PyTorch's `prune.global_unstructured(..., L1Unstructured, amount=s)`, which
the authors used (SPEC 5): exactly `round(s * N)` entries with the smallest magnitude are zeroed,
existing zeros count toward that number, and Python's `round` (half to even) is used. Where several
entries tie at the cut, the ones with the lowest flat index are pruned first, so the result is
deterministic (PyTorch's `topk` leaves ties unspecified).

Thresholds are selected with `torch.topk` on whichever side of the cut is smaller, never with
`kthvalue` (an order of magnitude slower on GPU, DESIGN.md), and without host syncs: every
function here returns device tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from sparsyfed_lightning.checks import check_number


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Return `sparsity` as a float if it is a number in [0, 1), else raise a ValueError naming it."""
    return check_number(sparsity, name, low=0, high=1, high_inclusive=False)


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) along the last dim, via topk on the smaller side.

    A flat tensor gives a 0-d result, a (rows, n) tensor one entry per row.
    """
    n = values.shape[-1]
    if k <= n - k + 1:
        return torch.topk(values, k, largest=False, sorted=False).values.amax(-1)
    return torch.topk(values, n - k + 1, largest=True, sorted=False).values.amin(-1)


def smallest_magnitude_mask(magnitudes: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Boolean mask (same shape) of the `n_prune` smallest entries; ties pruned lowest index first."""
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    if n_prune <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    if n_prune >= n:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    cut = _kth_smallest(flat, n_prune)
    below = flat < cut
    ties = flat == cut
    # Only as many tied entries as are still needed to reach n_prune, in index order.
    still_needed = n_prune - below.sum()
    tie_rank = torch.cumsum(ties, dim=0)
    return (below | (ties & (tie_rank <= still_needed))).reshape(magnitudes.shape)


def magnitude_threshold(x: torch.Tensor, keep_fraction: float | torch.Tensor, *, groups: int = 1) -> torch.Tensor:
    """Magnitude of the k-th largest entry of `x`, `k = ceil(keep_fraction * numel)`, as a 0-d tensor.

    Keeping `|x| >= threshold` keeps the top k entries plus any ties at the threshold (SPEC 2).
    With `groups` > 1, `x` is that many equal consecutive chunks (stacked clients, `models.stacked`)
    and each gets its own threshold: the result has shape (groups,). A float `keep_fraction` selects
    with `topk` (k known on the host); a device tensor (one entry, or one per group) selects with a
    sort and a gather, so a keep fraction that lives on the device is never read back to the host.
    """
    magnitudes = x.detach().reshape(groups, -1).abs()
    n = magnitudes.shape[1]
    if isinstance(keep_fraction, torch.Tensor):
        # Float64 as the host path computes `ceil(keep_fraction * n)` in Python floats.
        k = torch.ceil(keep_fraction.to(torch.float64).reshape(-1, 1) * n).clamp(1, n).long()
        descending = torch.sort(magnitudes, dim=1, descending=True).values
        threshold = descending.gather(1, k.expand(groups, 1) - 1).reshape(groups)
    else:
        k = min(n, max(1, math.ceil(keep_fraction * n)))
        threshold = _kth_smallest(magnitudes, n - k + 1)
    return threshold.reshape(()) if groups == 1 else threshold


@torch.no_grad()
def prune_smallest_(
    tensors: Sequence[torch.Tensor], n_prune: int, protected: Sequence[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Zero the `n_prune` smallest-magnitude entries over all `tensors` jointly, in place.

    Entries marked in `protected` (boolean masks, one per tensor) are never pruned; `n_prune` is
    capped at the number of unprotected entries. Returns the keep masks (True = kept).
    """
    if not tensors:
        return []
    parts = [t.detach().reshape(-1).abs().float() for t in tensors]
    if protected is not None:
        parts = [m.masked_fill(p.reshape(-1), math.inf) for m, p in zip(parts, protected, strict=True)]
        n_prune = min(n_prune, sum(int((~p).sum()) for p in protected))
    magnitudes = torch.cat(parts)
    pruned = smallest_magnitude_mask(magnitudes, n_prune)
    masks = []
    for t, pruned_part in zip(tensors, torch.split(pruned, [t.numel() for t in tensors]), strict=True):
        keep = ~pruned_part.reshape(t.shape)
        t.masked_fill_(~keep, 0)  # not mul_: -x * 0 is -0.0, which a bit-exact codec must send
        masks.append(keep)
    return masks


@torch.no_grad()
def keep_largest_with_ties_(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """Zero the entries of `tensor` below its k-th largest magnitude, in place; returns the keep mask.

    Entries tied with the k-th largest are kept too, so more than `k` may survive; `k <= 0` and
    `k >= numel` keep the tensor whole. This is the authors' layer-wise pruning in FLASH's server
    (SPEC 12.4); `prune_smallest_` is the exact-count routine everything else uses.
    """
    n = tensor.numel()
    if k <= 0 or k >= n:
        return torch.ones_like(tensor, dtype=torch.bool)
    magnitudes = tensor.detach().abs().float()
    keep = magnitudes >= _kth_smallest(magnitudes.reshape(-1), n - k + 1)
    tensor.masked_fill_(~keep, 0)
    return keep


def global_magnitude_prune(
    tensors: Iterable[torch.Tensor], sparsity: float, min_layer_density: float = 0.0
) -> list[torch.Tensor]:
    """Prune `round(sparsity * N)` smallest magnitudes over all tensors jointly, in place (SPEC 5).

    `min_layer_density > 0` is a guard against layer collapse that the authors' code does not have
    (SPEC 15, quirk 8): each tensor first reserves its `ceil(min_layer_density * numel)` largest
    magnitudes, which are never pruned, and the global ranking prunes among the rest. It must be
    below `1 - sparsity`. Returns the keep masks, one per tensor.
    """
    sparsity = check_sparsity(sparsity)
    if not 0.0 <= min_layer_density < 1.0 - sparsity:
        raise ValueError(
            f"min_layer_density={min_layer_density!r} is invalid; it must be in [0, 1 - sparsity = {1.0 - sparsity:g})"
        )
    tensors = list(tensors)
    total = sum(t.numel() for t in tensors)
    protected = None
    if min_layer_density > 0:
        protected = [
            ~smallest_magnitude_mask(t.detach().abs(), t.numel() - math.ceil(min_layer_density * t.numel()))
            for t in tensors
        ]
    return prune_smallest_(tensors, round(sparsity * total), protected)


def layerwise_magnitude_prune(tensors: Iterable[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Prune `round(sparsity * numel)` smallest magnitudes of each tensor separately, in place."""
    sparsity = check_sparsity(sparsity)
    return [prune_smallest_([t], round(sparsity * t.numel()))[0] for t in tensors]
