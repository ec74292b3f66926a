"""Activation pruning of the tensors saved for the weight gradient (SPEC section 4).

For every conv/linear layer in training mode, the copy of its input that autograd keeps for
backward is replaced by a Top-K pruned, compact copy of the entries with `|x| >= threshold`
(`CompactTensor`). The forward output and the input gradient are computed from the dense input and
the full weight, exactly as without pruning; only `dL/dW` sees the pruned input.

Mechanism: a forward pre-hook on each layer installs a `saved_tensors_hooks` pair for the duration
of that layer's forward (inner hooks take precedence over outer ones), and the pack hook swaps the
layer's own input for its compact copy. Three more things make the saving real:

* ReLUs are swapped for `CompactReLU`, which keeps a bit-packed sign mask (1/32 of fp32) instead of
  its output; otherwise the dense ReLU output, which is the next conv's input, would stay alive.
* The layer's effective Powerprop weight `w = sign(v)|v|^beta`, also saved by the conv, is stored as
  "recompute from v" (v is the parameter, alive anyway) and rebuilt bit-identically in backward.
* Thresholds are selected rarely. The keep fraction of a layer is its weight density, read once
  per fit by `refresh()` (with beta > 1 and no momentum zeros are frozen, so it is constant within
  a round); with `threshold="first_batch"` (the authors' behaviour, the default) a conv layer's
  threshold is selected on the first pruned batch of a fit and reused (a dense pruned copy is then
  one `hardshrink` per stacked client), linear layers select per step; `threshold="per_step"`
  selects for every layer at every step.

No step after a fit's first waits for the device (on CUDA the host must run ahead of the kernels
it queues). So nothing in a step has a shape that depends on the data, and nothing reads a device
value: thresholds are selected with `topk` for a k known on the host, and a compact copy is a
fixed-size buffer filled by `nonzero_static`. Its capacity is the difficulty: with the frozen
threshold the number of entries it keeps varies from batch to batch, and no fixed size short of
the whole tensor bounds it. The capacity (`compact_capacity`) is `headroom` (default `HEADROOM`,
1.15) times the larger of the expected count (`ceil(keep_fraction * numel)`) and the count kept on
the layer's first compact batch of the fit (read there, once: ties at the threshold can make it
larger), plus `CAPACITY_FLOOR` (1/64) of the entries. Measured within local fits of ResNet-18
(rounds 2-6, lr 0.5, docs/PERFORMANCE.md), layers keeping over 6% of their input kept at most
1.07x that count on later batches, while layers whose weights global pruning had nearly emptied
(keeping a few dozen entries, far out in the tail) swung up to 10x: the floor, which costs at most
what a bitmap costs, is for them. A batch that keeps more than the capacity stores the first
`capacity` kept entries in flat order and drops the rest from its weight gradient (an
approximation, the only one); `take_overflows()` reads the per-layer device counters of such
copies once per fit, and the client callback reports them as the round metric
`activation_overflows` and a warning. With `per_step` thresholds a batch keeps exactly the expected
count plus ties, so only ties can overflow it. Stacked clients (`models.stacked`) each get their
own capacity and overflow count, as alone. A zero threshold (a layer keeping more entries than its
input has non-zeros) is raised to the smallest positive float: zeros are never stored, which
changes nothing in the pruned input.

With `refresh_every_step` (beta = 1: zeros regrow, densities change every step) the keep
fractions are recomputed on the device at every step, thresholds are selected by a sort and a
gather at a device-side k, and the pruned copies are stored dense (`torch.where`): their size
would follow a density that is back near 1 after a step, so there is nothing to compact.

What stays dense by construction: BatchNorm inputs (the conv outputs BN needs for its backward) and
the network input. Costs, on ResNet-18 at batch 32 and 95% layer sparsity: the bytes saved for
backward drop to 0.597x of the dense step's (bit-packed masks, and buffers for 1.46x the kept
values: 1.15 x 5% + 1/64); per pruned layer and step a comparison, a `nonzero_static`, a gather and
a bit-pack in the forward, an unpack and a masked scatter in the backward (docs/PERFORMANCE.md has
the measured times).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.hooks import RemovableHandle

from sparsyfed_lightning.sparse.layers import is_linear, prunable_layers, stored_weight
from sparsyfed_lightning.sparse.memory import record_compact
from sparsyfed_lightning.sparse.powerprop import _SignedPower, signed_power
from sparsyfed_lightning.sparse.pruning import magnitude_threshold

MIN_KEEP_FRACTION = 1e-7  # SPEC 4.1: avoids k = 0 when a whole layer has been pruned away
# Tensors smaller than this (1 MiB of fp32) are kept as a dense pruned copy, small ReLUs keep their
# output and small Powerprop weights are saved as they are: for them the extra kernels of a compact
# encoding cost more time than the kilobytes they save. Every conv input of ResNet-18 at batch 32
# (the smallest is 32 x 512 x 4 x 4) is at least this large.
MIN_COMPACT_NUMEL = 1 << 18
# Capacity of a compact copy (see the module doc): HEADROOM x the entries its layer is expected to
# keep, plus CAPACITY_FLOOR x its entries. Frozen thresholds high in the tail (layers that keep
# well under 1%) see the largest relative swings in what they keep; the floor covers them at the
# cost of a bitmap at most (n/64 slots of 8 bytes = n/8 bytes).
HEADROOM = 1.15
CAPACITY_FLOOR = 1 / 64
ThresholdMode = Literal["first_batch", "per_step"]


class CompactTensor:
    """At most `capacity` entries of a tensor (those marked by `keep`), in fixed-size buffers.

    The kept entries are found with `nonzero_static`, whose output has `capacity + 1` slots whatever
    the data, so nothing here waits for the device. When more than `capacity` entries are marked,
    the first `capacity` in flat order are stored, and 1 is added to `overflows` (a device counter).
    Two layouts, chosen from the capacity: flat int32 indices + values (8 bytes per slot) below
    1/32 of the entries, a bit-packed mask + values (1/8 byte per entry + 4 per slot) from 1/32 up.
    """

    __slots__ = ("shape", "dtype", "indices", "bitmap", "values")

    def __init__(
        self, x: torch.Tensor, keep: torch.Tensor, capacity: int, overflows: torch.Tensor | None = None
    ) -> None:
        flat = x.detach().reshape(-1)
        numel = flat.numel()
        # Unused slots hold `numel`: one past the end, so they scatter into a discarded extra entry.
        found = torch.nonzero_static(keep.reshape(-1), size=capacity + 1, fill_value=numel).reshape(-1)
        if overflows is not None:
            overflows.add_(found[capacity] < numel)
        indices = found[:capacity]
        self.shape = x.shape
        self.dtype = x.dtype
        self.values = flat.index_select(0, indices.clamp(max=numel - 1))
        self.indices: torch.Tensor | None = None
        self.bitmap: torch.Tensor | None = None
        if capacity * 32 < numel:
            self.indices = indices.to(torch.int32 if numel < 2**31 else torch.int64)
            record_compact((self.indices, self.values))
        else:
            # The mask of the stored entries (not `keep`, which may mark more than fit).
            stored = torch.zeros(numel + 1, dtype=torch.bool, device=flat.device)
            stored.index_fill_(0, indices, True)
            self.bitmap = pack_bits(stored[:numel])
            record_compact((self.bitmap, self.values))

    def to_dense(self) -> torch.Tensor:
        numel = math.prod(self.shape)
        if self.indices is not None:
            dense = torch.zeros(numel + 1, dtype=self.dtype, device=self.values.device)
            dense.index_put_((self.indices,), self.values)
            return dense[:numel].reshape(self.shape)
        dense = torch.zeros(numel, dtype=self.dtype, device=self.values.device)
        dense.masked_scatter_(unpack_bits(self.bitmap, numel), self.values)  # type: ignore[arg-type]
        return dense.reshape(self.shape)

    def kept(self) -> torch.Tensor:
        """Number of stored entries, as a 0-d device tensor."""
        if self.indices is not None:
            return (self.indices < math.prod(self.shape)).sum()
        return unpack_bits(self.bitmap, math.prod(self.shape)).sum()  # type: ignore[arg-type]


def keep_mask(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """`|x| >= threshold`, shaped like `x`.

    A 0-d threshold applies to the whole tensor; one of shape (1, k, 1) gives each of `k` stacked
    clients its own (their entries are the k consecutive chunks of dim 1, see `models.stacked`).
    """
    x = x.detach()
    if threshold.dim() == 0:
        return x.abs() >= threshold
    return (x.reshape(x.shape[0], threshold.shape[1], -1).abs() >= threshold).reshape(x.shape)


class _RecomputedWeight:
    """An effective Powerprop weight saved as (v, exponent, support) and rebuilt in backward."""

    __slots__ = ("stored", "exponent", "support")

    def __init__(self, stored: torch.Tensor, exponent: float, support: torch.Tensor | None) -> None:
        self.stored = stored
        self.exponent = exponent
        self.support = support

    def to_dense(self) -> torch.Tensor:
        with torch.no_grad():
            return signed_power(self.stored, self.exponent, self.support)


# Bit packing by multiplication: viewing 8 booleans as one int64 and multiplying by this constant
# gathers their low bits into the top byte (no carries: every partial product lands on its own bit);
# multiplying a byte by it and masking spreads the bits back out, one per byte. Both directions
# are three int64 passes over n/8 words, several times faster than shift-and-sum on 2 CPU cores.
_MAGIC = 0x8040201008040201 - (1 << 64)  # as a signed int64
_HIGH_BITS = 0x8080808080808080 - (1 << 64)
_LOW_BITS = 0x0101010101010101


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into uint8, eight entries per byte."""
    flat = mask.reshape(-1).view(torch.uint8)
    if flat.numel() % 8:
        flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    words = flat.view(torch.int64)
    return ((words * _MAGIC) >> 56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` bits as a flat boolean tensor."""
    spread = (packed.to(torch.int64) * _MAGIC) & _HIGH_BITS
    spread = (spread >> 7) & _LOW_BITS
    return spread.view(torch.uint8).view(torch.bool)[:numel]


class _CompactReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = torch.relu(x)
        ctx.save_for_backward(pack_bits(out > 0))
        ctx.shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        positive = unpack_bits(packed, math.prod(ctx.shape)).view(torch.uint8).reshape(ctx.shape)
        # ReLU's own backward kernel on a 0/1 tensor of the gradient's dtype: a boolean `where` is
        # an order of magnitude slower on CPU.
        return torch.ops.aten.threshold_backward(grad, positive.to(grad.dtype), 0)


class CompactReLU(nn.ReLU):
    """ReLU whose backward keeps a bit-packed sign mask instead of the (dense) output.

    Inputs smaller than `min_compact_numel` use the ordinary ReLU.
    """

    def __init__(self, min_compact_numel: int = MIN_COMPACT_NUMEL) -> None:
        super().__init__()
        self.min_compact_numel = min_compact_numel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad and x.numel() >= self.min_compact_numel:
            return _CompactReLUFunction.apply(x)
        return torch.relu(x)


class _Capacity:
    """Compact slots per stacked client, sized for inputs of `per_client` entries per client.

    Other input sizes (a fit's last, smaller batch) scale the slots in integer arithmetic, on the
    host and, for the stacked clients' limits, on the device (no host-to-device copy in a step).
    """

    def __init__(self, slots: list[int], per_client: int, device: torch.device) -> None:
        self.slots = slots
        self.per_client = per_client
        self._device_slots = torch.tensor(slots, dtype=torch.int64).to(device)  # on the first batch only
        self._device_limits: dict[int, torch.Tensor] = {}

    def slots_for(self, per_client: int) -> list[int]:
        return [min(per_client, -(-slots * per_client // self.per_client)) for slots in self.slots]

    def device_slots_for(self, per_client: int) -> torch.Tensor:
        """`slots_for(per_client)` as an int32 device tensor (computed there, cached)."""
        if per_client not in self._device_limits:
            rounded_up = self._device_slots * per_client + self.per_client - 1
            scaled = torch.div(rounded_up, self.per_client, rounding_mode="floor")
            self._device_limits[per_client] = scaled.clamp_max(per_client).to(torch.int32)
        return self._device_limits[per_client]


class _LayerState:
    __slots__ = (
        "keep_fraction", "client_keep", "device_keep", "threshold", "shrink", "freeze_threshold", "capacity",
        "overflows", "hooks", "last", "total",
    )

    def __init__(self, freeze_threshold: bool) -> None:
        self.keep_fraction = 1.0  # the mean over stacked clients
        self.client_keep = [1.0]  # one per stacked client, read on the host when a fit starts
        self.device_keep: torch.Tensor | None = None  # per client, re-read on the device every step
        self.threshold: torch.Tensor | None = None
        # The largest float below each stacked client's frozen threshold, on the host: `hardshrink`
        # by it keeps |x| >= threshold, the dense pruned copy in one kernel per client (read once,
        # when the thresholds are selected).
        self.shrink: list[float] | None = None
        self.freeze_threshold = freeze_threshold
        self.capacity: _Capacity | None = None
        self.overflows: torch.Tensor | None = None  # per client, compact copies of this fit that overflowed
        self.hooks: saved_tensors_hooks | None = None
        self.last: CompactTensor | torch.Tensor | None = None  # what the last pruned forward stored
        self.total = 0  # entries of that input


class ActivationPruning:
    """Prune conv/linear inputs saved for backward to each layer's keep fraction; see module doc.

    Args:
        model: the network; its conv/linear layers (optionally only `layer_names`) are pruned.
        threshold: `"first_batch"` (faithful: conv thresholds frozen after the first pruned batch
            of a fit) or `"per_step"`.
        keep_fraction: None for the layer's weight density (SparsyFed); a float for a fixed
            fraction for every layer (ZeroFL).
        refresh_every_step: re-read layer densities at every step (needed when zeros can regrow,
            i.e. beta = 1); they stay on the device, and the pruned copies are stored dense.
        compact_relu: swap ReLU modules for `CompactReLU` while attached.
        layer_names: restrict pruning to these layers (default: all conv/linear layers).
        min_compact_numel: inputs (and ReLU outputs) with fewer entries keep a dense pruned copy.
        clients: the number of clients `model` stacks (`models.stacked`); each client's part of a
            layer gets its own keep fraction (its weight density) and threshold, exactly as if it
            were trained alone (`min_compact_numel` also counts per client).
        headroom: capacity of a compact copy as a multiple of the entries expected to be kept (plus
            `CAPACITY_FLOOR` of the entries).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        threshold: ThresholdMode = "first_batch",
        keep_fraction: float | None = None,
        refresh_every_step: bool = False,
        compact_relu: bool = True,
        layer_names: Iterable[str] | None = None,
        min_compact_numel: int = MIN_COMPACT_NUMEL,
        clients: int = 1,
        headroom: float = HEADROOM,
    ) -> None:
        if threshold not in ("first_batch", "per_step"):
            raise ValueError(f"threshold must be 'first_batch' or 'per_step', got {threshold!r}")
        if keep_fraction is not None and not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
        if not headroom >= 1.0:
            raise ValueError(f"headroom must be >= 1, got {headroom!r}")
        self.model = model
        self.clients = clients
        self.keep_fraction = keep_fraction
        self.refresh_every_step = refresh_every_step
        self.compact_relu = compact_relu
        self.headroom = headroom
        # Sizes are per client: a stacked network stores what each of its clients would alone.
        self.min_compact_numel = min_compact_numel * clients
        wanted = None if layer_names is None else set(layer_names)
        self.layers: dict[str, nn.Module] = {
            name: m for name, m in prunable_layers(model) if wanted is None or name in wanted
        }
        if wanted is not None and wanted - set(self.layers):
            raise ValueError(f"unknown layers for activation pruning: {sorted(wanted - set(self.layers))}")
        self._states = {
            name: _LayerState(threshold == "first_batch" and not is_linear(m))
            for name, m in self.layers.items()
        }
        self._handles: list[RemovableHandle] = []
        self._swapped_relus: list[tuple[nn.Module, str, nn.Module]] = []

    # -- lifecycle -------------------------------------------------------------------------------
    def attach(self) -> ActivationPruning:
        """Install the hooks (and CompactReLUs); reads the keep fractions. Idempotent."""
        if self._handles:
            return self
        for name, module in self.layers.items():
            state = self._states[name]
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name, state)))
            self._handles.append(module.register_forward_hook(self._post_hook(state), always_call=True))
        if self.compact_relu:
            self._swap_relus()
        self.refresh()
        return self

    def detach(self) -> None:
        """Remove every hook and restore the original ReLU modules."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for parent, attr, original in reversed(self._swapped_relus):
            setattr(parent, attr, original)
        self._swapped_relus.clear()
        for state in self._states.values():
            state.last = None

    def __enter__(self) -> ActivationPruning:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def refresh(self) -> None:
        """Re-read keep fractions from the current weights; forget thresholds, capacities and overflows.

        Call at the start of every local fit (one host sync for all layers together).
        """
        for name, fractions in self._current_keep_fractions(self.layers.keys()).items():
            state = self._states[name]
            self._set_keep(state, fractions)
            state.threshold = None
            state.shrink = None
            state.capacity = None
            state.overflows = None
            state.device_keep = None

    def keep_fractions(self) -> dict[str, float]:
        """The keep fraction of each pruned layer when the fit started (`refresh`)."""
        return {name: state.keep_fraction for name, state in self._states.items()}

    def kept_fractions(self) -> dict[str, float]:
        """Fraction of input entries kept at each layer's last pruned forward (1 if none; reads the device)."""
        kept = {}
        for name, state in self._states.items():
            if state.last is None or not state.total:
                kept[name] = 1.0
            elif isinstance(state.last, CompactTensor):
                kept[name] = int(state.last.kept()) / state.total
            else:  # a dense pruned copy: every kept entry is non-zero (see `_select_threshold`)
                kept[name] = int(torch.count_nonzero(state.last)) / state.total
        return kept

    def take_overflows(self) -> dict[str, list[int]]:
        """Per layer and stacked client, the compact copies of this fit that dropped kept entries.

        Resets the counts. One host sync for all layers (call it when a fit ends); layers without
        overflow are left out.
        """
        names = [n for n, s in self._states.items() if s.overflows is not None]
        if not names:
            return {}
        counts = torch.stack([self._states[n].overflows for n in names]).tolist()  # type: ignore[misc]
        for name in names:
            self._states[name].overflows = None
        return {n: row for n, row in zip(names, counts, strict=True) if any(row)}

    # -- internals -------------------------------------------------------------------------------
    def _current_keep_fractions(self, names: Iterable[str]) -> dict[str, list[float]]:
        """Each layer's keep fraction per stacked client."""
        names = list(names)
        if self.keep_fraction is not None:
            return {n: [self.keep_fraction] * self.clients for n in names}
        if not names:
            return {}
        counts = torch.stack(
            [torch.count_nonzero(stored_weight(self.layers[n]).view(self.clients, -1), dim=1) for n in names]
        )
        counts_host = counts.tolist()  # the single sync
        return {
            n: [max(c * self.clients / stored_weight(self.layers[n]).numel(), MIN_KEEP_FRACTION) for c in row]
            for n, row in zip(names, counts_host, strict=True)
        }

    def _device_keep_fractions(self, name: str) -> torch.Tensor:
        """A layer's keep fraction per stacked client, computed on the device (float64, as on the host)."""
        stored = stored_weight(self.layers[name]).detach()
        if self.keep_fraction is not None:
            return torch.full((self.clients,), self.keep_fraction, dtype=torch.float64, device=stored.device)
        counts = torch.count_nonzero(stored.view(self.clients, -1), dim=1)
        return (counts.double() * self.clients / stored.numel()).clamp_min(MIN_KEEP_FRACTION)

    @staticmethod
    def _set_keep(state: _LayerState, fractions: list[float]) -> None:
        state.client_keep = fractions
        state.keep_fraction = sum(fractions) / len(fractions)

    def _select_threshold(self, x: torch.Tensor, state: _LayerState) -> torch.Tensor:
        """A 0-d threshold, or one per stacked client shaped (1, k, 1) (see `keep_mask`).

        Never below the smallest positive float: a layer that keeps more entries than its input has
        non-zeros would otherwise get threshold 0 and keep its zeros, which change nothing in the
        pruned copy but would fill a compact one.
        """
        keep = state.device_keep if state.device_keep is not None else state.client_keep
        if self.clients == 1:
            threshold = magnitude_threshold(x, keep[0])
        else:
            parts = x.detach().reshape(x.shape[0], self.clients, -1).transpose(0, 1)
            if state.device_keep is not None or len(set(keep)) == 1:
                # One selection for all clients (they received the same model, so their keep
                # fractions are the same host float; or they are one device tensor).
                shared = keep if state.device_keep is not None else keep[0]
                threshold = magnitude_threshold(parts, shared, groups=self.clients)
            else:
                threshold = torch.stack([magnitude_threshold(parts[i], keep[i]) for i in range(self.clients)])
            threshold = threshold.view(1, self.clients, 1)
        return threshold.clamp_min(_smallest_positive(x.dtype))

    def _pre_hook(self, name: str, state: _LayerState) -> Callable[..., tuple | None]:
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple | None:
            if not (mod.training and torch.is_grad_enabled()):
                return
            state.last = None
            if self.refresh_every_step:
                state.device_keep = self._device_keep_fractions(name)
            elif state.keep_fraction >= 1.0:
                return  # a dense layer prunes nothing (round 1 of SparsyFed)
            x, replaced = args[0], None
            if x.dim() > 2 and is_linear(mod) and not x.is_contiguous():
                # F.linear would save a reshaped copy of a non-contiguous N-D input, which the pack hook
                # cannot recognise as the layer's input: give the layer a contiguous one (same values).
                x = x.contiguous()
                replaced = (x, *args[1:])
            compact = x.numel() >= self.min_compact_numel and not self.refresh_every_step
            if state.threshold is None or not state.freeze_threshold:
                state.threshold = self._select_threshold(x, state)
                if state.freeze_threshold and state.device_keep is None and not compact:
                    below = torch.nextafter(state.threshold, state.threshold.new_zeros(()))
                    state.shrink = below.reshape(-1).tolist()  # the first batch may synchronise
            threshold = state.threshold
            if state.device_keep is not None and state.freeze_threshold:
                # A layer whose weights have become dense keeps all of its input, as a dense layer
                # does when its keep fraction is read on the host.
                dense = state.device_keep.view(threshold.shape) >= 1.0
                threshold = torch.where(dense, _smallest_positive(x.dtype), threshold)
            state.hooks = saved_tensors_hooks(self._make_pack(x, state, threshold, compact), _unpack)
            state.hooks.__enter__()
            return replaced

        return hook

    @staticmethod
    def _post_hook(state: _LayerState) -> Callable[..., None]:
        def hook(mod: nn.Module, args: object, output: object) -> None:
            if state.hooks is not None:
                hooks, state.hooks = state.hooks, None
                hooks.__exit__(None, None, None)

        return hook

    def _swap_relus(self) -> None:
        for parent in self.model.modules():
            for attr, child in list(parent.named_children()):
                if type(child) is nn.ReLU:
                    setattr(parent, attr, CompactReLU(self.min_compact_numel))
                    self._swapped_relus.append((parent, attr, child))

    def _capacity(self, keep: torch.Tensor, state: _LayerState) -> _Capacity:
        """Per client, `headroom` x the larger of the expected and the kept count of this batch, plus
        `CAPACITY_FLOOR` x the client's entries.

        Read once per fit, on the layer's first compact batch (one host sync): ties at the threshold
        can make that batch keep more than expected, and later batches would keep as many.
        """
        per_client = keep.numel() // self.clients
        counts = keep.reshape(keep.shape[0], self.clients, -1).sum(dim=(0, 2)).tolist()
        slots = [
            compact_capacity(max(count, math.ceil(fraction * per_client)), per_client, self.headroom)
            for count, fraction in zip(counts, state.client_keep, strict=True)
        ]
        return _Capacity(slots, per_client, keep.device)

    def _compact(self, t: torch.Tensor, keep: torch.Tensor, state: _LayerState) -> CompactTensor:
        """The compact copy of a layer input; counts the clients whose kept entries overflowed."""
        if state.capacity is None:
            state.capacity = self._capacity(keep, state)
        if state.overflows is None:
            state.overflows = torch.zeros(self.clients, dtype=torch.int64, device=t.device)
        per_client = t.numel() // self.clients
        capacities = state.capacity.slots_for(per_client)
        if self.clients == 1:
            return CompactTensor(t, keep, capacities[0], state.overflows)
        # Each stacked client stores its own first `capacity` kept entries, exactly as it would alone.
        limits = state.capacity.device_slots_for(per_client).view(-1, 1)
        batch = keep.shape[0]
        by_client = keep.reshape(batch, self.clients, -1).transpose(0, 1).reshape(self.clients, -1)
        rank = torch.cumsum(by_client, dim=1, dtype=torch.int32)
        state.overflows.add_(rank[:, -1:].gt(limits).view(-1))
        limited = (by_client & (rank <= limits)).view(self.clients, batch, -1).transpose(0, 1)
        return CompactTensor(t, limited.reshape(keep.shape), sum(capacities))

    def _make_pack(
        self, x: torch.Tensor, state: _LayerState, threshold: torch.Tensor, compact: bool
    ) -> Callable[[torch.Tensor], object]:
        input_ptr, input_numel = x.data_ptr(), x.numel()

        def pack(t: torch.Tensor) -> object:
            if t.data_ptr() == input_ptr and t.numel() == input_numel:
                if compact:
                    stored = self._compact(t, keep_mask(t, threshold), state)
                elif state.shrink is not None:
                    stored = shrink_per_client(t.detach(), state.shrink)
                else:
                    stored = torch.where(keep_mask(t, threshold), t.detach(), 0)
                state.last, state.total = stored, input_numel
                return stored
            node = t.grad_fn
            if isinstance(node, _SignedPower._backward_cls) and t.numel() >= self.min_compact_numel:
                return _RecomputedWeight(node.saved_tensors[0], node.exponent, node.support)
            return t

        return pack


def shrink_per_client(x: torch.Tensor, lambdas: list[float]) -> torch.Tensor:
    """`hardshrink` of each stacked client's part of `x` by its own lambda (one lambda: the whole of `x`).

    Client i's part is the i-th of `len(lambdas)` consecutive chunks of each sample (`models.stacked`).
    One kernel per client into one output: on a CPU an order of magnitude faster than comparing
    with a broadcast threshold tensor and selecting with `torch.where`.
    """
    if len(lambdas) == 1:
        return torch.nn.functional.hardshrink(x, lambdas[0])
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    parts, out_parts = x.reshape(x.shape[0], len(lambdas), -1), out.view(x.shape[0], len(lambdas), -1)
    for index, lambd in enumerate(lambdas):
        torch.ops.aten.hardshrink.out(parts[:, index], lambd, out=out_parts[:, index])
    return out


def compact_capacity(expected: int, numel: int, headroom: float = HEADROOM) -> int:
    """Slots of a compact copy of `numel` entries expected to keep `expected` (see `HEADROOM`)."""
    return min(numel, math.ceil(headroom * expected) + math.ceil(CAPACITY_FLOOR * numel))


def _smallest_positive(dtype: torch.dtype) -> float:
    """The smallest positive (subnormal) number of a floating-point dtype."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def _unpack(packed: object) -> torch.Tensor:
    if isinstance(packed, CompactTensor | _RecomputedWeight):
        return packed.to_dense()
    return packed  # type: ignore[return-value]
