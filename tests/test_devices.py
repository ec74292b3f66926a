"""Several devices on one machine, on CPU: clients in parallel over device workers, and DDP per client.

Clients in parallel must give the one-device run bit for bit (same stacking, one thread per
process). DDP (gloo, 2 ranks, real subprocesses as Lightning's script launcher would start them)
must keep every rank's global model identical (the trainer checks it every round), match one device
with the combined batch for a BatchNorm-free model and the dense method up to float rounding, and
resume exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sparsyfed_lightning.cli import main
from sparsyfed_lightning.data.loaders import TensorBatchLoader
from sparsyfed_lightning.federated import ddp
from sparsyfed_lightning.federated.checkpoint import load_model_state
from sparsyfed_lightning.federated.devices import plan_devices
from sparsyfed_lightning.federated.errors import RunFailedError
from sparsyfed_lightning.methods import SparsyFed


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- clients in parallel -----------------------------------------------------------------------------
@pytest.mark.parametrize("stack_clients", [1, 2])
def test_clients_in_parallel_over_two_workers_equal_one_device_bit_for_bit(run_rounds, stack_clients):
    common = {"rounds": 2, "clients_per_round": 5, "num_threads": 1, "stack_clients": stack_clients}
    one = run_rounds(SparsyFed(0.9), devices=1, **common)
    two = run_rounds(SparsyFed(0.9), devices=2, **common)
    assert two.device_plan.mode == "clients" and two.device_plan.count == 2
    assert _same(one.global_state, two.global_state)
    keys = ("test_accuracy", "uplink_bytes", "train_loss", "after_pruning_deactivated", "clients", "stacked_clients")
    for a, b in zip(one.history, two.history, strict=True):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"devices": 2, "strategy": "fsdp"}, "trainer.strategy='fsdp' is not supported with trainer.devices=2"),
        ({"devices": 1, "strategy": "deepspeed"}, "trainer.strategy='deepspeed' is not supported"),
        ({"num_nodes": 2}, "trainer.num_nodes=2 is not supported"),
    ],
)
def test_device_combinations_that_cannot_work_are_one_line(kwargs, message):
    from sparsyfed_lightning.federated.trainer import FederatedTrainer

    with pytest.raises(ValueError, match=message) as error:
        FederatedTrainer(accelerator="cpu", progress="none", **kwargs)
    assert "\n" not in str(error.value)


def test_device_plans():
    assert plan_devices("cpu", 1, "auto", 1).mode == "single"
    assert plan_devices("cpu", "auto", "auto", 1).count == 1
    clients = plan_devices("cpu", 3, "auto", 1)
    assert (clients.mode, clients.indices, clients.slot_devices(2)) == ("clients", (0, 1, 2), 1)
    assert plan_devices("cpu", 2, "ddp", 1).mode == "ddp"


# -- DDP: batches, ranks, equivalence --------------------------------------------------------------
def test_ranks_share_each_batch_of_the_combined_size_between_them():
    inputs = torch.arange(40.0).reshape(20, 2)
    labels = torch.arange(20)
    per_device = TensorBatchLoader(inputs, labels, 4, shuffle=True, seed=3)
    combined = TensorBatchLoader(inputs, labels, 8, shuffle=True, seed=3)
    shards = [list(ddp.ShardedBatchLoader(per_device, rank, 2)) for rank in (0, 1)]
    expected = list(combined)
    assert len(shards[0]) == len(shards[1]) == len(expected) == 3  # 8 + 8 + 4
    for (x0, y0), (x1, y1), (x, y) in zip(*shards, expected, strict=True):
        assert torch.equal(torch.stack([y0, y1], 1).reshape(-1), y)  # interleaved: samples r, r + 2, ...
        assert torch.equal(torch.cat([x0, x1]).sort(0).values, x.sort(0).values)
    lone_last = ddp.ShardedBatchLoader(TensorBatchLoader(inputs[:9], labels[:9], 4), 0, 2)
    assert len(lone_last) == 1  # a batch of 8, then a lone sample that no rank can step on alone


def test_ranks_that_disagree_stop_the_run(run_rounds, monkeypatch):
    trainer = run_rounds(SparsyFed(0.9), rounds=1)
    trainer._check_ranks_agree(1)  # one process: it agrees with itself
    monkeypatch.setattr(ddp, "gather_strings", lambda value: [value, value, "0" * 64])
    with pytest.raises(RunFailedError, match="round 1: DDP ranks \\[2\\] hold a different global model than rank 0"):
        trainer._check_ranks_agree(1)


@pytest.fixture
def ddp_config(tmp_path) -> Path:
    config = {
        "trainer": {"rounds": 3, "clients_per_round": 2, "eval_every": 3, "progress": "none",
                    "accelerator": "cpu", "checkpoint_every": 1},
        "model": {"backbone": "small_cnn", "backbone_kwargs": {"width": 4}, "lr": 0.05},
        "data": {"dataset": "digits", "num_clients": 4, "batch_size": 32, "samples_per_client": 320,
                 "cache_dir": str(tmp_path / "cache")},
        "method": {"class_path": "sparsyfed_lightning.methods.SparsyFed", "init_args": {"sparsity": 0.9}},
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _ddp_fit(config: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`sparsyfed fit` with 2 DDP ranks on the CPU, as a user starts it (rank 0 launches rank 1)."""
    command = [sys.executable, "-m", "sparsyfed_lightning.cli", "fit", "--config", str(config),
               "--trainer.devices", "2", "--trainer.strategy", "ddp", *extra]
    if "--resume" not in extra:
        command += ["--trainer.run_dir", str(run_dir)]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    return subprocess.run(command, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)


def test_ddp_with_half_the_batch_per_rank_matches_one_device_with_the_whole_batch(ddp_config, tmp_path):
    """Dense, no BatchNorm: 2 ranks x batch 32 = 1 device x batch 64, up to float rounding."""
    plain = ["--method", "Dense", "--model.backbone_kwargs.batch_norm", "false"]
    ranks = _ddp_fit(ddp_config, tmp_path / "ddp", *plain)
    assert ranks.returncode == 0, ranks.stderr
    one = tmp_path / "one"
    assert main(["fit", "--config", str(ddp_config), "--trainer.run_dir", str(one), *plain,
                 "--data.batch_size", "64"]) == 0
    distributed = load_model_state(tmp_path / "ddp" / "global_model.pt")
    single = load_model_state(one / "global_model.pt")
    assert distributed.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(distributed[key], single[key], rtol=1e-4, atol=1e-5, msg=key)


def test_ddp_ranks_stay_identical_only_rank_0_writes_and_resume_is_exact(ddp_config, tmp_path):
    """SparsyFed with BatchNorm: per-rank activation pruning and statistics, checked identical per round."""
    whole = _ddp_fit(ddp_config, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    assert whole.stderr.count("run directory:") == 1  # rank 1 printed nothing of its own
    assert sorted(p.name for p in (tmp_path / "whole").iterdir() if not p.name.startswith(".")) == [
        "checkpoint.prev.pt", "checkpoint.pt", "class_counts.json", "config.yaml", "global_model.pt", "logs",
        "masks", "metrics.jsonl"]
    first = _ddp_fit(ddp_config, tmp_path / "resumed", "--trainer.rounds", "2")
    assert first.returncode == 0, first.stderr
    config = tmp_path / "resumed" / "config.yaml"
    resumed = _ddp_fit(config, tmp_path / "resumed", "--resume", str(tmp_path / "resumed"), "--trainer.rounds", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert _same(load_model_state(tmp_path / "whole" / "global_model.pt"),
                 load_model_state(tmp_path / "resumed" / "global_model.pt"))
