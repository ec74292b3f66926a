"""After a fit's first batch, no training step of any method makes the host wait for the device.

Every method trains two rounds through the real `FederatedTrainer` (three clients: two stacked, one
alone) on a model whose inputs are large enough for the compact activation storage. A `SyncWatch`
callback switches a `HostSyncRecorder` on for every batch but the first of each fit; nothing may be
recorded.
The CUDA variant runs the same fits under `torch.cuda.set_sync_debug_mode("error")` (`SyncWatch`).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from sparsyfed_lightning.client.sync_watch import SyncWatch
from sparsyfed_lightning.data.loaders import TensorBatchLoader
from sparsyfed_lightning.sparse import activations
from sparsyfed_lightning.sparse.host_sync import HostSyncRecorder


def _methods():
    from sparsyfed_lightning.methods import FLASH, Dense, SparsyFed, SparsyFedSpectral, TopK, ZeroFL

    return {
        "dense": lambda: Dense(),
        "topk": lambda: TopK(0.9),
        "flash": lambda: FLASH(0.9),
        "zerofl": lambda: ZeroFL(0.99),  # keeps 1%: the index layout of CompactTensor
        "sparsyfed": lambda: SparsyFed(0.9),
        "sparsyfed_per_step": lambda: SparsyFed(0.9, threshold="per_step"),
        "sparsyfed_beta_one": lambda: SparsyFed(0.9, beta=1.0),
        "sparsyfed_spectral": lambda: SparsyFedSpectral(0.9),
    }


PRUNES_ACTIVATIONS = {"zerofl", "sparsyfed", "sparsyfed_per_step", "sparsyfed_spectral"}


class ThreeClients:
    """Two clients of 48 samples (they stack) and one of 40, 1x32x32 inputs, batch 16.

    With small_cnn at width 16 the second conv's input has 16 x 16 x 32 x 32 = 2**18 entries per
    client: the compact storage; the third conv's (after the max-pool) is a dense pruned copy.
    """

    num_classes = 4
    num_clients = 3

    def __init__(self, device: str = "cpu") -> None:
        g = torch.Generator().manual_seed(0)
        self.inputs = [torch.randn(n, 1, 32, 32, generator=g).to(device) for n in (48, 48, 40)]
        self.labels = [torch.randint(0, 4, (n,), generator=g).to(device) for n in (48, 48, 40)]

    def setup(self, stage: str | None = None) -> None:
        pass

    def client_train_dataloader(self, cid: int, seed: int = 0) -> TensorBatchLoader:
        return TensorBatchLoader(self.inputs[cid], self.labels[cid], 16, shuffle=True, seed=seed)

    def test_dataloader(self) -> TensorBatchLoader:
        return TensorBatchLoader(self.inputs[0], self.labels[0], 64)


def _fit(method, device: str = "cpu", stack_clients: int = 2):  # noqa: ANN202
    from sparsyfed_lightning.client.module import ClientModule
    from sparsyfed_lightning.federated.trainer import FederatedTrainer

    model = ClientModule("small_cnn", 4, lr=0.05, backbone_kwargs={"width": 16})
    trainer = FederatedTrainer(method=method, rounds=2, clients_per_round=3, accelerator=device, devices=1,
                               progress="none", stack_clients=stack_clients, eval_every=10)
    trainer.fit(model, datamodule=ThreeClients("cuda" if device == "gpu" else "cpu"))
    return trainer


def _fit_watched(method, watcher: SyncWatch, device: str) -> list[int]:
    """Two rounds of `method` with `watcher` among the client callbacks; returns the stacked fit sizes."""
    method._callbacks = [*method.build_callbacks(), watcher]  # what client_callbacks() hands every fit
    return [m["stacked_clients"] for m in _fit(method, device).history[1:]]


@pytest.mark.parametrize("name", list(_methods()))
def test_training_steps_after_the_first_never_wait_for_the_device(name, monkeypatch):
    compact_copies = []
    original = activations.CompactTensor.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        compact_copies.append("indices" if self.indices is not None else "bitmap")

    monkeypatch.setattr(activations.CompactTensor, "__init__", spy)
    watcher = SyncWatch()
    stacked = _fit_watched(_methods()[name](), watcher, "cpu")
    assert stacked == [2, 2]  # each round had a stacked fit (and the third client alone)
    assert watcher.steps == 2 * 2 * 2  # 2 rounds x 2 fits x 2 batches after the first
    assert watcher.events == []
    if name in PRUNES_ACTIVATIONS:  # the compact storage was really exercised
        assert compact_copies and set(compact_copies) == {"indices" if name == "zerofl" else "bitmap"}


def test_the_recorder_catches_what_synchronises():
    x, rows = torch.randn(100), torch.tensor([1, 2])
    with HostSyncRecorder() as recorder:
        x[x > 0]
        torch.nonzero(x)
        x.masked_select(x > 1)
        float(x.sum())
        x.tolist()
        torch.unique(x)
        x[rows] = 0.0  # integer indices: fine
        torch.nonzero_static(x > 0, size=10)  # fixed size: fine
        x.index_put_((x > 2,), x[0])
        x[:2].add_(torch.tensor([1.0, 2.0]))  # host data: a copy to the device on a GPU
    assert recorder.events == [
        "aten.index.Tensor (boolean mask)",
        "aten.nonzero.default",
        "aten.masked_select.default",
        "aten._local_scalar_dense.default",
        "Tensor.tolist",
        "aten._unique2.default",
        "aten.index_put_.default (boolean mask)",
        "aten.lift_fresh.default (host data)",
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(_methods()))
def test_training_steps_after_the_first_never_synchronise_on_cuda(name):
    watcher = SyncWatch(record=False, cuda_sync_debug="error")  # raises at the first synchronisation
    assert _fit_watched(_methods()[name](), watcher, "gpu") == [2, 2]
    assert watcher.steps == 2 * 2 * 2


def test_sync_watch_catches_a_synchronising_step():
    """The watch itself can fail: a callback that reads the loss in every step is caught."""
    from sparsyfed_lightning.methods import Dense

    class ReadsTheLoss(L.Callback):
        def on_before_backward(self, trainer, pl_module, loss) -> None:  # noqa: ANN001
            float(loss.detach())

    method, watcher = Dense(), SyncWatch()
    method._callbacks = [ReadsTheLoss(), watcher]
    _fit(method)
    assert watcher.steps == 8 and watcher.events == ["aten._local_scalar_dense.default"] * 8


@pytest.mark.parametrize("stack_clients", [1, 2])
def test_compact_copies_that_overflow_are_counted_and_reported(stack_clients, monkeypatch):
    """With no headroom a frozen threshold soon keeps more than the expected count: the device
    counters, read once per fit, reach the round metrics, and a warning says what it means."""
    monkeypatch.setattr(activations, "CAPACITY_FLOOR", 0.0)
    from sparsyfed_lightning.client.callbacks import ActivationPruningCallback
    from sparsyfed_lightning.methods import SparsyFed

    method = SparsyFed(0.9)
    for callback in method.client_callbacks():
        if isinstance(callback, ActivationPruningCallback):
            callback.headroom = 1.0
    with pytest.warns(UserWarning, match="activation_overflows counts these copies"):
        trainer = _fit(method, stack_clients=stack_clients)
    first, second = (m["activation_overflows"] for m in trainer.history[1:])
    assert first == 0 and second > 0  # round 1 is dense; round 2 prunes
    default = _fit(SparsyFed(0.9), stack_clients=stack_clients)
    assert all(m["activation_overflows"] == 0 for m in default.history[1:])
