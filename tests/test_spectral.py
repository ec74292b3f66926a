"""Spectral exponent: bounded by the true spectral norm, >= 1, deterministic for a seed."""

import torch

from sparsyfed_lightning.models import build_model
from sparsyfed_lightning.sparse import (
    powerprop_of,
    powerpropify,
    spectral_exponent,
    update_spectral_exponents,
)
from sparsyfed_lightning.sparse.layers import prunable_layers
from sparsyfed_lightning.sparse.spectral import power_iteration_sigma


def test_estimate_never_exceeds_largest_singular_value():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(30, 50, generator=g).abs()
        a[a < 0.5] = 0.0
        sigma_max = torch.linalg.matrix_norm(a.double(), ord=2).item()
        estimate = power_iteration_sigma(a, torch.Generator().manual_seed(seed)).item()
        assert 0 < estimate <= sigma_max * (1 + 1e-6)


def test_exponent_formula_and_bounds():
    v = torch.randn(16, 3, 3, 3)
    exponent = spectral_exponent(v, torch.Generator().manual_seed(0))
    a = v.abs().reshape(16, -1)
    sigma = power_iteration_sigma(a, torch.Generator().manual_seed(0))
    assert exponent == round(float(1 + (a / sigma).mean()), 8)
    assert exponent >= 1.0
    assert spectral_exponent(torch.zeros(4, 4), torch.Generator().manual_seed(0)) == 1.0


def test_update_is_deterministic_for_a_seed_and_sets_every_layer():
    model = powerpropify(build_model("small_cnn", 10, seed=0), 1.5, keep_effective_weights=False)
    first = update_spectral_exponents(model, seed=7)
    second = update_spectral_exponents(model, seed=7)
    other = update_spectral_exponents(model, seed=8)
    assert first == second
    assert first != other
    assert set(first) == {name for name, _ in prunable_layers(model)}
    for name, module in prunable_layers(model):
        assert powerprop_of(module).exponent == other[name] >= 1.0
