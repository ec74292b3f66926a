"""Fault injection: every failure is loud (one line, honest exit status) and nothing on disk is lost.

Each class of fault of docs/RELIABILITY.md: non-finite values, layer collapse, damaged or unsafe
files, resume validation, run-directory ownership and locking, leftovers of killed writes, a full
disk, signals, and configuration errors that used to end in a traceback. Signals and concurrent
writers use real subprocesses; the rest runs in-process through the CLI's `main` or the Python API.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from sparsyfed_lightning.cli import main
from sparsyfed_lightning.federated import atomic_files, snapshots
from sparsyfed_lightning.federated import checkpoint as checkpoint_module
from sparsyfed_lightning.federated.checkpoint import load_model_state, load_verified
from sparsyfed_lightning.federated.errors import (
    NonFiniteError,
    RunDirectoryError,
    RunFailedError,
)
from sparsyfed_lightning.federated.schedule import exponential_lr
from sparsyfed_lightning.methods import Dense, SparsyFed, TopK
from sparsyfed_lightning.server.optimizers import FedAvg


def _fit(config: Path, run_dir: Path, *extra: str) -> int:
    return main(["fit", "--config", str(config), "--trainer.run_dir", str(run_dir), *extra])


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("run directory:")]
    assert len(err) == 1, err
    assert err[0].startswith("sparsyfed: error: ") and "Traceback" not in err[0], err
    return err[0]


def _files(folder: Path) -> dict[Path, tuple[int, bytes]]:
    """Every file below `folder` with its modification time and content (to prove nothing changed)."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- non-finite values -----------------------------------------------------------------------------
def test_a_diverging_run_stops_with_exit_1_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _fit(tiny_config, run_dir, "--model.lr", "1e6", "--trainer.rounds", "3") == 1
    line = _one_error_line(capsys)
    assert "round 1: client" in line and "non-finite values (NaN/Inf)" in line and "accept_failures" in line
    assert "last good round (0)" in line
    assert not (run_dir / "global_model.pt").exists()
    _, content = load_verified(run_dir / "checkpoint.pt", ("checkpoint",))
    assert content["server"]["round"] == 0
    assert all(torch.isfinite(t).all() for t in content["server"]["global_state"].values() if t.is_floating_point())


def _nan_client_module(digits_module, bad_cid: int, monkeypatch):
    """The digits module, with client `bad_cid` training on NaN inputs (same sizes, so it stacks)."""
    from sparsyfed_lightning.data.loaders import TensorBatchLoader

    original = type(digits_module).client_train_dataloader

    def loader(self, cid, seed=0):
        good = original(self, cid, seed)
        if cid != bad_cid:
            return good
        inputs = torch.full_like(good.inputs, float("nan"))
        return TensorBatchLoader(inputs, good.labels, good.batch_size, shuffle=True, seed=seed,
                                 indices=self.client_train_indices(cid))

    monkeypatch.setattr(type(digits_module), "client_train_dataloader", loader)


@pytest.mark.parametrize("stack_clients", [1, 3])
def test_a_nan_client_is_a_client_failure_alone_or_stacked(run_rounds, digits_module, monkeypatch, stack_clients):
    clients = _sampled(0, 1, digits_module.num_clients, 3)
    bad = clients[1]
    _nan_client_module(digits_module, bad, monkeypatch)
    trainer = run_rounds(Dense(), rounds=1, clients_per_round=3, accept_failures=True, stack_clients=stack_clients)
    failures = trainer.history[-1]["failures"]
    assert list(failures) == [bad] and "non-finite values (NaN/Inf)" in failures[bad]
    assert trainer.history[-1]["clients_ok"] == 2  # its stacked neighbours were not taken down
    assert trainer.history[-1]["stacked_clients"] == stack_clients
    assert all(torch.isfinite(t).all() for t in trainer.global_state.values() if t.is_floating_point())
    with pytest.raises(RunFailedError, match=f"round 1: client {bad} failed .its update has non-finite"):
        run_rounds(Dense(), rounds=1, clients_per_round=3, stack_clients=stack_clients)


def _sampled(seed: int, round_index: int, num_clients: int, per_round: int) -> list[int]:
    from sparsyfed_lightning.federated.sampling import UniformSampler

    return UniformSampler(seed).sample(round_index, num_clients, per_round)


class _ExplodingOptimizer(FedAvg):
    """A server optimizer whose third step returns NaN (e.g. an adaptive optimizer gone wrong)."""

    def _update(self, key, current, target, delta):
        out = super()._update(key, current, target, delta)
        return out * float("nan") if self.steps >= 3 and out.is_floating_point() else out


def test_a_non_finite_global_model_stops_the_run_before_it_is_adopted(run_rounds, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteError) as error:
        run_rounds(SparsyFed(0.9), rounds=4, server_optimizer=_ExplodingOptimizer(), run_dir=str(run_dir))
    message = str(error.value)
    assert "\n" not in message
    assert "round 3: the global model has non-finite values" in message and "after the server optimizer" in message
    assert f"last good round (2) is in {run_dir}" in message
    _, content = load_verified(run_dir / "checkpoint.pt", ("checkpoint",))
    assert content["server"]["round"] == 2 and [m["round"] for m in content["history"]] == [0, 1, 2]
    assert all(torch.isfinite(t).all() for t in content["server"]["global_state"].values() if t.is_floating_point())
    assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _trainer(rounds=True), "trainer.rounds must be an integer >= 1, got True"),
        (lambda: _trainer(rounds=2.0), "trainer.rounds must be an integer >= 1, got 2.0"),
        (lambda: _trainer(lr_final=float("nan")), "trainer.lr_final must be a number > 0, got nan"),
        (lambda: _trainer(accept_failures="yes"), "trainer.accept_failures must be true or false, got 'yes'"),
        (lambda: SparsyFed(sparsity="0.9"), "method.sparsity must be a number in [0, 1), got '0.9'"),
        (lambda: SparsyFed(sparsity=float("nan")), "method.sparsity must be a number in [0, 1), got nan"),
        (lambda: SparsyFed(beta=float("inf")), "method.beta must be a number >= 1, got inf"),
        (lambda: TopK(sparsity=True), "method.sparsity must be a number in [0, 1), got True"),
        (lambda: _module(lr=float("nan")), "model.lr must be a number > 0, got nan"),
        (lambda: _module(lr="0.1"), "model.lr must be a number > 0, got '0.1'"),
        (lambda: _module(weight_decay=float("inf")), "model.weight_decay must be a number >= 0, got inf"),
        (lambda: FedAvg(lr=float("nan")), "server_optimizer.lr must be a number > 0, got nan"),
        (lambda: _data(alpha=float("nan")), "alpha=nan is invalid"),
        (lambda: _data(num_clients=True), "num_clients=True is invalid"),
    ],
)
def test_bad_hyperparameters_are_refused_by_the_python_api(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert message in str(error.value) and "\n" not in str(error.value)


def _trainer(**kwargs):
    from sparsyfed_lightning.federated.trainer import FederatedTrainer

    return FederatedTrainer(progress="none", accelerator="cpu", **kwargs)


def _module(**kwargs):
    from sparsyfed_lightning.client.module import ClientModule

    return ClientModule("small_cnn", 10, backbone_kwargs={"width": 4}, **kwargs)


def _data(**kwargs):
    from sparsyfed_lightning.data.module import FederatedDataModule

    return FederatedDataModule("digits", **kwargs)


# -- layer collapse ---------------------------------------------------------------------------------
def test_layer_collapse_is_recorded_warned_once_and_guarded(tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    extreme = ["--method", "TopK", "--method.sparsity", "0.995", "--trainer.rounds", "3",
               "--model.backbone_kwargs.width", "8"]
    assert _fit(tiny_config, run_dir, *extreme) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first_seen: dict[str, int] = {}
    for row in rows:
        assert all(row["layer_density"][key] == 0.0 for key in row["collapsed_layers"])
        for key in row["collapsed_layers"]:
            first_seen.setdefault(key, row["round"])
    assert first_seen, "this setting empties at least one layer"
    # one line per layer, the round it first happens, naming the guard; not one line every round
    assert len(warnings) == len(set(first_seen.values()))
    for key, round_index in first_seen.items():
        layer = key.removesuffix(".weight")
        [line] = [w for w in warnings if f"round {round_index}:" in w]
        assert layer in line and "method.min_layer_density" in line
    guarded = tmp_path / "guarded"
    assert _fit(tiny_config, guarded, *extreme, "--method.min_layer_density", "0.004") == 0
    last = json.loads((guarded / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["collapsed_layers"] == [] and min(last["layer_density"].values()) > 0


# -- checkpoints and run directories ------------------------------------------------------------------
@pytest.fixture
def finished_run(tiny_config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert _fit(tiny_config, run_dir, "--trainer.rounds", "3") == 0
    return run_dir


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # one flipped bit inside a stored tensor: the zip structure stays valid, the values change
        with zipfile.ZipFile(path) as archive:
            storages = [i for i in archive.infolist() if "/data/" in i.filename]  # tensor bytes, not the pickle
            info = max(storages, key=lambda i: i.file_size)
        header = info.header_offset  # the local header's own name and extra lengths (torch pads the extra)
        name_length = int.from_bytes(data[header + 26 : header + 28], "little")
        extra_length = int.from_bytes(data[header + 28 : header + 30], "little")
        offset = header + 30 + name_length + extra_length + info.file_size // 2
        damaged = bytearray(data)
        damaged[offset] ^= 0x40
        path.write_bytes(bytes(damaged))


@pytest.mark.parametrize("how", ["empty", "truncated", "bit-flipped"])
def test_a_damaged_checkpoint_is_one_line_and_the_previous_one_resumes(
    how, tiny_config, finished_run, tmp_path, capsys
):
    reference = load_model_state(finished_run / "global_model.pt")
    run_dir = tmp_path / "damaged"
    assert _fit(tiny_config, run_dir, "--trainer.rounds", "3") == 0
    (run_dir / "global_model.pt").unlink()
    _damage(run_dir / "checkpoint.pt", how)
    capsys.readouterr()
    before = _files(run_dir)
    resume = ["fit", "--config", str(tiny_config), "--resume", str(run_dir), "--trainer.rounds", "3"]
    assert main(resume) == 2
    line = _one_error_line(capsys)
    assert str(run_dir / "checkpoint.pt") in line
    assert f"--ckpt_path {run_dir / 'checkpoint.prev.pt'}" in line
    assert _files(run_dir) == before  # a refused resume changes nothing on disk
    assert main([*resume, "--ckpt_path", str(run_dir / "checkpoint.prev.pt")]) == 0
    _assert_same_state(load_model_state(run_dir / "global_model.pt"), reference)
    assert [json.loads(r)["round"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    # the good previous checkpoint was not replaced by the damaged one
    assert load_verified(run_dir / "checkpoint.prev.pt", ("checkpoint",))[1]["server"]["round"] == 2


def test_flipped_bytes_anywhere_never_load_silently(finished_run, tmp_path):
    data = (finished_run / "checkpoint.pt").read_bytes()
    target = tmp_path / "flipped.pt"
    outcomes = set()
    for offset in range(0, len(data), max(1, len(data) // 97)):  # about 100 positions across the file
        damaged = bytearray(data)
        damaged[offset] ^= 0x01
        target.write_bytes(bytes(damaged))
        try:
            load_verified(target, ("checkpoint",))
        except checkpoint_module.CheckpointError as error:
            outcomes.add("refused")
            assert str(target) in str(error) and "\n" not in str(error)
        else:  # a flip the loader cannot see (e.g. in zip padding) must leave the content intact
            outcomes.add("same")
            original = load_verified(finished_run / "checkpoint.pt", ("checkpoint",))[1]
            assert checkpoint_module.content_digest(load_verified(target, ("checkpoint",))[1]) == (
                checkpoint_module.content_digest(original)
            )
    assert "refused" in outcomes


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tiny_config, finished_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "global_model.pt"
    torch.save({"format": checkpoint_module.FORMAT, "kind": "global_model", "sha256": "", "content": _Exploit(marker)},
               crafted)
    assert main(["test", "--config", str(finished_run / "config.yaml"), "--ckpt_path", str(crafted)]) == 2
    line = _one_error_line(capsys)
    assert "refused by the safe loader" in line and str(crafted) in line
    assert not marker.exists()
    pickled = tmp_path / "plain.pt"
    pickled.write_bytes(pickle.dumps(_Exploit(marker)))
    assert main(["fit", "--config", str(tiny_config), "--resume", str(finished_run), "--trainer.rounds", "4",
                 "--ckpt_path", str(pickled)]) == 2
    assert "damaged or not a checkpoint" in _one_error_line(capsys)
    assert not marker.exists()


def test_test_with_a_mismatched_or_garbage_checkpoint_is_one_line(finished_run, tmp_path, capsys):
    config = str(finished_run / "config.yaml")
    model = str(finished_run / "global_model.pt")
    assert main(["test", "--config", config, "--ckpt_path", model, "--model.backbone_kwargs.width", "8"]) == 2
    line = _one_error_line(capsys)
    assert "does not fit the configured model" in line and "has shape" in line
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    assert main(["test", "--config", config, "--ckpt_path", str(garbage)]) == 2
    assert "damaged or not a checkpoint" in _one_error_line(capsys)


def test_resume_validation_changes_nothing_and_fewer_rounds_is_an_error(tiny_config, finished_run, capsys):
    before = _files(finished_run)
    assert main(["fit", "--config", str(tiny_config), "--resume", str(finished_run), "--trainer.rounds", "2"]) == 2
    assert "has already done 3 rounds" in _one_error_line(capsys)
    (finished_run / "config.yaml").write_text("trainer: [unclosed\n")
    assert main(["fit", "--config", str(tiny_config), "--resume", str(finished_run)]) == 2
    assert "config.yaml cannot be read" in _one_error_line(capsys)
    (finished_run / "config.yaml").write_bytes(before[finished_run / "config.yaml"][1])
    after = _files(finished_run)
    assert {p: c for p, (_, c) in after.items()} == {p: c for p, (_, c) in before.items()}


def test_extending_a_run_keeps_the_learning_rate_schedule_fixed_at_its_start(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    assert _fit(tiny_config, run_dir, "--trainer.lr_final", "0.005") == 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["lr_decay_rounds"] == 2
    assert main(["fit", "--config", str(tiny_config), "--resume", str(run_dir), "--trainer.lr_final", "0.005",
                 "--trainer.rounds", "4"]) == 0
    lrs = [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()[1:]]
    assert lrs == pytest.approx([exponential_lr(r, 0.05, 0.005, 2) for r in range(1, 5)])
    assert lrs[1] == pytest.approx(0.005) and lrs[3] < 0.005  # the horizon stayed at 2, not re-based to 4


def test_overwrite_is_a_bare_flag_and_only_removes_run_directories(tiny_config, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    assert _fit(tiny_config, folder, "--overwrite") == 2
    line = _one_error_line(capsys)
    assert "not a sparsyfed run directory" in line
    assert (folder / "thesis.tex").read_text() == "years of work" and len(list(folder.iterdir())) == 1
    run_dir = tmp_path / "run"
    assert _fit(tiny_config, run_dir, "--trainer.rounds", "1") == 0
    (run_dir / "stale.txt").write_text("from the old run")
    assert _fit(tiny_config, run_dir, "--trainer.rounds", "1", "--overwrite") == 0
    assert not (run_dir / "stale.txt").exists() and (run_dir / "global_model.pt").is_file()


def test_the_python_api_never_touches_an_existing_run(finished_run, run_rounds, digits_module):
    before = _files(finished_run)
    with pytest.raises(RunDirectoryError, match="already exists; pass ckpt_path=.* to fit.. to continue it"):
        run_rounds(SparsyFed(0.9), rounds=1, run_dir=str(finished_run))
    assert _files(finished_run) == before


def test_temp_files_of_killed_writes_are_removed_on_the_next_start(tiny_config, finished_run):
    leftovers = [finished_run / ".checkpoint.pt.tmp-abc123", finished_run / "masks" / ".round_00003.pt.tmp-x"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    assert main(["fit", "--config", str(tiny_config), "--resume", str(finished_run), "--trainer.rounds", "4"]) == 0
    assert not any(path.exists() for path in leftovers)


def test_disk_full_is_one_line_and_the_last_good_checkpoint_stays(tiny_config, tmp_path, capsys, monkeypatch):
    """A small tmpfs when this machine lets us mount one, else ENOSPC from the checkpoint writer."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    ).returncode == 0
    try:
        if not mounted:  # every atomic write after the first few runs out of space half-way
            calls = {"n": 0}
            write_atomic = atomic_files.write_atomic

            def filling(path, mode, write):
                calls["n"] += 1
                if calls["n"] <= 8:
                    return write_atomic(path, mode, write)

                def half(handle):
                    handle.write(b"half" if "b" in mode else "half")
                    raise OSError(errno.ENOSPC, "No space left on device")

                return write_atomic(path, mode, half)

            for module in (atomic_files, checkpoint_module, snapshots):  # every importer of the writer
                monkeypatch.setattr(module, "write_atomic", filling)
        run_dir = mount / "run"
        code = _fit(tiny_config, run_dir, "--trainer.rounds", "400", "--model.backbone_kwargs.width", "32",
                    "--trainer.mask_snapshot_every", "1", "--trainer.eval_every", "400")
        assert code == 1
        line = _one_error_line(capsys)
        assert "the disk is full" in line
        _, content = load_verified(run_dir / "checkpoint.pt", ("checkpoint",))  # intact, verified
        assert content["server"]["round"] >= 1
        assert not list(run_dir.rglob(".*.tmp-*"))  # no half-written file left behind
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=False)


# -- several processes: one writer, signals ----------------------------------------------------------
def _start(config: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "sparsyfed_lightning.cli", "fit", "--config", str(config),
               "--trainer.run_dir", str(run_dir), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_rounds(process: subprocess.Popen, run_dir: Path, rounds: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > rounds):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"fewer than {rounds} rounds within {timeout} s"
        time.sleep(0.05)


def test_a_second_writer_on_a_run_in_use_is_refused(tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    process = _start(tiny_config, run_dir, "--trainer.rounds", "1000", "--trainer.checkpoint_every", "0")
    try:
        _wait_for_rounds(process, run_dir, 1)
        before = (run_dir / "config.yaml").read_bytes()
        assert main(["fit", "--config", str(tiny_config), "--resume", str(run_dir), "--trainer.rounds", "1000"]) == 2
        line = _one_error_line(capsys)
        assert f"in use by another process (pid {process.pid})" in line
        assert _fit(tiny_config, run_dir, "--overwrite") == 2
        assert "in use by another process" in _one_error_line(capsys)
        assert (run_dir / "config.yaml").read_bytes() == before and run_dir.is_dir()
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_a_safe_point_and_the_resumed_run_is_bit_identical(
    signum, status, tiny_config, tmp_path
):
    common = ["--trainer.rounds", "40", "--trainer.eval_every", "40", "--trainer.checkpoint_every", "0"]
    run_dir = tmp_path / "run"
    process = _start(tiny_config, run_dir, *common)
    try:
        _wait_for_rounds(process, run_dir, 3)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == status, err
    lines = [line for line in err.splitlines() if not line.startswith("run directory:")]
    assert len(lines) == 1, err
    name = signal.Signals(signum).name
    assert lines[0].startswith(f"sparsyfed: error: interrupted by {name}; the checkpoint of round ")
    assert f"resume with sparsyfed fit --config {run_dir / 'config.yaml'} --resume {run_dir}" in lines[0]
    done = load_verified(run_dir / "checkpoint.pt", ("checkpoint",))[1]["server"]["round"]
    assert f"round {done} is in" in lines[0] and 3 <= done < 40
    assert not (run_dir / "global_model.pt").exists()
    if signum == signal.SIGTERM:  # once is enough for the bit-identical resumption (a 40-round reference)
        assert main(["fit", "--config", str(tiny_config), "--resume", str(run_dir), *common]) == 0
        reference = tmp_path / "reference"
        assert _fit(tiny_config, reference, *common) == 0
        resumed = load_model_state(run_dir / "global_model.pt")
        _assert_same_state(resumed, load_model_state(reference / "global_model.pt"))
        rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert rounds == list(range(41))


# -- configuration and input errors that used to be tracebacks --------------------------------------
TRACEBACKS_BEFORE = [
    (["--trainer.accelerator", "gpu"], "trainer.accelerator='gpu'"),
    (["--trainer.accelerator", "cuda"], "trainer.accelerator='cuda'"),
    (["--data.device", "cuda:7"], "data.device='cuda:7' is invalid"),
    (["--trainer.devices", "-1"], "trainer.devices"),
    (["--model.backbone_kwargs.width", "0"], "model.backbone='small_cnn' with model.backbone_kwargs={'width': 0}"),
    (["--trainer.min_successful_clients", "3"], "trainer.min_successful_clients=3 is invalid; it must be <= "
                                                "trainer.clients_per_round=2"),
    (["--model.backbone", "resnet18_speech", "--model.backbone_kwargs", "{}"],
     "cannot take the inputs of data.dataset='digits'"),
    (["--method.sparsityy", "0.9"], "Option 'sparsityy' is not accepted"),
    (["--method.sparsity", "nan"], "Got value: nan"),
    (["--model.lr", "nan"], 'Parser key "model.lr"'),
]


@pytest.mark.parametrize(("args", "message"), TRACEBACKS_BEFORE)
def test_configuration_errors_are_one_line_exit_2_and_nothing_written(args, message, tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _fit(tiny_config, run_dir, *args) == 2
    line = _one_error_line(capsys)
    assert message in line, line
    assert not run_dir.exists()


def test_run_dir_that_is_a_file_or_not_writable_is_one_line(tiny_config, tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    assert _fit(tiny_config, a_file) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)
    # /proc refuses new folders even to root (chmod would not stop root)
    assert _fit(tiny_config, Path("/proc/sparsyfed-run")) == 2
    assert "trainer.run_dir=/proc/sparsyfed-run" in _one_error_line(capsys)


def test_predict_is_not_a_command(tiny_config, capsys):
    assert main(["predict", "--config", str(tiny_config)]) == 2
    assert "invalid choice: 'predict'" in _one_error_line(capsys)


def test_exit_statuses_are_documented():
    text = (Path(__file__).parents[1] / "docs" / "RELIABILITY.md").read_text()
    for status in ("| 0 |", "| 1 |", "| 2 |", "| 130 |", "| 143 |"):
        assert status in text
