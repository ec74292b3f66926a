"""`sparsyfed table SWEEP_DIR`: a sweep's paper-style tables as Markdown, and every number as CSV.

Two Markdown tables (printed, and written to `SWEEP_DIR/table.md`):

1. the final value of `--metric` (default `test_accuracy`, shown in %), mean ± std over seeds,
   rows method x heterogeneity, columns sparsity, the dense reference with each row group;
2. per cell: the regrowth counts and mask IoU (means over rounds >= 2) and the cumulative uplink
   and downlink relative to dense ("1/13.6": 13.6 times fewer bytes).

A cell with fewer finished runs than it expects says so, "95.21 ± 0.40 (2/3)"; a cell with none
reads "missing (0/3)". `SWEEP_DIR/table.csv` holds one line per cell with the raw means and sample
standard deviations (the metric unscaled: accuracy as a fraction), the numbers of runs expected and
finished, and the row and column keys as columns. The layout is in `results.py`.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

from sparsyfed_lightning.sweep.arguments import OneLineParser
from sparsyfed_lightning.sweep.definition import SweepDefinitionError
from sparsyfed_lightning.sweep.grid import name_value
from sparsyfed_lightning.sweep.results import (
    ABSENT,
    COMMUNICATION_KEYS,
    DYNAMICS_KEYS,
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

TABLE_MD = "table.md"
TABLE_CSV = "table.csv"
_DYNAMICS_HEADERS = {
    "after_training_activated": "regrown in local training",
    "after_pruning_deactivated": "authors' regrowth (after-pruning deactivated)",
    "mask_iou_previous": "mask IoU with previous round",
    "uplink_vs_dense": "uplink vs dense",
    "downlink_vs_dense": "downlink vs dense",
}


def _scale(metric: str) -> float:
    return 100.0 if metric.endswith("accuracy") else 1.0


def _mean_std(cell: Cell, metric: str) -> str:
    """`95.21 ± 0.40`, `95.21` for a single run, with `(2/3)` when runs are missing; `missing (0/3)`."""
    expected, finished = len(cell.runs), len(cell.finished)
    stats = cell.stats(metric)[metric]
    if stats is None:
        return f"missing ({finished}/{expected})" if finished < expected else "n/a"
    mean, std, _ = stats
    scale = _scale(metric)
    text = f"{scale * mean:.2f}" if std is None else f"{scale * mean:.2f} ± {scale * std:.2f}"
    return text if finished == expected else f"{text} ({finished}/{expected})"


def _dynamics(cell: Cell, key: str, metric: str) -> str:
    stats = cell.stats(metric)[key]
    if stats is None:
        return f"missing ({len(cell.finished)}/{len(cell.runs)})"
    mean = stats[0]
    if key in COMMUNICATION_KEYS:
        return f"1/{1 / mean:.1f}" if mean > 0 else "0"
    return f"{mean:.4f}" if key == "mask_iou_previous" else f"{mean:.1f}"


def _group_key(row: Row, layout: Layout) -> tuple[Any, ...]:
    return row.values[: len(layout.groups)]


def _group_text(group: tuple[Any, ...]) -> str:
    """A row group's values (the header names the keys): `0.1`."""
    return ", ".join(name_value(value) for value in group)


def render_markdown(rows: list[Row], columns: list[tuple[Any, ...]], layout: Layout, metric: str) -> str:
    """The two Markdown tables of the module doc."""
    names = short_names(layout.rows + layout.columns + layout.aggregate)
    label_keys = layout.rows[len(layout.groups):]
    label_header = ", ".join(names[k] for k in label_keys) or "run"
    group_header = ", ".join(names[k] for k in layout.groups)
    unit = " (%)" if _scale(metric) == 100 else ""
    seeds = f", mean ± std over {', '.join(layout.aggregate)}" if layout.aggregate else ""
    lines = [f"### Final {metric}{unit}{seeds}", ""]
    value_headers = [column_label(layout.columns, c, names) for c in columns] or [metric]
    headers = ([group_header] if layout.groups else []) + [label_header] + value_headers
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    references_above = []
    for group in _unique(_group_key(row, layout) for row in rows):
        members = [row for row in rows if _group_key(row, layout) == group]
        references = [row for row in members if row.is_reference and columns]
        shown = [row for row in members if row not in references]
        reference_text = "; ".join(
            f"{describe(label_keys, r.values[len(layout.groups):], names)} {_mean_std(c, metric)}"
            for r in references for c in r.cells.values()
        )
        if not layout.groups and reference_text:
            references_above.append(reference_text)
        group_text = _group_text(group)
        if layout.groups and reference_text:
            group_text = f"{group_text} ({reference_text})"
        for index, row in enumerate(shown or [None]):
            cells = [group_text if index == 0 else ""] if layout.groups else []
            if row is None:
                lines.append("| " + " | ".join(cells + ["-"] + [""] * len(value_headers)) + " |")
                continue
            cells.append(describe(label_keys, row.values[len(layout.groups):], names))
            keys = columns or [()]
            cells += [_mean_std(row.cells[c], metric) if c in row.cells else "" for c in keys]
            lines.append("| " + " | ".join(cells) + " |")
    if references_above:
        lines[2:2] = [f"Reference: {text}" for text in references_above] + [""]
    lines += ["", "### Per-round dynamics (mean over rounds >= 2) and cumulative communication vs dense", ""]
    column_header = ", ".join(names[k] for k in layout.columns)
    headers = ([group_header] if layout.groups else []) + [label_header] + ([column_header] if columns else [])
    headers += list(_DYNAMICS_HEADERS.values())
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    grouped = [row for group in _unique(_group_key(r, layout) for r in rows) for row in rows
               if _group_key(row, layout) == group]
    for row in grouped:
        if row.is_reference and columns:
            continue
        for column, cell in sorted(row.cells.items(), key=lambda item: columns.index(item[0])
                                   if item[0] in columns else len(columns)):
            cells = [_group_text(_group_key(row, layout))] if layout.groups else []
            cells.append(describe(label_keys, row.values[len(layout.groups):], names))
            if columns:
                cells.append(column_label(layout.columns, column, names))
            cells += [_dynamics(cell, key, metric) for key in _DYNAMICS_HEADERS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_csv(rows: list[Row], layout: Layout, metric: str) -> str:
    """One line per cell: row and column keys, runs expected and finished, mean and std of every quantity."""
    quantities = [metric, *COMMUNICATION_KEYS, *DYNAMICS_KEYS]
    header = [*layout.rows, *layout.columns, "runs", "finished"]
    header += [f"{q}_{stat}" for q in quantities for stat in ("mean", "std")]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        for column, cell in row.cells.items():
            stats = cell.stats(metric)
            line: list[Any] = [_csv_value(v) for v in (*row.values, *column)]
            line += [len(cell.runs), len(cell.finished)]
            for q in quantities:
                mean, std = (stats[q][0], stats[q][1]) if stats[q] is not None else (None, None)
                line += [_csv_number(mean), _csv_number(std)]
            writer.writerow(line)
    return out.getvalue()


def _csv_value(value: Any) -> Any:
    return "" if value is ABSENT else value


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _unique(items: Any) -> list[Any]:
    seen: list[Any] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def make_tables(sweep_dir: str | Path, metric: str = "test_accuracy", rows: list[str] | None = None,
                columns: list[str] | None = None, aggregate: list[str] | None = None) -> tuple[str, str]:
    """The Markdown tables and the CSV of a sweep directory (also written into it)."""
    definition, results = read_results(sweep_dir)
    layout = choose_layout(definition, rows, columns, aggregate)
    arranged, column_values = arrange(results, layout)
    markdown = render_markdown(arranged, column_values, layout, metric)
    table_csv = render_csv(arranged, layout, metric)
    (Path(sweep_dir) / TABLE_MD).write_text(markdown)
    (Path(sweep_dir) / TABLE_CSV).write_text(table_csv)
    return markdown, table_csv


def table_main(argv: list[str]) -> int:
    """`sparsyfed table SWEEP_DIR [--metric KEY] [--rows K ...] [--columns K ...] [--aggregate K ...]`."""
    parser = OneLineParser(
        prog="sparsyfed table",
        description="Print a sweep's paper-style tables (Markdown; also SWEEP_DIR/table.md) and write "
                    "SWEEP_DIR/table.csv. Rows: method x heterogeneity; columns: sparsity; mean ± std over seeds.")
    parser.add_argument("sweep_dir", help="a directory written by `sparsyfed sweep`")
    parser.add_argument("--metric", default="test_accuracy", help="a metrics.jsonl key; its final value is reported")
    parser.add_argument("--rows", nargs="+", metavar="KEY", help="grid keys that make the rows, in order")
    parser.add_argument("--columns", nargs="+", metavar="KEY", help="grid keys that make the columns "
                        "(default: the sparsity key)")
    parser.add_argument("--aggregate", nargs="+", metavar="KEY", help="grid keys averaged over "
                        "(default: the seed keys)")
    try:
        args = parser.parse_args(argv)
        markdown, _ = make_tables(args.sweep_dir, args.metric, args.rows, args.columns, args.aggregate)
    except (SweepDefinitionError, ValueError) as error:
        print(f"sparsyfed: error: {error}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(f"(also in {Path(args.sweep_dir) / TABLE_MD}; every number in {Path(args.sweep_dir) / TABLE_CSV})",
          file=sys.stderr)
    return 0
