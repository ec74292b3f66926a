"""The client runner's lean training step (manual optimization) against Lightning's automatic loop."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from sparsyfed_lightning.client.module import ClientModule
from sparsyfed_lightning.data.loaders import TensorBatchLoader
from sparsyfed_lightning.federated.client_runner import ClientRunner, decode_result, state_on_cpu
from sparsyfed_lightning.methods import FLASH, Dense, SparsyFed, TopK, ZeroFL

METHODS = {
    "dense": Dense,
    "sparsyfed": lambda: SparsyFed(0.9),
    "topk": lambda: TopK(0.9),
    "zerofl": lambda: ZeroFL(0.9),
    "flash": lambda: FLASH(0.8),
}


def _loader(seed: int = 3) -> TensorBatchLoader:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(40, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 4, (40,), generator=generator)
    return TensorBatchLoader(inputs, labels, 8, shuffle=True, seed=seed)


def _runner(method, module_class=ClientModule, **trainer_kwargs) -> tuple[ClientRunner, dict[str, torch.Tensor]]:
    """A runner and the state a client of round 2 receives (round 1's update, pruned as the method prunes)."""
    module = module_class("small_cnn", 4, lr=0.1, backbone_kwargs={"width": 4})
    module.net = method.prepare_model(module.net)
    runner = ClientRunner(module, method, accelerator="cpu", devices=1, **trainer_kwargs)
    method.on_round_start(1)
    round_one = decode_result(runner.fit(0, state_on_cpu(module.net), _loader(1), 0.1, 1))
    method.on_round_start(2)
    return runner, round_one


class _ModeRecorder(L.Callback):
    """Records the module's optimization mode during each fit."""

    def __init__(self) -> None:
        self.automatic: list[bool] = []

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.automatic.append(pl_module.automatic_optimization)


def _fit_recording_mode(runner: ClientRunner, received: dict[str, torch.Tensor]) -> tuple[dict, bool]:
    """Fit client 1 from `received`; its update and whether Lightning's automatic loop ran."""
    recorder = _ModeRecorder()
    runner.trainer.callbacks.append(recorder)
    try:
        sent = decode_result(runner.fit(1, received, _loader(), 0.1, 5))
    finally:
        runner.trainer.callbacks.remove(recorder)
    assert runner.module.automatic_optimization is True  # restored after the fit
    return sent, recorder.automatic == [True]


def _update(runner: ClientRunner, received: dict[str, torch.Tensor], automatic: bool,
            monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    monkeypatch.setattr(runner, "_needs_automatic_optimization", lambda module: automatic)
    sent, ran_automatic = _fit_recording_mode(runner, received)
    assert ran_automatic is automatic
    return sent


@pytest.mark.parametrize("name", list(METHODS))
def test_the_lean_step_sends_exactly_the_automatic_loops_update(name, monkeypatch):
    runner, received = _runner(METHODS[name]())
    lean = _update(runner, received, False, monkeypatch)
    automatic = _update(runner, received, True, monkeypatch)
    assert any(not torch.equal(lean[k], received[k]) for k in received)  # it trained
    for key, value in automatic.items():
        assert torch.equal(lean[key], value), key


def test_the_lean_step_matches_the_automatic_loop_under_mixed_precision(monkeypatch):
    runner, received = _runner(SparsyFed(0.9), precision="bf16-mixed")
    lean = _update(runner, received, False, monkeypatch)
    automatic = _update(runner, received, True, monkeypatch)
    for key, value in automatic.items():
        assert torch.equal(lean[key], value), key


class _HookCounter(L.Callback):
    def __init__(self) -> None:
        self.calls = {"on_before_backward": 0, "on_after_backward": 0, "on_before_optimizer_step": 0}

    def on_before_backward(self, trainer, pl_module, loss) -> None:  # noqa: ANN001
        self.calls["on_before_backward"] += 1

    def on_after_backward(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.calls["on_after_backward"] += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        self.calls["on_before_optimizer_step"] += 1


def test_the_lean_step_runs_the_backward_and_optimizer_hooks_once_a_batch():
    runner, received = _runner(Dense())
    counter = _HookCounter()
    runner.trainer.callbacks.append(counter)
    _, ran_automatic = _fit_recording_mode(runner, received)
    assert not ran_automatic
    assert counter.calls == dict.fromkeys(counter.calls, len(_loader()))


def test_gradient_clipping_keeps_the_automatic_loop_and_clips():
    clipped_runner, received = _runner(Dense(), gradient_clip_val=1e-3)
    clipped, ran_automatic = _fit_recording_mode(clipped_runner, received)
    assert ran_automatic
    free_runner, _ = _runner(Dense())
    free, ran_automatic = _fit_recording_mode(free_runner, received)
    assert not ran_automatic
    weight = "0.weight"
    moved_clipped = (clipped[weight] - received[weight]).norm()
    moved_free = (free[weight] - received[weight]).norm()
    assert 0 < moved_clipped < moved_free / 10


def test_gradient_accumulation_keeps_the_automatic_loop():
    runner, received = _runner(Dense(), accumulate_grad_batches=2)
    _, ran_automatic = _fit_recording_mode(runner, received)
    assert ran_automatic


class _OwnStep(ClientModule):
    """A user's module with its own training step, written for Lightning's automatic loop."""

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y) * 0.5


def test_a_module_with_its_own_training_step_keeps_the_automatic_loop():
    runner, received = _runner(Dense(), module_class=_OwnStep)
    sent, ran_automatic = _fit_recording_mode(runner, received)
    assert ran_automatic
    assert not torch.equal(sent["0.weight"], received["0.weight"])  # its loop stepped the optimizer


class _OwnOptimizerStep(ClientModule):
    """A user's module that halves every gradient in its own `optimizer_step`."""

    calls = 0

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:  # noqa: ANN001
        _OwnOptimizerStep.calls += 1
        optimizer_closure()
        for parameter in self.net.parameters():
            parameter.grad.mul_(0.5)
        optimizer.step()


def test_a_module_with_its_own_optimizer_step_keeps_the_automatic_loop_and_its_step_runs():
    runner, received = _runner(Dense(), module_class=_OwnOptimizerStep)
    before = _OwnOptimizerStep.calls
    _, ran_automatic = _fit_recording_mode(runner, received)
    assert ran_automatic
    assert _OwnOptimizerStep.calls - before == len(_loader())
