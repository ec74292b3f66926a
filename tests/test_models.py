"""Model registry: shapes, parameter counts, gradients, errors."""

import pytest
import torch
from torch import nn

from sparsyfed_lightning.models import build_model
from sparsyfed_lightning.models.init import TRUNCATED_STD
from sparsyfed_lightning.sparse.layers import prunable_layers

CASES = [
    ("resnet18_cifar", 10, (2, 3, 32, 32)),
    ("resnet18_cifar", 100, (2, 3, 32, 32)),
    ("resnet18_speech", 35, (2, 1, 8000)),
    ("logmel_cnn", 35, (2, 1, 40, 81)),
    ("small_cnn", 10, (2, 1, 8, 8)),
    ("small_resnet", 10, (2, 1, 28, 28)),
]


@pytest.mark.parametrize(("name", "num_classes", "shape"), CASES)
def test_output_shape_and_every_parameter_gets_a_gradient(name, num_classes, shape):
    model = build_model(name, num_classes, seed=0)
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], num_classes)
    out.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.any(p.grad != 0), pname


def test_resnet18_cifar_parameter_count_and_stem():
    model = build_model("resnet18_cifar", 10)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    prunable = sum(m.weight.numel() for _, m in prunable_layers(model))
    assert prunable == 11_164_352  # SPEC 5: everything but BN affine (9,600) and the fc bias (10)


def test_small_resnet_has_resnet18s_parts_at_28x28():
    model = build_model("small_resnet", 10)
    assert sum(m.weight.numel() for _, m in prunable_layers(model)) == 302_480
    shortcuts = [name for name, _ in prunable_layers(model) if name.endswith("downsample.0")]
    assert shortcuts == ["layer1.downsample.0", "layer2.downsample.0", "layer3.downsample.0"]
    features = model.relu(model.bn1(model.conv1(torch.randn(1, 1, 28, 28))))
    sizes = [features.shape[-1]]
    for block in (model.layer1, model.layer2, model.layer3):
        features = block(features)
        sizes.append(features.shape[-1])
    assert sizes == [14, 7, 4, 2] and features.shape[1] == 128


def test_resnet18_speech_stem_keeps_height_one():
    model = build_model("resnet18_speech", 35)
    stem = model.net.conv1
    assert stem.kernel_size == (7, 7) and stem.stride == (2, 2) and stem.in_channels == 1
    features = model.net.conv1(torch.randn(1, 1, 1, 8000))
    assert features.shape[2] == 1


def test_initialisation_is_truncated_normal_with_fan_in_scale():
    model = build_model("resnet18_cifar", 10, seed=0)
    w = model.layer3[0].conv1.weight.detach()
    std = (1.0 / w[0].numel()) ** 0.5 / TRUNCATED_STD
    assert w.abs().max() <= 2 * std
    assert abs(w.std().item() - (1.0 / w[0].numel()) ** 0.5) < 0.02 * (1.0 / w[0].numel()) ** 0.5
    assert torch.all(model.fc.bias == 0)
    assert torch.equal(build_model("small_cnn", 3, seed=4)[0].weight, build_model("small_cnn", 3, seed=4)[0].weight)


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="model.backbone='resnet50' is unknown; allowed: .*resnet18_cifar.*small_cnn"):
        build_model("resnet50", 10)
