"""SWAT weight Top-K (ZeroFL): layer-wise weight pruning in the training forward."""

import math

import torch
from torch import nn

from sparsyfed_lightning.sparse import WeightTopK


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_weights_are_pruned_layerwise_in_training_forward_only():
    model = _model()
    topk = WeightTopK(model, 0.9).attach()
    model.eval()
    model(torch.randn(1, 2, 8, 8))
    assert all(int((m.weight == 0).sum()) == 0 for m in (model[0], model[2]))
    model.train()
    model(torch.randn(1, 2, 8, 8))
    for layer in (model[0], model[2]):
        kept = int((layer.weight != 0).sum())
        assert kept == math.ceil(0.1 * layer.weight.numel())
    topk.detach()


def test_conv_threshold_frozen_linear_recomputed():
    model = _model()
    topk = WeightTopK(model, 0.5, layer_names=["0", "2"]).attach()
    model(torch.randn(1, 2, 8, 8))
    conv_threshold = topk._thresholds["0"].clone()
    with torch.no_grad():
        model[0].weight.mul_(10.0)  # everything now far above the frozen threshold
        model[2].weight.mul_(10.0)
    model(torch.randn(1, 2, 8, 8))
    assert torch.equal(topk._thresholds["0"], conv_threshold)
    pruned = model[0].weight.numel() - math.ceil(0.5 * model[0].weight.numel())
    assert int((model[0].weight == 0).sum()) == pruned  # survivors all exceed the frozen threshold
    assert int((model[2].weight != 0).sum()) == math.ceil(0.5 * model[2].weight.numel())
    topk.reset()
    assert not topk._thresholds


def test_layer_selection_leaves_other_layers_dense():
    model = _model()
    WeightTopK(model, 0.9, layer_names=["2"]).attach()
    model(torch.randn(1, 2, 8, 8))
    assert int((model[0].weight == 0).sum()) == 0
    assert int((model[2].weight == 0).sum()) > 0
