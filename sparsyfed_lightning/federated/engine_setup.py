"""Which engine fits a run's clients, and how many clients one fit stacks (`trainer.stack_clients`).

* `engine: flower`: the Flower engine (docs/FLOWER.md);
* `devices: N` (clients in parallel): the in-process round over N device worker processes;
* otherwise the in-process engine in this process (under DDP every rank runs it).

`stack_clients: auto`. On a GPU stacking pays (DESIGN.md: ResNet-18, 10 clients, 5x faster on an
H200). On a CPU grouped convolutions run slower than plain ones, which only the per-step overhead
saved makes up for on small steps: measured here (2 cores, 10 clients stacked against one after the
other), small_cnn at batch 16 took 0.75x the time at 8x8 inputs (57 MFLOP per forward pass), 0.95x
at 12x12 (129 MFLOP), 1.23x at 16x16 (229 MFLOP), 1.51x at 32x32; logmel_cnn 1.74x, resnet18_cifar
1.3x. The choice depends only on the configuration and the device, so runs stay reproducible.
"""

from __future__ import annotations

from typing import Any

from sparsyfed_lightning.client.module import ClientModule
from sparsyfed_lightning.federated.client_runner import ClientRunner
from sparsyfed_lightning.federated.client_spec import ClientSpec
from sparsyfed_lightning.federated.engines import InProcessEngine
from sparsyfed_lightning.federated.signals import StopSignals

AUTO_STACK_CLIENTS = 10
STACK_ON_CPU_BELOW_FLOPS = 100e6


def build_engine(trainer: Any, model: ClientModule, runner: ClientRunner, datamodule: Any, stop: StopSignals) -> Any:
    """The engine of a `FederatedTrainer`'s run (see the module doc)."""
    if trainer.engine_name == "flower":
        from sparsyfed_lightning.federated.engines_flower import FlowerEngine

        return FlowerEngine(trainer, datamodule)
    stack = clients_per_stacked_fit(trainer.stack_clients, runner, datamodule)
    plan = trainer.device_plan
    if plan.mode == "clients":
        from sparsyfed_lightning.federated.device_workers import DeviceWorkerPool, DeviceWorkersEngine

        spec = ClientSpec.from_objects(
            model, trainer.method, datamodule, trainer.local_epochs, trainer.client_trainer_kwargs,
            key="device-workers",
        )
        threads = trainer.num_threads or (1 if plan.accelerator == "cpu" else None)
        return DeviceWorkersEngine(
            DeviceWorkerPool(spec, plan, threads), runner, datamodule, trainer.seed, stack,
            retry_alone=trainer.accept_failures, should_stop=lambda: stop.requested,
        )
    # DDP ranks must stop together: only at round boundaries (agreed in the round loop) and, inside a
    # fit, where Lightning broadcasts rank 0's SIGTERM flag at every batch.
    should_stop = (lambda: False) if plan.mode == "ddp" else (lambda: stop.requested)
    return InProcessEngine(
        runner, datamodule, trainer.seed, stack, retry_alone=trainer.accept_failures, should_stop=should_stop
    )


def clients_per_stacked_fit(stack_clients: int | str, runner: ClientRunner, datamodule: Any) -> int:
    """`stack_clients` with "auto" resolved; 1 where stacking is unavailable (see `FederatedTrainer`)."""
    try:
        probe = datamodule.client_train_dataloader(0)
    except Exception:  # noqa: BLE001 - a client that cannot load fails in its round, not here
        probe = None
    if not runner.can_stack(probe):  # with a loader, also checks the model keeps stacked clients apart
        return 1
    if stack_clients != "auto":
        return int(stack_clients)
    if runner.trainer.strategy.root_device.type != "cpu":
        return AUTO_STACK_CLIENTS
    flops = runner.forward_flops(probe) if probe is not None else None
    return AUTO_STACK_CLIENTS if flops is not None and flops < STACK_ON_CPU_BELOW_FLOPS else 1
