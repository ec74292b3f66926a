"""`sparsyfed plot`: figures of one run and of several runs together, mask snapshots, errors, no torch."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sparsyfed_lightning.cli import main
from sparsyfed_lightning.federated.snapshots import load_mask_snapshot, pooled_mask_iou, save_mask_snapshot
from sparsyfed_lightning.plots import collapsed_layers, format_bytes, read_metrics
from sparsyfed_lightning.sparse.masks import mask_iou

ROOT = Path(__file__).resolve().parents[1]
COMPARISON_FIGURES = (
    "accuracy.png", "accuracy_vs_communication.png", "density.png", "layer_density.png", "regrowth.png",
    "mask_iou_rounds.png", "training.png", "mask_iou.png",
)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """A SparsyFed and a dense run of the same tiny digits setup, through the real `sparsyfed fit`."""
    root = tmp_path_factory.mktemp("runs")
    config = {
        "trainer": {"rounds": 3, "clients_per_round": 2, "eval_every": 1, "progress": "none", "accelerator": "cpu",
                    "devices": 1, "mask_snapshot_every": 1},
        "model": {"backbone": "small_cnn", "backbone_kwargs": {"width": 4}, "lr": 0.05},
        "data": {"dataset": "digits", "num_clients": 4, "batch_size": 64, "cache_dir": str(root / "cache")},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    sparse, dense = root / "sparsyfed-run", root / "dense-run"
    assert main(["fit", "--config", str(path), "--method", "SparsyFed", "--method.sparsity", "0.9",
                 "--trainer.run_dir", str(sparse)]) == 0
    assert main(["fit", "--config", str(path), "--method", "Dense", "--trainer.run_dir", str(dense)]) == 0
    return sparse, dense


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_runs_give_the_comparison_figures_and_the_communication_ratio(two_runs, tmp_path, monkeypatch, capsys):
    sparse, dense = two_runs
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(sparse), str(dense)]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "compare"  # several runs without --out: compare/ in the current directory
    assert f"figures written to {out}" in printed
    for name in COMPARISON_FIGURES:
        width, height = _png_size(out / name)
        assert width >= 600 and height >= 400 and (out / name).stat().st_size > 15_000, name
        assert f"compare/{name}" in printed.splitlines()
    assert not (out / "class_counts.png").exists()  # a partition figure belongs to one run
    last_sparse, last_dense = _rows(sparse)[-1], _rows(dense)[-1]
    total = last_sparse["cumulative_uplink_bytes"] + last_sparse["cumulative_downlink_bytes"]
    reference = last_dense["cumulative_uplink_bytes"] + last_dense["cumulative_downlink_bytes"]
    line = next(line for line in printed.splitlines() if line.startswith("communication:"))
    assert line == (
        f"communication: sparsyfed-run: {format_bytes(total)} up + down over 3 rounds = {total / reference:.4f}x "
        f"the dense run dense-run ({format_bytes(reference)})"
    )
    assert 0.05 < total / reference < 0.5


def test_one_run_writes_every_figure_into_its_folder(two_runs, tmp_path, capsys):
    sparse, _ = two_runs
    assert main(["plot", str(sparse)]) == 0
    for name in (*COMPARISON_FIGURES, "class_counts.png"):
        _png_size(sparse / name)
    assert "communication:" not in capsys.readouterr().out  # no dense run to compare with


@pytest.mark.parametrize("case", ["missing", "not_a_run", "empty", "corrupt", "file"])
def test_plot_of_something_that_is_not_a_run_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case == "empty":
        (run / "metrics.jsonl").write_text("\n")
    if case == "corrupt":
        (run / "metrics.jsonl").write_text('{"round": 0}\nnot json\n{"round": 1}\n')
    if case == "file":
        run.rmdir()
        run.write_text("x")
    out = tmp_path / "out"
    assert main(["plot", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sparsyfed plot: error: ") and str(run) in err, err
    assert not out.exists()
    assert not list(tmp_path.rglob("*.png"))


def test_a_run_killed_while_writing_its_last_line_still_plots(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"round": 0, "test_accuracy": 0.1}\n{"round": 1, "test_acc')
    assert [row["round"] for row in read_metrics(tmp_path)] == [0]
    assert "line 2 is incomplete and left out" in capsys.readouterr().err


def test_collapsed_layers_from_the_logged_key_or_from_zero_density():
    densities = {"0.weight": 0.5, "3.parametrizations.weight.original": 0.0, "7.weight": 0.1}
    assert collapsed_layers({"layer_density": densities}) == {"3.parametrizations.weight.original"}
    logged = {"layer_density": densities, "collapsed_layers": ["7"]}  # the trainer's record wins
    assert collapsed_layers(logged) == {"7.weight"}


def test_readable_byte_labels():
    assert [format_bytes(v) for v in (1e6, 1e7, 1e8, 2.5e9, 512)] == ["1 MB", "10 MB", "100 MB", "2.5 GB", "512 B"]


# -- mask snapshots -------------------------------------------------------------------------------------------
def test_mask_snapshots_round_trip_and_pooled_iou_matches_the_torch_reference(tmp_path):
    generator = np.random.default_rng(0)
    shapes = {"conv.weight": (3, 2, 3, 3), "fc.weight": (5, 7), "odd": (13,)}
    a = {k: generator.random(s) < 0.3 for k, s in shapes.items()}
    b = {k: generator.random(s) < 0.3 for k, s in shapes.items()}
    path = tmp_path / "masks" / "round_00003.npz"
    save_mask_snapshot(a, path)
    loaded = load_mask_snapshot(path)
    assert list(loaded) == list(a) and all(np.array_equal(loaded[k], a[k]) and loaded[k].dtype == bool for k in a)
    assert os.listdir(path.parent) == ["round_00003.npz"]  # no temporary file left
    expected = mask_iou({k: torch.from_numpy(v) for k, v in a.items()}, {k: torch.from_numpy(v) for k, v in b.items()})
    assert pooled_mask_iou(a, b) == pytest.approx(expected, abs=1e-15)
    empty = {k: np.zeros(s, dtype=bool) for k, s in shapes.items()}
    assert pooled_mask_iou(empty, empty) == 1.0
    with pytest.raises(ValueError, match="different tensors"):
        pooled_mask_iou(a, {"fc.weight": b["fc.weight"]})


def test_a_failed_snapshot_write_leaves_the_previous_file(tmp_path, monkeypatch):
    import sparsyfed_lightning.federated.snapshots as snapshots

    path = tmp_path / "round_00001.npz"
    save_mask_snapshot({"w": np.ones(4, dtype=bool)}, path)

    def half_written(handle, **arrays):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshots.np, "savez", half_written)
    with pytest.raises(OSError, match="the disk is full"):
        save_mask_snapshot({"w": np.zeros(4, dtype=bool)}, path)
    monkeypatch.undo()
    assert np.array_equal(load_mask_snapshot(path)["w"], np.ones(4, dtype=bool))
    assert os.listdir(tmp_path) == ["round_00001.npz"]
