"""`sparsyfed plot RUN [RUN ...] [--out DIR]`: the paper-style figures of one run, or of several runs together.

Figures (PNG), each with one line (or panel) per run:

* `accuracy.png` - central test accuracy per round;
* `accuracy_vs_communication.png` - accuracy against cumulative uplink + downlink bytes (log axis).
  When one of the runs is dense (its config's method is `Dense`) it is the reference: every other
  run's bytes are divided by the dense run's at their last common round, printed and shown in the
  legend; otherwise the legend shows each run's bytes against dense fp32 messages of its own model;
* `density.png` - global density of the conv/linear weights per round, with each run's target;
* `layer_density.png` - density of every conv/linear layer per round, one panel per run; collapsed
  layers (all stored weights zero: `collapsed_layers` in metrics.jsonl, or a layer density of 0) are
  marked with red crosses at the bottom of the panel;
* `regrowth.png` - weights regrown by aggregation: the client average of `after_pruning_deactivated`
  (weights non-zero in the received model and zero after the client's pruning; SPEC 9.2);
* `mask_iou_rounds.png` - pooled mask IoU with the previous round and with the lagged snapshot
  (`iou_lag` rounds back), from round 2 on (round 1 compares with the dense initial model);
* `training.png` - training loss and client learning rate per round;
* `mask_iou.png` - heat-map of the pooled IoU between the saved global masks of every pair of
  rounds (`masks/round_*.npz`), one panel per run; the colour scale is logarithmic in `1 - IoU`, so
  0.99 and 0.999 look different;
* `class_counts.png` - the partition's per-client class histogram (one run only).

One run's figures go into its own folder, several runs' into `--out` (default `compare/` in the
current directory). This module imports matplotlib, numpy and yaml, never torch or Lightning.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from sparsyfed_lightning.data.figures import class_counts_figure  # noqa: E402
from sparsyfed_lightning.federated.snapshots import load_mask_snapshot, pooled_mask_iou  # noqa: E402

METRICS_NAME = "metrics.jsonl"
COMPARE_DIR = "compare"
_WEIGHT_SUFFIXES = (".parametrizations.weight.original", ".weight")


@dataclass
class Run:
    """One run directory's metrics and configuration."""

    path: Path
    metrics: list[dict[str, Any]]
    method: str | None = None  # the method's class name, from config.yaml
    sparsity: float | None = None
    label: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def is_dense(self) -> bool:
        return self.method == "Dense"

    def rows(self, *keys: str) -> list[dict[str, Any]]:
        """The rounds that logged every one of `keys`."""
        return [m for m in self.metrics if all(m.get(k) is not None for k in keys)]


class PlotError(ValueError):
    """A run directory that cannot be plotted (reported as one line, exit status 2)."""


# -- reading runs ----------------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rounds logged in `run_dir/metrics.jsonl`; a PlotError when there are none.

    A last line without its newline (a run killed while writing it) is left out with a note.
    """
    path = run_dir / METRICS_NAME
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir} is not a directory (expected a run directory written by `sparsyfed fit`)")
    if not path.is_file():
        raise PlotError(f"{run_dir} is not a sparsyfed run directory: it has no {METRICS_NAME}")
    text = path.read_text()
    lines = text.splitlines()
    metrics = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                print(f"sparsyfed plot: note: {path} line {number} is incomplete and left out", file=sys.stderr)
                continue
            raise PlotError(f"{path} line {number} is not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise PlotError(f"{path} line {number} is not a round of metrics (no integer 'round')")
        metrics.append(row)
    if not metrics:
        raise PlotError(f"{path} holds no rounds: nothing to plot")
    return metrics


def read_run(run_dir: str | Path) -> Run:
    """A run directory's metrics, method and target sparsity (from `config.yaml` when present)."""
    run_dir = Path(run_dir)
    run = Run(run_dir, read_metrics(run_dir))
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        try:
            method = (yaml.safe_load(config.read_text()) or {}).get("method")
        except yaml.YAMLError:
            method = None
        if isinstance(method, dict):
            class_path = str(method.get("class_path", ""))
            run.method = class_path.rsplit(".", 1)[-1] or None
            sparsity = (method.get("init_args") or {}).get("sparsity")
            run.sparsity = 0.0 if run.is_dense else (None if sparsity is None else float(sparsity))
        elif isinstance(method, str):
            run.method = method.rsplit(".", 1)[-1]
    return run


def _describe(run: Run) -> str:
    if run.method is None:
        return run.path.name
    return run.method if run.sparsity in (None, 0.0) else f"{run.method} {100 * run.sparsity:g}%"


def label_runs(runs: list[Run]) -> None:
    """Legend labels: the run directory names, or method and sparsity where names repeat."""
    names = [run.path.name for run in runs]
    for run in runs:
        unique = names.count(run.path.name) == 1
        run.label = run.path.name if unique else f"{_describe(run)} ({run.path.parent.name}/{run.path.name})"


# -- axis helpers ------------------------------------------------------------------------------------------
_BYTE_UNITS = ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1.0, "B"))


def format_bytes(value: float) -> str:
    """`2.3e7` -> `23 MB` (decimal units, as the README's table)."""
    for unit, name in _BYTE_UNITS:
        if abs(value) >= unit:
            return f"{value / unit:.3g} {name}"
    return f"{value:.3g} B"


def readable_log_axis(axis: Any, values: list[float], label: Any = lambda value: f"{value:.3g}") -> None:
    """Labelled major ticks at powers of ten; also at 2 and 5 of each when `values` span under two decades, at
    1.5, 3 and 7 too under one."""
    positive = [v for v in values if v > 0]
    span = max(positive) / min(positive) if positive else math.inf
    subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if span < 10 else (1.0, 2.0, 5.0) if span < 100 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda value, _: label(value)))
    axis.set_minor_formatter(NullFormatter())


def bytes_axis(axis: Any, values: list[float]) -> None:
    """A log axis of bytes labelled 1 MB, 10 MB, 100 MB, ..."""
    readable_log_axis(axis, values, format_bytes)


def percent_log_axis(axis: Any, values: list[float]) -> None:
    """A log axis of percentages labelled 0.1%, 1%, 10%, 100%."""
    readable_log_axis(axis, values, lambda value: f"{value:g}%")


def _save(fig: plt.Figure, path: Path) -> Path:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # keeps a legend placed beside the axes
    plt.close(fig)
    return path


def _colours(runs: list[Run]) -> dict[str, Any]:
    palette = plt.get_cmap("tab10")
    return {run.label: palette(i % 10) for i, run in enumerate(runs)}


def _finish(ax: Any, **legend: Any) -> None:
    """Grid, whole-number round ticks, and a legend when something is labelled."""
    ax.grid(alpha=0.3, which="both")
    if ax.get_xlabel() == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**{"fontsize": "small", **legend})


def _lines_per_run(
    ax: Any, runs: list[Run], key: str, *, scale: float = 1.0, first_round: float = 0, suffix: str = "", **style: Any
) -> None:
    """One line per run (in its colour) of metric `key` times `scale` against the round, from `first_round`."""
    colours = _colours(runs)
    for index, run in enumerate(runs):
        rows = [m for m in run.rows(key) if m["round"] >= first_round]
        if rows:
            extra = {name: value(index) if callable(value) else value for name, value in style.items()}
            ax.plot([m["round"] for m in rows], [scale * m[key] for m in rows], color=colours[run.label],
                    label=f"{run.label}{suffix}", **extra)


# -- figures -------------------------------------------------------------------------------------------------
def plot_accuracy(runs: list[Run], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = _colours(runs)
    for run in runs:
        rows = run.rows("test_accuracy")
        ax.plot([m["round"] for m in rows], [100 * m["test_accuracy"] for m in rows], marker=".",
                color=colours[run.label], label=f"{run.label} (final {100 * rows[-1]['test_accuracy']:.2f}%)")
    ax.set(xlabel="round", ylabel="test accuracy (%)", title="Central test accuracy")
    _finish(ax)
    return _save(fig, out / "accuracy.png")


def total_bytes(row: dict[str, Any]) -> int:
    """Cumulative uplink + downlink bytes of a logged round."""
    return int(row["cumulative_uplink_bytes"]) + int(row["cumulative_downlink_bytes"])


def communication_ratios(runs: list[Run]) -> tuple[Run | None, dict[str, tuple[float, int, int, int]]]:
    """The dense reference run (the first dense one) and, per other run label, `(ratio, round, bytes, dense bytes)`.

    Both runs are compared at their last common round with byte counts: cumulative up + down bytes of
    the run divided by the dense run's.
    """
    dense = next((run for run in runs if run.is_dense), None)
    ratios: dict[str, tuple[float, int, int, int]] = {}
    if dense is None:
        return None, ratios
    dense_rows = {m["round"]: m for m in dense.rows("cumulative_uplink_bytes", "cumulative_downlink_bytes")}
    for run in runs:
        if run is dense:
            continue
        rows = run.rows("cumulative_uplink_bytes", "cumulative_downlink_bytes")
        common = [m for m in rows if m["round"] in dense_rows]
        if not common:
            continue
        row = common[-1]
        reference = total_bytes(dense_rows[row["round"]])
        ratios[run.label] = (total_bytes(row) / reference, row["round"], total_bytes(row), reference)
    return dense, ratios


def plot_accuracy_vs_communication(runs: list[Run], out: Path) -> tuple[Path, list[str]]:
    """The figure and the lines to print (the communication ratios against the dense run)."""
    dense, ratios = communication_ratios(runs)
    lines, plotted = [], []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = _colours(runs)
    for run in runs:
        rows = run.rows("test_accuracy", "cumulative_uplink_bytes", "cumulative_downlink_bytes")
        if not rows:
            continue
        if run is dense:
            note = "dense reference"
        elif run.label in ratios:
            ratio, round_index, used, reference = ratios[run.label]
            note = f"{ratio:.4f}x the dense run's bytes"
            lines.append(
                f"communication: {run.label}: {format_bytes(used)} up + down over {round_index} rounds = "
                f"{ratio:.4f}x the dense run {dense.label} ({format_bytes(reference)})"  # type: ignore[union-attr]
            )
        else:
            own = rows[-1].get("cumulative_ratio_to_dense")
            note = "" if own is None else f"{own:.4f}x dense fp32 messages"
        style = {"color": "black", "linestyle": "--"} if run is dense else {"color": colours[run.label]}
        plotted += [total_bytes(m) for m in rows]
        ax.plot([total_bytes(m) for m in rows], [100 * m["test_accuracy"] for m in rows], marker=".",
                label=f"{run.label}" + (f" ({note})" if note else ""), **style)
    ax.set_xscale("log")
    bytes_axis(ax.xaxis, plotted)
    title = "Accuracy against communication"
    if dense is not None and len(runs) > 1:
        title += f" (reference: dense run {dense.label})"
    ax.set(xlabel="cumulative communication, uplink + downlink", ylabel="test accuracy (%)", title=title)
    _finish(ax)
    return _save(fig, out / "accuracy_vs_communication.png"), lines


def plot_density(runs: list[Run], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = _colours(runs)
    _lines_per_run(ax, runs, "density", scale=100, marker=".")
    for run in runs:
        if run.sparsity is not None and run.sparsity > 0:
            ax.axhline(100 * (1 - run.sparsity), color=colours[run.label], linestyle=":", linewidth=1)
    ax.set_yscale("log")
    percent_log_axis(ax.yaxis, [100 * m["density"] for run in runs for m in run.rows("density")])
    ax.set(xlabel="round", ylabel="density of conv/linear weights", title="Global density (dotted: targets)")
    _finish(ax)
    return _save(fig, out / "density.png")


def short_layer_name(key: str) -> str:
    """`layer1.0.conv1.parametrizations.weight.original` -> `layer1.0.conv1`."""
    for suffix in _WEIGHT_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)] or key
    return key


def collapsed_layers(row: dict[str, Any]) -> set[str]:
    """State keys of the layers whose stored weights are all zero in a logged round."""
    densities = row.get("layer_density") or {}
    logged = row.get("collapsed_layers")
    if logged is None:
        return {key for key, value in densities.items() if value == 0}
    names = set(logged)
    return {key for key in densities if key in names or short_layer_name(key) in names}


# Up to this many layers are named in the legend; more get a colour bar from the first to the last.
MAX_LAYER_LEGEND = 12


def plot_layer_density(runs: list[Run], out: Path) -> Path:
    panels = [run for run in runs if run.rows("layer_density")]
    # At most three panels a row, so that several runs stay readable side by side.
    count = max(len(panels), 1)
    columns = min(count, 3)
    grid_rows = math.ceil(count / columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(6.5 * columns, 6.2 * grid_rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, run in zip(axes.flat, panels, strict=False):
        rows = run.rows("layer_density")
        keys = list(rows[-1]["layer_density"])
        rounds = [m["round"] for m in rows]
        positive = [v for m in rows for v in m["layer_density"].values() if v > 0]
        floor = 100 * min(positive) / 3 if positive else 1e-3
        palette = plt.get_cmap("viridis", max(len(keys), 2))
        named = len(keys) <= MAX_LAYER_LEGEND
        for i, key in enumerate(keys):
            values = [100 * m["layer_density"].get(key, float("nan")) for m in rows]
            ax.plot(rounds, [v if v > 0 else float("nan") for v in values], color=palette(i), linewidth=1.2,
                    label=short_layer_name(key) if named else "_")
        if not named:
            bar = fig.colorbar(ScalarMappable(Normalize(0, len(keys) - 1), palette), ax=ax, ticks=[0, len(keys) - 1])
            bar.ax.set_yticklabels([short_layer_name(keys[0]), short_layer_name(keys[-1])], fontsize="x-small")
            bar.set_label(f"{len(keys)} layers, input to output", fontsize="small")
        collapsed_any: list[str] = []
        for m in rows:
            for key in sorted(collapsed_layers(m)):
                collapsed_any += [] if key in collapsed_any else [key]
                ax.plot(m["round"], floor, marker="x", color="red", markersize=6, linestyle="none")
        if run.sparsity:
            ax.axhline(100 * (1 - run.sparsity), color="grey", linestyle=":", linewidth=1, label="target (global)")
        if collapsed_any:
            names = ", ".join(short_layer_name(k) for k in collapsed_any[:3])
            more = f" and {len(collapsed_any) - 3} more" if len(collapsed_any) > 3 else ""
            ax.plot([], [], marker="x", color="red", linestyle="none", label=f"collapsed (all zero): {names}{more}")
            ax.axhline(floor, color="red", linewidth=0.5, alpha=0.4)
        ax.set_yscale("log")
        ax.set_ylim(floor / 1.5, 150)
        percent_log_axis(ax.yaxis, [floor / 1.5, 150])
        ax.set(xlabel="round", ylabel="density of the layer's weights", title=f"Per-layer density: {run.label}")
        # Below the panel: a legend inside would cover the curves of some layer.
        _finish(ax, fontsize="x-small", ncol=3 if len(keys) > 6 and named else 2, loc="upper center",
                bbox_to_anchor=(0.5, -0.14))
    return _save(fig, out / "layer_density.png")


def plot_regrowth(runs: list[Run], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # From round 2 (SPEC 9.2): in round 1 the received model is the dense initial one.
    _lines_per_run(ax, runs, "after_pruning_deactivated", first_round=2, marker=".")
    ax.set_yscale("symlog", linthresh=1)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.set_ylim(bottom=0)
    ax.set(xlabel="round", ylabel="weights (client average, symmetric log scale)",
           title="Weight regrowth (non-zero when received, pruned by the client)")
    _finish(ax)
    return _save(fig, out / "regrowth.png")


def plot_mask_iou_rounds(runs: list[Run], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(11 if len(runs) > 1 else 7, 4.5), layout="constrained")
    # Round 1, and the first lagged value, compare with the dense initial model: left out.
    _lines_per_run(ax, runs, "mask_iou_previous", first_round=2, suffix=": previous round")
    lagged_rounds = sorted({m["round"] for run in runs for m in run.rows("mask_iou_lagged")})
    _lines_per_run(ax, runs, "mask_iou_lagged", first_round=lagged_rounds[2] if len(lagged_rounds) > 2 else math.inf,
                   suffix=": lagged", linestyle="--", marker="o")
    # A logit scale spreads both 0.1-0.9 and 0.99-0.9999; IoU 1 (identical masks) is drawn at 1 - 1e-5.
    ax.set_yscale("logit")
    for line in ax.get_lines():
        line.set_ydata(np.clip(np.asarray(line.get_ydata(), dtype=float), 1e-5, 1 - 1e-5))
    ax.relim()
    ax.autoscale_view()
    ax.yaxis.set_major_locator(FixedLocator([0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999, 1 - 1e-5]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: "1" if value > 0.99999 - 1e-9 else f"{value:g}"))
    ax.yaxis.set_minor_locator(FixedLocator([]))
    ax.set(xlabel="round", ylabel="pooled mask IoU (logit scale)", title="Mask IoU of the global model")
    # Two lines per run: beside the axes, a legend would hide the curves near IoU 1 or the lower ones.
    _finish(ax, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if len(runs) > 1 else {}))
    return _save(fig, out / "mask_iou_rounds.png")


def plot_training(runs: list[Run], out: Path) -> Path:
    fig, (loss_ax, lr_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    _lines_per_run(loss_ax, runs, "train_loss")
    styles = ["-", "--", ":", "-."]  # runs with the same schedule stay visible on top of each other
    _lines_per_run(lr_ax, runs, "lr", linestyle=lambda i: styles[i % 4], linewidth=lambda i: 2.5 - 0.4 * (i % 4))
    loss_ax.set(xlabel="round", ylabel="training loss (client average)", title="Training loss")
    lr_ax.set(xlabel="round", ylabel="client learning rate", title="Learning rate")
    for ax in (loss_ax, lr_ax):
        _finish(ax)
    return _save(fig, out / "training.png")


def mask_iou_matrix(run_dir: Path) -> tuple[list[int], np.ndarray] | None:
    """Rounds of the saved mask snapshots and their pairwise pooled IoU (None: fewer than two)."""
    files = sorted((run_dir / "masks").glob("round_*.npz"))
    if len(files) < 2:
        return None
    rounds = [int(f.stem.split("_")[1]) for f in files]
    masks = []
    for file in files:
        try:
            masks.append(load_mask_snapshot(file))
        except (OSError, ValueError, KeyError) as error:  # zipfile.BadZipFile is an OSError
            raise PlotError(f"{file} is not a readable mask snapshot ({error})") from None
    iou = np.ones((len(masks), len(masks)))
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            iou[i, j] = iou[j, i] = pooled_mask_iou(masks[i], masks[j])
    return rounds, iou


def plot_mask_iou(runs: list[Run], matrices: list[tuple[Run, tuple[list[int], np.ndarray]]], out: Path) -> Path | None:
    """The heat-maps of `mask_iou_matrix` results (computed before any figure is written)."""
    if not matrices:
        return None
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.8 * len(matrices) + 1.2, 4.8), squeeze=False,
                             layout="constrained")
    distances = np.concatenate([(1 - iou)[~np.eye(len(iou), dtype=bool)] for _, (_, iou) in matrices])
    positive = distances[distances > 0]
    low = max(float(positive.min()), 1e-5) if positive.size else 1e-3
    high = max(float(distances.max()), low * 10)
    norm = LogNorm(vmin=low, vmax=high)
    for ax, (run, (rounds, iou)) in zip(axes[0], matrices, strict=True):
        image = ax.imshow(np.clip(1 - iou, low, high), norm=norm, cmap="viridis_r", interpolation="nearest")
        step = math.ceil(len(rounds) / 8)  # every step-th snapshot: evenly spaced rounds
        ticks = list(range(0, len(rounds), step))
        if len(rounds) - 1 - ticks[-1] >= step / 2:
            ticks.append(len(rounds) - 1)
        ax.set_xticks(ticks, [rounds[i] for i in ticks])
        ax.set_yticks(ticks, [rounds[i] for i in ticks])
        ax.set(xlabel="round", ylabel="round", title=f"Mask IoU: {run.label}")
    decades = [10.0**k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]
    bar = fig.colorbar(image, ax=list(axes[0]), label="pooled mask IoU (log scale in 1 - IoU)", shrink=0.9)
    bar.ax.invert_yaxis()  # identical masks (IoU 1) at the top
    bar.ax.yaxis.set_major_locator(FixedLocator([d for d in decades if low <= d <= high] or [low, high]))
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{1 - value:.6g}"))
    bar.ax.yaxis.set_minor_formatter(NullFormatter())
    fig.savefig(out / "mask_iou.png", dpi=120)
    plt.close(fig)
    return out / "mask_iou.png"


def plot_class_counts(run: Run, out: Path) -> Path | None:
    counts_file = run.path / "class_counts.json"
    if not counts_file.is_file():
        return None
    counts = np.array(json.loads(counts_file.read_text()))
    figure = class_counts_figure(counts, f"Partition of {run.label}: training samples per client and class")
    figure.savefig(out / "class_counts.png", dpi=120)
    return out / "class_counts.png"


# -- entry points ---------------------------------------------------------------------------------------------
def plot_runs(run_dirs: list[str | Path], out: str | Path | None = None) -> tuple[list[Path], list[str]]:
    """Write the figures of the runs into `out`; returns the files written and the lines to print.

    Every run directory is read and checked before anything is written.
    """
    runs = [read_run(run_dir) for run_dir in run_dirs]
    label_runs(runs)
    matrices = [(run, matrix) for run in runs if (matrix := mask_iou_matrix(run.path)) is not None]
    out_dir = Path(out) if out is not None else (runs[0].path if len(runs) == 1 else Path(COMPARE_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    communication, lines = plot_accuracy_vs_communication(runs, out_dir)
    written = [
        plot_accuracy(runs, out_dir),
        communication,
        plot_density(runs, out_dir),
        plot_layer_density(runs, out_dir),
        plot_regrowth(runs, out_dir),
        plot_mask_iou_rounds(runs, out_dir),
        plot_training(runs, out_dir),
        plot_mask_iou(runs, matrices, out_dir),
        plot_class_counts(runs[0], out_dir) if len(runs) == 1 else None,
    ]
    return [path for path in written if path is not None], lines


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write every figure of one run into its directory; returns the files written."""
    return plot_runs([run_dir])[0]


def plot_main(argv: list[str]) -> int:
    """`sparsyfed plot RUN_DIR [RUN_DIR ...] [--out DIR]`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="sparsyfed plot",
        description="Write the figures of one run (into its folder) or of several runs together (into --out).",
    )
    parser.add_argument("run_dirs", nargs="+", help="run directories written by `sparsyfed fit`")
    parser.add_argument(
        "--out", default=None,
        help=f"folder for the figures (default: the run's folder for one run, ./{COMPARE_DIR} for several)",
    )
    args = parser.parse_args(argv)
    try:
        written, lines = plot_runs(args.run_dirs, args.out)
    except PlotError as error:
        print(f"sparsyfed plot: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    for line in lines:
        print(line)
    if args.out is None and len(args.run_dirs) > 1:
        print(f"figures written to {Path(COMPARE_DIR).resolve()}")
    return 0
