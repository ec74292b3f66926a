"""The `sparsyfed` command through its real entry point: runs, run directories, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sparsyfed_lightning.cli import main
from sparsyfed_lightning.federated.checkpoint import load_model_state


def _fit(config: Path, run_dir: Path, *extra: str) -> int:
    return main(["fit", "--config", str(config), "--trainer.run_dir", str(run_dir), *extra])


def test_fit_writes_a_complete_run_directory(tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _fit(tiny_config, run_dir) == 0
    for name in ("config.yaml", "metrics.jsonl", "global_model.pt", "checkpoint.pt", "class_counts.json",
                 "logs/metrics.csv"):
        assert (run_dir / name).is_file(), name
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["method"]["init_args"]["sparsity"] == 0.9 and saved["trainer"]["rounds"] == 2
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert main(["plot", str(run_dir)]) == 0
    for name in ("accuracy.png", "accuracy_vs_communication.png", "density.png", "mask_iou.png", "class_counts.png"):
        assert (run_dir / name).stat().st_size > 1000, name
    capsys.readouterr()
    saved_model = str(run_dir / "global_model.pt")
    assert main(["test", "--config", str(run_dir / "config.yaml"), "--ckpt_path", saved_model]) == 0
    assert '"test_accuracy"' in capsys.readouterr().out


def test_overrides_and_config_composition(tiny_config, tmp_path, capsys):
    override = tmp_path / "override.yaml"
    override.write_text("trainer:\n  rounds: 1\nmethod:\n  class_path: sparsyfed_lightning.methods.TopK\n"
                        "  init_args:\n    sparsity: ${data.alpha}\ndata:\n  alpha: 0.5\n")
    assert main(["fit", "--config", str(tiny_config), "--config", str(override), "--method.sparsity", "0.8",
                 "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["rounds"] == 1
    assert printed["method"]["class_path"].endswith("TopK") and printed["method"]["init_args"]["sparsity"] == 0.8
    assert main(["fit", "--config", str(tiny_config), "--config", str(override), "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["method"]["init_args"]["sparsity"] == 0.5


def test_existing_run_directory_needs_resume_or_overwrite(tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _fit(tiny_config, run_dir, "--trainer.rounds", "1") == 0
    capsys.readouterr()
    assert _fit(tiny_config, run_dir, "--trainer.rounds", "1") == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert _fit(tiny_config, run_dir, "--trainer.rounds", "1", "--overwrite") == 0
    assert main(["fit", "--config", str(tiny_config), "--resume", str(run_dir), "--trainer.rounds", "2"]) == 0
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    # e.g. after running out of memory in a stacked fit: go on with clients trained one at a time
    resumed = ["--resume", str(run_dir), "--trainer.rounds", "3", "--trainer.stack_clients", "1"]
    assert main(["fit", "--config", str(tiny_config), *resumed]) == 0
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["round"] == 3 and last["stacked_clients"] == 1


BAD_INPUTS = [
    (["--method", "Magic"], "method='Magic' is unknown; known: Dense, FLASH"),
    (["--model.backbone", "vgg11"], "model.backbone='vgg11' is unknown; allowed: a registered name (logmel_cnn"),
    (["--data.dataset", "imagenet"], "data.dataset='imagenet' is unknown"),
    (["--data.partitioner", "pathological"], "data.partitioner='pathological' is unknown"),
    (["--server_optimizer", "FedMagic"], "server_optimizer='FedMagic' is unknown; known: FedAdagrad"),
    (["--method.sparsity", "1.0"], "method.sparsity must be a number in [0, 1), got 1.0"),
    (["--method.sparsity", "-0.1"], "method.sparsity must be a number in [0, 1), got -0.1"),
    (["--method.beta", "0.8"], "method.beta must be a number >= 1, got 0.8"),
    (["--trainer.clients_per_round", "5"], "trainer.clients_per_round=5 is invalid; it must be <= data.num_clients=4"),
    (["--trainer.rounds", "0"], "trainer.rounds must be an integer >= 1, got 0"),
    (["--trainer.rounds", "-3"], "trainer.rounds must be an integer >= 1, got -3"),
    (["--trainer.rounds", "abc"], 'Parser key "trainer.rounds"'),
    (["--data.alpha", "0"], "data.alpha=0.0 is invalid"),
    (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_nothing_written(args, message, tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _fit(tiny_config, run_dir, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("sparsyfed: error: ") and message in err, err
    assert "Traceback" not in err
    assert not run_dir.exists()


def test_malformed_yaml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  rounds: [1\n")
    assert main(["fit", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not valid YAML" in err and str(bad) in err


def test_resume_with_a_different_config_is_refused(tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _fit(tiny_config, run_dir, "--trainer.rounds", "1") == 0
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["fit", "--config", str(tiny_config), "--resume", str(run_dir), "--method.sparsity", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "method.init_args.sparsity=0.5 differs from the run's 0.9" in err
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert main(["fit", "--config", str(tiny_config), "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_console_script_exit_status_and_version():
    out = subprocess.run([sys.executable, "-m", "sparsyfed_lightning.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("sparsyfed-lightning ")


@pytest.mark.parametrize(("argv", "status", "shown"), [
    (["--version"], 0, "sparsyfed-lightning "),
    (["--help"], 0, "plot"),
    ([], 2, "usage: sparsyfed"),
    (["plot", "/nonexistent-run"], 2, "/nonexistent-run is not a directory"),
])
def test_version_help_and_plot_answer_without_torch_or_lightning(argv, status, shown):
    code = (
        "import sys; from sparsyfed_lightning.cli import main; code = main(sys.argv[1:]); "
        "print('LOADED', sorted(m for m in ('torch', 'lightning') if m in sys.modules)); sys.exit(code)"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert out.returncode == status, out.stderr
    assert "LOADED []" in out.stdout
    assert shown in out.stdout + out.stderr


def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(tiny_config, tmp_path):
    common = ["--trainer.rounds", "30", "--trainer.eval_every", "30", "--trainer.checkpoint_every", "2"]
    reference = tmp_path / "reference"
    assert _fit(tiny_config, reference, *common) == 0

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "sparsyfed_lightning.cli", "fit", "--config", str(tiny_config),
               "--trainer.run_dir", str(killed), *common]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.pt").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    time.sleep(0.3)  # let it get into a later round
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "global_model.pt").exists()

    assert main(["fit", "--config", str(tiny_config), "--resume", str(killed), *common]) == 0
    expected = load_model_state(reference / "global_model.pt")
    resumed = load_model_state(killed / "global_model.pt")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    rounds = [yaml.safe_load(line)["round"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(31))


def test_hub_dataset_offline_is_one_line_and_nothing_written(tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = tmp_path / "run"
    assert _fit(tiny_config, run_dir, "--data.dataset", "cifar10", "--model.backbone_kwargs.in_channels", "3") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dataset 'cifar10'" in err and "--data.path" in err, err
    assert not run_dir.exists()
