"""`sparsyfed plot RUN_DIR`: the paper-style figures of a run, as PNG files in the run directory.

* `accuracy.png` - central test accuracy per round;
* `accuracy_vs_communication.png` - accuracy against cumulative uplink + downlink bytes (log x);
* `density.png` - global density of the conv/linear weights per round, with the target;
* `mask_iou.png` - heat-map of the pooled IoU between the saved global masks of every pair of rounds;
* `class_counts.png` - the partition's per-client class histogram.

Inputs are the run's `metrics.jsonl`, `masks/round_*.pt` and `class_counts.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sparsyfed_lightning.sparse.masks import packed_mask_iou  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rounds logged in `run_dir/metrics.jsonl`."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a sparsyfed run directory")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy(metrics: list[dict[str, Any]], out: Path) -> Path:
    rows = [m for m in metrics if "test_accuracy" in m]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([m["round"] for m in rows], [100 * m["test_accuracy"] for m in rows], marker=".")
    ax.set(xlabel="round", ylabel="test accuracy (%)", title="Central test accuracy")
    ax.grid(alpha=0.3)
    return _save(fig, out / "accuracy.png")


def plot_accuracy_vs_communication(metrics: list[dict[str, Any]], out: Path) -> Path:
    rows = [m for m in metrics if "test_accuracy" in m and "cumulative_uplink_bytes" in m]
    fig, ax = plt.subplots(figsize=(6, 4))
    total = [(m["cumulative_uplink_bytes"] + m["cumulative_downlink_bytes"]) / 1e6 for m in rows]
    ax.plot(total, [100 * m["test_accuracy"] for m in rows], marker=".")
    ax.set_xscale("log")
    ax.set(xlabel="cumulative communication (MB, up + down)", ylabel="test accuracy (%)",
           title="Accuracy against communication")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out / "accuracy_vs_communication.png")


def plot_density(metrics: list[dict[str, Any]], out: Path, target: float | None) -> Path:
    rows = [m for m in metrics if "density" in m]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([m["round"] for m in rows], [100 * m["density"] for m in rows], marker=".", label="global model")
    if target is not None:
        ax.axhline(100 * target, color="grey", linestyle="--", label="target")
    ax.set_yscale("log")
    ax.set(xlabel="round", ylabel="density of conv/linear weights (%)", title="Global density")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out / "density.png")


def plot_mask_iou(run_dir: Path, out: Path) -> Path | None:
    files = sorted((run_dir / "masks").glob("round_*.pt"))
    if len(files) < 2:
        return None
    rounds = [int(f.stem.split("_")[1]) for f in files]
    masks = [torch.load(f, weights_only=True) for f in files]
    iou = np.array([[packed_mask_iou(a, b) for b in masks] for a in masks])
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(iou, vmin=0, vmax=1, cmap="viridis")
    ticks = np.linspace(0, len(rounds) - 1, min(len(rounds), 10)).round().astype(int)
    ax.set_xticks(ticks, [rounds[i] for i in ticks])
    ax.set_yticks(ticks, [rounds[i] for i in ticks])
    ax.set(xlabel="round", ylabel="round", title="Mask IoU of the global model")
    fig.colorbar(image, ax=ax, label="IoU")
    return _save(fig, out / "mask_iou.png")


def plot_class_counts(counts: np.ndarray, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(counts.shape[0])
    colors = plt.get_cmap("tab20", counts.shape[1])
    for c in range(counts.shape[1]):
        ax.bar(np.arange(counts.shape[0]), counts[:, c], bottom=bottom, color=colors(c), width=0.9)
        bottom += counts[:, c]
    ax.set(xlabel="client", ylabel="training samples", title="Partition: class histogram per client")
    return _save(fig, out / "class_counts.png")


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write every figure of a run into its directory; returns the files written."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    target = None
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        method = (yaml.safe_load(config.read_text()) or {}).get("method") or {}
        sparsity = (method.get("init_args") or {}).get("sparsity")
        target = None if sparsity is None else 1.0 - float(sparsity)
    written = [
        plot_accuracy(metrics, run_dir),
        plot_accuracy_vs_communication(metrics, run_dir),
        plot_density(metrics, run_dir, target),
    ]
    iou = plot_mask_iou(run_dir, run_dir)
    if iou is not None:
        written.append(iou)
    counts = run_dir / "class_counts.json"
    if counts.is_file():
        written.append(plot_class_counts(np.array(json.loads(counts.read_text())), run_dir))
    return written


def plot_main(argv: list[str]) -> int:
    """`sparsyfed plot RUN_DIR [RUN_DIR ...]`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="sparsyfed plot", description="Write a run's figures as PNG files.")
    parser.add_argument("run_dirs", nargs="+", help="run directories written by `sparsyfed fit`")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        try:
            for path in plot_run(run_dir):
                print(path)
        except (FileNotFoundError, ValueError) as error:
            print(f"sparsyfed plot: error: {error}", file=sys.stderr)
            return 2
    return 0
