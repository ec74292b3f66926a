"""Flower side of the Flower engine: the wire format, the ClientApp and the ServerApps.

Wire format (Flower 1.42 Message API). Model payloads are our codec's encodings carried verbatim as
one `uint8` `Array` (stype `CODEC_STYPE`) inside an `ArrayRecord`, so the bytes Flower moves are the
bytes the server counts, and Flower can chunk large payloads (its `ArrayRecord`s are split into 5 MB
chunks on gRPC; a bytes value in a `ConfigRecord` is not).

* `train` message: `downlink` (ArrayRecord) + `config` (ConfigRecord: round, cid, lr, seed, and
  `partition_routing`, which asks the node to refuse a cid other than its own `partition-id`).
* `train` reply: `uplink` (ArrayRecord) + `metrics` (MetricRecord: num_samples and the client's
  metrics) + `uplink_stats` (MetricRecord: the `MessageStats` fields) + `config` (cid); or, when the
  client raised, only `failure` (ConfigRecord: cid, error). An exception is turned into a reply
  rather than left to Flower so the error text is the same as the in-process engine's.
* `query` message: empty; reply `node` (ConfigRecord: partition-id, -1 when the node has none).

The ClientApp builds the client side (data module, `ClientModule`, method, `ClientRunner`) once per
process from a `ClientSpec` and reuses it for every message that process handles: Ray actors in a
simulation handle many messages, so a client fit costs what it costs in-process. (A deployed
SuperNode of Flower 1.42 starts one `flwr-clientapp` process per message, so there every fit pays
the imports and the set-up; see docs/FLOWER.md.)

Heavy imports (torch, Lightning) happen inside the handlers: a `query` needs none of them.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import TYPE_CHECKING

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from sparsyfed_lightning.federated.client_spec import ClientSpec, ClientWorker, constructor_kwargs

if TYPE_CHECKING:
    from sparsyfed_lightning.federated.client_runner import ClientResult

__all__ = ["ClientSpec", "ClientWorker", "constructor_kwargs", "make_client_app", "attach_grid"]

CODEC_STYPE = "sparsyfed_lightning.codec"
TRAIN = "train"
QUERY = "query"
PARTITION_ID = "partition-id"  # the node_config key Flower's simulation sets and deployments use

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# The client side of a ClientApp process (built once per run, see `client_spec.ClientWorker`)

_worker_lock = threading.Lock()
_worker: ClientWorker | None = None


def cached_worker(spec: ClientSpec) -> ClientWorker:
    """This process's worker for `spec` (one at a time: a new run's key replaces the old worker)."""
    global _worker
    with _worker_lock:
        if _worker is None or _worker.spec.key != spec.key:
            _worker = None  # free the previous run's model and data before building the next
            _worker = ClientWorker(spec)
        return _worker


# ----------------------------------------------------------------------------------------------
# Wire format


def _payload_record(payload: bytes) -> ArrayRecord:
    return ArrayRecord({"payload": Array("uint8", (len(payload),), CODEC_STYPE, bytes(payload))})


def _payload_of(record: ArrayRecord) -> bytes:
    array = record["payload"]
    if array.stype != CODEC_STYPE:
        raise ValueError(f"expected a {CODEC_STYPE} payload, got stype {array.stype!r}")
    return array.data


def train_message(
    node_id: int, round_index: int, cid: int, downlink: bytes, lr: float, seed: int,
    partition_routing: bool, ttl: float,
) -> Message:
    """The instruction that trains client `cid` on node `node_id`."""
    config = ConfigRecord(
        {"round": round_index, "cid": cid, "lr": float(lr), "seed": seed, "partition_routing": partition_routing}
    )
    content = RecordDict({"downlink": _payload_record(downlink), "config": config})
    return Message(content, dst_node_id=node_id, message_type=TRAIN, ttl=ttl, group_id=str(round_index))


def query_message(node_id: int, ttl: float) -> Message:
    """Asks a node which partition (client id) it serves."""
    return Message(RecordDict({}), dst_node_id=node_id, message_type=QUERY, ttl=ttl)


def result_content(result: ClientResult) -> RecordDict:
    """A client's result as reply content."""
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return RecordDict(
        {
            "uplink": _payload_record(result.payload),
            "metrics": MetricRecord({"num_samples": int(result.num_samples), **metrics}),
            "uplink_stats": MetricRecord({f.name: int(getattr(result.uplink, f.name)) for f in fields(result.uplink)}),
            "config": ConfigRecord({"cid": int(result.cid)}),
        }
    )


def failure_content(cid: int, error: str) -> RecordDict:
    """Reply content of a client that raised."""
    return RecordDict({"failure": ConfigRecord({"cid": int(cid), "error": error})})


def parse_train_reply(reply: Message, cid: int) -> ClientResult | str:
    """The `ClientResult` a reply carries, or the failure text (Flower error, client error, bad reply)."""
    from sparsyfed_lightning.federated.client_runner import ClientResult
    from sparsyfed_lightning.federated.codec import MessageStats

    if reply.has_error():
        return f"Flower error {reply.error.code}: {reply.error.reason}"
    content = reply.content
    if "failure" in content.config_records:
        return str(content.config_records["failure"]["error"])
    try:
        echoed = int(content.config_records["config"]["cid"])
        if echoed != cid:
            return f"reply for client {echoed} arrived for client {cid}"
        metrics = dict(content.metric_records["metrics"])
        num_samples = int(metrics.pop("num_samples"))
        stats = MessageStats(**{k: int(v) for k, v in content.metric_records["uplink_stats"].items()})
        payload = _payload_of(content.array_records["uplink"])
    except (KeyError, TypeError, ValueError) as error:
        return f"malformed reply: {type(error).__name__}: {error}"
    return ClientResult(cid, num_samples, payload, stats, metrics)


def parse_query_reply(reply: Message) -> int | None:
    """The partition id a node reported (None: error or no partition)."""
    if reply.has_error() or "node" not in reply.content.config_records:
        return None
    partition = int(reply.content.config_records["node"][PARTITION_ID])
    return partition if partition >= 0 else None


# ----------------------------------------------------------------------------------------------
# ClientApp


def handle_train(message: Message, context: Context, spec_fn: Callable[[Context], ClientSpec]) -> Message:
    """Train the client a `train` message names; any exception becomes a `failure` reply."""
    cid = -1
    try:
        config = message.content.config_records["config"]
        cid = int(config["cid"])
        if bool(config["partition_routing"]):
            own = context.node_config.get(PARTITION_ID)
            if own is None or int(own) != cid:
                raise ValueError(f"this node serves partition-id {own!r}, not client {cid}")
        worker = cached_worker(spec_fn(context))
        downlink = _payload_of(message.content.array_records["downlink"])
        result = worker.fit(int(config["round"]), cid, downlink, float(config["lr"]), int(config["seed"]))
        content = result_content(result)
    except Exception as error:  # noqa: BLE001 - reported to the server, whose accept-failures policy decides
        log.exception("client %s failed", cid)
        content = failure_content(cid, f"{type(error).__name__}: {error}")
    return Message(content, reply_to=message)


def handle_query(message: Message, context: Context) -> Message:
    """Report this node's partition id (the client id it trains under partition routing)."""
    partition = context.node_config.get(PARTITION_ID)
    node = ConfigRecord({PARTITION_ID: int(partition) if partition is not None else -1})
    return Message(RecordDict({"node": node}), reply_to=message)


def make_client_app(spec_fn: Callable[[Context], ClientSpec]) -> ClientApp:
    """A ClientApp that trains with the client side `spec_fn(context)` describes.

    In a simulation `spec_fn` returns the spec captured from the running `FederatedTrainer`; in a
    deployment it builds the spec from the run config (see `examples/flower_app`).
    """
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle_train(message, context, spec_fn)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return handle_query(message, context)

    return app


class FixedSpec:
    """`spec_fn` of a simulation: the same spec for every context (picklable, unlike a lambda's cell)."""

    def __init__(self, spec: ClientSpec) -> None:
        self.spec = spec

    def __call__(self, context: Context) -> ClientSpec:
        return self.spec


# ----------------------------------------------------------------------------------------------
# ServerApps

_attached_grid: contextvars.ContextVar[Grid | None] = contextvars.ContextVar("sparsyfed_flower_grid", default=None)


@contextmanager
def attach_grid(grid: Grid) -> Iterator[Grid]:
    """Inside a ServerApp: `FederatedTrainer(engine="flower").fit(...)` sends through `grid`.

    Without an attached grid the Flower engine starts its own simulation.
    """
    token = _attached_grid.set(grid)
    try:
        yield grid
    finally:
        _attached_grid.reset(token)


def attached_grid() -> Grid | None:
    """The grid of the enclosing `attach_grid`, if any."""
    return _attached_grid.get()


def make_bridge_server_app(handover: Callable[[Grid], None], stop: threading.Event) -> ServerApp:
    """The simulation's ServerApp: hands its grid to the engine, then lives until `stop` is set.

    The round loop stays in `FederatedTrainer.fit` on the caller's thread; this app only keeps the
    simulation alive. It also ends when the main thread ends, so an engine that was never closed
    cannot keep the interpreter from exiting (Flower's simulation threads are not daemons).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        handover(grid)
        while not stop.wait(1.0):
            if not threading.main_thread().is_alive():
                break

    return app
