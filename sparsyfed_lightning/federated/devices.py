"""Which devices a federated run uses, and how: one device, clients in parallel, or DDP per client.

`trainer.devices` and `trainer.strategy` keep their Lightning meaning and choose the mode:

* `devices: 1` (the default; `auto` is 1 here), `strategy: auto`: `single`, every client fit and
  the evaluation on one device;
* `devices: N > 1` (or a list of GPU ids; -1 is every GPU), `strategy: auto`: `clients`, the
  round's clients (or client stacks) are spread over N device workers, one process per device
  (`device_workers.py`); the results are those of one device;
* `devices: N > 1`, `strategy: ddp`: `ddp`, every client's local fit runs data-parallel over the N
  devices, one process per device, each running the same deterministic federated loop; rank 0
  alone writes (`ddp.py`).

Anything else (other strategies, several nodes) is refused with one line: several machines are
Flower's job (docs/FLOWER.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

DeviceMode = Literal["single", "clients", "ddp"]
_DDP_STRATEGIES = ("ddp",)


@dataclass(frozen=True)
class DevicePlan:
    """The resolved device setup of a run.

    Args:
        mode: `single`, `clients` or `ddp` (see the module doc).
        accelerator: `cpu` or `gpu` (what the client Trainers get).
        indices: the GPU ids in use, or `0 .. N-1` for N CPU workers/ranks.
    """

    mode: DeviceMode
    accelerator: str
    indices: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.indices)

    def slot_devices(self, slot: int) -> int | list[int]:
        """Lightning's `devices` for one process of the plan: one GPU by id, or one CPU."""
        return [self.indices[slot]] if self.accelerator == "gpu" else 1


def plan_devices(accelerator: Any, devices: Any, strategy: Any, num_nodes: Any) -> DevicePlan:
    """Resolve `trainer.accelerator/devices/strategy/num_nodes` into a `DevicePlan`.

    Raises ValueError (one line) for combinations that cannot work; Lightning's own parsers validate
    device ids against this machine.
    """
    from lightning.fabric.accelerators.cpu import _parse_cpu_cores
    from lightning.fabric.utilities.device_parser import _parse_gpu_ids

    if num_nodes not in (None, 1):
        raise ValueError(
            f"trainer.num_nodes={num_nodes!r} is not supported: a federated run uses one machine's devices; "
            "use engine='flower' with SuperNodes on several machines (docs/FLOWER.md)"
        )
    accelerator = _resolve_accelerator(accelerator)
    strategy_name = strategy if isinstance(strategy, str) else type(strategy).__name__
    if devices in (None, "auto"):
        devices = 1
    if accelerator == "gpu":
        indices = tuple(_parse_gpu_ids(devices, include_cuda=True) or [0])
    elif accelerator == "cpu":
        indices = tuple(range(_parse_cpu_cores(devices)))
    else:  # mps, tpu, ...: one device only
        if devices not in (1, [0], "1"):
            raise ValueError(f"trainer.devices={devices!r} is invalid with trainer.accelerator={accelerator!r}; use 1")
        indices = (0,)
    if len(indices) == 1:
        if strategy_name not in ("auto", *_DDP_STRATEGIES):
            raise ValueError(
                f"trainer.strategy={strategy_name!r} is not supported; use 'auto' (or 'ddp' with devices > 1)"
            )
        return DevicePlan("single", accelerator, indices)
    if strategy_name == "auto":
        return DevicePlan("clients", accelerator, indices)
    if strategy_name in _DDP_STRATEGIES:
        return DevicePlan("ddp", accelerator, indices)
    raise ValueError(
        f"trainer.strategy={strategy_name!r} is not supported with trainer.devices={devices!r}; use 'auto' (clients in "
        "parallel, one worker per device) or 'ddp' (each client's fit data-parallel over the devices)"
    )


def _resolve_accelerator(accelerator: Any) -> str:
    import torch

    if isinstance(accelerator, str):
        name = accelerator
    else:  # an Accelerator object
        name = type(accelerator).__name__.lower().replace("accelerator", "")
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if name in ("gpu", "cuda") else name
