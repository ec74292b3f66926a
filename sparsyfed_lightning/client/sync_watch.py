"""`SyncWatch`: a callback that watches training steps for host-device synchronisations.

A client fit's first batch may synchronise (thresholds and capacities are selected there), the
steps after it must not (docs/PERFORMANCE.md). `SyncWatch` watches every training batch of a fit
but its first: on any device it records the operations `sparse.host_sync.HostSyncRecorder` finds,
and on CUDA it can also switch on `torch.cuda.set_sync_debug_mode` ("warn" counts the
synchronisations CUDA reports, "error" raises at the first). Used by the tests and the GPU benchmark;
add it to a method's client callbacks to check a new method.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning as L
import torch
from typing_extensions import override

from sparsyfed_lightning.sparse.host_sync import HostSyncRecorder

CudaSyncDebug = Literal["off", "warn", "error"]


class SyncWatch(L.Callback):
    """Watch the training steps after each fit's first.

    Args:
        record: record synchronising operations with a `HostSyncRecorder` (`events`).
        cuda_sync_debug: "warn" or "error" sets CUDA's sync debug mode for the watched steps
            (ignored without CUDA); with "warn", `cuda_syncs` counts the synchronisations.

    Attributes: `steps` (watched steps), `events` (recorded operation names), `cuda_syncs`.
    """

    def __init__(self, record: bool = True, cuda_sync_debug: CudaSyncDebug = "off") -> None:
        self.recorder = HostSyncRecorder() if record else None
        self.cuda_sync_debug = cuda_sync_debug if torch.cuda.is_available() else "off"
        self.steps = 0
        self.cuda_syncs = 0
        self._active = False
        self._caught: Any = None
        self._log: list[warnings.WarningMessage] = []

    @property
    def events(self) -> list[str]:
        return [] if self.recorder is None else self.recorder.events

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx < 1:
            return
        self.steps += 1
        if self.cuda_sync_debug != "off":
            torch.cuda.synchronize()  # what was queued before the step is not the step's
            if self.cuda_sync_debug == "warn":
                self._caught = warnings.catch_warnings(record=True)
                self._log = self._caught.__enter__()
                warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(self.cuda_sync_debug)
        if self.recorder is not None:
            self.recorder.__enter__()
        self._active = True

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop()  # e.g. the error of sync debug mode "error": leave no mode switched on

    def _stop(self) -> None:
        if not self._active:
            return
        self._active = False
        if self.recorder is not None:
            self.recorder.__exit__(None, None, None)
        if self.cuda_sync_debug != "off":
            torch.cuda.set_sync_debug_mode("default")
            if self._caught is not None:
                self._caught.__exit__(None, None, None)
                self.cuda_syncs += sum("synchroniz" in str(w.message) for w in self._log)
                self._caught = None
