"""Engines run the clients of a round. The in-process engine (the default) fits them one after the
other on one `ClientRunner`; the Flower engine (`engines_flower`) runs the same runner in ClientApps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from sparsyfed_lightning.data.loaders import batch_layout
from sparsyfed_lightning.federated.client_runner import ClientResult, ClientRunner
from sparsyfed_lightning.federated.codec import decode_state
from sparsyfed_lightning.federated.errors import SparsyFedError
from sparsyfed_lightning.federated.sampling import client_seed


class InProcessEngine:
    """Fit the sampled clients in this process, one after the other or several at once.

    Args:
        runner: the client runner (module + reused Trainer + method callbacks).
        datamodule: a `FederatedDataModule` (client loaders).
        seed: the run seed; each client's seed derives from (seed, round, client).
        stack_clients: fit up to this many clients with the same batch sizes as one stacked network
            (`ClientRunner.fit_stacked`); 1 fits every client alone.
        retry_alone: when a stacked fit raises, fit its clients again one at a time so that only the
            client that fails is a failure (the run accepts failures); otherwise every client of the
            group fails with the stacked fit's error.
        should_stop: called between client fits; when it returns True the round is abandoned with
            `RoundAbandoned` (a stop signal arrived).
    """

    name = "inprocess"

    def __init__(
        self,
        runner: ClientRunner,
        datamodule: Any,
        seed: int,
        stack_clients: int = 1,
        retry_alone: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.runner = runner
        self.datamodule = datamodule
        self.seed = seed
        self.stack_clients = stack_clients
        self.retry_alone = retry_alone
        self.should_stop = should_stop if should_stop is not None else (lambda: False)
        self.largest_fit = 0  # the most clients one fit of the last round trained together

    def fit_round(
        self,
        round_index: int,
        client_ids: list[int],
        downlink: bytes,
        lr: float,
        receive: Callable[[ClientResult], None],
    ) -> dict[int, str]:
        """Fit every client, hand each result to `receive`; return {client: error} for failures.

        Results reach `receive` in `client_ids` order whatever the grouping (so the aggregate sums in
        the same order either way), each as soon as every client before it is done.
        """
        received = decode_state(downlink)  # every client receives the same bytes: decode once
        failures: dict[int, str] = {}
        seeds = {cid: client_seed(self.seed, round_index, cid) for cid in client_ids}
        loaders: dict[int, Any] = {}
        for cid in client_ids:
            try:
                loaders[cid] = self.datamodule.client_train_dataloader(cid, seed=seeds[cid])
            except Exception as error:  # noqa: BLE001 - the accept-failures policy decides
                failures[cid] = _describe(error)
        pending: dict[int, ClientResult] = {}
        next_index = 0
        groups = self._groups(loaders)
        self.largest_fit = max(map(len, groups), default=0)
        for outcomes in self._fit_groups(round_index, groups, downlink, received, loaders, lr, seeds):
            for cid, outcome in outcomes.items():
                if isinstance(outcome, ClientResult):
                    pending[cid] = outcome
                else:
                    failures[cid] = outcome
            while next_index < len(client_ids) and (
                client_ids[next_index] in pending or client_ids[next_index] in failures
            ):
                if client_ids[next_index] in pending:
                    receive(pending.pop(client_ids[next_index]))
                next_index += 1
        return failures

    def _fit_groups(
        self, round_index: int, groups: list[list[int]], downlink: bytes, received: dict[str, Any],
        loaders: dict[int, Any], lr: float, seeds: dict[int, int],
    ) -> Iterator[dict[int, ClientResult | str]]:
        """Fit the groups; yield each group's outcomes as it finishes (here: one after the other)."""
        for group in groups:
            if self.should_stop():
                raise RoundAbandoned(f"round {round_index} abandoned before client {group[0]}")
            yield fit_client_group(self.runner, group, received, loaders, lr, seeds, self.retry_alone, self.should_stop)

    def _groups(self, loaders: dict[int, Any]) -> list[list[int]]:
        """Clients in groups of at most `stack_clients` with the same batch layout, in sampling order."""
        if self.stack_clients == 1:
            return [[cid] for cid in loaders]
        by_layout: dict[object, list[int]] = {}
        for cid, loader in loaders.items():
            layout = batch_layout(loader)
            by_layout.setdefault(cid if layout is None else layout, []).append(cid)
        groups = []
        for members in by_layout.values():
            groups += [members[i : i + self.stack_clients] for i in range(0, len(members), self.stack_clients)]
        return groups


def fit_client_group(
    runner: ClientRunner,
    group: list[int],
    received: dict[str, Any],
    loaders: dict[int, Any],
    lr: float,
    seeds: dict[int, int],
    retry_alone: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> dict[int, ClientResult | str]:
    """Fit one group of clients (stacked when it has several); each client's result or error message.

    A stacked fit that raises fails every client of the group, unless `retry_alone`: then its
    clients are fitted again one at a time, so only the one that fails is a failure (the others'
    results equal the stacked ones up to float rounding). A stacked client that diverges fails alone.
    """
    if len(group) == 1:
        cid = group[0]
        try:
            return {cid: runner.fit(cid, received, loaders[cid], lr, seeds[cid])}
        except Exception as error:  # noqa: BLE001 - the accept-failures policy decides
            return {cid: _describe(error)}
    try:
        group_loaders, group_seeds = [loaders[c] for c in group], [seeds[c] for c in group]
        fitted = runner.fit_stacked(group, received, group_loaders, lr, group_seeds)
    except Exception as error:  # noqa: BLE001 - a stacked fit fails for all of its clients
        if retry_alone:
            outcomes: dict[int, ClientResult | str] = {}
            for cid in group:
                if should_stop is not None and should_stop():
                    raise RoundAbandoned(f"round abandoned before client {cid}") from error
                outcomes.update(fit_client_group(runner, [cid], received, loaders, lr, seeds))
            return outcomes
        # e.g. out of memory: say how to train them one at a time
        message = (f"{_describe(error)} (in a fit of {len(group)} stacked clients; "
                   "trainer.stack_clients=1 fits them alone)")
        return dict.fromkeys(group, message)
    return {
        cid: outcome if isinstance(outcome, ClientResult) else _describe(outcome)
        for cid, outcome in zip(group, fitted, strict=True)
    }


class RoundAbandoned(Exception):
    """A round stopped before all of its clients were fitted (a stop signal arrived)."""


def _describe(error: BaseException) -> str:
    """A client failure as one line: the exception type and the first line of its message (this
    project's own errors are already phrased for the user and go without the type)."""
    text = str(error).strip().splitlines()
    if text and isinstance(error, SparsyFedError):
        return text[0]
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
