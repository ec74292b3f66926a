"""Centralized sparse training: a method's client side in a plain `lightning.Trainer.fit` of any LightningModule."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from sparsyfed_lightning import SparseTraining, SparsyFed, TopK
from sparsyfed_lightning.sparse import magnitude_threshold, powerprop_of, prunable_layers, stored_weight

SPARSITY = 0.9


class TinyClassifier(L.LightningModule):
    """A user's own LightningModule: no `net` attribute, SGD with momentum (state across epochs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.hidden = nn.Linear(8 * 4 * 4, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.out(F.relu(self.hidden(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Probe(L.Callback):
    """Checks, inside the fit, what a user cannot see from outside: pruned weight gradients and frozen zeros."""

    def __init__(self) -> None:
        self.gradient_checks: list[bool] = []  # per checked step: matches the pruned-input gradient exactly
        self.regrown: list[int] = []  # per epoch: zero weights that became non-zero during training
        self._inputs: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module):
        def keep_input(module, args) -> None:
            self._inputs["hidden"] = args[0].detach().clone()

        def keep_grad(module, args, out) -> None:
            out.register_hook(lambda grad: self._grads.__setitem__("hidden", grad.detach()))

        pl_module.hidden.register_forward_pre_hook(keep_input)
        pl_module.hidden.register_forward_hook(keep_grad)

    def on_train_epoch_start(self, trainer, pl_module):
        self._zeros = [stored_weight(m).detach() == 0 for _, m in prunable_layers(pl_module)]

    def on_after_backward(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            return
        x, g = self._inputs["hidden"], self._grads["hidden"]
        v = stored_weight(pl_module.hidden)
        keep = (v != 0).float().mean().item()  # activations are pruned to the layer's weight density
        kept = torch.where(x.abs() >= magnitude_threshold(x, keep), x, 0)
        beta = powerprop_of(pl_module.hidden).exponent
        chain = beta * v.detach().abs().pow(beta - 1)
        pruned_grad, dense_grad = (g.T @ kept) * chain, (g.T @ x) * chain
        self.gradient_checks.append(
            torch.allclose(v.grad, pruned_grad, rtol=1e-5, atol=1e-7)
            and not torch.allclose(v.grad, dense_grad, rtol=1e-5, atol=1e-7)
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == trainer.num_training_batches:  # before SparseTraining prunes (it comes later)
            now = [stored_weight(m).detach() != 0 for _, m in prunable_layers(pl_module)]
            self.regrown.append(sum(int((z & n).sum()) for z, n in zip(self._zeros, now, strict=True)))


def _digits_loader() -> DataLoader:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    y = torch.tensor(digits.target)
    return DataLoader(TensorDataset(x[:512], y[:512]), batch_size=64, shuffle=True)


def _trainer(callbacks, epochs=3) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, callbacks=callbacks, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )


def test_sparsyfed_under_a_plain_trainer_prunes_powerprops_and_prunes_activations():
    torch.manual_seed(0)
    model, probe = TinyClassifier(), Probe()
    trainer = _trainer([probe, SparseTraining(SparsyFed(sparsity=SPARSITY))])
    trainer.fit(model, train_dataloaders=_digits_loader())

    layers = [m for _, m in prunable_layers(model)]
    assert len(layers) == 3 and all(powerprop_of(m) is not None and powerprop_of(m).exponent == 1.25 for m in layers)
    weights = [stored_weight(m) for m in layers]
    total = sum(w.numel() for w in weights)
    assert sum(int(torch.count_nonzero(w)) for w in weights) == total - round(SPARSITY * total)
    # Activation pruning was on from epoch 2 (epoch 1 trains densely, as round 1 of SparsyFed).
    assert len(probe.gradient_checks) == 2 * 8 and all(probe.gradient_checks)
    # Zeros stayed zero within every epoch although SGD has momentum: the pruned entries' state is cleared.
    assert probe.regrown[1:] == [0, 0]
    assert not model.conv._forward_pre_hooks and not model.conv._forward_hooks  # hooks are gone after the fit


def test_sparse_training_acts_on_net_when_the_module_has_one():
    class WithNet(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

        def forward(self, x):
            return self.net(x)

    model = WithNet()
    _trainer([SparseTraining(TopK(SPARSITY))], epochs=1).fit(model, train_dataloaders=_digits_loader())
    inside = [stored_weight(m) for _, m in prunable_layers(model.net)]
    total = sum(w.numel() for w in inside)
    assert sum(int(torch.count_nonzero(w)) for w in inside) == total - round(SPARSITY * total)
    assert torch.count_nonzero(model.hidden.weight) == model.hidden.weight.numel()  # outside `net`: untouched


def test_refused_layers_are_named_before_training():
    class WithAttention(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2)

    refused = "layer 'attention' .MultiheadAttention. cannot be trained by method sparsyfed"
    with pytest.raises(ValueError, match=refused):
        _trainer([SparseTraining(SparsyFed(SPARSITY))], epochs=1).fit(WithAttention(), _digits_loader())


def test_the_documented_recipe_runs_and_reaches_its_density(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(tmp_path)  # Lightning's default checkpoints/ folder goes here
    doc = (Path(__file__).resolve().parents[1] / "docs" / "LIGHTNING.md").read_text()
    section = doc.split("## Sparse training in a plain Lightning fit", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(snippet, "docs/LIGHTNING.md", "exec"), namespace)  # noqa: S102 - the doc's own code
    assert "SparseTraining(SparsyFed(sparsity=0.95))" in snippet and "net" not in vars(namespace["model"])
    assert abs(namespace["density"] - 0.05) < 1e-4
    assert all(powerprop_of(m) is not None for _, m in prunable_layers(namespace["model"]))
