"""`sparsyfed plot SWEEP_DIR`: a sweep's comparison figures, as PNG files in the sweep directory.

* `accuracy_vs_sparsity.png` - final test accuracy against sparsity, one line per method with error
  bars over seeds, one panel per row group (heterogeneity), the dense reference as a horizontal line
  with its ± std band (the paper's accuracy-degradation figure);
* `accuracy_vs_communication.png` - final accuracy against cumulative communication (up + down)
  relative to dense, log x: what each method pays in bytes for its accuracy;
* `train_loss_per_round.png`, `regrowth_per_round.png` (the authors' after-pruning-deactivated
  count), and `test_accuracy_per_round.png` when runs were evaluated at least three times: the mean
  over seeds per round, one panel per row group and sparsity, one line per method.

The layout (rows, columns, seeds) is the one of `sparsyfed table` (`results.py`). Runs that are not
finished are left out of the figures (the table lists them as missing). Only matplotlib and numpy.
"""

from __future__ import annotations

import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from sparsyfed_lightning.plots import readable_log_axis  # noqa: E402
from sparsyfed_lightning.sweep.arguments import OneLineParser  # noqa: E402
from sparsyfed_lightning.sweep.definition import SweepDefinitionError  # noqa: E402
from sparsyfed_lightning.sweep.grid import name_value  # noqa: E402
from sparsyfed_lightning.sweep.results import (  # noqa: E402
    FIRST_DYNAMICS_ROUND,
    Cell,
    Layout,
    Row,
    arrange,
    choose_layout,
    column_label,
    describe,
    read_results,
    short_names,
)

# Per-round figures: (y label, title, first round drawn, log y, draw the references).
# Regrowth starts at round 2 (round 1 prunes the dense initial model) on a log scale (Top-K regrows
# hundreds of weights per round, SparsyFed a few); dense has none to draw.
_PER_ROUND = {
    "train_loss": ("training loss", "Training loss per round (client-weighted)", 1, False, True),
    "after_pruning_deactivated": ("weights regrown", "Authors' regrowth per round (after-pruning deactivated)",
                                  FIRST_DYNAMICS_ROUND, True, False),
    "test_accuracy": ("test accuracy (%)", "Test accuracy per round", 0, False, True),
}
_FILE_NAMES = {"after_pruning_deactivated": "regrowth_per_round.png"}


class _Figures:
    """What every figure needs: rows, columns, names and the row groups."""

    def __init__(self, rows: list[Row], columns: list[tuple[Any, ...]], layout: Layout, metric: str) -> None:
        self.rows, self.columns, self.layout, self.metric = rows, columns, layout, metric
        self.names = short_names(layout.rows + layout.columns + layout.aggregate)
        self.scale = 100.0 if metric.endswith("accuracy") else 1.0
        self.groups: list[tuple[Any, ...]] = []
        for row in rows:
            group = row.values[: len(layout.groups)]
            if group not in self.groups:
                self.groups.append(group)
        labels = [self.label(row) for row in rows]
        colours = plt.get_cmap("tab10")
        self.colour = {label: colours(i % 10) for i, label in enumerate(dict.fromkeys(labels))}

    def label(self, row: Row) -> str:
        return describe(self.layout.rows[len(self.layout.groups):], row.values[len(self.layout.groups):], self.names)

    def group_title(self, group: tuple[Any, ...]) -> str:
        return ", ".join(f"{self.names[k]} {name_value(v)}" for k, v in zip(self.layout.groups, group, strict=True))

    def members(self, group: tuple[Any, ...]) -> tuple[list[Row], list[Row]]:
        """The (ordinary, reference) rows of a group."""
        rows = [row for row in self.rows if row.values[: len(self.layout.groups)] == group]
        references = [row for row in rows if row.is_reference and self.columns]
        return [row for row in rows if row not in references], references

    def values(self, cell: Cell, key: str) -> list[float]:
        return [run.summary(self.metric)[key] for run in cell.finished
                if run.summary(self.metric)[key] is not None]


def _panels(count: int, width: float = 5.0, height: float = 3.8) -> tuple[plt.Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
    return fig, list(axes[0])


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot_accuracy_vs_sparsity(figures: _Figures, out: Path) -> Path | None:
    if not figures.columns:
        return None
    fig, axes = _panels(len(figures.groups))
    x = np.arange(len(figures.columns))
    for ax, group in zip(axes, figures.groups, strict=True):
        rows, references = figures.members(group)
        for row in references:
            for cell in row.cells.values():
                values = figures.values(cell, figures.metric)
                if values:
                    mean, std = _mean_std([figures.scale * v for v in values])
                    colour = figures.colour[figures.label(row)]
                    ax.axhline(mean, color=colour, linestyle="--", label=f"{figures.label(row)} (reference)")
                    ax.axhspan(mean - std, mean + std, color=colour, alpha=0.12)
        for offset, row in enumerate(rows):
            points = []
            for index, column in enumerate(figures.columns):
                values = figures.values(row.cells[column], figures.metric) if column in row.cells else []
                if values:
                    points.append((index, *_mean_std([figures.scale * v for v in values])))
            if points:
                # A small horizontal offset per method keeps overlapping error bars readable.
                xs = np.array([p[0] for p in points]) + 0.04 * (offset - (len(rows) - 1) / 2)
                ax.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3,
                            color=figures.colour[figures.label(row)], label=figures.label(row))
        ax.set_xticks(x, [column_label(figures.layout.columns, c, figures.names) for c in figures.columns])
        ax.set(xlabel=", ".join(figures.names[k] for k in figures.layout.columns),
               ylabel=f"final {figures.metric}" + (" (%)" if figures.scale == 100 else ""),
               title=figures.group_title(group) or None)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize="small")
    _suptitle(fig, f"Final {figures.metric} against {', '.join(figures.layout.columns)} (mean ± std over seeds)")
    return _save(fig, out / "accuracy_vs_sparsity.png")


def plot_accuracy_vs_communication(figures: _Figures, out: Path) -> Path | None:
    fig, axes = _panels(len(figures.groups))
    drawn = False
    for ax, group in zip(axes, figures.groups, strict=True):
        rows, references = figures.members(group)
        for row in references + rows:
            points = []
            for cell in row.cells.values():
                comm = figures.values(cell, "communication_vs_dense")
                values = figures.values(cell, figures.metric)
                if comm and values:
                    points.append((statistics.fmean(comm), *_mean_std([figures.scale * v for v in values])))
            if not points:
                continue
            points.sort()
            drawn = True
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        capsize=3, color=figures.colour[figures.label(row)], label=figures.label(row),
                        linestyle="--" if row in references else "-")
        if ax.lines:
            _log_scale(ax, "x", [float(v) for line in ax.lines for v in line.get_xdata()])
        ax.set(xlabel="cumulative communication, up + down, relative to dense",
               ylabel=f"final {figures.metric}" + (" (%)" if figures.scale == 100 else ""),
               title=figures.group_title(group) or None)
        ax.grid(alpha=0.3, which="both")
    if not drawn:
        plt.close(fig)
        return None
    axes[-1].legend(fontsize="small")
    _suptitle(fig, "Accuracy against communication (points: sparsity levels; mean ± std over seeds)")
    return _save(fig, out / "accuracy_vs_communication.png")


def plot_per_round(figures: _Figures, key: str, out: Path) -> Path | None:
    """The mean over seeds of a per-round metric: panels row group x column, a line per method."""
    ylabel, title, first_round, log_y, with_references = _PER_ROUND[key]
    columns = figures.columns or [()]
    fig, grid = plt.subplots(len(figures.groups), len(columns), figsize=(4.6 * len(columns), 3.4 * len(figures.groups)),
                             squeeze=False)
    scale = 100.0 if key.endswith("accuracy") else 1.0
    drawn = False
    for g, group in enumerate(figures.groups):
        rows, references = figures.members(group)
        for c, column in enumerate(columns):
            ax = grid[g][c]
            for row in rows + (references if with_references else []):
                cell = row.cells.get(column) if row not in references else next(iter(row.cells.values()))
                if cell is None or not cell.finished:
                    continue
                rounds, means = _per_round_mean(cell, key, first_round)
                if rounds:
                    drawn = True
                    ax.plot(rounds, [scale * m for m in means], color=figures.colour[figures.label(row)],
                            linestyle="--" if row in references else "-", label=figures.label(row),
                            marker="." if len(rounds) < 12 else None)
            if log_y and ax.lines:
                _log_scale(ax, "y", [float(v) for line in ax.lines for v in line.get_ydata()])
            panel = ", ".join(t for t in (figures.group_title(group),
                                          column_label(figures.layout.columns, column, figures.names)) if t)
            ax.set(xlabel="round", ylabel=ylabel, title=panel or None)
            ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    grid[0][-1].legend(fontsize="small")
    _suptitle(fig, f"{title} (mean over seeds)")
    return _save(fig, out / _FILE_NAMES.get(key, f"{key}_per_round.png"))


def _log_scale(ax: plt.Axes, which: str, values: list[float]) -> None:
    """A log axis with plain, non-overlapping tick labels (0.03, 0.1, 1); symlog when zeros occur."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    if min(values) > 0:
        (ax.set_xscale if which == "x" else ax.set_yscale)("log")
        readable_log_axis(axis, values)
    else:
        (ax.set_xscale if which == "x" else ax.set_yscale)("symlog", linthresh=1.0)
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if abs(value) >= 1 else f"{value:.3g}"))


def _per_round_mean(cell: Cell, key: str, first_round: int) -> tuple[list[int], list[float]]:
    """Rounds (from `first_round`) every finished run of the cell logged `key` at, and the mean there."""
    per_run = [{line["round"]: line[key] for line in run.metrics
                if key in line and line.get("round", -1) >= first_round} for run in cell.finished]
    common = sorted(set.intersection(*(set(values) for values in per_run))) if per_run else []
    return common, [statistics.fmean(values[r] for values in per_run) for r in common]


def _suptitle(fig: plt.Figure, text: str) -> None:
    """A figure title wrapped to the figure's width (about 11 characters per inch)."""
    fig.suptitle(textwrap.fill(text, width=max(30, int(11 * fig.get_figwidth()))))


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(sweep_dir: str | Path, out: str | Path | None = None, metric: str = "test_accuracy") -> list[Path]:
    """Write a sweep's figures (module doc) into `out` (default: the sweep directory); returns them."""
    definition, results = read_results(sweep_dir)
    layout = choose_layout(definition)
    rows, columns = arrange(results, layout)
    figures = _Figures(rows, columns, layout, metric)
    out = Path(out) if out is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_accuracy_vs_sparsity(figures, out), plot_accuracy_vs_communication(figures, out)]
    evaluations = max((sum("test_accuracy" in line for line in run.metrics) for run in results), default=0)
    for key in ("train_loss", "after_pruning_deactivated", *(["test_accuracy"] if evaluations >= 3 else [])):
        written.append(plot_per_round(figures, key, out))
    return [path for path in written if path is not None]


def plot_sweep_main(argv: list[str]) -> int:
    """`sparsyfed plot SWEEP_DIR [--out DIR] [--metric KEY]`; returns the exit status."""
    parser = OneLineParser(prog="sparsyfed plot", description="Write a sweep's comparison figures.")
    parser.add_argument("sweep_dir", help="a directory written by `sparsyfed sweep`")
    parser.add_argument("--out", help="folder for the figures (default: the sweep directory)")
    parser.add_argument("--metric", default="test_accuracy", help="the final metric compared (default test_accuracy)")
    try:
        args = parser.parse_args(argv)
        paths = plot_sweep(args.sweep_dir, args.out, args.metric)
    except (SweepDefinitionError, ValueError, OSError) as error:
        print(f"sparsyfed: error: {error}", file=sys.stderr)
        return 2
    if not paths:
        print(f"sparsyfed: error: {args.sweep_dir} has no finished runs to draw", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0
