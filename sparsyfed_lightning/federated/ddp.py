"""One client's fit data-parallel over several devices (`trainer.devices N`, `trainer.strategy ddp`).

For the cross-silo case (few clients with much data, or a big model) each client's local fit runs on
N processes, one per device, with Lightning's DDP: gradients are all-reduced after every backward,
so the N copies of the client model stay identical. The federated loop around the fits is run by
every process (rank) the same way, which is Lightning's own DDP convention (the script runs once
per rank): sampling, seeds, server aggregation and evaluation are deterministic, so every rank holds
the same global model after every round. The trainer checks that each round (the SHA-256 of the
global state is compared across ranks) and stops with one line if they ever differ. Only rank 0
claims and writes the run directory (checkpoints, metrics, logs) and prints; `--resume` works as
with one device, every rank reading the same checkpoint.

Processes: rank 0 (the command the user started) starts ranks 1..N-1 by running the same command
again with `LOCAL_RANK` set (as Lightning's script launcher does, but without its observer thread,
which would SIGKILL rank 0 while it writes a checkpoint when another rank ends first); they die with
rank 0 (`PR_SET_PDEATHSIG`). CPU ranks use gloo, GPU ranks NCCL, one GPU each.

Batches (Lightning's convention): `data.batch_size` is the batch of one device; each rank takes its
share of every client batch of size N x `batch_size` (rank r gets samples r, r+N, ...), drawn from the
client's shuffle exactly as one device would draw a batch of that size. The paper's batch 16 is
therefore `data.batch_size: 8` on 2 devices (or 16 per device for an effective 32). A final batch
smaller than N is skipped; when the last batch does not divide evenly the ranks average unequal
shares (as DistributedSampler-free DDP does).

Activation pruning per rank: each rank prunes the activations of the batch tensor it holds (its
share), so the Top-K and the first-batch thresholds are per rank; the weight gradient is the average
of the ranks' pruned-input gradients. BatchNorm: without `sync_batchnorm` each rank normalises with
its share's statistics and the running statistics are averaged over ranks after every client fit
(so ranks stay identical); with `trainer.sync_batchnorm: true` (GPU only in PyTorch) the statistics
are those of the whole N x `batch_size` batch.
"""

from __future__ import annotations

import copy
import ctypes
import datetime
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from sparsyfed_lightning.data.loaders import TensorBatchLoader, batch_layout

# The command ranks 1..N-1 run; None: this process's own command line (Lightning's convention). The
# CLI sets it when called from Python with explicit arguments, whose sys.argv is someone else's.
RELAUNCH_COMMAND: list[str] | None = None


def local_rank() -> int:
    """This process's rank (0 for the process the user started)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launch_ranks(world_size: int) -> list[subprocess.Popen]:
    """On rank 0: start ranks 1..`world_size`-1 running this command (nothing on a launched rank)."""
    if "LOCAL_RANK" in os.environ:
        return []
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world_size), NODE_RANK="0",
        LOCAL_RANK="0",
    )
    command = RELAUNCH_COMMAND or _own_command()
    return [
        subprocess.Popen(command, env={**os.environ, "LOCAL_RANK": str(rank)}, preexec_fn=_die_with_parent)
        for rank in range(1, world_size)
    ]


def init_process_group(accelerator: str, world_size: int, timeout_s: float = 1800.0) -> None:
    """Join the ranks (gloo on CPU, NCCL on GPUs); a no-op when already joined."""
    if dist.is_initialized():
        return
    if accelerator == "gpu":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(
        "nccl" if accelerator == "gpu" else "gloo", rank=local_rank(), world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def finish(children: list[subprocess.Popen], timeout_s: float = 60.0) -> list[int]:
    """Leave the process group and reap the launched ranks; returns their exit codes."""
    if dist.is_initialized():
        dist.destroy_process_group()
    codes = []
    for process in children:
        try:
            codes.append(process.wait(timeout=timeout_s))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(process.wait())
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK"):
        if children:
            os.environ.pop(key, None)
    return codes


def active() -> bool:
    """Whether this process is one of several DDP ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating buffers (BatchNorm running statistics) over the ranks, in place."""
    if not active():
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(dist.get_world_size())


def mean_over_ranks(value: float) -> float:
    """The mean of a float over the ranks (e.g. a client's training loss)."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor) / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (e.g. a stop signal reached one of them)."""
    if not active():
        return flag
    tensor = torch.tensor([int(flag)])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def gather_strings(value: str) -> list[str]:
    """`value` from every rank, in rank order."""
    if not active():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return [str(v) for v in values]


class ShardedBatchLoader:
    """Rank `rank`'s share of the batches one device would draw with `world` times the batch size.

    `loader` is a client's `TensorBatchLoader` with the per-device batch size; the rank takes
    samples `rank`, `rank + world`, ... of each enlarged batch. A batch with fewer than `world`
    samples is skipped on every rank (no rank may step without data).
    """

    def __init__(self, loader: TensorBatchLoader, rank: int, world: int) -> None:
        self.loader = copy.copy(loader)
        self.loader.batch_size = loader.batch_size * world
        # Its own shuffling generator, in the state the client's loader is in (a shallow copy shares it).
        self.loader._generator = torch.Generator().set_state(loader._generator.get_state())
        self.rank = rank
        self.world = world
        self.num_samples = loader.num_samples

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for inputs, labels in self.loader:
            if labels.shape[0] >= self.world:
                yield inputs[self.rank :: self.world], labels[self.rank :: self.world]

    def __len__(self) -> int:
        return sum(1 for size in batch_layout(self.loader) or () if size >= self.world)


def _own_command() -> list[str]:
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is None:
        return [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]]
    return [sys.executable, "-m", spec.name, *sys.argv[1:]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In a launched rank: receive SIGTERM when rank 0 dies (Linux `prctl(PR_SET_PDEATHSIG)`)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def world_size() -> int:
    """The number of DDP ranks (1 when not distributed)."""
    return dist.get_world_size() if active() else 1
