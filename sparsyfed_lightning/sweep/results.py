"""A sweep's results arranged as a paper table: which keys are rows, columns and seeds, and the cells.

Read from `sweep.yaml` and the runs' `metrics.jsonl` only (no torch). A run counts when it is
finished (its `global_model.pt` exists); the others are missing from their cell, never dropped:
every cell knows how many runs it expects.

Layout (each can be overridden; every key the grid varies gets exactly one place):

* columns: the varied keys named `sparsity` (`method.sparsity`);
* aggregated: the varied seed keys (`trainer.seed`, `model.init_seed`, ...): a cell holds the runs
  that differ only in them, reported as mean and sample standard deviation;
* rows: every other varied key, the `data.*` keys (heterogeneity, e.g. `data.alpha`) first;
* row groups: the leading row keys every run sets, other than the method and its options;
* references: rows whose runs set none of the column keys (`Dense` has no sparsity). They are
  shown with their row group, as in the paper's "LDA 0.1 (dense 73.81)".

Per run, besides the final value of the chosen metric: communication relative to dense (cumulative
uplink and downlink bytes against the dense fp32 messages of the same run, the denominator of
`cumulative_ratio_to_dense`), and means over rounds >= 2 of the regrowth counts (SPEC 9.2) and of
the mask IoU with the previous round.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsyfed_lightning.sweep.definition import SweepDefinition
from sparsyfed_lightning.sweep.grid import RunPoint, is_seed_key, name_value

FINAL_MODEL_NAME = "global_model.pt"  # as federated/run_files.py (which imports torch)
METRICS_NAME = "metrics.jsonl"
# Quantities averaged over rounds >= FIRST_DYNAMICS_ROUND (round 1 starts from the dense initial model).
DYNAMICS_KEYS = ("after_training_activated", "after_pruning_deactivated", "mask_iou_previous")
FIRST_DYNAMICS_ROUND = 2
COMMUNICATION_KEYS = ("uplink_vs_dense", "downlink_vs_dense", "communication_vs_dense")


class _Absent:
    """A grid key a run does not set (distinct from a `null` value)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()


@dataclass
class RunResult:
    """One run of a sweep and what it logged."""

    point: RunPoint
    run_dir: Path
    finished: bool
    metrics: list[dict[str, Any]] = field(repr=False)
    _summaries: dict[str, dict[str, float | None]] = field(default_factory=dict, repr=False)

    def value(self, key: str) -> Any:
        """The run's value of a grid key (`ABSENT` when its grid entry does not set it)."""
        return self.point.values.get(key, ABSENT)

    def final(self, key: str) -> float | None:
        """The last logged value of a metric (None if never logged)."""
        for line in reversed(self.metrics):
            if key in line:
                return line[key]
        return None

    def summary(self, metric: str) -> dict[str, float | None]:
        """The numbers the tables and figures report for this run (None where not available)."""
        if metric in self._summaries:
            return self._summaries[metric]
        numbers: dict[str, float | None] = {metric: self.final(metric)}
        numbers.update(self.communication())
        later = [line for line in self.metrics if line.get("round", 0) >= FIRST_DYNAMICS_ROUND]
        for key in DYNAMICS_KEYS:
            values = [line[key] for line in later if key in line]
            numbers[key] = statistics.fmean(values) if values else None
        self._summaries[metric] = numbers
        return numbers

    def communication(self) -> dict[str, float | None]:
        """Cumulative uplink, downlink and total bytes relative to dense fp32 messages of this run."""
        last = next((line for line in reversed(self.metrics) if "cumulative_ratio_to_dense" in line), None)
        if last is None or not last["cumulative_ratio_to_dense"]:
            return dict.fromkeys(COMMUNICATION_KEYS)
        up, down = last["cumulative_uplink_bytes"], last["cumulative_downlink_bytes"]
        dense_one_way = (up + down) / last["cumulative_ratio_to_dense"] / 2
        return {"uplink_vs_dense": up / dense_one_way, "downlink_vs_dense": down / dense_one_way,
                "communication_vs_dense": last["cumulative_ratio_to_dense"]}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rounds in a run's `metrics.jsonl` (empty when there is none; a torn last line is skipped)."""
    path = run_dir / METRICS_NAME
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines


def read_results(sweep_dir: str | Path) -> tuple[SweepDefinition, list[RunResult]]:
    """The definition of a sweep and every run's result, in grid order."""
    sweep_dir = Path(sweep_dir)
    definition = SweepDefinition.read(sweep_dir)
    results = []
    for point in definition.points:
        run_dir = definition.run_dir(sweep_dir, point)
        finished = (run_dir / FINAL_MODEL_NAME).is_file()
        results.append(RunResult(point, run_dir, finished, read_metrics(run_dir) if finished else []))
    return definition, results


# -- layout --------------------------------------------------------------------------------------------
@dataclass
class Layout:
    """Which grid keys are rows, columns and aggregated; `groups` are the leading row keys that group rows."""

    rows: list[str]
    columns: list[str]
    aggregate: list[str]
    groups: list[str]


def varied_keys(definition: SweepDefinition) -> list[str]:
    """The grid keys whose value differs between runs (a key some runs do not set counts), in grid order."""
    varied = []
    for key in definition.keys:
        values = [point.values.get(key, ABSENT) for point in definition.points]
        if any(value != values[0] or (value is ABSENT) != (values[0] is ABSENT) for value in values):
            varied.append(key)
    return varied


def choose_layout(definition: SweepDefinition, rows: list[str] | None = None, columns: list[str] | None = None,
                  aggregate: list[str] | None = None) -> Layout:
    """The layout of the module doc, with the given keys placed where asked (`ValueError` for a key the
    grid does not vary, or one placed twice)."""
    varied = varied_keys(definition)
    given = [*(rows or []), *(columns or []), *(aggregate or [])]
    for key in given:
        if key not in varied:
            raise ValueError(f"{key!r} is not a key this sweep varies; it varies: {', '.join(varied) or 'nothing'}")
    if len(set(given)) != len(given):
        raise ValueError("a key is given to more than one of --rows, --columns and --aggregate")
    free = [key for key in varied if key not in given]
    if columns is None:
        columns = [key for key in free if key.rsplit(".", 1)[-1] == "sparsity"]
    if aggregate is None:
        aggregate = [key for key in free if is_seed_key(key) and key not in columns]
    rest = [key for key in free if key not in columns and key not in aggregate]
    if rows is None:
        rows = [key for key in rest if key.startswith("data.")] + [key for key in rest if not key.startswith("data.")]
    else:
        rows = rows + rest  # a varied key the user left out still separates rows
    groups = []
    for key in rows[:-1]:
        if key == "method" or key.startswith("method.") or any(key not in p.values for p in definition.points):
            break
        groups.append(key)
    return Layout(rows, columns, aggregate, groups)


# -- cells ---------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """The runs of one row and column (they differ only in the aggregated keys)."""

    row: tuple[Any, ...]
    column: tuple[Any, ...]
    runs: list[RunResult]

    @property
    def finished(self) -> list[RunResult]:
        return [run for run in self.runs if run.finished]

    def stats(self, metric: str) -> dict[str, tuple[float, float | None, int] | None]:
        """Per reported quantity: (mean, sample std or None for one run, runs counted), None if none."""
        summaries = [run.summary(metric) for run in self.finished]
        stats: dict[str, tuple[float, float | None, int] | None] = {}
        for key in (metric, *COMMUNICATION_KEYS, *DYNAMICS_KEYS):
            values = [s[key] for s in summaries if s[key] is not None]
            if not values:
                stats[key] = None
            else:
                std = statistics.stdev(values) if len(values) > 1 else None
                stats[key] = (statistics.fmean(values), std, len(values))
        return stats


@dataclass
class Row:
    """A table row: its values of the row keys and its cells by column values."""

    values: tuple[Any, ...]
    cells: dict[tuple[Any, ...], Cell]

    @property
    def is_reference(self) -> bool:
        """A row whose runs set no column key (e.g. Dense in a table with sparsity columns)."""
        return bool(self.cells) and all(all(v is ABSENT for v in column) for column in self.cells)


def arrange(results: list[RunResult], layout: Layout) -> tuple[list[Row], list[tuple[Any, ...]]]:
    """The rows (in grid order) and the non-reference column values (sorted) of a layout."""
    rows: dict[tuple[Any, ...], Row] = {}
    for run in results:
        row_values = tuple(run.value(key) for key in layout.rows)
        column_values = tuple(run.value(key) for key in layout.columns)
        row = rows.setdefault(row_values, Row(row_values, {}))
        row.cells.setdefault(column_values, Cell(row_values, column_values, [])).runs.append(run)
    columns = {c for row in rows.values() if not row.is_reference for c in row.cells}
    return list(rows.values()), sorted(columns, key=_sort_key)


def _sort_key(values: tuple[Any, ...]) -> tuple:
    return tuple((0, v, "") if isinstance(v, int | float) and not isinstance(v, bool) else (1, 0, str(v))
                 for v in values)


def short_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key by its last component, or whole when two keys share it."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: (name if last.count(name) == 1 else key) for key, name in zip(keys, last, strict=True)}


def describe(keys: list[str], values: tuple[Any, ...], names: dict[str, str]) -> str:
    """`TopK`, `SparsyFed, beta=1` or `alpha=0.1`: a row's values as a label (`method` shown bare)."""
    parts = []
    for key, value in zip(keys, values, strict=True):
        if value is ABSENT:
            continue
        parts.append(name_value(value) if key == "method" else f"{names[key]}={name_value(value)}")
    return ", ".join(parts) or "-"


def column_label(keys: list[str], values: tuple[Any, ...], names: dict[str, str]) -> str:
    """`95%` for a sparsity column, `key=value` otherwise."""
    parts = []
    for key, value in zip(keys, values, strict=True):
        if names[key] == "sparsity" and isinstance(value, int | float):
            parts.append(f"{100 * value:.10g}%")
        else:
            parts.append(f"{names[key]}={name_value(value)}")
    return ", ".join(parts)
