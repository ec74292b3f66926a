"""The authors' layer walk on ResNet-18 (SPEC 3.2, quirk 24): plain 1x1 downsample convs.

The reference here is SPEC's description of the authors' helper, written out: it replaces the
conv/linear layers it finds through `dir(module)` and recurses into every child, and
`nn.Module.__dir__` hides child names that start with a digit. The structure is checked on the
two ResNet-18 builders; what the methods do with the plain layers is checked on a small network
built from the same torchvision block and marked the same way (a ResNet-18 step takes a second).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from sparsyfed_lightning.client.callbacks import ActivationPruningCallback, EndOfFitPruning, WeightTopKCallback
from sparsyfed_lightning.client.module import ClientModule
from sparsyfed_lightning.data.loaders import TensorBatchLoader
from sparsyfed_lightning.federated.client_runner import ClientRunner, decode_result, state_on_cpu
from sparsyfed_lightning.methods import SparsyFed, SparsyFedSpectral, ZeroFL
from sparsyfed_lightning.models import MODELS, build_model
from sparsyfed_lightning.sparse import AUTHORS_LAYER_WALK, global_magnitude_prune, powerprop_of, prunable_weights

DOWNSAMPLE = ["layer1.0.downsample.0", "layer2.0.downsample.0"]  # of `tiny_resnet`


def reached_by_authors_walk(module: nn.Module, prefix: str = "") -> set[str]:
    """Names of the conv/linear layers the authors' helper replaces (SPEC 3.2)."""
    found = set()
    for attribute in dir(module):
        value = getattr(module, attribute, None)
        if isinstance(value, nn.Conv1d | nn.Conv2d | nn.Linear):
            found.add(prefix + attribute)
    for name, child in module.named_children():
        found |= reached_by_authors_walk(child, f"{prefix}{name}.")
    return found


def all_layers(net: nn.Module) -> set[str]:
    return {name for name, m in net.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear)}


def powerprop_layers(net: nn.Module) -> set[str]:
    return {name for name, m in net.named_modules() if powerprop_of(m) is not None}


def plain_resnet(backbone: str = "resnet18_cifar", **kwargs) -> nn.Module:
    """The registered builder without the (slow) initialisation: the structure is what matters here."""
    return MODELS[backbone](num_classes=10, **kwargs)


@pytest.mark.parametrize("backbone", ["resnet18_cifar", "resnet18_speech"])
def test_sparsyfed_wraps_what_the_authors_walk_reaches(backbone):
    reference = reached_by_authors_walk(plain_resnet(backbone))
    plain = all_layers(plain_resnet(backbone)) - reference
    assert len(plain) == 3 and all(name.endswith("downsample.0") for name in plain)
    assert powerprop_layers(SparsyFed().prepare_model(plain_resnet(backbone))) == reference
    assert powerprop_layers(SparsyFedSpectral().prepare_model(plain_resnet(backbone))) == reference
    every = all_layers(plain_resnet(backbone))
    assert powerprop_layers(SparsyFed(wrap_downsample=True).prepare_model(plain_resnet(backbone))) == every
    assert powerprop_layers(SparsyFedSpectral(wrap_downsample=True).prepare_model(plain_resnet(backbone))) == every


def test_custom_backbones_are_wrapped_whole():
    # The authors' walk would wrap nothing in a model built as one nn.Sequential; ours are not theirs.
    net = build_model("small_cnn", 10)
    assert reached_by_authors_walk(net) == set()
    assert powerprop_layers(SparsyFed().prepare_model(net)) == all_layers(build_model("small_cnn", 10))


@pytest.mark.parametrize("value", [1, "no", None])
@pytest.mark.parametrize("method", [SparsyFed, SparsyFedSpectral, ZeroFL])
def test_wrap_downsample_must_be_a_bool(method, value):
    with pytest.raises(ValueError, match=rf"^method.wrap_downsample must be true or false, got {value!r}$"):
        method(wrap_downsample=value)


def tiny_resnet(num_classes: int, width: int = 4) -> nn.Module:
    """Stem, two torchvision BasicBlocks with 1x1 downsample convs, pooling, classifier; marked as
    a backbone of the authors' layer walk, as the ResNet-18 builders mark theirs."""

    def layer(cin: int, cout: int) -> nn.Sequential:
        downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))
        return nn.Sequential(BasicBlock(cin, cout, stride=2, downsample=downsample))

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU()
            self.layer1 = layer(width, 2 * width)
            self.layer2 = layer(2 * width, 4 * width)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4 * width, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
            return self.fc(torch.flatten(self.pool(x), 1))

    net = Tiny()
    setattr(net, AUTHORS_LAYER_WALK, True)
    return net


def test_tiny_resnet_is_walked_like_resnet18():
    net = tiny_resnet(10)
    assert all_layers(net) - reached_by_authors_walk(net) == set(DOWNSAMPLE)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(MODELS, "tiny_resnet", tiny_resnet)
    return lambda: ClientModule("tiny_resnet", 10, lr=0.05)


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _client_fit(method, global_sparsity: float, module: ClientModule, monkeypatch) -> dict[str, dict]:
    """One client fit (3 steps of 4 samples): received, trained (before the end-of-fit pruning)
    and sent states."""
    module.net = method.prepare_model(module.net)
    if global_sparsity:
        global_magnitude_prune(prunable_weights(module.net).values(), global_sparsity)
    received = state_on_cpu(module.net)
    trained: dict[str, torch.Tensor] = {}
    original = EndOfFitPruning.on_fit_end

    def capture(self, trainer, pl_module):
        trained.update(state_on_cpu(pl_module.net))
        original(self, trainer, pl_module)

    monkeypatch.setattr(EndOfFitPruning, "on_fit_end", capture)
    method.on_round_start(2 if global_sparsity else 1)
    runner = ClientRunner(module, method, accelerator="cpu")
    x, y = _images(12, 0)
    result = runner.fit(0, received, TensorBatchLoader(x, y, 4, shuffle=True, seed=0), lr=0.05, seed=0)
    return {"received": received, "trained": trained, "sent": decode_result(result)}


def _pruned_layers(method) -> set[str]:
    callback = next(c for c in method.client_callbacks() if isinstance(c, ActivationPruningCallback))
    return set(callback.pruning.layers)


def _stored(state: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    key = f"{layer}.parametrizations.weight.original"
    return state[key] if key in state else state[f"{layer}.weight"]


def test_sparsyfed_downsample_convs_regrow_are_not_activation_pruned_and_rank_by_w(tiny, monkeypatch):
    method = SparsyFed(0.8)
    run = _client_fit(method, 0.8, tiny(), monkeypatch)
    received, trained, sent = run["received"], run["trained"], run["sent"]
    layers = sorted(all_layers(tiny_resnet(10)))
    # Zeros of the plain convs receive gradients (they regrow); Powerprop zeros stay zero.
    for layer in layers:
        regrown = int(((_stored(received, layer) == 0) & (_stored(trained, layer) != 0)).sum())
        assert (regrown > 0) == (layer in DOWNSAMPLE), layer
    assert _pruned_layers(method) == reached_by_authors_walk(tiny_resnet(10))
    # End-of-fit pruning: round(0.8 * N) smallest of |w| (plain) and |v| (wrapped), ranked together.
    magnitudes = np.concatenate([_stored(trained, layer).abs().reshape(-1).numpy() for layer in layers])
    n_prune = round(0.8 * magnitudes.size)
    expected = np.ones(magnitudes.size, dtype=bool)
    expected[np.argsort(magnitudes, kind="stable")[:n_prune]] = False
    got = np.concatenate([(_stored(sent, layer) != 0).reshape(-1).numpy() for layer in layers])
    assert np.array_equal(got, expected)


def test_sparsyfed_wrap_downsample_wraps_and_freezes_them_too(tiny, monkeypatch):
    method = SparsyFed(0.8, wrap_downsample=True)
    run = _client_fit(method, 0.8, tiny(), monkeypatch)
    for layer in DOWNSAMPLE:
        assert (_stored(run["received"], layer) == 0).any()
        assert not torch.any((_stored(run["received"], layer) == 0) & (_stored(run["trained"], layer) != 0))
    assert _pruned_layers(method) == all_layers(tiny_resnet(10))


@pytest.mark.parametrize("wrap_downsample", [False, True])
def test_zerofl_downsample_convs_train_without_swat_and_are_pruned_at_the_end(wrap_downsample, tiny, monkeypatch):
    densities: dict[str, list[float]] = {name: [] for name in DOWNSAMPLE}

    def on_before_backward(self, trainer, pl_module, loss):  # after the forward's weight Top-K
        modules = dict(pl_module.net.named_modules())
        for name in DOWNSAMPLE:
            densities[name].append(float((modules[name].weight != 0).float().mean()))

    monkeypatch.setattr(WeightTopKCallback, "on_before_backward", on_before_backward, raising=False)
    method = ZeroFL(0.75, wrap_downsample=wrap_downsample)
    run = _client_fit(method, 0.0, tiny(), monkeypatch)  # round 1: a dense global model
    for name in DOWNSAMPLE:
        assert len(densities[name]) == 3
        if wrap_downsample:
            assert densities[name][0] == pytest.approx(0.25, abs=0.01)  # SWAT's layer-wise Top-K
        else:
            assert min(densities[name]) == 1.0  # no weight Top-K in training
        assert (run["sent"][f"{name}.weight"] == 0).any()  # pruned at the end of the fit either way
    expected = all_layers(tiny_resnet(10)) - {"conv1"}  # ZeroFL's dense stem
    if not wrap_downsample:
        expected -= set(DOWNSAMPLE)
    assert _pruned_layers(method) == expected


def test_stacked_clients_keep_the_downsample_convs_plain(tiny):
    """Stacked clients train as they do alone, with the same plain layers (stacking copies the mark)."""
    module = tiny()
    method = SparsyFed(0.8)
    module.net = method.prepare_model(module.net)
    global_magnitude_prune(prunable_weights(module.net).values(), 0.8)
    received = state_on_cpu(module.net)
    method.on_round_start(2)
    runner = ClientRunner(module, method, accelerator="cpu")

    def loaders() -> list[TensorBatchLoader]:  # fresh ones: a loader's shuffle advances per epoch
        return [TensorBatchLoader(*_images(12, i), 4, shuffle=True, seed=i) for i in range(3)]

    alone = [decode_result(runner.fit(i, received, loader, 0.05, 10 + i)) for i, loader in enumerate(loaders())]
    stacked = [decode_result(r) for r in runner.fit_stacked([0, 1, 2], received, loaders(), 0.05, [10, 11, 12])]
    assert powerprop_layers(runner._stacked[3][0].net) == reached_by_authors_walk(tiny_resnet(10))
    for single, together in zip(alone, stacked, strict=True):
        for key, value in single.items():
            torch.testing.assert_close(together[key], value, rtol=1e-3, atol=1e-5, msg=key)
            assert torch.equal(together[key] != 0, value != 0), key
