"""Every GPU measurement in one command, written to one JSON: `python -m benchmarks --device cuda`.

1. `step`: one ResNet-18 training step at batch 32, 95% layer sparsity: dense, Powerprop, SparsyFed
   (`first_batch`, `per_step`): time, bytes saved for backward and, on CUDA, peak allocated memory
   (`benchmarks/sparse_step.py`).
2. `round`: a federated round of 10 clients x 500 samples (ResNet-18, batch 32), clients stacked and
   alone, dense and SparsyFed, against a plain PyTorch loop, and the Lightning floor (a minimal
   LightningModule fitted client by client) (`benchmarks/round_overhead.py`).
3. `syncs_per_step`: for every method, the host-device synchronisations per training step after a
   fit's first (two rounds, two clients stacked and one alone): the operations `HostSyncRecorder`
   finds and, on CUDA, the synchronisations CUDA's sync debug mode reports (`SyncWatch`).
4. `paper_cifar10`: rounds of `configs/paper/cifar10.yaml` with SparsyFed through the `sparsyfed`
   CLI (ResNet-18, LDA over 100 clients x 500 samples, 10 per round, batch 16, evaluation on the
   test set every round) on synthetic data in CIFAR-10's schema, written to a temporary
   `save_to_disk` folder (the GPU machine has no hub access).

    python -m benchmarks --device cuda [--out FILE]      # about 5 minutes on an H200
    python -m benchmarks --device cpu --quick            # every section with tiny sizes (CI)

Ratios are against baselines measured in the same run. The JSON (default
`benchmarks/out/gpu-<device>-<time>.json`) holds every number of the summary table and more.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import round_overhead, sparse_step
from benchmarks._common import pick_device, print_table
from benchmarks.round_overhead import SyntheticFederatedData

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def sync_counts(device: torch.device, quick: bool) -> dict[str, dict[str, Any]]:
    """Per method, synchronisations per watched training step (see the module doc)."""
    from sparsyfed_lightning.client.module import ClientModule
    from sparsyfed_lightning.client.sync_watch import SyncWatch
    from sparsyfed_lightning.federated.trainer import FederatedTrainer
    from sparsyfed_lightning.methods import FLASH, Dense, SparsyFed, SparsyFedSpectral, TopK, ZeroFL

    methods = {
        "dense": lambda: Dense(),
        "topk": lambda: TopK(0.95),
        "flash": lambda: FLASH(0.95),
        "zerofl": lambda: ZeroFL(0.95),
        "sparsyfed": lambda: SparsyFed(0.95),
        "sparsyfed (per_step)": lambda: SparsyFed(0.95, threshold="per_step"),
        "sparsyfed (beta 1)": lambda: SparsyFed(0.95, beta=1.0),
        "sparsyfed_spectral": lambda: SparsyFedSpectral(0.95),
    }
    if quick:  # tests/test_sync_free.py checks the compact storage at sizes that use it
        backbone, kwargs, shape, batch = "small_cnn", {"width": 8}, (1, 8, 8), 4
    else:
        backbone, kwargs, shape, batch = "resnet18_cifar", {}, (3, 32, 32), 32
    # Three equal clients, at most two per stacked fit: every round has a stacked and a lone fit.
    data = SyntheticFederatedData(3, 3 * batch, shape, batch, device)
    results = {}
    for name, make in methods.items():
        method = make()
        watch = SyncWatch(record=True, cuda_sync_debug="warn")
        method.client_callbacks().append(watch)
        model = ClientModule(backbone, 10, lr=0.05, backbone_kwargs=kwargs)
        trainer = FederatedTrainer(method=method, rounds=2, clients_per_round=3, stack_clients=2,
                                   eval_every=10**6, progress="none", accelerator=device.type, devices=1)
        trainer.fit(model, datamodule=data)
        steps = max(watch.steps, 1)
        results[name] = {
            "steps": watch.steps,
            "recorded": len(watch.events) / steps,
            "cuda": watch.cuda_syncs / steps if device.type == "cuda" else None,
            "operations": sorted(set(watch.events)),
        }
    return results


def write_synthetic_cifar10(folder: Path, train: int, test: int, seed: int = 0) -> Path:
    """Random 32x32 RGB images with CIFAR-10's columns (`img` Image, `label` ClassLabel), saved to disk."""
    import datasets

    datasets.disable_progress_bars()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    rng = np.random.default_rng(seed)
    splits = {}
    for split, rows in (("train", train), ("test", test)):
        images = rng.integers(0, 256, size=(rows, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=rows)
        splits[split] = datasets.Dataset.from_dict({"img": list(images), "label": labels.tolist()}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def paper_round(device: torch.device, quick: bool, workdir: Path) -> dict[str, Any]:
    """Round times of the paper's CIFAR-10 configuration with SparsyFed, through the CLI."""
    from sparsyfed_lightning import cli

    train, test = (64, 16) if quick else (50_000, 10_000)
    started = time.perf_counter()
    data = write_synthetic_cifar10(workdir / "cifar10", train, test)
    data_seconds = time.perf_counter() - started
    run_dir = workdir / "run"
    args = [
        "fit", "--config", str(CONFIGS / "paper" / "cifar10.yaml"),
        "--config", str(CONFIGS / "method" / "sparsyfed.yaml"),
        "--data.path", str(data), "--data.cache_dir", str(workdir / "cache"), "--trainer.run_dir", str(run_dir),
        "--trainer.progress", "none", "--trainer.accelerator", "gpu" if device.type == "cuda" else "cpu",
        "--trainer.devices", "1", "--trainer.rounds", "3",
    ]
    if quick:  # a small CNN, 4 clients of 8 samples, 2 per round, batch 4
        args += ["--model.backbone", "small_cnn", "--model.backbone_kwargs", '{"in_channels": 3, "width": 8}',
                 "--data.num_clients", "4", "--data.samples_per_client", "8", "--trainer.clients_per_round", "2",
                 "--data.batch_size", "4", "--trainer.rounds", "2"]
    status = cli.main(args)
    if status != 0:
        raise RuntimeError(f"sparsyfed fit exited with status {status}: {' '.join(args)}")
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in rounds if r.get("round", 0) >= 2]  # round 1 is dense and carries one-off set-up
    keys = ("time_train_s", "time_aggregate_s", "time_eval_s")
    return {
        "rounds_timed": len(timed),
        "stacked_clients": timed[-1].get("stacked_clients") if timed else None,
        **{key: min(r[key] for r in timed) for key in keys},
        "round_s": min(sum(r[key] for key in keys) for r in timed),
        "synthetic_data_s": data_seconds,
    }


def _in_temporary_folder(run):  # noqa: ANN001, ANN202
    with tempfile.TemporaryDirectory(prefix="sparsyfed-gpu-bench-") as folder:
        return run(Path(folder))


def summary_rows(result: dict[str, Any]) -> list[list[str]]:
    step, rounds, syncs, paper = result["step"], result["round"], result["syncs_per_step"], result["paper_cifar10"]
    sparsyfed = step["powerprop+AP (first_batch)"]
    peak = "-" if sparsyfed["peak_ratio"] is None else f"{sparsyfed['peak_ratio']:.2f}x"
    rows = [
        ["step", "SparsyFed step time / dense", f"{sparsyfed['time_ratio']:.2f}x", "<= 1.15x"],
        ["step", "SparsyFed bytes saved for backward / dense", f"{sparsyfed['saved_ratio']:.2f}x", "<= 0.6x"],
        ["step", "SparsyFed peak allocated memory / dense", peak, "-"],
        ["round", "plain PyTorch round (s)", f"{rounds['plain_s']:.3f}", "-"],
    ]
    rows += [["round", f"{name} / plain", f"{ratio:.2f}x", "<= 1.15x" if "stacked" in name else "-"]
             for name, ratio in rounds["ratios"].items()]
    for name, counts in syncs.items():
        cuda = "-" if counts["cuda"] is None else f"{counts['cuda']:.1f}"
        rows.append(["syncs/step", f"{name}: recorded, CUDA", f"{counts['recorded']:.1f}, {cuda}", "0"])
    rows.append(["paper_cifar10", f"round s (train+aggregate+eval), {paper['stacked_clients']} stacked",
                 f"{paper['round_s']:.2f}", "-"])
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a check that every section runs")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/out/gpu-<device>-<time>.json)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 3; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    repeats = args.repeats or (1 if args.quick else 3)
    common = ["--device", device.type, "--repeats", str(repeats), "--threads", str(args.threads)]
    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    step_args = ["--backbone", "small_cnn", "--batch-size", "4"] if args.quick else ["--batch-size", "32"]
    round_args = (["--backbone", "small_cnn", "--clients", "2", "--samples", "16", "--batch-size", "8"]
                  if args.quick else ["--backbone", "resnet18_cifar", "--samples", "500", "--batch-size", "32"])
    sections = {
        "step": lambda: sparse_step.main(common + step_args),
        "round": lambda: round_overhead.main(common + round_args),
        "syncs_per_step": lambda: sync_counts(device, args.quick),
        "paper_cifar10": lambda: _in_temporary_folder(lambda folder: paper_round(device, args.quick, folder)),
    }
    result["section_seconds"] = {}
    for name, run in sections.items():
        section_start = time.perf_counter()
        result[name] = run()
        result["section_seconds"][name] = time.perf_counter() - section_start
    result["seconds"] = time.perf_counter() - started
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "out" / f"gpu-{device.type}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(f"GPU benchmarks on {result['device']} ({result['seconds']:.0f} s; JSON: {out})",
                ["section", "measure", "value", "target"], summary_rows(result))
    return result


if __name__ == "__main__":
    main()
