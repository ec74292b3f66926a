"""Clients in parallel over several devices: one long-lived worker process per device.

With `trainer.devices N` (strategy `auto`) a round's clients, or client stacks, are spread over N
worker processes, each holding its own client side (data module, `ClientModule`, method and a reused
Lightning Trainer on its device, built once from a `ClientSpec`). The parent keeps the server, the
evaluation and the run directory; it sends a worker one group at a time (the downlink bytes, the
round, the learning rate and the clients' seeds) and folds the results in sampling order, exactly as
the in-process engine does. Since a client's update is a pure function of what it receives, the run
is the one-device run: bit for bit on CPU with the same stacking and the same number of threads per
process (`trainer.num_threads`, one per worker by default on a CPU).

Groups go to whichever worker is free, so unequal groups balance themselves. Workers ignore SIGINT
and SIGTERM (the parent decides when to stop) and exit when the parent's end of their pipe closes,
so a parent killed by SIGKILL leaves no worker behind. A worker that dies fails the clients it was
training (the accept-failures policy decides) and is started again for the next group.

Costs: each worker imports torch and Lightning and sets up the data once per run (seconds), and
holds its own copy of the dataset (on its GPU with `data.device: cuda`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from typing import Any

from sparsyfed_lightning.federated.client_runner import ClientResult
from sparsyfed_lightning.federated.client_spec import ClientSpec, ClientWorker
from sparsyfed_lightning.federated.devices import DevicePlan
from sparsyfed_lightning.federated.engines import InProcessEngine, RoundAbandoned
from sparsyfed_lightning.federated.errors import RunFailedError


def spec_for_slot(spec: ClientSpec, plan: DevicePlan, slot: int) -> ClientSpec:
    """The client side of worker `slot`: its own device for the Trainer and, on GPUs, for the data."""
    trainer_kwargs = {k: v for k, v in spec.trainer_kwargs.items() if k not in ("strategy", "devices")}
    trainer_kwargs.update(accelerator=plan.accelerator, devices=plan.slot_devices(slot))
    data_kwargs = dict(spec.data_kwargs)
    device = str(data_kwargs.get("device", "cpu"))
    if device.startswith("cuda"):
        data_kwargs["device"] = f"cuda:{plan.indices[slot]}"
    return replace(spec, trainer_kwargs=trainer_kwargs, data_kwargs=data_kwargs)


def _worker_main(spec: ClientSpec, threads: int | None, connection: Connection) -> None:
    """A worker process: build the client side once, then fit the groups the parent sends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        worker = ClientWorker(spec)
    except Exception as error:  # noqa: BLE001 - reported to the parent as one line
        connection.send(("error", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ready", os.getpid()))
    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if request is None:
            return
        round_index, group, downlink, lr, seeds, retry_alone = request
        connection.send(("done", worker.fit_group(round_index, group, downlink, lr, seeds, retry_alone)))


class DeviceWorkerPool:
    """N worker processes (spawned, so CUDA and threads are safe), one per slot of a `DevicePlan`."""

    def __init__(self, spec: ClientSpec, plan: DevicePlan, threads: int | None) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._specs = [spec_for_slot(spec, plan, slot) for slot in range(plan.count)]
        self._threads = threads
        self._workers: list[tuple[Any, Connection] | None] = [None] * plan.count
        for slot in range(plan.count):
            self._start(slot)
        for slot in range(plan.count):
            self._wait_ready(slot)

    @property
    def size(self) -> int:
        return len(self._workers)

    def _start(self, slot: int) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main, args=(self._specs[slot], self._threads, child), daemon=True,
            name=f"sparsyfed-device-worker-{slot}",
        )
        process.start()
        child.close()
        self._workers[slot] = (process, parent)

    def _wait_ready(self, slot: int) -> None:
        process, connection = self._workers[slot]  # type: ignore[misc]
        try:
            kind, detail = connection.recv()
        except (EOFError, OSError):
            kind, detail = "error", f"the process exited with code {process.exitcode}"
        if kind != "ready":
            self.close()
            raise RunFailedError(f"device worker {slot} could not start: {detail}")

    def submit(self, slot: int, request: tuple) -> None:
        """Send a fit request to worker `slot` (which must be idle)."""
        self._workers[slot][1].send(request)  # type: ignore[index]

    def collect(self, busy: set[int], timeout: float) -> Iterator[tuple[int, dict[int, ClientResult | str] | str]]:
        """Wait up to `timeout` s for the `busy` workers; yield (slot, its outcomes or why it died)."""
        connections = {self._workers[slot][1]: slot for slot in busy}  # type: ignore[index]
        for connection in wait(list(connections), timeout=timeout):
            slot = connections[connection]
            try:
                _, outcomes = connection.recv()
            except (EOFError, OSError):
                process = self._workers[slot][0]  # type: ignore[index]
                process.join(timeout=5)
                yield slot, f"device worker {slot} died (exit code {process.exitcode})"
                self._start(slot)
                self._wait_ready(slot)
                continue
            yield slot, outcomes

    def close(self) -> None:
        """Stop every worker (idle ones at once; busy ones are terminated)."""
        for entry in self._workers:
            if entry is None:
                continue
            process, connection = entry
            try:
                connection.send(None)
            except (BrokenPipeError, OSError):
                pass
            process.join(timeout=2)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            connection.close()
        self._workers = [None] * len(self._workers)


class DeviceWorkersEngine(InProcessEngine):
    """The in-process engine's round, with groups fitted by a `DeviceWorkerPool` (see the module doc)."""

    name = "device_workers"

    def __init__(self, pool: DeviceWorkerPool, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool = pool

    def _fit_groups(
        self, round_index: int, groups: list[list[int]], downlink: bytes, received: Any, loaders: dict[int, Any],
        lr: float, seeds: dict[int, int],
    ) -> Iterator[dict[int, ClientResult | str]]:
        pending = list(groups)
        busy: dict[int, list[int]] = {}
        while pending or busy:
            if self.should_stop():  # results still in flight are dropped; close() stops their workers
                raise RoundAbandoned(f"round {round_index} abandoned with clients in flight")
            for slot in range(self.pool.size):
                if pending and slot not in busy:
                    if self.should_stop():
                        raise RoundAbandoned(f"round {round_index} abandoned before client {pending[0][0]}")
                    group = pending.pop(0)
                    group_seeds = {cid: seeds[cid] for cid in group}
                    self.pool.submit(slot, (round_index, group, downlink, lr, group_seeds, self.retry_alone))
                    busy[slot] = group
            for slot, outcomes in self.pool.collect(set(busy), timeout=0.5):
                group = busy.pop(slot)
                yield outcomes if isinstance(outcomes, dict) else dict.fromkeys(group, outcomes)

    def close(self) -> None:
        self.pool.close()
