"""Time one federated round of the product against a plain PyTorch loop doing the same dense work.

Both sides train the same clients (same model, samples, batch size, SGD with weight decay, one local
epoch, a fresh optimizer per client, the global state loaded before each client) and average the
client models; the product additionally encodes/decodes every message and computes its round
metrics, i.e. everything a real round does except the central evaluation. Rounds are interleaved
and the fastest of `--repeats` rounds is reported (interference on these shared machines only adds
time), as a ratio to the plain loop of the same run. Each method is timed twice: all clients fitted
as one stacked network (`trainer.stack_clients=10`, the default) and every client fitted alone.

A third reference, the Lightning floor, is the plain loop's work done the way a Lightning user
would write it: a minimal LightningModule (the same network, cross-entropy and SGD) fitted client by
client by one reused barebones Trainer. It is what Lightning alone costs when clients train one at
a time, with none of the product in it; the alone rounds are also given as ratios to it.

    python -m benchmarks.round_overhead                  # small CNN, 10 clients x 100 steps x batch 16, CPU
    python -m benchmarks.round_overhead --device cuda    # resnet18_cifar, 10 clients x 500 samples x batch 32

`--backbone`, `--clients`, `--samples` and `--batch-size` override those sizes. Returns the plain
round's seconds and each variant's (and the floor's) ratio to it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from benchmarks._common import BACKBONES, add_common_arguments, apply_common_arguments, print_table, synchronize
from sparsyfed_lightning.client.module import ClientModule
from sparsyfed_lightning.data.loaders import TensorBatchLoader
from sparsyfed_lightning.federated.client_runner import quiet_lightning
from sparsyfed_lightning.federated.trainer import FederatedTrainer
from sparsyfed_lightning.methods import Dense, SparsyFed


class SyntheticFederatedData:
    """Random inputs split evenly over clients, resident on `device` (what FederatedDataModule offers)."""

    def __init__(self, clients: int, samples: int, shape: tuple[int, ...], batch_size: int,
                 device: torch.device) -> None:
        generator = torch.Generator().manual_seed(0)
        self.num_clients = clients
        self.num_classes = 10
        self.batch_size = batch_size
        self.inputs = torch.randn(clients, samples, *shape, generator=generator).to(device)
        self.labels = torch.randint(0, 10, (clients, samples), generator=generator).to(device)

    def setup(self, stage: str | None = None) -> None:
        pass

    def client_train_dataloader(self, cid: int, seed: int = 0) -> TensorBatchLoader:
        return TensorBatchLoader(self.inputs[cid], self.labels[cid], self.batch_size, shuffle=True, seed=seed)

    def test_dataloader(self) -> TensorBatchLoader:
        return TensorBatchLoader(self.inputs[0, :256], self.labels[0, :256], 256)


def fedavg_round(net: nn.Module, data: SyntheticFederatedData, train_client: Callable[[int], None]) -> None:
    """Hand-written FedAvg round: load the global state, `train_client(cid)`, accumulate the average."""
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    total: dict[str, torch.Tensor] = {}
    for cid in range(data.num_clients):
        net.load_state_dict(global_state)
        train_client(cid)
        for key, value in net.state_dict().items():
            total[key] = total.get(key, 0) + value.double()
    net.load_state_dict({k: (v / data.num_clients).to(global_state[k].dtype) for k, v in total.items()})


def plain_round(net: nn.Module, data: SyntheticFederatedData, lr: float) -> None:
    """`fedavg_round` training each client for one epoch with fresh SGD, by hand."""

    def train_client(cid: int) -> None:
        net.train()
        optimizer = torch.optim.SGD(net.parameters(), lr=lr, weight_decay=1e-3)
        for x, y in data.client_train_dataloader(cid, seed=cid):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()

    fedavg_round(net, data, train_client)


class LightningFloor(L.LightningModule):
    """The least a Lightning fit does: the backbone, cross-entropy and the plain loop's SGD, stepped by
    Lightning's default (automatic) optimization."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=self.lr, weight_decay=1e-3)


def lightning_floor_round(module: LightningFloor, trainer: L.Trainer, data: SyntheticFederatedData) -> None:
    """`fedavg_round` with each client's epoch fitted by one reused barebones Trainer (as the product
    reuses its client Trainer): what Lightning alone adds to a round of clients trained one at a time."""

    def train_client(cid: int) -> None:
        trainer.fit_loop.max_epochs = trainer.current_epoch + 1
        trainer.fit(module, train_dataloaders=data.client_train_dataloader(cid, seed=cid))

    fedavg_round(module.net, data, train_client)


def product_round_times(method, data, backbone: str, kwargs: dict, device: torch.device, rounds: int,
                        stack_clients: int = 1):
    """Per-round seconds (training + aggregation, no evaluation) of `rounds` rounds of the product."""
    model = ClientModule(backbone, 10, lr=0.05, backbone_kwargs=kwargs)
    trainer = FederatedTrainer(method=method, rounds=rounds, clients_per_round=data.num_clients,
                               eval_every=10**6, progress="none", accelerator=device.type, devices=1,
                               stack_clients=stack_clients)
    trainer.fit(model, datamodule=data)
    return [m["time_train_s"] + m["time_aggregate_s"] for m in trainer.history[1:]]


# A minimal LightningModule fitted client by client (`LightningFloor`): the alone rounds' floor.
FLOOR = "Lightning floor (alone)"


def main(argv: list[str] | None = None) -> dict[str, float | dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, repeats=3)
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default=None)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--samples", type=int, default=None, help="per client")
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args(argv)
    device = apply_common_arguments(args)
    gpu = device.type == "cuda"
    backbone = args.backbone or ("resnet18_cifar" if gpu else "small_cnn")
    samples = args.samples or (500 if gpu else 1600)
    batch = args.batch_size or (32 if gpu else 16)
    kwargs, shape = BACKBONES[backbone]
    data = SyntheticFederatedData(args.clients, samples, shape, batch, device)
    plain_net = ClientModule(backbone, 10, backbone_kwargs=kwargs).net.to(device)
    quiet_lightning()
    floor_module = LightningFloor(ClientModule(backbone, 10, backbone_kwargs=kwargs).net, 0.05)
    floor_trainer = L.Trainer(max_epochs=0, barebones=True, accelerator=device.type, devices=1)

    # (method, trainer.stack_clients): all 10 clients as one stacked network (the default), and
    # each client alone (unequal partitions, ZeroFL, the spectral variant, Flower ClientApps).
    variants = {"dense (stacked)": (Dense, args.clients), "sparsyfed (stacked)": (SparsyFed, args.clients),
                "dense (alone)": (Dense, 1), "sparsyfed (alone)": (SparsyFed, 1)}
    plain: list[float] = []
    times: dict[str, list[float]] = {name: [] for name in [FLOOR, *variants]}
    plain_round(plain_net, data, 0.05)  # warm-up
    lightning_floor_round(floor_module, floor_trainer, data)
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        plain_round(plain_net, data, 0.05)
        synchronize(device)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        lightning_floor_round(floor_module, floor_trainer, data)
        synchronize(device)
        times[FLOOR].append(time.perf_counter() - start)
        # First round of a fresh run includes one-off set-up; SparsyFed's round 1 is dense (SPEC 9),
        # so time its round 2 onward.
        for name, (method, stack) in variants.items():
            method_object = method(0.95) if method is SparsyFed else method()
            times[name].append(min(product_round_times(method_object, data, backbone, kwargs, device, 3, stack)[1:]))
    base = min(plain)
    results = {name: min(values) / base for name, values in times.items()}
    floor = results[FLOOR]
    rows = [["plain PyTorch", f"{base:.3f}", "1.00x", ""]]
    rows += [
        [name, f"{ratio * base:.3f}", f"{ratio:.2f}x", f"{ratio / floor:.2f}x" if "alone" in name else ""]
        for name, ratio in results.items()
    ]
    print_table(f"round_overhead: {backbone}, {args.clients} clients x {samples} samples x batch {batch}, {device} "
                "(target <= 1.15x)", ["round", "seconds", "ratio", "/ floor"], rows)
    return {"plain_s": base, "ratios": results}


if __name__ == "__main__":
    main()
