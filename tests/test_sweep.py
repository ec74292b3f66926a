"""`sparsyfed sweep`, `sparsyfed table` and `sparsyfed plot SWEEP_DIR`.

Grid expansion, names, bad grids and the tables' arithmetic run in-process on files the tests
write. Three tests start real `sparsyfed fit` processes, since that is what a sweep is: a 2x2 grid
plus a failing point (its table, and a failure that stops nothing), the same 2x2 grid killed
mid-way with SIGKILL and run again (only what was missing runs, the result is bit-identical), and
the pool passing SIGTERM on to its runs (with stand-in processes that start in milliseconds).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from sparsyfed_lightning.cli import main
from sparsyfed_lightning.federated.rundir import lock_holder
from sparsyfed_lightning.sweep import pool as pool_module
from sparsyfed_lightning.sweep.definition import SweepDefinition
from sparsyfed_lightning.sweep.grid import RunPoint, expand_grid, load_grid
from sparsyfed_lightning.sweep.pool import RunPool, RunTask, Slot, plan_slots, run_state
from sparsyfed_lightning.sweep.table import make_tables


# -- grids ----------------------------------------------------------------------------------------------
def test_a_mapping_is_a_product_and_a_list_a_union_in_order_without_duplicates():
    grid = [
        {"method": ["TopK", "SparsyFed"], "method.sparsity": [0.9, 0.99], "data.alpha": [1.0, 0.1]},
        {"method": "Dense", "data.alpha": [1.0, 0.1]},
        {"method": "Dense", "data.alpha": 0.1},  # already there: once
    ]
    points = expand_grid(grid)
    assert [p.values for p in points[:3]] == [
        {"method": "TopK", "method.sparsity": 0.9, "data.alpha": 1.0},
        {"method": "TopK", "method.sparsity": 0.9, "data.alpha": 0.1},
        {"method": "TopK", "method.sparsity": 0.99, "data.alpha": 1.0},
    ]
    assert len(points) == 8 + 2
    assert [p.name for p in points[-2:]] == ["method=Dense,alpha=1", "method=Dense,alpha=0.1"]
    assert points[3].name == "method=TopK,sparsity=0.99,alpha=0.1"


def test_tied_keys_take_one_value_each_or_are_zipped():
    points = expand_grid({"trainer.seed,model.init_seed": [0, [1, 11]], "model.lr": [0.1]})
    assert [p.values for p in points] == [{"trainer.seed": 0, "model.init_seed": 0, "model.lr": 0.1},
                                          {"trainer.seed": 1, "model.init_seed": 11, "model.lr": 0.1}]
    assert [p.name for p in points] == ["seed=0,lr=0.1", "seed=1,lr=0.1"]


def test_run_names_are_readable_unique_and_stable(tmp_path):
    grid = {"trainer.seed": [0], "data.seed": [1], "method": ["sparsyfed_lightning.methods.TopK"],
            "data.path": ["/data/a b", "/data/a_b"], "method.min_layer_density": [1e-3]}
    names = [p.name for p in expand_grid(grid)]
    # Keys sharing a last component are named in full; class paths by their class; unsafe characters
    # replaced, and the two values that then meet get a digest each.
    stem = "trainer.seed=0,data.seed=1,method=TopK,path=_data_a_b,min_layer_density=0.001-"
    assert names[0].startswith(stem) and names[1].startswith(stem) and len(set(names)) == 2
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid, sort_keys=False))
    assert names == [p.name for p in expand_grid(load_grid(grid_file))]  # the file gives the same names
    long = expand_grid({"model.backbone_kwargs": [{"width": 4, "note": "x" * 300}]})[0].name
    assert len(long.encode()) <= 200


def test_fit_arguments_put_a_class_before_its_options():
    point = RunPoint("x", {"method.sparsity": 0.99, "data.alpha": 0.1, "method": "TopK", "trainer.flag": True,
                           "model.backbone_kwargs": {"width": 4}})
    assert point.fit_arguments() == ["--method", "TopK", "--method.sparsity", "0.99", "--data.alpha", "0.1",
                                     "--trainer.flag", "true", "--model.backbone_kwargs", '{"width": 4}']


@pytest.mark.parametrize(("grid", "message"), [
    ("[unclosed", "is not valid YAML (line 1)"),
    ("", "defines no runs"),
    ("- 3\n", "entry 1 must be a non-empty mapping"),
    ("method.sparsity: []\n", "method.sparsity=[] is invalid; give at least one value"),
    ("--method.sparsity: [0.9]\n", "write it without dashes, e.g. method.sparsity"),
    ("trainer.run_dir: [x]\n", "'trainer.run_dir' cannot be swept"),
    ("a,b: [[1, 2, 3]]\n", "a list of 2 values, one per key"),
    ("- trainer.seed: [0]\n- trainer.seed,model.init_seed: [1]\n", "appears both as"),
    ("method.sparsityy: [0.9]\n", "run sparsityy=0.9: Parser key \"method\": Option 'sparsityy' is not accepted"),
    ("method.sparsity: [0.5, 1.5, 2.0]\n", "run sparsity=1.5: method.sparsity must be a number in [0, 1), got 1.5 "
                                           "(and 1 more runs with errors)"),
    ("trainer.rounds: [two]\n", 'Parser key "trainer.rounds"'),
    ("method: [Nope]\n", "method='Nope' is unknown; known: Dense, FLASH"),
])
def test_bad_grid_files_are_one_line_exit_2_and_nothing_written(grid, message, tiny_config, tmp_path, capsys):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(grid)
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(tiny_config), "--grid", str(grid_file), "--out", str(out)]) == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(("arguments", "message"), [
    (["--workers", "0"], "argument --workers: invalid integer >= 1 or auto value: '0'"),
    (["--threads", "x"], "argument --threads: invalid integer >= 1 value: 'x'"),
    (["--", "--trainer.run_dir", "x"], "--trainer.run_dir cannot be given to the runs of a sweep after `--`"),
    (["--", "--resume=x"], "--resume cannot be given to the runs of a sweep"),
    (["--", "--trainer.roundz", "3"], "unrecognized arguments: --trainer.roundz"),
    (["--config", "missing.yaml"], "--config missing.yaml does not exist"),
])
def test_bad_sweep_options_are_one_line_exit_2(arguments, message, tiny_config, tmp_path, capsys):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("method.sparsity: [0.5]\n")
    out = tmp_path / "sweep"
    command = ["sweep", "--config", str(tiny_config), "--grid", str(grid_file), "--out", str(out)]
    split = arguments.index("--") if "--" in arguments else len(arguments)
    assert main([*command, *arguments[:split], *arguments[split:]]) == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


def test_sweep_help_and_table_do_not_import_torch(tmp_path):
    code = ("import sys; from sparsyfed_lightning.cli import main; main(['sweep', '--help']); "
            f"main(['table', {str(_synthetic_sweep(tmp_path))!r}]); "
            "print('torch' in sys.modules, 'lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "False False"
    assert "--runs_per_device" in out.stdout and "| alpha | method | 90% | 99% |" in out.stdout


# -- slots and run states -------------------------------------------------------------------------------
def test_slots_share_out_cpu_cores_or_gpus():
    cpu = plan_slots([], workers=None, threads=None, runs_per_device=3, cores=16)
    assert len(cpu) == 16 and {s.threads for s in cpu} == {1} and {s.gpu for s in cpu} == {None}
    assert len(plan_slots([], workers=None, threads=4, runs_per_device=1, cores=16)) == 4
    assert len(plan_slots([], workers=3, threads=2, runs_per_device=1, cores=16)) == 3
    gpus = plan_slots(["2", "5"], workers=None, threads=None, runs_per_device=3, cores=16)
    assert [s.gpu for s in gpus] == ["2", "5", "2", "5", "2", "5"] and {s.threads for s in gpus} == {2}
    assert gpus[1].environment() == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1",
                                     "CUDA_VISIBLE_DEVICES": "5"}
    assert "CUDA_VISIBLE_DEVICES" not in cpu[0].environment()


def test_a_run_starts_new_resumed_replaced_or_not_at_all(tmp_path):
    from sparsyfed_lightning.federated.checkpoint import save_verified

    run_dir = tmp_path / "run"
    assert run_state(run_dir) == "new"
    run_dir.mkdir()
    (run_dir / ".sparsyfed-run").write_text("{}")
    assert run_state(run_dir) == "restart"  # killed before its config.yaml: --overwrite
    (run_dir / "config.yaml").write_text("trainer: {}\n")
    assert run_state(run_dir) == "resume"
    (run_dir / "global_model.pt").write_bytes(b"truncated")
    assert run_state(run_dir) == "resume"  # a damaged model is rewritten from the last checkpoint
    save_verified({"w": torch.ones(2)}, run_dir / "global_model.pt", "global_model")
    assert run_state(run_dir) == "finished"
    task = RunTask(RunPoint("run", {}), run_dir, tmp_path / "run.log", ["--config", "c.yaml"], 2)
    (run_dir / "global_model.pt").unlink()
    assert task.command()[-4:] == ["--config", "c.yaml", "--resume", str(run_dir)]


# -- tables and figures from a sweep directory written by the test --------------------------------------
GRID = [{"method": ["TopK", "SparsyFed"], "method.sparsity": [0.9, 0.99], "data.alpha": [1.0, 0.1],
         "trainer.seed,model.init_seed": [0, 1, 2]},
        {"method": "Dense", "data.alpha": [1.0, 0.1], "trainer.seed,model.init_seed": [0, 1, 2]}]


def _fake_metrics(point: RunPoint) -> list[dict]:
    """Per-round lines with numbers that differ per run (a deterministic function of its values)."""
    text = json.dumps(point.values, sort_keys=True)
    base = (sum(map(ord, text)) % 97) / 100
    lines = [{"round": 0, "test_accuracy": 0.1}]
    for r in range(1, 6):
        up, down = 1000 * r * (1 + base), 800 * r * (1 + base)
        lines.append({"round": r, "train_loss": 2 - r * base / 5, "after_training_activated": r * base,
                      "after_pruning_deactivated": 10 * base + r, "mask_iou_previous": 1 - base / (r + 1),
                      "cumulative_uplink_bytes": up, "cumulative_downlink_bytes": down,
                      "cumulative_ratio_to_dense": (up + down) / (2 * 4000 * r),
                      **({"test_accuracy": base + r / 100} if r == 5 else {})})
    return lines


def _synthetic_sweep(tmp_path: Path, unfinished: tuple[str, ...] = ()) -> Path:
    """A sweep directory as `sparsyfed sweep` leaves it, with made-up metrics; `unfinished` runs lack a model."""
    sweep_dir = tmp_path / "synthetic"
    points = expand_grid(GRID)
    definition = SweepDefinition([str(tmp_path / "base.yaml")], ["0" * 64], GRID, [], points)
    sweep_dir.mkdir()
    (sweep_dir / "sweep.yaml").write_text(definition.to_yaml())
    for point in points:
        run_dir = definition.run_dir(sweep_dir, point)
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in _fake_metrics(point)))
        if point.name not in unfinished:
            (run_dir / "global_model.pt").write_bytes(b"model")
    return sweep_dir


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_table_layout_reference_missing_runs_and_every_number(tmp_path):
    unfinished = ("method=TopK,sparsity=0.9,alpha=1,seed=2", "method=SparsyFed,sparsity=0.99,alpha=0.1,seed=0",
                  "method=SparsyFed,sparsity=0.99,alpha=0.1,seed=1", "method=SparsyFed,sparsity=0.99,alpha=0.1,seed=2")
    sweep_dir = _synthetic_sweep(tmp_path, unfinished)
    markdown, table_csv = make_tables(sweep_dir)
    lines = markdown.splitlines()
    assert lines[0] == "### Final test_accuracy (%), mean ± std over trainer.seed, model.init_seed"
    assert lines[2] == "| alpha | method | 90% | 99% |"
    assert lines[4].startswith("| 1 (Dense ") and "| TopK | " in lines[4] and lines[4].count(" (2/3) |") == 1
    assert lines[5].startswith("|  | SparsyFed | ") and "(" not in lines[5]
    assert lines[6].startswith("| 0.1 (Dense ") and "| TopK | " in lines[6]
    assert lines[7].startswith("|  | SparsyFed | ") and lines[7].endswith(" | missing (0/3) |")
    assert (sweep_dir / "table.md").read_text() == markdown

    points = {p.name: p for p in expand_grid(GRID)}
    by_cell: dict[tuple, list] = {}
    for name, point in points.items():
        values = point.values
        key = (values["method"], str(values.get("method.sparsity", "")), str(values["data.alpha"]))
        by_cell.setdefault(key, []).append(name)
    written = list(csv.DictReader(io.StringIO(table_csv)))
    assert len(written) == len(by_cell) == 10
    for line in written:
        names = by_cell[(line["method"], line["method.sparsity"], line["data.alpha"])]
        done = [n for n in names if n not in unfinished]
        assert (int(line["runs"]), int(line["finished"])) == (len(names), len(done))
        metrics = [_fake_metrics(points[n]) for n in done]
        expected = {
            "test_accuracy": [m[-1]["test_accuracy"] for m in metrics],
            "after_pruning_deactivated": [sum(x["after_pruning_deactivated"] for x in m[2:]) / 4 for m in metrics],
            "mask_iou_previous": [sum(x["mask_iou_previous"] for x in m[2:]) / 4 for m in metrics],
            "uplink_vs_dense": [m[-1]["cumulative_uplink_bytes"] / (4000 * 5) for m in metrics],
            "downlink_vs_dense": [m[-1]["cumulative_downlink_bytes"] / (4000 * 5) for m in metrics],
        }
        for key, values in expected.items():
            if not values:
                assert line[f"{key}_mean"] == "" and line[f"{key}_std"] == ""
                continue
            mean, std = _mean_std(values)
            assert float(line[f"{key}_mean"]) == pytest.approx(mean, rel=1e-12, abs=1e-15), key
            assert (line[f"{key}_std"] == "") if std is None else (
                float(line[f"{key}_std"]) == pytest.approx(std, rel=1e-9, abs=1e-15)), key
    # The Markdown shows the same numbers, in %, two decimals.
    dense = next(line for line in written if line["method"] == "Dense" and line["data.alpha"] == "1.0")
    mean, std = 100 * float(dense["test_accuracy_mean"]), 100 * float(dense["test_accuracy_std"])
    assert lines[4].startswith(f"| 1 (Dense {mean:.2f} ± {std:.2f}) | TopK |")


def test_table_options_and_errors(tmp_path, capsys):
    sweep_dir = _synthetic_sweep(tmp_path)
    assert main(["table", str(sweep_dir), "--rows", "method", "--columns", "data.alpha"]) == 0
    out = capsys.readouterr().out
    assert "| method, sparsity | alpha=0.1 | alpha=1 |" in out  # sparsity left over: a row key
    assert "| TopK, sparsity=0.9 |" in out and "| Dense |" in out
    assert main(["table", str(sweep_dir), "--metric", "train_loss"]) == 0
    assert "### Final train_loss, mean ± std" in capsys.readouterr().out
    assert main(["table", str(sweep_dir), "--rows", "model.lr"]) == 2
    assert "'model.lr' is not a key this sweep varies; it varies: method, method.sparsity" in _one_error_line(capsys)
    assert main(["table", str(tmp_path)]) == 2
    assert "is not a sweep directory (no sweep.yaml)" in _one_error_line(capsys)


def test_plot_of_a_sweep_directory_draws_the_comparison_figures(tmp_path, capsys):
    sweep_dir = _synthetic_sweep(tmp_path, ("method=Dense,alpha=1,seed=0",))
    assert main(["plot", str(sweep_dir)]) == 0
    names = {Path(line).name for line in capsys.readouterr().out.split()}
    assert names == {"accuracy_vs_sparsity.png", "accuracy_vs_communication.png", "train_loss_per_round.png",
                     "regrowth_per_round.png"}  # test accuracy was logged twice only: no per-round figure
    for name in names:
        assert (sweep_dir / name).stat().st_size > 10_000, name


# -- real sweeps -----------------------------------------------------------------------------------------
GRID_2X2 = {"method.sparsity": [0.5, 0.9], "trainer.seed,model.init_seed": [0, 1]}
FAILING = {"method.sparsity": 0.9, "model.lr": 1.0e6}  # NaN at round 1: the run exits 1


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """Top-K on 4 digits clients, a width-4 CNN, 24 rounds (about 0.1 s each): long enough to be caught mid-run."""
    folder = tmp_path_factory.mktemp("sweep")
    config = {
        "trainer": {"rounds": 24, "clients_per_round": 4, "eval_every": 8, "accelerator": "cpu", "devices": 1},
        "model": {"backbone": "small_cnn", "backbone_kwargs": {"width": 4}, "lr": 0.3},
        "data": {"dataset": "digits", "num_clients": 4, "batch_size": 16, "cache_dir": str(folder / "cache")},
        "method": {"class_path": "sparsyfed_lightning.methods.TopK", "init_args": {"sparsity": 0.5}},
    }
    from sparsyfed_lightning.data.module import FederatedDataModule

    FederatedDataModule("digits", num_clients=4, batch_size=16, cache_dir=config["data"]["cache_dir"]).setup("fit")
    path = folder / "tiny.yaml"  # the partition is cached before the runs start, so they only read it
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "trainer": {"rounds": 2, "accelerator": "cpu", "devices": 1},
        "model": {"backbone": "small_cnn", "backbone_kwargs": {"width": 4}},
        "data": {"dataset": "digits", "num_clients": 4, "cache_dir": str(tmp_path / "cache")},
        "method": {"class_path": "sparsyfed_lightning.methods.TopK", "init_args": {"sparsity": 0.5}},
    }))
    return path


def _sweep_in_process(*arguments: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["sweep", *arguments])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finished_sweep(tiny_base) -> tuple[Path, int, str, str]:
    """The 2x2 grid and a failing point, swept with 2 workers x 1 thread, uninterrupted."""
    grid = tiny_base.parent / "grid_with_failure.yaml"
    grid.write_text(yaml.safe_dump([GRID_2X2, FAILING], sort_keys=False))
    sweep_dir = tiny_base.parent / "finished"
    status, out, err = _sweep_in_process("--config", str(tiny_base), "--grid", str(grid), "--out", str(sweep_dir),
                                         "--workers", "2", "--threads", "1")
    return sweep_dir, status, out, err


def test_a_2x2_sweep_produces_its_table_and_a_failing_run_stops_nothing(finished_sweep, capsys):
    sweep_dir, status, out, err = finished_sweep
    failing = "sparsity=0.9,lr=1000000"
    assert status == 1, out + err
    assert err.splitlines()[-1] == ("sparsyfed: error: 1 of 5 runs did not finish (listed above); fix the cause "
                                    "and run the same command again to resume them")
    log = sweep_dir / "logs" / f"{failing}.log"
    assert f"  failed {failing} (exit 1): round 1: client " in out and f"log {log}" in out
    assert "non-finite values (NaN/Inf)" in out and "4 of 5 runs finished, 1 failed" in out
    finals = {}
    for name in ("sparsity=0.5,seed=0", "sparsity=0.5,seed=1", "sparsity=0.9,seed=0", "sparsity=0.9,seed=1"):
        run_dir = sweep_dir / "runs" / name
        assert (run_dir / "global_model.pt").is_file(), name
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        seed = int(name[-1])
        assert (saved["trainer"]["seed"], saved["model"]["init_seed"]) == (seed, seed)
        assert saved["method"]["init_args"]["sparsity"] == float(name.split(",")[0].split("=")[1])
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [line["round"] for line in lines] == list(range(25))
        finals[name] = lines[-1]["test_accuracy"]
    assert not (sweep_dir / "runs" / failing / "global_model.pt").exists()

    assert main(["table", str(sweep_dir)]) == 0
    markdown = capsys.readouterr().out
    written = {(row["method.sparsity"], row["model.lr"]): row
               for row in csv.DictReader((sweep_dir / "table.csv").open())}
    for sparsity in ("0.5", "0.9"):
        values = [finals[f"sparsity={sparsity},seed={seed}"] for seed in (0, 1)]
        mean, std = _mean_std(values)
        row = written[(sparsity, "")]
        assert (row["runs"], row["finished"]) == ("2", "2")
        assert float(row["test_accuracy_mean"]) == pytest.approx(mean, rel=1e-12)
        assert float(row["test_accuracy_std"]) == pytest.approx(std, rel=1e-9, abs=1e-15)
        assert f"{100 * mean:.2f} ± {100 * std:.2f}" in markdown
    assert (written[("0.9", "1000000.0")]["runs"], written[("0.9", "1000000.0")]["finished"]) == ("1", "0")
    assert "| lr=1000000 |  | missing (0/1) |" in markdown


def test_a_sweep_killed_mid_way_finishes_only_what_was_missing_and_equals_an_uninterrupted_one(
        tiny_base, finished_sweep):
    grid = tiny_base.parent / "grid_2x2.yaml"
    grid.write_text(yaml.safe_dump(GRID_2X2, sort_keys=False))
    sweep_dir = tiny_base.parent / "killed"
    arguments = ["--config", str(tiny_base), "--grid", str(grid), "--out", str(sweep_dir), "--workers", "2",
                 "--threads", "1"]
    sweep = subprocess.Popen([sys.executable, "-m", "sparsyfed_lightning.cli", "sweep", *arguments],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    runs = sweep_dir / "runs"
    try:
        deadline = time.monotonic() + 240
        while True:  # until one run is finished and another one is mid-way
            assert sweep.poll() is None, sweep.stderr.read()
            assert time.monotonic() < deadline, "no moment with a finished run and one mid-way"
            done = [d for d in runs.glob("*") if (d / "global_model.pt").exists()] if runs.exists() else []
            # 2 to 11 rounds done of 24: a SIGTERM now cannot let it reach the end.
            mid = [d for d in runs.glob("*") if d not in done and 3 <= _rounds_logged(d) <= 12] if runs.exists() else []
            if done and mid:
                break
            time.sleep(0.02)
        sweep.kill()
        sweep.wait()
    finally:
        sweep.kill()
    # The runs notice their sweep's death (SIGTERM from the kernel), checkpoint their last completed
    # round and end by themselves: had they run on unseen, they would have finished their 24 rounds.
    deadline = time.monotonic() + 60
    while any(lock_holder(d / ".sparsyfed-lock") is not None for d in runs.glob("*")):
        assert time.monotonic() < deadline, "the runs of a killed sweep went on running"
        time.sleep(0.1)
    for run_dir in mid:
        assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "global_model.pt").exists()
        log = (sweep_dir / "logs" / f"{run_dir.name}.log").read_text()
        assert "sparsyfed: error: interrupted by SIGTERM; the checkpoint of round" in log
    # A run near its end when the sweep died may have finished its last round meanwhile.
    done = [d for d in runs.glob("*") if (d / "global_model.pt").exists()]
    before = {p: p.stat().st_mtime_ns for d in done for p in d.rglob("*") if p.is_file()}

    status, out, err = _sweep_in_process(*arguments)
    assert status == 0, out + err
    assert f"4 runs, {len(done)} finished before, {4 - len(done)} to run" in out
    assert before == {p: p.stat().st_mtime_ns for d in done for p in d.rglob("*") if p.is_file()}
    for run_dir in mid:
        log = (sweep_dir / "logs" / f"{run_dir.name}.log").read_text()
        assert log.count("==== ") == 2 and f"--resume {run_dir}" in log.split("==== ")[2]
    make_tables(sweep_dir)
    killed = {row["method.sparsity"]: row for row in csv.DictReader((sweep_dir / "table.csv").open())}
    reference = {row["method.sparsity"]: row for row in csv.DictReader((finished_sweep[0] / "table.csv").open())
                 if row["model.lr"] == ""}
    for sparsity, row in reference.items():
        row.pop("model.lr")
        assert killed[sparsity] == row  # the same text: every number bit-identical


def _rounds_logged(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def test_the_pool_passes_a_sigterm_on_and_ends_with_its_runs(tmp_path, monkeypatch):
    """Stand-in runs that checkpoint (write a file) and exit 143 on SIGTERM, as `sparsyfed fit` does."""
    script = ("import signal, sys, time, pathlib\n"
              "def stop(signum, frame):\n"
              "    pathlib.Path(sys.argv[1]).write_text(str(signum)); sys.exit(143)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "pathlib.Path(sys.argv[2]).write_text('started')\n"
              "time.sleep(60)\n")
    monkeypatch.setattr(RunTask, "command", lambda self: [sys.executable, "-c", script, str(self.run_dir / "stopped"),
                                                          str(self.run_dir / "started")])
    tasks = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        tasks.append(RunTask(RunPoint(name, {}), tmp_path / name, tmp_path / f"{name}.log", [], 1))

    def stop_when_started():
        deadline = time.monotonic() + 30
        while not all((tmp_path / n / "started").exists() for n in ("a", "b")) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    events = pool_module.PoolEvents()
    pool = RunPool([Slot(0, None, 1), Slot(1, None, 1)], events, poll_interval=0.02)
    threading.Thread(target=stop_when_started, daemon=True).start()
    outcomes = pool.run(tasks)
    assert pool.stop_signal == signal.SIGTERM
    assert [(o.task.point.name, o.outcome, o.exit_status) for o in outcomes] in (
        [("a", "stopped", 143), ("b", "stopped", 143)], [("b", "stopped", 143), ("a", "stopped", 143)])
    assert (tmp_path / "a" / "stopped").read_text() == str(int(signal.SIGTERM))
    assert not (tmp_path / "c" / "started").exists()  # no run starts once the sweep is stopping
    assert signal.getsignal(signal.SIGTERM) is handler  # the pool's handler is gone again


def test_a_sweep_directory_is_kept_to_its_definition(finished_sweep, tiny_base, tmp_path, capsys):
    sweep_dir = finished_sweep[0]
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(GRID_2X2))
    command = ["sweep", "--config", str(tiny_base), "--grid", str(other), "--out", str(sweep_dir)]
    before = (sweep_dir / "sweep.yaml").read_bytes()
    assert main(command) == 2
    assert f"--out {sweep_dir} holds another sweep: its grid differs from the one it was started with" in \
        _one_error_line(capsys)
    assert main([*command[:3], "--grid", str(tiny_base.parent / "grid_with_failure.yaml"), "--out", str(sweep_dir),
                 "--", "--trainer.rounds", "3"]) == 2
    assert "the extra fit arguments ['--trainer.rounds', '3'] differ from the [] it was started with" in \
        _one_error_line(capsys)
    assert (sweep_dir / "sweep.yaml").read_bytes() == before


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("sparsyfed: error: "), err
    return err[0]


# -- the documented sweeps ---------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED_RUNS = {"configs/sweeps/digits_fidelity.yaml": 78, "configs/sweeps/digits_guarded.yaml": 30,
                   "configs/sweeps/digits_ablations.yaml": 30, "configs/sweeps/fmnist_study.yaml": 18,
                   "configs/sweeps/fmnist_guarded.yaml": 8}
DOCUMENTED_BASES = {"digits": "configs/fidelity_digits.yaml", "fmnist": "configs/fmnist_study.yaml"}


def test_the_documented_sweeps_exist_expand_to_their_run_counts_and_their_runs_are_valid():
    import re

    from sparsyfed_lightning.lightning_cli import check_fit_arguments

    commands = set()
    for doc in ("README.md", "docs/RESULTS.md", "docs/SWEEPS.md", "benchmarks/fidelity.py"):
        commands |= set(re.findall(r"sparsyfed sweep --config (configs/\S+) --grid (configs/[\w/]+\.yaml)",
                                   (ROOT / doc).read_text()))
    assert {grid for _, grid in commands} == set(DOCUMENTED_RUNS)
    for config, grid in commands:
        assert config == DOCUMENTED_BASES[Path(grid).stem.split("_")[0]], (config, grid)
        points = expand_grid(load_grid(ROOT / grid))
        assert len(points) == DOCUMENTED_RUNS[grid], grid
        # Every distinct method setting once (alpha and seed are plain numbers): a quick full check.
        distinct = {json.dumps({k: v for k, v in p.values.items() if not k.startswith(("data.", "trainer.",
                                                                                           "model."))}): p
                    for p in points}
        definition = SweepDefinition.create([str(ROOT / config)], load_grid(ROOT / grid), [], points)
        checks = check_fit_arguments([definition.fit_arguments(p, Path("unused") / p.name)
                                      for p in distinct.values()])
        assert [c.error for c in checks] == [None] * len(distinct), grid
