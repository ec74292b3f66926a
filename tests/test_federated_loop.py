"""The federated loop end to end on tiny real data (digits), for every method."""

from __future__ import annotations

import math

import pytest
import torch

from sparsyfed_lightning.federated.errors import RunFailedError
from sparsyfed_lightning.federated.server import FederatedServer
from sparsyfed_lightning.methods import FLASH, Dense, SparsyFed, SparsyFedSpectral, TopK, ZeroFL, build_method
from sparsyfed_lightning.server.optimizers import FedAdagrad, FedAdam, FedAvgM, FedYogi
from sparsyfed_lightning.sparse import ActivationPruning

METHODS = {
    "dense": lambda: Dense(),
    "topk": lambda: TopK(0.9),
    "zerofl": lambda: ZeroFL(0.9),
    "flash": lambda: FLASH(0.9),
    "sparsyfed": lambda: SparsyFed(0.9),
    "sparsyfed_spectral": lambda: SparsyFedSpectral(0.9),
    "sparsyfed_no_activation_pruning": lambda: SparsyFed(0.9, activation_pruning=False),
    "sparsyfed_beta_one": lambda: SparsyFed(0.9, beta=1.0),
}


@pytest.fixture
def record_uplinks(monkeypatch):
    """Collect every decoded client state the server receives, per round."""
    received: dict[int, list[dict[str, torch.Tensor]]] = {}
    original = FederatedServer.receive

    def receive(self, result):
        from sparsyfed_lightning.federated.client_runner import decode_result

        received.setdefault(self.round, []).append(decode_result(result))
        return original(self, result)

    monkeypatch.setattr(FederatedServer, "receive", receive)
    return received


def _prunable(trainer, state):
    return {k: state[k] for k in trainer.server.prunable_keys}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_three_rounds_and_hits_its_target(name, run_rounds, record_uplinks):
    trainer = run_rounds(METHODS[name]())
    history = trainer.history
    assert [m["round"] for m in history] == [0, 1, 2, 3]
    assert all(0.0 <= m["test_accuracy"] <= 1.0 and math.isfinite(m["test_loss"]) for m in history)
    sparsity = trainer.method.sparsity
    for round_index, states in record_uplinks.items():
        assert len(states) == 3
        for state in states:
            weights = _prunable(trainer, state)
            total = sum(t.numel() for t in weights.values())
            nonzero = sum(int(torch.count_nonzero(t)) for t in weights.values())
            target = total - round(sparsity * total)
            if name == "flash" and round_index > 1:  # the layer-wise mask floors each layer's count
                assert target - len(weights) <= nonzero <= target, round_index
            else:
                assert nonzero == target, (name, round_index)
    slack = 0.01 if name == "flash" else 1e-9  # FLASH floors each layer's kept count
    assert history[-1]["density"] >= 1 - sparsity - slack
    assert history[-1]["cumulative_uplink_bytes"] > 0 and history[-1]["cumulative_downlink_bytes"] > 0


def test_sparse_uplink_is_much_smaller_than_dense(run_rounds):
    sparse = run_rounds(SparsyFed(0.95), rounds=2)
    assert sparse.history[-1]["uplink_ratio_to_dense"] < 1 / 6  # small tensors carry header overhead
    dense = run_rounds(Dense(), rounds=1)
    assert dense.history[-1]["uplink_ratio_to_dense"] >= 1.0


def test_sparsyfed_support_never_grows_after_round_one(run_rounds):
    trainer = run_rounds(SparsyFed(0.9, beta=1.25), rounds=4)
    layer = trainer.history
    assert all(layer[r]["density"] <= layer[r - 1]["density"] + 1e-12 for r in range(2, 5))
    assert all(m["after_training_activated"] == 0 for m in trainer.history[2:])
    # beta = 1 lets zeros regrow during local training
    ablation = run_rounds(SparsyFed(0.9, beta=1.0), rounds=3)
    assert any(m["after_training_activated"] > 0 for m in ablation.history[2:])


def test_activation_pruning_inactive_in_round_one_active_from_round_two(run_rounds, monkeypatch):
    kept_by_round: list[dict[str, float]] = []
    original_refresh = ActivationPruning.refresh

    def refresh(self):
        original_refresh(self)
        kept_by_round.append(self.keep_fractions())

    monkeypatch.setattr(ActivationPruning, "refresh", refresh)
    run_rounds(SparsyFed(0.9), rounds=2, clients_per_round=1)
    first, second = kept_by_round
    assert all(f == 1.0 for f in first.values())  # dense global model: nothing to prune
    assert all(f < 1.0 for f in second.values())
    assert sum(second.values()) / len(second) < 0.5


def test_flash_mask_is_fixed_after_round_one(run_rounds):
    trainer = run_rounds(FLASH(0.9), rounds=4)
    densities = [m["density"] for m in trainer.history[1:]]
    assert densities[0] == pytest.approx(0.1, abs=0.01)
    assert all(d == densities[0] for d in densities)
    assert all(m["mask_iou_previous"] == 1.0 for m in trainer.history[2:])


def test_zerofl_stem_dense_in_training_and_pruned_at_round_end(run_rounds, record_uplinks, monkeypatch):
    from sparsyfed_lightning.client.callbacks import WeightTopKCallback

    stem_zeros_in_training: list[int] = []
    other_density_in_training: list[float] = []

    def on_before_backward(self, trainer, pl_module, loss):  # after the forward's weight Top-K
        stem, other = pl_module.net[0].weight, pl_module.net[3].weight
        stem_zeros_in_training.append(int((stem == 0).sum()))
        other_density_in_training.append(float((other != 0).float().mean()))

    monkeypatch.setattr(WeightTopKCallback, "on_before_backward", on_before_backward)
    trainer = run_rounds(ZeroFL(0.9), rounds=1, clients_per_round=2)
    assert stem_zeros_in_training and max(stem_zeros_in_training) == 0
    assert max(other_density_in_training) == pytest.approx(0.1, abs=0.002)
    stem_key = trainer.server.prunable_keys[0]
    assert all(int((state[stem_key] == 0).sum()) > 0 for state in record_uplinks[1])


@pytest.mark.parametrize("optimizer", [FedAvgM(), FedAdam(), FedYogi(), FedAdagrad()])
def test_any_server_optimizer_composes_with_sparsyfed(optimizer, run_rounds):
    trainer = run_rounds(SparsyFed(0.9), rounds=2, server_optimizer=optimizer, optimizer_on_buffers=False)
    assert trainer.server.optimizer is optimizer
    assert math.isfinite(trainer.history[-1]["test_loss"])


def test_same_seed_same_metrics_and_sampling(run_rounds):
    def strip(history):
        return [{k: v for k, v in m.items() if not k.startswith("time_")} for m in history]

    first = run_rounds(SparsyFed(0.9), rounds=2, seed=3)
    second = run_rounds(SparsyFed(0.9), rounds=2, seed=3)
    other = run_rounds(SparsyFed(0.9), rounds=2, seed=4)
    assert strip(first.history) == strip(second.history)
    for key, value in first.global_state.items():
        assert torch.equal(value, second.global_state[key]), key
    assert [m.get("clients") for m in first.history] != [m.get("clients") for m in other.history] or (
        strip(first.history) != strip(other.history)
    )


def test_resume_from_checkpoint_matches_uninterrupted_run(run_rounds, digits_module, tmp_path):
    full = run_rounds(SparsyFed(0.9), rounds=3, run_dir=str(tmp_path / "full"))
    run_rounds(SparsyFed(0.9), rounds=2, run_dir=str(tmp_path / "part"))
    assert (tmp_path / "part" / "checkpoint.pt").exists()
    from sparsyfed_lightning.client.module import ClientModule
    from sparsyfed_lightning.federated.trainer import FederatedTrainer

    resumed = FederatedTrainer(method=SparsyFed(0.9), rounds=3, clients_per_round=3, accelerator="cpu",
                               progress="none", run_dir=str(tmp_path / "part"))
    model = ClientModule("small_cnn", 10, lr=0.05, backbone_kwargs={"width": 8})
    resumed.fit(model, datamodule=digits_module, ckpt_path=str(tmp_path / "part" / "checkpoint.pt"))
    for key, value in full.global_state.items():
        assert torch.equal(value, resumed.global_state[key]), key
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4


def test_failures_follow_the_accept_failures_policy(run_rounds, digits_module, monkeypatch):
    original = type(digits_module).client_train_dataloader

    def flaky(self, cid, seed=0):
        if cid == 0:
            raise OSError("disk on fire")
        return original(self, cid, seed)

    monkeypatch.setattr(type(digits_module), "client_train_dataloader", flaky)
    with pytest.raises(RunFailedError, match="client 0 failed.*disk on fire"):
        run_rounds(SparsyFed(0.9), rounds=1, clients_per_round=6)
    trainer = run_rounds(SparsyFed(0.9), rounds=1, clients_per_round=6, accept_failures=True)
    assert trainer.history[-1]["failures"] == {0: "OSError: disk on fire"}
    assert trainer.history[-1]["clients_ok"] == 5
    with pytest.raises(RunFailedError, match="min_successful_clients=6"):
        run_rounds(SparsyFed(0.9), rounds=1, clients_per_round=6, accept_failures=True, min_successful_clients=6)


def test_lr_decays_exponentially_from_round_one(run_rounds):
    trainer = run_rounds(Dense(), rounds=3, lr_final=0.005, lr_decay_rounds=3)
    lrs = [m["lr"] for m in trainer.history[1:]]
    assert lrs[0] == pytest.approx(0.05 * (0.005 / 0.05) ** (1 / 3))
    assert lrs[-1] == pytest.approx(0.005)


def test_unknown_method_and_bad_settings_are_clear_errors():
    from sparsyfed_lightning.federated.trainer import FederatedTrainer

    with pytest.raises(ValueError, match="unknown method 'magic'; known methods: dense"):
        build_method("magic")
    with pytest.raises(ValueError, match="method.beta must be a number >= 1, got 0.5"):
        SparsyFed(beta=0.5)
    for method in (SparsyFed, SparsyFedSpectral):
        with pytest.raises(ValueError, match="method.threshold must be 'first_batch' or 'per_step', got 'always'"):
            method(threshold="always")
    with pytest.raises(ValueError, match=r"method.sparsity must be a number in \[0, 1\), got 1.2"):
        TopK(1.2)
    with pytest.raises(ValueError, match="trainer.rounds must be an integer >= 1, got 0"):
        FederatedTrainer(rounds=0)


def test_layer_collapse_at_extreme_sparsity_and_the_guard(run_rounds):
    """At 99% the global ranking wipes out the widest conv of this small CNN (its weights start
    smallest); the min_layer_density guard keeps every layer alive."""
    unguarded = run_rounds(TopK(0.99), rounds=1)
    assert min(unguarded.history[-1]["layer_density"].values()) == 0.0
    guarded = run_rounds(TopK(0.99, min_layer_density=0.002), rounds=1)
    assert min(guarded.history[-1]["layer_density"].values()) > 0.0
    with pytest.raises(ValueError, match="method.min_layer_density=0.5 is invalid"):
        SparsyFed(0.95, min_layer_density=0.5)
