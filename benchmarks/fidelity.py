"""A reduced reproduction of the paper's accuracy-vs-sparsity tables on the offline digits data.

Methods dense, topk, zerofl, flash and sparsyfed x target sparsity {0.90, 0.95, 0.99} x LDA alpha
{1.0, 0.1} x 3 seeds, all in this process (Lightning is imported once). Per cell it reports the final
central test accuracy (mean and std over seeds), the mean per-round weight regrowth of SPEC 9.2 for
rounds >= 2 (client-weighted: weights that came back to life during local training, and the
authors' plotted "after pruning deactivated" count), the mean mask IoU with the previous round, and
the cumulative uplink/downlink bytes relative to dense.

The setup is the demo's scaled down to fit about an hour on 2 CPU cores: `small_cnn` (width 32,
about 56k weights), 10 clients all training every round, `--rounds` rounds (default 60), batch 16,
client lr 0.1 decaying to 0.01, SGD without momentum, weight decay 1e-3. Seeds change the initial
model, the client shuffles and (here irrelevantly, with full participation) the sampling; the
partition is fixed per alpha (seed 0), as in the paper, whose partitions were saved files.

    python -m benchmarks.fidelity [--rounds 60] [--seeds 0 1 2] [--out benchmarks/out/fidelity]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sparsyfed_lightning.client.module import ClientModule
from sparsyfed_lightning.data.module import FederatedDataModule
from sparsyfed_lightning.federated.trainer import FederatedTrainer
from sparsyfed_lightning.methods import FLASH, Method, SparsyFed, TopK, ZeroFL, build_method

SPARSE_METHODS = ("topk", "zerofl", "flash", "sparsyfed")
# Ablations and options, selectable with --methods: the paper's SparsyFed ablations, and the
# layer-collapse guard (keep at least a tenth of the target density in every layer).
VARIANTS: dict[str, Any] = {
    "sparsyfed_no_activation_pruning": lambda s: SparsyFed(s, activation_pruning=False),
    "sparsyfed_beta1": lambda s: SparsyFed(s, beta=1.0),
    "sparsyfed_per_step": lambda s: SparsyFed(s, threshold="per_step"),
    "sparsyfed_guarded": lambda s: SparsyFed(s, min_layer_density=(1 - s) / 10),
    "topk_guarded": lambda s: TopK(s, min_layer_density=(1 - s) / 10),
    "zerofl_guarded": lambda s: ZeroFL(s, min_layer_density=(1 - s) / 10),
    "flash_guarded": lambda s: FLASH(s, min_layer_density=(1 - s) / 10),
}


def make_method(name: str, sparsity: float) -> Method:
    """A method by fidelity name: a registry name or one of `VARIANTS`."""
    if name in VARIANTS:
        return VARIANTS[name](sparsity)
    return build_method(name) if name == "dense" else build_method(name, sparsity=sparsity)


def run_once(
    method: str, sparsity: float, data: FederatedDataModule, seed: int, rounds: int, stack_clients: int = 10
) -> dict[str, Any]:
    """One federated run; returns its summary numbers."""
    model = ClientModule("small_cnn", data.num_classes, lr=0.1, backbone_kwargs={"width": 32}, init_seed=seed)
    trainer = FederatedTrainer(
        method=make_method(method, sparsity), rounds=rounds, clients_per_round=data.num_clients,
        lr_final=0.01, eval_every=rounds, seed=seed, accelerator="cpu", devices=1, progress="none",
        stack_clients=stack_clients,
    )
    trainer.fit(model, datamodule=data)
    history = trainer.history
    later = history[2:]
    last = history[-1]
    return {
        "accuracy": last["test_accuracy"],
        "density": last["density"],
        "regrowth_training": statistics.fmean(m["after_training_activated"] for m in later),
        "regrowth_authors": statistics.fmean(m["after_pruning_deactivated"] for m in later),
        "mask_iou": statistics.fmean(m["mask_iou_previous"] for m in later),
        "uplink_bytes": last["cumulative_uplink_bytes"],
        "downlink_bytes": last["cumulative_downlink_bytes"],
    }


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def render(
    results: dict[str, list[dict[str, Any]]], sparsities: list[float], alphas: list[float], methods: list[str]
) -> str:
    """Markdown tables of the results (keys `method|sparsity|alpha`)."""
    lines = ["### Final test accuracy (%), mean ± std over seeds", ""]
    header = "| LDA alpha | method | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |"
    lines += [header, "|" + "---|" * (2 + len(sparsities))]
    for alpha in alphas:
        dense = results[f"dense|0.0|{alpha}"]
        lines.append(f"| {alpha:g} | dense | " + " | ".join(
            [_mean_std([r["accuracy"] for r in dense], 100)] * len(sparsities)) + " |")
        for method in methods:
            cells = [_mean_std([r["accuracy"] for r in results[f"{method}|{s}|{alpha}"]], 100) for s in sparsities]
            lines.append(f"| {alpha:g} | {method} | " + " | ".join(cells) + " |")
    lines += ["", "### Per-round dynamics and communication (mean over seeds and rounds >= 2)", "",
              "| LDA alpha | method | sparsity | regrown in local training | authors' regrowth (after-pruning "
              "deactivated) | mask IoU with previous round | uplink vs dense | downlink vs dense |",
              "|---|---|---|---|---|---|---|---|"]
    for alpha in alphas:
        dense = results[f"dense|0.0|{alpha}"]
        up_dense = statistics.fmean(r["uplink_bytes"] for r in dense)
        down_dense = statistics.fmean(r["downlink_bytes"] for r in dense)
        for method in methods:
            for s in sparsities:
                rows = results[f"{method}|{s}|{alpha}"]
                lines.append(
                    f"| {alpha:g} | {method} | {100 * s:g}% | "
                    f"{statistics.fmean(r['regrowth_training'] for r in rows):.1f} | "
                    f"{statistics.fmean(r['regrowth_authors'] for r in rows):.1f} | "
                    f"{statistics.fmean(r['mask_iou'] for r in rows):.4f} | "
                    f"1/{up_dense / statistics.fmean(r['uplink_bytes'] for r in rows):.1f} | "
                    f"1/{down_dense / statistics.fmean(r['downlink_bytes'] for r in rows):.1f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--methods", nargs="+", default=list(SPARSE_METHODS),
                        help=f"from {', '.join([*SPARSE_METHODS, *VARIANTS])}")
    parser.add_argument("--out", default="benchmarks/out/fidelity")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--stack-clients", type=int, default=10,
                        help="trainer.stack_clients (1: every client alone, as docs/RESULTS.md was measured)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="fidelity-cache-")
    results: dict[str, list[dict[str, Any]]] = {}
    jobs = [("dense", 0.0)] + [(m, s) for m in args.methods for s in args.sparsities]
    total = len(jobs) * len(args.alphas) * len(args.seeds)
    started = time.perf_counter()
    done = 0
    for alpha in args.alphas:
        data = FederatedDataModule("digits", num_clients=10, alpha=alpha, batch_size=16, seed=0, cache_dir=cache)
        data.setup("fit")
        for method, sparsity in jobs:
            key = f"{method}|{sparsity}|{alpha}"
            for seed in args.seeds:
                summary = run_once(method, sparsity, data, seed, args.rounds, args.stack_clients)
                results.setdefault(key, []).append(summary)
                done += 1
                elapsed = time.perf_counter() - started
                print(f"[{done}/{total}] {key} seed {seed}: accuracy {results[key][-1]['accuracy']:.4f} "
                      f"({elapsed / 60:.1f} min elapsed, ~{elapsed / done * (total - done) / 60:.1f} min left)",
                      flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    table = render(results, args.sparsities, args.alphas, args.methods)
    (out / "tables.md").write_text(table)
    print(table)
    print(f"total {(time.perf_counter() - started) / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
