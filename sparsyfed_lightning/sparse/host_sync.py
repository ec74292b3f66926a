"""Finding the operations that make the host wait for the device, on any device (CPU included).

On CUDA the host queues kernels ahead of the device and a training step is fast only while it never
waits. Two kinds of operations make it wait: reading a device value on the host (`.item()`,
`float(t)`, `if t:`, `.tolist()`, a copy to the CPU), operations whose output shape depends on
the data (`nonzero`, boolean-mask indexing, `masked_select`, `unique`, ...), which must learn the
size from the device before they can allocate their output, and copies of host data to the device
(`torch.tensor(values, device=...)`: PyTorch waits for a blocking copy from pageable memory).
`HostSyncRecorder` records them by name while it is active, through a `TorchDispatchMode` (every
aten operation, forward and backward) and a `TorchFunctionMode` (`tolist`/`numpy`, which read a
CPU tensor without any aten operation). On a CPU it finds what would synchronise on a GPU; on a GPU
`torch.cuda.set_sync_debug_mode` is the complementary check of what actually does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operations whose output shape depends on the data, or which return a host value.
_ALWAYS = {
    aten.nonzero, aten.nonzero_numpy, aten.argwhere, aten.masked_select, aten._local_scalar_dense,
    aten.item, aten.is_nonzero, aten.equal, aten.allclose, aten.bincount, aten.unique_consecutive,
    aten.unique_dim, aten.unique_dim_consecutive, aten._unique, aten._unique2,
}
_BOOLEAN_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_HOST_READS = {"tolist", "numpy"}


def _is_mask(index: object) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def synchronising_op(func: Any, args: tuple, kwargs: dict) -> str | None:
    """The name of an aten call that would make the host wait for the device, else None."""
    packet = func.overloadpacket
    if packet in _ALWAYS:
        return str(func)
    if packet in _BOOLEAN_INDEXED and any(_is_mask(i) for i in args[1] if i is not None):
        return f"{func} (boolean mask)"
    if packet is aten.lift_fresh and args[0].dim() > 0:
        # A tensor made from Python data (a 0-d one is a scalar that kernels take by value).
        return f"{func} (host data)"
    if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return str(func)
    if packet in (aten._to_copy, aten.copy_):
        source = args[1] if packet is aten.copy_ else args[0]
        target = args[0].device if packet is aten.copy_ else kwargs.get("device")
        if isinstance(source, torch.Tensor) and target is not None:
            crossing = {source.device.type, torch.device(target).type}
            if "cpu" in crossing and len(crossing) == 2 and not kwargs.get("non_blocking", False):
                return f"{func} (between host and device)"
    return None


class _Dispatch(TorchDispatchMode):
    def __init__(self, recorder: HostSyncRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if not self.recorder._in_host_read:
            name = synchronising_op(func, args, kwargs)
            if name is not None:
                self.recorder.events.append(name)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, recorder: HostSyncRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = getattr(func, "__name__", "")
        if name not in _HOST_READS or self.recorder._in_host_read:
            return func(*args, **(kwargs or {}))
        self.recorder.events.append(f"Tensor.{name}")
        self.recorder._in_host_read = True  # its copy to the host is this same event
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.recorder._in_host_read = False


class HostSyncRecorder:
    """Context manager recording, in `events`, every operation that would make the host wait.

    Reusable: `events` accumulates over every `with` block (clear it yourself).
    """

    def __init__(self) -> None:
        self.events: list[str] = []
        self._in_host_read = False
        self._modes: list[Any] = []

    def __enter__(self) -> HostSyncRecorder:
        self._modes = [_Function(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []
