"""The Flower engine: the clients of a round train in Flower ClientApps (`flwr`, extra `flower`).

Design (docs/FLOWER.md has the user's view):

* The round loop, the server state, the method rules, metrics and checkpoints stay in
  `FederatedTrainer.fit`, on the caller's thread, exactly as with the in-process engine. Only
  `fit_round` differs: it sends each sampled client a Flower `train` Message carrying the downlink
  encoding (our codec's bytes), the round, lr, seed and client id; collects the replies (the uplink
  encoding + metrics) and hands them to the server in the sampled order, so aggregation sums in the
  same order as in-process and byte counts are identical.
* Without a grid (a plain `trainer.fit(...)`), the engine starts a Flower simulation (Ray backend)
  on a background thread whose ServerApp only hands its `Grid` over and stays alive; inside a
  ServerApp (deployment), `flower_app.attach_grid(grid)` makes the engine use that grid instead.
* Routing: `partition` sends client `cid` to the node whose `node_config["partition-id"] == cid`
  (learned with one `query` message per new node); a deployed node holds only its own data, so this
  is the default with an attached grid. `any` lets any node train any cid (the cid travels in the
  message): in a simulation every virtual node shares one machine and one dataset, so pinning cids
  to nodes would only cost a query round; it is the simulation's default, with one node per sampled
  client.
* Failures: a client that raises answers with a failure reply; a node whose process dies answers
  with a Flower error; a node that does not answer within `round_timeout_s` is reported too. All of
  them come back as `{cid: error}` and the trainer's accept-failures policy decides. Flower 1.42's
  Ray pool keeps a dead actor and fails every later message sent to it, so after an actor death the
  simulation is restarted before the next round (`restart_after_actor_death`).
* Every wait is bounded: simulation start-up, each round, node queries and shut-down.
"""

from __future__ import annotations

import importlib.util
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from sparsyfed_lightning.federated.sampling import client_seed

log = logging.getLogger(__name__)

FLOWER_MISSING = "engine='flower' needs Flower: pip install 'sparsyfed-lightning[flower]'"
_ACTOR_DEATH_MARKERS = ("ActorDiedError", "RayActorError", "ActorUnavailableError")
_POLL_S = 0.1


def require_flower(simulation: bool = False) -> None:
    """Raise a one-line ImportError when `flwr` (and for simulations `ray`) is not installed."""
    if importlib.util.find_spec("flwr") is None or (simulation and importlib.util.find_spec("ray") is None):
        raise ImportError(FLOWER_MISSING)


@dataclass
class FlowerConfig:
    """Options of the Flower engine (`FederatedTrainer(engine="flower", flower=FlowerConfig(...))`).

    Args:
        num_cpus: CPUs Ray reserves per client in a simulation (parallel clients = CPUs / num_cpus).
        num_gpus: GPUs per client in a simulation (0.5 puts two clients on each GPU); must be > 0 when
            clients train on a GPU, since Ray hides GPUs from actors that reserve none.
        num_supernodes: virtual nodes of a simulation (default: clients_per_round with `any` routing,
            num_clients with `partition` routing).
        routing: "auto" (`any` in a simulation, `partition` with an attached deployment grid), "any" or
            "partition"; see the module docstring.
        round_timeout_s: longest wait for a round's replies; missing replies are failures.
        startup_timeout_s: longest wait for the simulation to start and for nodes to report their
            partition ids.
        shutdown_timeout_s: longest wait for the simulation to stop.
        restart_after_actor_death: restart the simulation before the next round when a Ray actor died.
        ray_init_args: extra `ray.init` arguments of a simulation (e.g. {"num_cpus": 8}).
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    num_supernodes: int | None = None
    routing: Literal["auto", "any", "partition"] = "auto"
    round_timeout_s: float = 3600.0
    startup_timeout_s: float = 300.0
    shutdown_timeout_s: float = 60.0
    restart_after_actor_death: bool = True
    ray_init_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.routing not in ("auto", "any", "partition"):
            raise ValueError(f"flower.routing must be 'auto', 'any' or 'partition', got {self.routing!r}")
        for name in ("num_cpus", "num_gpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"flower.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("round_timeout_s", "startup_timeout_s", "shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"flower.{name} must be > 0, got {getattr(self, name)!r}")
        if self.num_supernodes is not None and self.num_supernodes < 1:
            raise ValueError(f"flower.num_supernodes must be >= 1 or null, got {self.num_supernodes!r}")

    def backend_config(self) -> dict[str, Any]:
        """`run_simulation`'s backend_config: per-client resources and Ray's init arguments."""
        return {
            "client_resources": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "init_args": dict(self.ray_init_args),
        }


def route_any(client_ids: list[int], node_ids: list[int]) -> dict[int, int]:
    """`any` routing: the sampled clients go round-robin over the nodes (sorted, so it is reproducible)."""
    if not node_ids:
        return {}
    nodes = sorted(node_ids)
    return {cid: nodes[i % len(nodes)] for i, cid in enumerate(client_ids)}


def route_partition(client_ids: list[int], node_of_partition: dict[int, int]) -> tuple[dict[int, int], dict[int, str]]:
    """`partition` routing: each client to the node serving its partition; the rest are failures."""
    routes = {cid: node_of_partition[cid] for cid in client_ids if cid in node_of_partition}
    missing = {cid: f"no node serves partition-id {cid}" for cid in client_ids if cid not in routes}
    return routes, missing


def exchange(
    grid: Any, messages: list[Any], timeout: float, alive: Callable[[], bool] = lambda: True
) -> dict[str, Any]:
    """Push `messages` and pull replies until all arrived, `timeout` passed or `alive()` turns false.

    Returns {instruction message id: reply}. `Grid.send_and_receive` would also do, but it cannot
    stop early when the simulation behind the grid has died.
    """
    pending = set(grid.push_messages(messages))
    replies: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline and alive():
        for reply in grid.pull_messages(list(pending)):
            replies[reply.metadata.reply_to_message_id] = reply
            pending.discard(reply.metadata.reply_to_message_id)
        if pending:
            time.sleep(_POLL_S)
    return replies


class FlowerSimulation:
    """A Flower simulation (Ray backend) on a background thread, exposing its ServerApp's grid.

    Args:
        client_app: the ClientApp every virtual node runs.
        num_supernodes: number of virtual nodes (node i has `partition-id` i).
        backend_config: Flower's backend config (client resources, Ray init args).
        startup_timeout_s: longest wait for the grid.
    """

    def __init__(self, client_app: Any, num_supernodes: int, backend_config: dict[str, Any],
                 startup_timeout_s: float) -> None:
        from sparsyfed_lightning.federated.flower_app import make_bridge_server_app

        self._grids: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        server_app = make_bridge_server_app(self._grids.put, self._stop)
        self._thread = threading.Thread(
            target=self._run, args=(server_app, client_app, num_supernodes, backend_config),
            name="flower-simulation", daemon=True,
        )
        self.num_supernodes = num_supernodes
        self._thread.start()
        self.grid = self._wait_for_grid(startup_timeout_s)

    def _run(self, server_app: Any, client_app: Any, num_supernodes: int, backend_config: dict[str, Any]) -> None:
        from flwr.simulation import run_simulation

        try:
            run_simulation(server_app, client_app, num_supernodes=num_supernodes, backend_config=backend_config)
        except BaseException as error:  # noqa: BLE001 - reported by the engine, not lost in this thread
            self._error = error

    def _wait_for_grid(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self._grids.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive():
                    error = self._error
                    raise RuntimeError(f"the Flower simulation stopped while starting: {error!r}") from error
        self.close(5.0)
        raise TimeoutError(f"the Flower simulation did not start within flower.startup_timeout_s={timeout}")

    @property
    def alive(self) -> bool:
        """Whether the simulation is still running."""
        return self._thread.is_alive()

    def close(self, timeout: float) -> None:
        """Stop the simulation and wait (bounded) for Ray to shut down."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # A ClientApp stuck in a task keeps Flower's worker threads waiting; shutting Ray down
            # ends those tasks. The thread is a daemon, so it cannot block the interpreter's exit.
            log.warning("the Flower simulation did not stop within %.0f s; shutting Ray down", timeout)
            try:
                import ray

                ray.shutdown()
            except Exception:  # noqa: BLE001 - best effort on the way out
                log.exception("ray.shutdown failed")
            self._thread.join(min(timeout, 10.0))


class FlowerEngine:
    """Runs the clients of each round as Flower ClientApps (simulation or an attached grid).

    Args:
        trainer: the `FederatedTrainer` (its seed, method, runner module, client Trainer arguments,
            clients_per_round and `flower` options are read).
        datamodule: the run's `FederatedDataModule`; each client process builds its own copy from the
            same constructor arguments.
        config: engine options (default: `trainer.flower`).
    """

    name = "flower"

    def __init__(self, trainer: Any, datamodule: Any, config: FlowerConfig | None = None) -> None:
        from sparsyfed_lightning.federated import flower_app

        self.config = config or getattr(trainer, "flower", None) or FlowerConfig()
        self.seed = trainer.seed
        self.num_clients = datamodule.num_clients
        self.clients_per_round = trainer.clients_per_round
        self._grid = flower_app.attached_grid()
        require_flower(simulation=self._grid is None)
        routing = self.config.routing
        self.routing = routing if routing != "auto" else ("any" if self._grid is None else "partition")
        self._spec = flower_app.ClientSpec.from_objects(
            trainer.runner.module, trainer.method, datamodule, trainer.local_epochs,
            trainer.client_trainer_kwargs, key=uuid.uuid4().hex,
        )
        if self._grid is None:
            _check_simulation_devices(self.config, trainer.client_trainer_kwargs, datamodule)
        self._simulation: FlowerSimulation | None = None
        self._restart = False
        self._node_of_partition: dict[int, int] = {}
        self._queried: set[int] = set()
        self._expected_nodes = 1

    # -- the engine interface --------------------------------------------------------------------
    def fit_round(
        self,
        round_index: int,
        client_ids: list[int],
        downlink: bytes,
        lr: float,
        receive: Callable[[Any], None],
    ) -> dict[int, str]:
        """Train the sampled clients through Flower; hand results to `receive`; return {cid: error}."""
        from sparsyfed_lightning.federated import flower_app

        grid = self._ensure_grid()
        if self.routing == "partition":
            routes, failures = route_partition(client_ids, self._partitions(grid, client_ids))
        else:
            routes = route_any(client_ids, self._nodes(grid))
            failures = {cid: "no node available" for cid in client_ids if cid not in routes}
        ttl = self.config.round_timeout_s
        messages = {
            cid: flower_app.train_message(
                node, round_index, cid, downlink, lr, client_seed(self.seed, round_index, cid),
                self.routing == "partition", ttl,
            )
            for cid, node in routes.items()
        }
        replies = exchange(grid, list(messages.values()), self.config.round_timeout_s, self._alive)
        results = {}
        for cid, message in messages.items():
            reply = replies.get(message.metadata.message_id)
            if reply is not None:
                outcome = flower_app.parse_train_reply(reply, cid)
            elif not self._alive():
                outcome = "the Flower simulation stopped during the round"
            else:
                outcome = f"no reply within flower.round_timeout_s={self.config.round_timeout_s:g}"
            if isinstance(outcome, str):
                failures[cid] = outcome
                self._restart |= any(marker in outcome for marker in _ACTOR_DEATH_MARKERS)
            else:
                results[cid] = outcome
        for cid in client_ids:  # the sampled order, as in-process: the same summation order
            if cid in results:
                receive(results[cid])
        return {cid: failures[cid] for cid in client_ids if cid in failures}

    def close(self) -> None:
        """Stop the simulation this engine started (an attached grid belongs to its ServerApp)."""
        if self._simulation is not None:
            self._simulation.close(self.config.shutdown_timeout_s)
            self._simulation = None

    # -- internals -------------------------------------------------------------------------------
    def _alive(self) -> bool:
        return self._simulation is None or self._simulation.alive

    def _ensure_grid(self) -> Any:
        if self._simulation is not None and (
            not self._simulation.alive or (self._restart and self.config.restart_after_actor_death)
        ):
            log.warning("restarting the Flower simulation (a client process died or the simulation stopped)")
            self.close()
        self._restart = False
        if self._grid is not None:
            return self._grid
        if self._simulation is None:
            self._simulation = self._start_simulation()
            self._node_of_partition, self._queried = {}, set()
            self._expected_nodes = self._simulation.num_supernodes
        return self._simulation.grid

    def _nodes(self, grid: Any) -> list[int]:
        """The grid's node ids; the first call waits (bounded) until the expected nodes registered."""
        deadline = time.monotonic() + self.config.startup_timeout_s
        nodes = list(grid.get_node_ids())
        # A simulation registers its nodes after its ServerApp starts; a deployment's nodes connect
        # when they are started. Wait for all of a simulation's nodes, or for one deployed node.
        while len(nodes) < self._expected_nodes and time.monotonic() < deadline and self._alive():
            time.sleep(_POLL_S)
            nodes = list(grid.get_node_ids())
        self._expected_nodes = 0
        return nodes

    def _start_simulation(self) -> FlowerSimulation:
        from sparsyfed_lightning.federated.flower_app import FixedSpec, make_client_app

        num_supernodes = self.config.num_supernodes
        if num_supernodes is None:
            num_supernodes = self.num_clients if self.routing == "partition" else self.clients_per_round
        if self.routing == "partition" and num_supernodes < self.num_clients:
            raise ValueError(
                f"flower.routing='partition' needs a node per client: flower.num_supernodes={num_supernodes} "
                f"< data.num_clients={self.num_clients}"
            )
        return FlowerSimulation(
            make_client_app(FixedSpec(self._spec)), num_supernodes, self.config.backend_config(),
            self.config.startup_timeout_s,
        )

    def _partitions(self, grid: Any, wanted: list[int]) -> dict[int, int]:
        """{partition id: node id}, querying nodes not seen before.

        The first call waits (up to startup_timeout_s) for every wanted partition: deployed nodes may
        still be connecting. Later calls query new nodes once and do not wait for missing ones. A node
        that does not answer its query is not asked again (it would cost every round a timeout).
        """
        from sparsyfed_lightning.federated import flower_app

        wait = not self._queried
        deadline = time.monotonic() + self.config.startup_timeout_s
        while True:
            nodes = set(self._nodes(grid))
            self._node_of_partition = {p: n for p, n in self._node_of_partition.items() if n in nodes}
            new = sorted(nodes - self._queried)
            if new:
                messages = [flower_app.query_message(node, self.config.startup_timeout_s) for node in new]
                replies = exchange(grid, messages, max(deadline - time.monotonic(), _POLL_S), self._alive)
                for node, message in zip(new, messages, strict=True):
                    self._queried.add(node)
                    reply = replies.get(message.metadata.message_id)
                    partition = flower_app.parse_query_reply(reply) if reply is not None else None
                    if partition is None:
                        log.warning("node %s reported no partition-id; it trains no client", node)
                    else:
                        self._node_of_partition[partition] = node
            served = all(cid in self._node_of_partition for cid in wanted)
            if served or not wait or time.monotonic() >= deadline:
                return self._node_of_partition
            time.sleep(1.0)  # nodes of a deployment may still be connecting


def _check_simulation_devices(config: FlowerConfig, trainer_kwargs: dict[str, Any], datamodule: Any) -> None:
    """Ray hides GPUs from actors that reserve none: fail before starting rather than in every client."""
    accelerator = str(trainer_kwargs.get("accelerator", "auto"))
    device = getattr(getattr(datamodule, "device", None), "type", "cpu")
    if config.num_gpus == 0 and (accelerator in ("gpu", "cuda") or device == "cuda"):
        raise ValueError(
            f"clients train on a GPU (trainer.accelerator={accelerator!r}, data.device={device!r}) but "
            "flower.num_gpus=0, so Ray gives the client processes no GPU; set flower.num_gpus > 0 (e.g. 1, "
            "or 0.5 for two clients per GPU)"
        )
