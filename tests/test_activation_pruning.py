"""Activation pruning is exact where it must be and prunes exactly what it should."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from sparsyfed_lightning.models import build_model
from sparsyfed_lightning.sparse import (
    ActivationPruning,
    CompactReLU,
    SavedTensorMeter,
    global_magnitude_prune,
    layerwise_magnitude_prune,
    pack_bits,
    powerpropify,
    prunable_weights,
    unpack_bits,
)
from sparsyfed_lightning.sparse.activations import compact_capacity, keep_mask, shrink_per_client


def _sparsify_(weight: torch.Tensor, density: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight.mul_(torch.rand(weight.shape, generator=g) < density)


def _reference_pruned(x: torch.Tensor, keep: float) -> torch.Tensor:
    """x with entries below the k-th largest magnitude zeroed, k = ceil(keep * numel) (NumPy sort)."""
    k = max(1, math.ceil(keep * x.numel()))
    threshold = np.sort(np.abs(x.detach().numpy()).ravel())[::-1][k - 1]
    return x.detach() * (x.detach().abs() >= float(threshold))


LAYERS = [
    lambda: nn.Conv2d(3, 8, 3, stride=1, padding=1, bias=False),
    lambda: nn.Conv2d(4, 6, 3, stride=2, padding=0, bias=True),
    lambda: nn.Conv2d(5, 7, 1, stride=1, padding=0, bias=True),
    lambda: nn.Conv1d(3, 4, 5, stride=2, padding=2, bias=True),
    lambda: nn.Linear(12, 5, bias=True),
    lambda: nn.Linear(9, 3, bias=False),
]
INPUT_SHAPES = [(4, 3, 9, 9), (3, 4, 11, 11), (2, 5, 6, 6), (3, 3, 20), (6, 12), (2, 3, 9)]


@pytest.mark.parametrize("index", range(len(LAYERS)))
@pytest.mark.parametrize("powerprop", [False, True])
@pytest.mark.parametrize("density", [0.3, 0.02])  # the bitmap and the index layout of CompactTensor
@pytest.mark.parametrize("min_compact_numel", [0, 10**9])  # compact storage / dense pruned copy
def test_forward_and_input_grad_exact_weight_grad_from_pruned_input(index, powerprop, density, min_compact_numel):
    torch.manual_seed(index)
    layer = LAYERS[index]()
    _sparsify_(layer.weight, density, seed=index)
    with torch.no_grad():
        layer.weight.view(-1)[0] = 1.0  # at least one non-zero weight
    if powerprop:
        powerpropify(layer, 1.25)
    x = torch.randn(INPUT_SHAPES[index], requires_grad=True)
    upstream = None

    def run(pruning: bool):
        nonlocal upstream
        layer.zero_grad()
        x.grad = None
        ap = ActivationPruning(layer, min_compact_numel=min_compact_numel).attach() if pruning else None
        out = layer(x)
        if upstream is None:
            upstream = torch.randn_like(out)
        out.backward(upstream)
        keep = ap.keep_fractions()[""] if ap else None
        if ap:
            ap.detach()
        weight = prunable_weights(layer)
        return out.detach(), x.grad.clone(), next(iter(weight.values())).grad.clone(), keep

    dense_out, dense_gx, dense_gw, _ = run(False)
    out, gx, gw, keep = run(True)
    assert torch.equal(out, dense_out)
    assert torch.equal(gx, dense_gx)
    stored = next(iter(prunable_weights(layer).values()))
    assert keep == pytest.approx(float((stored != 0).float().mean()))
    # Reference: the same layer run densely on the explicitly pruned input.
    layer.zero_grad()
    x_pruned = _reference_pruned(x, keep)
    layer(x_pruned).backward(upstream)
    torch.testing.assert_close(gw, stored.grad, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(gw, dense_gw)


def test_kept_fraction_matches_layer_density_and_eval_prunes_nothing():
    torch.manual_seed(0)
    model = powerpropify(build_model("small_cnn", 10, width=8), 1.25)
    global_magnitude_prune(prunable_weights(model).values(), 0.9)
    x = torch.randn(16, 1, 8, 8)
    with ActivationPruning(model, min_compact_numel=0) as ap:
        model.train()
        model(x).sum().backward()
        for name, kept in ap.kept_fractions().items():
            keep = ap.keep_fractions()[name]
            total = ap._states[name].total
            assert kept * total == max(1, math.ceil(keep * total)), name  # continuous input: no ties
        model.eval()
        ap._states["0"].total = 0
        with torch.no_grad():
            model(x)
        assert ap._states["0"].total == 0


def test_dense_layers_are_not_pruned():
    model = build_model("small_cnn", 10, width=4)
    with ActivationPruning(model) as ap:
        model(torch.randn(4, 1, 8, 8)).sum().backward()
        assert all(f == 1.0 for f in ap.keep_fractions().values())
        assert all(s.total == 0 for s in ap._states.values())


def _conv_threshold_after(threshold_mode: str) -> list[float]:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    _sparsify_(conv.weight, 0.5, seed=0)
    thresholds = []
    with ActivationPruning(conv, threshold=threshold_mode) as ap:
        for scale in (1.0, 10.0):
            conv(scale * torch.randn(4, 2, 8, 8, requires_grad=True)).sum().backward()
            thresholds.append(float(ap._states[""].threshold))
    return thresholds


def test_conv_threshold_frozen_after_first_batch_by_default_and_per_step_option():
    first, second = _conv_threshold_after("first_batch")
    assert first == second
    first, second = _conv_threshold_after("per_step")
    assert second > 5 * first


def test_linear_threshold_is_recomputed_every_step_even_when_first_batch():
    torch.manual_seed(0)
    linear = nn.Linear(10, 4)
    _sparsify_(linear.weight, 0.5, seed=1)
    with ActivationPruning(linear) as ap:
        linear(torch.randn(8, 10)).sum().backward()
        t1 = float(ap._states[""].threshold)
        linear(100 * torch.randn(8, 10)).sum().backward()
        assert float(ap._states[""].threshold) > 10 * t1


def test_refresh_resets_thresholds_and_follows_new_density():
    conv = nn.Conv2d(2, 3, 3)
    _sparsify_(conv.weight, 0.5, seed=0)
    with ActivationPruning(conv) as ap:
        conv(torch.randn(2, 2, 6, 6)).sum().backward()
        with torch.no_grad():
            conv.weight[0] = 0.0
        ap.refresh()
        assert ap._states[""].threshold is None
        assert ap.keep_fractions()[""] == pytest.approx(float((conv.weight != 0).float().mean()))


def test_compact_relu_matches_relu_and_detach_restores_modules():
    x = torch.randn(3, 17, requires_grad=True)
    upstream = torch.randn(3, 17)
    torch.relu(x).backward(upstream)
    expected = x.grad.clone()
    x.grad = None
    out = CompactReLU(min_compact_numel=0)(x)
    out.backward(upstream)
    assert torch.equal(out, torch.relu(x)) and torch.equal(x.grad, expected)
    model = build_model("small_cnn", 10, width=4)
    with ActivationPruning(model):
        assert any(isinstance(m, CompactReLU) for m in model.modules())
    assert not any(isinstance(m, CompactReLU) for m in model.modules())


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000])
def test_bit_packing_round_trip(numel):
    mask = torch.rand(numel) < 0.3
    packed = pack_bits(mask)
    assert packed.numel() == (numel + 7) // 8
    assert torch.equal(unpack_bits(packed, numel), mask)


def test_saved_bytes_shrink_at_high_sparsity():
    torch.manual_seed(0)
    dense = build_model("resnet18_cifar", 10, seed=0)
    sparse = powerpropify(build_model("resnet18_cifar", 10, seed=0), 1.25)
    layerwise_magnitude_prune(prunable_weights(sparse).values(), 0.95)
    x = torch.randn(2, 3, 32, 32)
    with SavedTensorMeter() as dense_meter:
        dense(x).sum()
    with ActivationPruning(sparse, min_compact_numel=0), SavedTensorMeter() as sparse_meter:
        sparse(x).sum()
    assert sparse_meter.activation_bytes < 0.6 * dense_meter.activation_bytes


def test_bit_packing_round_trips_every_byte_pattern():
    patterns = torch.tensor([[(b >> i) & 1 for i in range(8)] for b in range(256)], dtype=torch.bool)
    packed = pack_bits(patterns)
    assert packed.numel() == 256 and len(set(packed.tolist())) == 256
    assert torch.equal(unpack_bits(packed, patterns.numel()), patterns.reshape(-1))


def _weight_grad(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    layer.zero_grad()
    layer(x).backward(upstream)
    return next(iter(prunable_weights(layer).values())).grad.clone()


@pytest.mark.parametrize("density", [0.3, 0.02])  # bitmap and index layouts
def test_a_compact_copy_that_overflows_keeps_its_first_entries_and_is_counted(density):
    """The frozen threshold lets a later batch keep more than the capacity: what is stored is the
    first `capacity` kept entries in flat order, and the overflow is counted on the device."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    _sparsify_(conv.weight, density, seed=0)
    plain = copy.deepcopy(conv)  # the references: the same layer, no activation pruning
    first, upstream = torch.randn(8, 4, 10, 10), torch.randn(8, 6, 10, 10)
    with ActivationPruning(conv, min_compact_numel=0, headroom=1.0) as ap:
        _weight_grad(conv, first, upstream)
        threshold = ap._states[""].threshold
        capacity = compact_capacity(math.ceil(ap.keep_fractions()[""] * first.numel()), first.numel(), 1.0)
        assert ap.take_overflows() == {}
        for scale, overflows in ((3.0, 1), (0.5, 0)):
            x = scale * torch.randn(8, 4, 10, 10)
            got = _weight_grad(conv, x, upstream)
            assert ap.take_overflows() == ({"": [1]} if overflows else {})
            kept = (x.abs() >= threshold).reshape(-1)
            assert (int(kept.sum()) > capacity) == bool(overflows)
            stored = kept & (torch.cumsum(kept, 0) <= capacity)
            pruned = torch.where(stored, x.reshape(-1), 0).reshape(x.shape)
            torch.testing.assert_close(got, _weight_grad(plain, pruned, upstream), rtol=1e-5, atol=1e-6)


def test_ties_on_the_first_batch_raise_the_capacity():
    """Discrete inputs tie at the threshold: the first batch keeps more than expected, and the
    capacity follows the count it read, so that batch and the next ones stay exact."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    _sparsify_(conv.weight, 0.1, seed=0)
    upstream = torch.randn(6, 4, 8, 8)
    with ActivationPruning(conv, min_compact_numel=0) as ap:
        for step in range(3):
            x = torch.randint(-4, 5, (6, 3, 10, 10), generator=torch.Generator().manual_seed(step)).float()
            got = _weight_grad(conv, x, upstream)
            state = ap._states[""]
            expected_count = math.ceil(ap.keep_fractions()[""] * x.numel())
            kept = int((x.abs() >= state.threshold).sum())
            assert kept > compact_capacity(expected_count, x.numel())  # ties, well beyond the headroom
            reference = _weight_grad(conv, x * (x.abs() >= state.threshold), upstream)
            torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
        assert ap.take_overflows() == {}


@pytest.mark.parametrize("threshold", ["per_step", "first_batch"])
def test_densities_refreshed_on_the_device_every_step(threshold):
    """refresh_every_step (beta = 1): each step prunes to the density the weights have at that step,
    read on the device; a conv whose weights became dense keeps its whole input."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3)
    _sparsify_(conv.weight, 0.2, seed=0)
    upstream = torch.randn(4, 5, 6, 6)
    thresholds = []
    with ActivationPruning(conv, threshold=threshold, refresh_every_step=True) as ap:
        for step, density in enumerate((0.2, 0.5, 1.0)):
            with torch.no_grad():  # what regrowth does between steps
                conv.weight.copy_(torch.where(conv.weight == 0, torch.randn_like(conv.weight), conv.weight))
                _sparsify_(conv.weight, density, seed=step) if density < 1 else None
            x = torch.randn(4, 3, 8, 8)
            got = _weight_grad(conv, x, upstream)
            keep = float((conv.weight != 0).float().mean())
            frozen = ap._states[""].threshold
            if threshold == "per_step":
                expected = _reference_pruned(x, keep)
            elif keep == 1.0:
                expected = x
            else:
                expected = x * (x.abs() >= frozen)
            torch.testing.assert_close(got, _weight_grad(conv, expected, upstream), rtol=1e-5, atol=1e-6)
            thresholds.append(float(frozen))
    assert (len(set(thresholds)) == 1) == (threshold == "first_batch")


@pytest.mark.parametrize("clients", [1, 3])
def test_shrinking_each_client_by_the_float_below_its_threshold_keeps_exactly_abs_x_at_or_above_it(clients):
    x = torch.randn(5, 4 * clients, 3, 3, generator=torch.Generator().manual_seed(0))
    thresholds = torch.tensor([0.3, 0.9, 1.4][:clients])
    x[0, 0, 0, :3] = torch.tensor([0.3, -0.3, 0.0])  # ties at client 0's threshold, and a zero
    threshold = thresholds[0] if clients == 1 else thresholds.view(1, clients, 1)
    below = torch.nextafter(thresholds, torch.zeros(())).tolist()
    expected = torch.where(keep_mask(x, threshold), x, 0)
    got = shrink_per_client(x, below)
    assert torch.equal(got, expected)
    assert got[0, 0, 0, 0] == 0.3 and got[0, 0, 0, 1] == -0.3  # ties kept
    for index in range(clients):  # every client's part really is cut at its own threshold
        part = got.view(5, clients, -1)[:, index]
        assert part[part != 0].abs().min() >= thresholds[index]
