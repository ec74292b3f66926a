"""`FederatedServer`: the server side of a round, shared by every engine.

Per round: `begin_round` encodes the downlink message; each client's uplink message is decoded and
folded into a streaming sample-weighted average (`receive`); `end_round` applies the method's server
rule and the server optimizer and computes the round's model metrics (density, IoU, regrowth,
bytes). Evaluation is the orchestrator's job. `state_dict`/`load_state_dict` cover everything a
resumed run needs.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsyfed_lightning.federated.client_runner import ClientResult, decode_result, first_non_finite
from sparsyfed_lightning.federated.codec import MessageStats, encode_state_with_stats
from sparsyfed_lightning.federated.errors import NonFiniteError
from sparsyfed_lightning.methods.base import Method
from sparsyfed_lightning.server.aggregation import WeightedAverage
from sparsyfed_lightning.server.optimizers import ServerOptimizer
from sparsyfed_lightning.sparse.masks import (
    density,
    density_gain,
    mask_iou,
    nonzero_masks,
    pack_masks,
    packed_mask_iou,
    per_tensor_density,
    unpack_masks,
)

_REGROWTH_KEYS = (
    "after_training_activated",
    "after_training_deactivated",
    "after_pruning_activated",
    "after_pruning_deactivated",
)


class FederatedServer:
    """Global model, method server rule, server optimizer and round metrics.

    Args:
        global_state: the initial global state (CPU tensors).
        prunable_keys: state keys of the conv/linear stored weights (density and IoU are over these).
        method: the federated method.
        optimizer: the server optimizer.
        iou_lag: rounds between the pooled lagged-IoU snapshots (SPEC 9.3: 11).
        buffer_keys: state keys of the module buffers (BatchNorm running statistics).
        optimizer_on_buffers: let the server optimizer step the buffers too (the authors' FedAdam
            does, SPEC 7.1); False sets them to the plain sample-weighted average, which keeps
            momentum-style optimizers from pushing a running variance below zero.
    """

    def __init__(
        self,
        global_state: dict[str, torch.Tensor],
        prunable_keys: list[str],
        method: Method,
        optimizer: ServerOptimizer,
        iou_lag: int = 11,
        buffer_keys: list[str] | None = None,
        optimizer_on_buffers: bool = True,
    ) -> None:
        self.global_state = global_state
        self.buffer_keys = set(buffer_keys or [])
        self.optimizer_on_buffers = optimizer_on_buffers
        self.prunable_keys = prunable_keys
        self.method = method
        self.optimizer = optimizer
        self.iou_lag = iou_lag
        self.round = 0
        self.cumulative = {"uplink_bytes": 0, "downlink_bytes": 0, "dense_bytes": 0}
        # Masks of the current global model's conv/linear weights, kept up to date by model_metrics;
        # they are the "previous round" of the next round's IoU.
        self._global_masks = nonzero_masks({k: global_state[k] for k in prunable_keys})
        self._lagged_snapshot = pack_masks(self._global_masks)
        self._aggregate: WeightedAverage | None = None
        self._round_metrics: dict[str, float] = {}
        self._downlink: tuple[bytes, MessageStats] | None = None

    def current_masks(self) -> dict[str, torch.Tensor]:
        """Non-zero masks of the global model's conv/linear weights (computed once per round)."""
        return self._global_masks

    def begin_round(self, round_index: int) -> bytes:
        """Start round `round_index` (1-based); returns the downlink message."""
        self.round = round_index
        self.method.on_round_start(round_index)
        self._aggregate = WeightedAverage()
        self._round_metrics = {k: 0.0 for k in ("train_loss", *_REGROWTH_KEYS)}
        self._round_metrics.update(uplink_bytes=0, clients_ok=0, activation_overflows=0)
        self._downlink = encode_state_with_stats(self.global_state)
        return self._downlink[0]

    def receive(self, result: ClientResult) -> None:
        """Fold one client's result into the round (decoded from its message)."""
        assert self._aggregate is not None, "receive() before begin_round()"
        state = decode_result(result)
        self.method.observe_client(self.round, state, result.num_samples)
        self._aggregate.add(state, result.num_samples)
        metrics = self._round_metrics
        for key in ("train_loss", *_REGROWTH_KEYS):
            metrics[key] += result.num_samples * float(result.metrics.get(key, 0.0))
        metrics["uplink_bytes"] += result.uplink.encoded_bytes
        metrics["clients_ok"] += 1
        metrics["activation_overflows"] += int(result.metrics.get("activation_overflows", 0))

    def end_round(self) -> dict[str, Any]:
        """Aggregate, apply the method rule and the server optimizer; return the round's metrics."""
        assert self._aggregate is not None and self._downlink is not None
        if self._aggregate.count == 0:
            raise RuntimeError(f"round {self.round}: no client result to aggregate")
        total = self._aggregate.total_weight
        aggregate = self.method.server_update(self.round, self._aggregate.result())
        new_state = self._optimizer_step(aggregate)
        bad = first_non_finite(new_state)
        if bad is not None:  # never adopt it: the previous global model stays the last good one
            where = "after aggregation" if first_non_finite(aggregate) == bad else "after the server optimizer step"
            raise NonFiniteError(
                f"round {self.round}: the global model has non-finite values (NaN/Inf) in {bad} {where} "
                f"({type(self.optimizer).__name__})"
            )
        self.global_state = new_state
        self._aggregate = None

        metrics: dict[str, Any] = dict(self._round_metrics)
        for key in ("train_loss", *_REGROWTH_KEYS):
            metrics[key] /= total  # client-weighted averages
        downlink_stats = self._downlink[1]
        clients = int(metrics["clients_ok"])
        metrics["downlink_bytes"] = downlink_stats.encoded_bytes * clients
        dense_message = downlink_stats.dense_fp32_bytes
        metrics["uplink_ratio_to_dense"] = metrics["uplink_bytes"] / (dense_message * clients)
        metrics["downlink_ratio_to_dense"] = downlink_stats.encoded_bytes / dense_message
        self.cumulative["uplink_bytes"] += metrics["uplink_bytes"]
        self.cumulative["downlink_bytes"] += metrics["downlink_bytes"]
        self.cumulative["dense_bytes"] += 2 * dense_message * clients
        metrics["cumulative_uplink_bytes"] = self.cumulative["uplink_bytes"]
        metrics["cumulative_downlink_bytes"] = self.cumulative["downlink_bytes"]
        metrics["cumulative_ratio_to_dense"] = (
            self.cumulative["uplink_bytes"] + self.cumulative["downlink_bytes"]
        ) / self.cumulative["dense_bytes"]
        metrics.update(self.model_metrics())
        return metrics

    def _optimizer_step(self, aggregate: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.optimizer_on_buffers or not self.buffer_keys:
            return self.optimizer.step(self.global_state, aggregate)
        stepped = [k for k in aggregate if k not in self.buffer_keys]
        new = self.optimizer.step(
            {k: self.global_state[k] for k in stepped}, {k: aggregate[k] for k in stepped}
        )
        return {k: new[k] if k in new else aggregate[k] for k in aggregate}

    def model_metrics(self) -> dict[str, Any]:
        """Density, density gain and mask IoU of the current global model.

        `collapsed_layers` lists the stored weights (state keys) that global magnitude pruning
        emptied: a layer with no weight left passes nothing on, whatever the headline density says.
        """
        weights = {k: self.global_state[k] for k in self.prunable_keys}
        masks = nonzero_masks(weights)
        params = {k: v for k, v in self.global_state.items() if v.is_floating_point() and "running" not in k}
        metrics: dict[str, Any] = {
            "density": density(weights),
            "density_all_params": density(params),
            "layer_density": per_tensor_density(weights),
            "mask_iou_previous": mask_iou(masks, self._global_masks),
        }
        metrics["collapsed_layers"] = [key for key, value in metrics["layer_density"].items() if value == 0.0]
        metrics["density_gain"] = density_gain(metrics["density"], 1.0 - self.method.sparsity)
        self._global_masks = masks
        if self.iou_lag > 0 and self.round % self.iou_lag == 0:
            snapshot = pack_masks(masks)
            metrics["mask_iou_lagged"] = packed_mask_iou(snapshot, self._lagged_snapshot)
            self._lagged_snapshot = snapshot
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "global_state": self.global_state,
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "cumulative": dict(self.cumulative),
            "previous_masks": pack_masks(self._global_masks),
            "lagged_snapshot": self._lagged_snapshot,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        self.global_state = state["global_state"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        self.cumulative = dict(state["cumulative"])
        self._global_masks = unpack_masks(state["previous_masks"])
        self._lagged_snapshot = state["lagged_snapshot"]
