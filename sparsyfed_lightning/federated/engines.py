"""Engines run the clients of a round. The in-process engine (the default) fits them one after the
other on one `ClientRunner`; the Flower engine (`engines_flower`) runs the same runner in ClientApps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparsyfed_lightning.federated.client_runner import ClientResult, ClientRunner
from sparsyfed_lightning.federated.codec import decode_state
from sparsyfed_lightning.federated.sampling import client_seed


class InProcessEngine:
    """Fit the sampled clients sequentially in this process.

    Args:
        runner: the client runner (module + reused Trainer + method callbacks).
        datamodule: a `FederatedDataModule` (client loaders).
        seed: the run seed; each client's seed derives from (seed, round, client).
    """

    name = "inprocess"

    def __init__(self, runner: ClientRunner, datamodule: Any, seed: int) -> None:
        self.runner = runner
        self.datamodule = datamodule
        self.seed = seed

    def fit_round(
        self,
        round_index: int,
        client_ids: list[int],
        downlink: bytes,
        lr: float,
        receive: Callable[[ClientResult], None],
    ) -> dict[int, str]:
        """Fit every client, hand each result to `receive`; return {client: error} for failures."""
        received = decode_state(downlink)  # every client receives the same bytes: decode once
        failures: dict[int, str] = {}
        for cid in client_ids:
            seed = client_seed(self.seed, round_index, cid)
            try:
                loader = self.datamodule.client_train_dataloader(cid, seed=seed)
                result = self.runner.fit(cid, received, loader, lr, seed)
            except Exception as error:  # noqa: BLE001 - the accept-failures policy decides
                failures[cid] = f"{type(error).__name__}: {error}"
                continue
            receive(result)
        return failures
