"""Your own model: backbones by import path or class_path, the linear-only ViT, layer checks, stacking checks."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sparsyfed_lightning.client.module import ClientModule
from sparsyfed_lightning.federated.trainer import FederatedTrainer
from sparsyfed_lightning.methods import FLASH, Dense, SparsyFed, SparsyFedSpectral, TopK, ZeroFL
from sparsyfed_lightning.models import build_model
from sparsyfed_lightning.models.init import TRUNCATED_STD
from sparsyfed_lightning.models.stacked import stacking_mismatch
from sparsyfed_lightning.sparse import (
    ActivationPruning,
    global_magnitude_prune,
    magnitude_threshold,
    powerprop_of,
    prunable_layers,
    prunable_weights,
    stored_weight,
)

TINY_VIT = {"class_path": "vit", "init_args": {"dim": 16, "depth": 1, "heads": 2}}
# A torchvision model through the class_path form: RGB stem (rebuilt for 1-channel digits), Hardswish,
# squeeze-excitation blocks and dropout (layers client stacking refuses, so clients train one at a time).
SMALL_MOBILENET = {"class_path": "torchvision.models.mobilenet_v3_small", "init_args": {"width_mult": 0.25}}
METHODS = {
    "dense": Dense,
    "topk": lambda: TopK(0.8),
    "zerofl": lambda: ZeroFL(0.8),
    "flash": lambda: FLASH(0.8),
    "sparsyfed": lambda: SparsyFed(0.8),
    "sparsyfed_spectral": lambda: SparsyFedSpectral(0.8),
}


class SmallNet(nn.Module):
    """A user's own CNN, imported by path in the tests below."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class ChannelMixingNet(SmallNet):
    """Built from stackable layers only, but its forward normalises over channels: stacking would mix clients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.bn(self.conv(x)))
        return self.fc(F.softmax(features, dim=1).mean(dim=(2, 3)))


def _fit(backbone, method, digits_module, **trainer_kwargs) -> FederatedTrainer:
    model = ClientModule(backbone, digits_module.num_classes, in_channels=1, lr=0.05)
    trainer = FederatedTrainer(method=method, rounds=1, accelerator="cpu", progress="none", **trainer_kwargs)
    trainer.fit(model, datamodule=digits_module)
    return trainer


# -- building backbones -----------------------------------------------------------------------------------
def test_registry_name_import_path_class_path_and_class_build_the_same_network():
    by_name = build_model("small_cnn", 10, in_channels=1, seed=3, width=4)
    by_path = build_model("sparsyfed_lightning.models.small.small_cnn", 10, in_channels=1, seed=3, width=4)
    by_spec = build_model({"class_path": "small_cnn", "init_args": {"width": 4}}, 10, in_channels=1, seed=3)
    for other in (by_path, by_spec):
        expected, got = by_name.state_dict(), other.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    by_class = build_model(SmallNet, 7, in_channels=2, seed=0)
    assert by_class.conv.in_channels == 2 and by_class.fc.out_features == 7


def test_torchvision_model_by_import_path_gets_num_classes_a_rebuilt_stem_and_the_authors_init():
    model = build_model("torchvision.models.resnet18", 5, in_channels=1, seed=0)
    assert model.fc.out_features == 5  # num_classes goes through resnet18(**kwargs)
    stem = model.conv1
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (1, 64, (7, 7), (2, 2))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    weight = model.layer2[0].conv1.weight
    std = math.sqrt(1.0 / weight[0].numel()) / TRUNCATED_STD
    assert weight.abs().max() <= 2 * std and torch.all(model.fc.bias == 0)  # truncated normal, zero biases
    rgb = build_model("torchvision.models.resnet18", 5, seed=0)  # in_channels None: the backbone's default
    assert rgb.conv1.in_channels == 3


def test_client_module_hparams_stay_picklable_and_rebuild_the_same_model():
    module = ClientModule(SmallNet, 4, in_channels=1)  # a class from Python is kept as its import path
    assert module.hparams["backbone"] == f"{__name__}.SmallNet"
    rebuilt = ClientModule(**pickle.loads(pickle.dumps(dict(module.hparams))))
    for (key, a), b in zip(module.net.state_dict().items(), rebuilt.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    vit = ClientModule(TINY_VIT, 10, in_channels=1)
    assert ClientModule(**pickle.loads(pickle.dumps(dict(vit.hparams)))).hparams["backbone"] == TINY_VIT


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        ("resnet50", "model.backbone='resnet50' is unknown; allowed: a registered name"),
        ("torchvision.models.resnet5000", "model.backbone='torchvision.models.resnet5000' does not resolve"),
        ("no_such_package.Net", "model.backbone='no_such_package.Net' does not resolve"),
        ("torch.optim.SGD", "model.backbone='torch.optim.SGD' is not an nn.Module class or factory"),
        ("math.pi", "model.backbone='math.pi' is not an nn.Module class or factory"),
        ("os.getcwd", "model.backbone='os.getcwd' built a str, not an nn.Module"),
        ({"class_path": "vit", "init_args": {"depht": 2}}, "model.backbone='vit' cannot be built with"),
        ({"class_path": "vit", "initargs": {}}, "model.backbone={'class_path': 'vit', 'initargs': {}} is invalid"),
        ({"class_path": "small_cnn", "init_args": {"num_classes": 3}}, "given num_classes=3, but model.num_classes=10"),
    ],
)
def test_bad_backbones_are_one_line_errors(backbone, expected):
    with pytest.raises(ValueError) as error:
        ClientModule(backbone, 10, in_channels=1)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_in_channels_in_backbone_kwargs_still_works_and_conflicts_are_one_line():
    module = ClientModule("small_cnn", 10, backbone_kwargs={"in_channels": 3, "width": 4})
    assert module.net[0].in_channels == 3
    assert ClientModule("small_cnn", 10, in_channels=3, backbone_kwargs={"in_channels": 3}).net[0].in_channels == 3
    with pytest.raises(ValueError, match=r"^model.backbone_kwargs.in_channels=3 contradicts model.in_channels=1; "):
        ClientModule("small_cnn", 10, in_channels=1, backbone_kwargs={"in_channels": 3})
    with pytest.raises(ValueError, match=r"^model.backbone_kwargs.num_classes is invalid; set model.num_classes"):
        ClientModule("small_cnn", 10, backbone_kwargs={"num_classes": 3})


class _WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)


@pytest.mark.parametrize(
    ("net", "named"),
    [
        (_WithAttention(), "layer 'attention' (MultiheadAttention)"),
        (nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), "layer '0' (Embedding)"),
        (nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2)), "layer '0' (Conv3d)"),
        (nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 4)), "layer '1' (GRU)"),
    ],
)
def test_layers_a_sparse_method_cannot_handle_are_refused_by_name(net, named):
    for method in (SparsyFed(0.9), TopK(0.9), ZeroFL(0.9), FLASH(0.9), SparsyFedSpectral(0.9)):
        with pytest.raises(ValueError) as error:
            method.prepare_model(net)
        assert str(error.value).startswith(f"model.backbone: {named} cannot be trained by method {method.name}: ")
    assert Dense().prepare_model(net) is net  # nothing is sparsified: any layer trains


def test_zerofl_keeps_the_stem_dense_the_vit_patch_embedding_without_convs():
    vit = ZeroFL(0.9)
    vit.prepare_model(build_model(TINY_VIT, 10, in_channels=1))
    cnn = ZeroFL(0.9)
    cnn.prepare_model(build_model(SmallNet, 10, in_channels=1))
    assert vit._skip == ["embed"] and cnn._skip == ["conv"]


def test_own_parameters_of_a_model_stay_dense_and_are_accepted():
    class Positional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.position = nn.Parameter(torch.zeros(1, 4, 8))  # like a learned position embedding
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 2)

    net = SparsyFed(0.9).prepare_model(Positional())
    assert powerprop_of(net.fc) is not None and not hasattr(net, "parametrizations")


# -- every method on a torchvision model and on the ViT ----------------------------------------------
@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("backbone", [SMALL_MOBILENET, TINY_VIT], ids=["mobilenet_v3_small", "vit"])
def test_every_method_trains_a_round_on_a_torchvision_model_and_on_the_vit(backbone, name, digits_module):
    trainer = _fit(backbone, METHODS[name](), digits_module, clients_per_round=1, limit_train_batches=2)
    assert [m["round"] for m in trainer.history] == [0, 1]
    assert all(math.isfinite(m["test_loss"]) for m in trainer.history)
    # One client per round: the global model is that client's uplink model.
    weights = [trainer.global_state[key] for key in trainer.server.prunable_keys]
    total = sum(w.numel() for w in weights)
    nonzero = sum(int(torch.count_nonzero(w)) for w in weights)
    if name == "dense":
        assert nonzero == total
    elif name == "flash":  # the mask search prunes each layer to its density, flooring its count
        assert total - round(0.8 * total) - len(weights) <= nonzero <= total - round(0.8 * total)
    else:
        assert nonzero == total - round(0.8 * total)


def test_vit_every_linear_is_powerpropped_and_its_3d_inputs_are_pruned_exactly():
    torch.manual_seed(0)
    net = SparsyFed(0.7).prepare_model(build_model(TINY_VIT, 10, in_channels=1, seed=0))
    layers = dict(prunable_layers(net))
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(layers) == len(linears) == 6 and all(powerprop_of(m) is not None for m in linears)
    global_magnitude_prune(list(prunable_weights(net).values()), 0.7)
    # min_compact_numel=1 stores every pruned input compactly, as large inputs are stored.
    pruning = ActivationPruning(net, threshold="per_step", min_compact_numel=1).attach()
    inputs, output_grads = {}, {}

    def record(name: str, layer: nn.Module) -> None:
        def keep_input(module, args) -> None:
            inputs[name] = args[0].detach().clone()

        def keep_output_grad(module, args, out) -> None:
            out.register_hook(lambda grad: output_grads.__setitem__(name, grad.detach()))

        layer.register_forward_pre_hook(keep_input)
        layer.register_forward_hook(keep_output_grad)

    for name, layer in layers.items():
        record(name, layer)
    images, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    F.cross_entropy(net(images), labels).backward()
    pruned_layers = 0
    for name, layer in layers.items():
        x, g, v = inputs[name], output_grads[name], stored_weight(layer)
        assert x.dim() == (2 if name == "head" else 3), name  # tokens: (batch, tokens, features)
        keep = pruning.keep_fractions()[name]
        kept = torch.where(x.abs() >= magnitude_threshold(x, keep), x, 0) if keep < 1 else x
        power = powerprop_of(layer).exponent
        chain = power * v.detach().abs().pow(power - 1)  # dw/dv of sign(v)|v|^beta
        expected = (g.reshape(-1, g.shape[-1]).T @ kept.reshape(-1, x.shape[-1])) * chain
        torch.testing.assert_close(v.grad, expected, rtol=1e-5, atol=1e-6, msg=name)
        if keep < 1:
            pruned_layers += 1
            dense = (g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])) * chain
            assert not torch.allclose(v.grad, dense, rtol=1e-5, atol=1e-6), name
    assert pruned_layers >= 4
    pruning.detach()


def test_non_contiguous_3d_linear_input_is_pruned():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    global_magnitude_prune([layer.weight], 0.75)
    pruning = ActivationPruning(layer, threshold="per_step").attach()
    x = torch.randn(6, 4, 16).transpose(0, 1)  # (4, 6, 16), not contiguous
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    kept = torch.where(x.abs() >= magnitude_threshold(x, pruning.keep_fractions()[""]), x, 0)
    torch.testing.assert_close(layer.weight.grad, grad.reshape(-1, 8).T @ kept.reshape(-1, 16))


# -- client stacking of user models -------------------------------------------------------------------
def test_stacking_check_finds_forwards_that_mix_stacked_clients():
    sample = torch.randn(4, 1, 8, 8)
    assert stacking_mismatch(build_model(SmallNet, 10, in_channels=1, seed=0), sample) is None
    mixing = build_model(ChannelMixingNet, 10, in_channels=1)
    assert "mix the clients of ChannelMixingNet" in stacking_mismatch(mixing, sample)
    assert "LayerNorm" in stacking_mismatch(build_model(TINY_VIT, 10, in_channels=1), sample)


@pytest.mark.parametrize(("net", "stacks"), [(SmallNet, True), (ChannelMixingNet, False)])
def test_user_models_by_import_path_stack_only_when_that_is_exact(net, stacks, digits_module):
    path = f"{__name__}.{net.__name__}"
    alone = _fit(path, SparsyFed(0.8), digits_module, clients_per_round=3, stack_clients=1).global_state
    trainer = _fit(path, SparsyFed(0.8), digits_module, clients_per_round=3, stack_clients=3)
    assert bool(trainer.runner._stacked) == stacks
    stacked = trainer.global_state
    for key, value in alone.items():
        if stacks:  # the same up to float rounding (grouped convolutions sum in another order)
            torch.testing.assert_close(stacked[key], value, rtol=1e-3, atol=1e-5, msg=key)
        else:  # refused after the numerical check: trained one at a time, bit for bit as alone
            assert torch.equal(stacked[key], value), key
