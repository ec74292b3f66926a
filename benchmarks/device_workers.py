"""Round time with several devices against one process: clients in parallel and data-parallel fits.

On a CPU the workers are processes with one torch thread each, so `devices: 2` on a 2-core machine
is two clients training at once instead of one client with two threads. `devices: 2, strategy: ddp`
runs each client's fit over two ranks (gloo), each with half of the batch, so that the global batch
and the number of steps match the one-process run. Rounds 2.. of a run are
timed (round 1 also pays the workers' start: imports and data set-up, reported separately); the
fastest round counts (interference only adds time) and the ratios are against one process with one
thread, measured in the same run.

    python -m benchmarks.device_workers [--dataset fashion_mnist] [--rounds 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks._common import print_table
from sparsyfed_lightning.client.module import ClientModule
from sparsyfed_lightning.data.module import FederatedDataModule
from sparsyfed_lightning.federated.ddp import local_rank
from sparsyfed_lightning.federated.trainer import FederatedTrainer
from sparsyfed_lightning.methods import SparsyFed

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def round_times(devices: int, threads: int, data: FederatedDataModule, rounds: int, width: int,
                strategy: str = "auto") -> tuple[float, float]:
    """(fastest later round, the run's wall time before its first round) in seconds."""
    model = ClientModule("small_cnn", data.num_classes, lr=0.05, in_channels=data.in_channels,
                         backbone_kwargs={"width": width})
    trainer = FederatedTrainer(method=SparsyFed(0.95), rounds=rounds, clients_per_round=data.num_clients,
                               eval_every=10**6, progress="none", accelerator="cpu", devices=devices,
                               num_threads=threads, stack_clients=1, strategy=strategy)
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    total = time.perf_counter() - started
    per_round = [m["time_train_s"] + m["time_aggregate_s"] for m in trainer.history[1:]]
    return min(per_round[1:]), total - sum(per_round) - sum(m.get("time_eval_s", 0.0) for m in trainer.history)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="auto", help="auto (fashion_mnist when installed, else digits)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="of the one-process runs; DDP ranks take half each")
    args = parser.parse_args(argv)
    dataset = args.dataset
    if dataset == "auto":
        dataset = "fashion_mnist" if FASHION_MNIST.is_dir() else "digits"
    path = str(FASHION_MNIST) if dataset == "fashion_mnist" else None

    ddp_name = f"ddp, 2 ranks x 1 thread, batch {args.batch_size // 2} each"

    def data_with(batch_size: int) -> FederatedDataModule:
        data = FederatedDataModule(dataset, path=path, num_clients=args.clients, batch_size=batch_size,
                                   samples_per_client=300 if dataset == "fashion_mnist" else None)
        data.setup("fit")
        return data

    data, half_batches = data_with(args.batch_size), data_with(args.batch_size // 2)
    variants = {"1 process, 1 thread": (1, 1, "auto", data), "1 process, 2 threads": (1, 2, "auto", data),
                "2 workers, 1 thread each": (2, 1, "auto", data),
                ddp_name: (2, 1, "ddp", half_batches)}
    if local_rank() > 0:
        # A DDP rank this script started again (Lightning's convention): it joins the DDP run only.
        devices, threads, strategy, variant_data = variants[ddp_name]
        round_times(devices, threads, variant_data, args.rounds, args.width, strategy)
        return {}
    measured = {name: round_times(devices, threads, variant_data, args.rounds, args.width, strategy)
                for name, (devices, threads, strategy, variant_data) in variants.items()}
    base = measured["1 process, 1 thread"][0]
    rows = [[name, f"{seconds:.2f}", f"{seconds / base:.2f}x", f"{start:.1f}"]
            for name, (seconds, start) in measured.items()]
    print_table(f"device_workers: SparsyFed 95%, small_cnn width {args.width}, {dataset}, {args.clients} clients "
                f"x {data.client_num_samples(0)} samples, batch {args.batch_size}, CPU",
                ["setup", "round (s)", "ratio", "start-up (s)"], rows)
    return {name: seconds / base for name, (seconds, _) in measured.items()}


if __name__ == "__main__":
    main()
