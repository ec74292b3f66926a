"""The Flower engine: the same run as the in-process engine, failures, routing and option checks.

Only `test_flower_simulation_matches_inprocess_engine` starts Ray (about 20 s here); the other tests
drive the engine through an in-memory grid that calls the real ClientApp in this process.
Without the `flower` extra this module fails at import: CI installs it, so a missing flwr is an error.
"""

from __future__ import annotations

import os
import sys
import uuid

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported; no network here

import flwr  # noqa: E402,F401 - must fail, not skip, when the extra is missing
import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.app import Context, Error, Message, RecordDict  # noqa: E402

from sparsyfed_lightning.client.module import ClientModule  # noqa: E402
from sparsyfed_lightning.data.module import FederatedDataModule  # noqa: E402
from sparsyfed_lightning.federated import engines_flower  # noqa: E402
from sparsyfed_lightning.federated.engines_flower import FlowerConfig, route_any, route_partition  # noqa: E402
from sparsyfed_lightning.federated.errors import RunFailedError  # noqa: E402
from sparsyfed_lightning.federated.flower_app import attach_grid, make_client_app  # noqa: E402
from sparsyfed_lightning.federated.sampling import client_seed  # noqa: E402
from sparsyfed_lightning.federated.server import FederatedServer  # noqa: E402
from sparsyfed_lightning.federated.trainer import FederatedTrainer  # noqa: E402
from sparsyfed_lightning.methods import SparsyFed  # noqa: E402

SEED = 7


class FaultyDigits(FederatedDataModule):
    """Digits over `num_clients` clients whose client `fail_cid` fails in round `fail_round`.

    The failure raises, or with `exit_process` ends the client's process (a ClientApp that dies).
    The failing fit is recognised by its loader seed, which the engine derives from (seed, round, cid).
    """

    def __init__(self, cache_dir: str, num_clients: int = 3, fail_cid: int = -1, fail_round: int = -1,
                 exit_process: bool = False) -> None:
        super().__init__("digits", num_clients=num_clients, batch_size=32, cache_dir=cache_dir)
        self.fail_cid, self.fail_round, self.exit_process = fail_cid, fail_round, exit_process

    def client_train_dataloader(self, cid: int, seed: int = 0):
        if cid == self.fail_cid and seed == client_seed(SEED, self.fail_round, cid):
            if self.exit_process:
                os._exit(3)
            raise RuntimeError(f"injected failure of client {cid}")
        return super().client_train_dataloader(cid, seed)


@pytest.fixture
def record_global_states(monkeypatch):
    """The global state after every round, recorded on the server (it lives in this process)."""
    states: list[dict[str, torch.Tensor]] = []
    original = FederatedServer.end_round

    def end_round(self):
        metrics = original(self)
        states.append({k: v.clone() for k, v in self.global_state.items()})
        return metrics

    monkeypatch.setattr(FederatedServer, "end_round", end_round)
    return states


def _run(datamodule, engine, rounds, **kwargs):
    model = ClientModule("small_cnn", 10, lr=0.05, backbone_kwargs={"width": 8})
    trainer = FederatedTrainer(
        method=SparsyFed(0.9), rounds=rounds, clients_per_round=datamodule.num_clients, seed=SEED,
        accelerator="cpu", progress="none", accept_failures=True, engine=engine, **kwargs,
    )
    trainer.fit(model, datamodule=datamodule)
    return trainer


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


_BYTE_KEYS = ("uplink_bytes", "downlink_bytes", "cumulative_uplink_bytes", "cumulative_downlink_bytes", "clients_ok")


def test_flower_simulation_matches_inprocess_engine(tmp_path, record_global_states):
    """3 clients, full participation, same seed: same global model and bytes after rounds 1-2; in round 3
    client 2 fails (in-process it raises, in Flower its process exits) and both continue without it."""
    # Ray pickles the data module's class to its actors; this test module may not be importable there.
    import ray.cloudpickle

    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)
    try:
        _check_equivalence(str(tmp_path / "cache"), record_global_states)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(module)


def _check_equivalence(cache, record_global_states):
    # Ray gives each 1-CPU actor one torch thread; the same here makes the reference bit-exact.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Flower's ClientApps train one client each, so the reference does too (no stacking).
        reference = _run(FaultyDigits(cache, fail_cid=2, fail_round=3), "inprocess", rounds=3, stack_clients=1)
    finally:
        torch.set_num_threads(threads)
    reference_states = list(record_global_states)
    record_global_states.clear()

    flower = _run(
        FaultyDigits(cache, fail_cid=2, fail_round=3, exit_process=True), "flower", rounds=3,
        flower=FlowerConfig(routing="partition", num_cpus=1, round_timeout_s=120, startup_timeout_s=120),
    )

    assert len(record_global_states) == len(reference_states) == 3
    for ours, theirs in zip(record_global_states, reference_states, strict=True):
        assert _max_abs_diff(ours, theirs) <= 1e-6
    for ours, theirs in zip(flower.history[1:], reference.history[1:], strict=True):
        assert {k: ours[k] for k in _BYTE_KEYS} == {k: theirs[k] for k in _BYTE_KEYS}, ours["round"]
        assert ours["clients"] == theirs["clients"] == [0, 1, 2]
    assert [m["failures"] for m in reference.history[1:]] == [{}, {}, {2: "RuntimeError: injected failure of client 2"}]
    assert [sorted(m["failures"]) for m in flower.history[1:]] == [[], [], [2]]
    assert "Flower error" in flower.history[-1]["failures"][2]  # the dead process answers through Flower
    assert flower.history[-1]["clients_ok"] == 2


# ----------------------------------------------------------------------------------------------
# An in-memory grid: the real ClientApp handles every message in this process.


class LocalGrid:
    """A `Grid` stand-in: node i serves partition i. Every node answers queries; `silent` nodes never
    answer a train message (a hung client), `crashing` nodes answer it with a Flower error (what Flower
    sends for a ClientApp process that died)."""

    def __init__(self, client_app, num_nodes: int, silent=(), crashing=()) -> None:
        self.client_app = client_app
        self.partition_of = {1000 + i: i for i in range(num_nodes)}
        self.silent, self.crashing = {1000 + i for i in silent}, {1000 + i for i in crashing}
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.partition_of)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(message)
            node = message.metadata.dst_node_id
            ids.append(message.metadata.message_id)
            training = message.metadata.message_type == "train"
            if training and node in self.silent:
                continue
            if training and node in self.crashing:
                self.replies[message.metadata.message_id] = Message(
                    Error(code=0, reason="<class 'ray.exceptions.ActorDiedError'>:<'worker died'>"), reply_to=message
                )
                continue
            context = Context(run_id=1, node_id=node, node_config={"partition-id": self.partition_of[node]},
                              state=RecordDict(), run_config={})
            self.replies[message.metadata.message_id] = self.client_app(message, context)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a ServerApp runtime sets before messages can be built (restored after each test)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name) or value)


def _client_app_for(datamodule, model, method, trainer):
    from sparsyfed_lightning.federated.flower_app import ClientSpec, FixedSpec

    spec = ClientSpec.from_objects(model, method, datamodule, trainer.local_epochs, trainer.client_trainer_kwargs,
                                   key=uuid.uuid4().hex)
    return make_client_app(FixedSpec(spec))


def test_attached_grid_reports_raising_silent_and_dead_clients(tmp_path):
    datamodule = FaultyDigits(str(tmp_path), num_clients=4, fail_cid=1, fail_round=1)
    model = ClientModule("small_cnn", 10, lr=0.05, backbone_kwargs={"width": 8})
    method = SparsyFed(0.9)
    trainer = FederatedTrainer(
        method=method, rounds=1, clients_per_round=4, seed=SEED, accelerator="cpu", progress="none",
        accept_failures=True, engine="flower", flower=FlowerConfig(round_timeout_s=0.5, startup_timeout_s=5),
    )
    grid = LocalGrid(_client_app_for(datamodule, model, method, trainer), 4, silent=[2], crashing=[3])
    with attach_grid(grid):
        trainer.fit(model, datamodule=datamodule)
    failures = trainer.history[-1]["failures"]
    assert failures[1] == "RuntimeError: injected failure of client 1"  # the in-process engine's wording
    assert failures[2] == "no reply within flower.round_timeout_s=0.5"
    assert failures[3].startswith("Flower error 0:") and "ActorDiedError" in failures[3]
    assert sorted(failures) == [1, 2, 3] and trainer.history[-1]["clients_ok"] == 1
    # partition routing: one query per node, then client i's train message to the node of partition i
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert sorted(grid.partition_of[m.metadata.dst_node_id] for m in train) == [0, 1, 2, 3]
    assert all(grid.partition_of[m.metadata.dst_node_id] == int(m.content["config"]["cid"]) for m in train)
    assert sum(m.metadata.message_type == "query" for m in grid.sent) == 4


def test_failures_stop_the_run_unless_accepted(tmp_path):
    datamodule = FaultyDigits(str(tmp_path), num_clients=2, fail_cid=0, fail_round=1)
    model = ClientModule("small_cnn", 10, lr=0.05, backbone_kwargs={"width": 8})
    trainer = FederatedTrainer(method=SparsyFed(0.9), rounds=1, clients_per_round=2, seed=SEED, accelerator="cpu",
                               progress="none", engine="flower")
    grid = LocalGrid(_client_app_for(datamodule, model, trainer.method, trainer), 2)
    with attach_grid(grid), pytest.raises(RunFailedError, match="client 0 failed.*injected failure of client 0"):
        trainer.fit(model, datamodule=datamodule)


def test_node_serving_another_partition_refuses_the_client(tmp_path):
    datamodule = FaultyDigits(str(tmp_path), num_clients=2)
    model = ClientModule("small_cnn", 10, lr=0.05, backbone_kwargs={"width": 8})
    trainer = FederatedTrainer(method=SparsyFed(0.9), rounds=1, clients_per_round=2, seed=SEED, accelerator="cpu",
                               progress="none", engine="flower")
    app = _client_app_for(datamodule, model, trainer.method, trainer)
    from sparsyfed_lightning.federated.flower_app import train_message

    message = train_message(1000, 1, 1, b"", 0.1, 0, partition_routing=True, ttl=10)
    message.metadata.__dict__["_message_id"] = "m"
    context = Context(run_id=1, node_id=1000, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = app(message, context)
    assert "serves partition-id 0, not client 1" in reply.content["failure"]["error"]


def test_simulation_restarts_after_an_actor_death(tmp_path, monkeypatch):
    """Flower 1.42 keeps a dead Ray actor in its pool; the engine starts a fresh simulation instead."""
    datamodule = FaultyDigits(str(tmp_path), num_clients=2)
    model = ClientModule("small_cnn", 10, lr=0.05, backbone_kwargs={"width": 8})
    trainer = FederatedTrainer(method=SparsyFed(0.9), rounds=2, clients_per_round=2, seed=SEED, accelerator="cpu",
                               progress="none", engine="flower", accept_failures=True)
    app = _client_app_for(datamodule, model, trainer.method, trainer)
    started, closed = [], []

    class FakeSimulation:
        def __init__(self, client_app, num_supernodes, backend_config, startup_timeout_s):
            assert backend_config["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
            # the first simulation's node of partition 1 dies; the restarted one is healthy
            self.grid = LocalGrid(app, num_supernodes, crashing=[1] if not started else [])
            self.num_supernodes, self.alive = num_supernodes, True
            started.append(self)

        def close(self, timeout):
            closed.append(self)

    monkeypatch.setattr(engines_flower, "FlowerSimulation", FakeSimulation)
    trainer.fit(model, datamodule=datamodule)
    assert [sorted(m["failures"]) for m in trainer.history[1:]] == [[1], []]
    assert len(started) == 2 and closed == started  # restarted before round 2, closed at the end


# ----------------------------------------------------------------------------------------------
# Pure helpers and option checks


def test_routing_functions():
    assert route_any([4, 7, 9], [30, 10, 20]) == {4: 10, 7: 20, 9: 30}
    assert route_any([1, 2, 3], [5]) == {1: 5, 2: 5, 3: 5}
    assert route_any([1], []) == {}
    routes, missing = route_partition([0, 2, 5], {0: 100, 2: 102})
    assert routes == {0: 100, 2: 102} and missing == {5: "no node serves partition-id 5"}


def test_options_are_validated_with_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="flower.routing must be"):
        FlowerConfig(routing="nearest")
    with pytest.raises(ValueError, match="flower.round_timeout_s must be > 0"):
        FlowerConfig(round_timeout_s=0)
    with pytest.raises(ValueError, match="trainer.devices=2 is not supported with trainer.engine='flower'"):
        FederatedTrainer(engine="flower", accelerator="cpu", devices=2)
    assert FederatedTrainer(accelerator="cpu").num_devices == 1
    # GPU clients in a simulation need GPUs reserved by Ray
    datamodule = FederatedDataModule("digits", num_clients=2, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="flower.num_gpus=0"):
        engines_flower._check_simulation_devices(FlowerConfig(), {"accelerator": "gpu"}, datamodule)
    engines_flower._check_simulation_devices(FlowerConfig(num_gpus=0.5), {"accelerator": "gpu"}, datamodule)


def test_missing_flower_is_a_one_line_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'sparsyfed-lightning\[flower\]'"):
        FederatedTrainer(engine="flower")
