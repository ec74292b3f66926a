"""Powerprop re-parameterisation against dense float64 references."""

import copy

import pytest
import torch
from torch import nn

from sparsyfed_lightning.models import build_model
from sparsyfed_lightning.sparse import Powerprop, powerprop_of, powerpropify, prunable_weights, signed_power
from sparsyfed_lightning.sparse.layers import prunable_layers


def test_effective_weight_is_signed_power_of_stored():
    v = torch.tensor([-2.0, -0.5, 0.0, 0.25, 3.0])
    w = signed_power(v, 1.25)
    expected = torch.tensor([-(2.0**1.25), -(0.5**1.25), 0.0, 0.25**1.25, 3.0**1.25])
    torch.testing.assert_close(w, expected)


@pytest.mark.parametrize("beta", [1.25, 2.0, 3.0])
def test_gradient_matches_float64_reference(beta):
    torch.manual_seed(0)
    v = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(7, 5, dtype=torch.float64)
    (signed_power(v, beta) * upstream).sum().backward()
    expected = beta * v.detach().abs() ** (beta - 1) * upstream
    torch.testing.assert_close(v.grad, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: signed_power(t, beta), (torch.randn(4, dtype=torch.float64,
                                                                                  requires_grad=True),))


def _train_steps(model: nn.Module, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3, momentum=0.0)
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 1, 8, 8)
        y = torch.randint(0, 3, (4,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _zero_some_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    zero_masks = {}
    with torch.no_grad():
        for key, v in prunable_weights(model).items():
            mask = torch.rand_like(v) < 0.5
            v[mask] = 0.0
            zero_masks[key] = mask
    return zero_masks


def test_zero_weights_stay_zero_with_beta_above_one():
    torch.manual_seed(0)
    model = powerpropify(build_model("small_cnn", 3, width=4), 1.25)
    zero_masks = _zero_some_weights(model)
    _train_steps(model, 50)
    for key, v in prunable_weights(model).items():
        assert torch.all(v[zero_masks[key]] == 0), key
        assert torch.any(v[~zero_masks[key]] != 0), key


def test_zero_weights_regrow_with_beta_one():
    torch.manual_seed(0)
    model = powerpropify(build_model("small_cnn", 3, width=4), 1.0)
    zero_masks = _zero_some_weights(model)
    _train_steps(model, 50)
    regrown = sum(int((v[zero_masks[key]] != 0).sum()) for key, v in prunable_weights(model).items())
    assert regrown > 0


def test_wrapping_keeps_effective_weights_and_covers_every_layer():
    torch.manual_seed(0)
    plain = build_model("resnet18_cifar", 10, seed=3)
    wrapped = powerpropify(copy.deepcopy(plain), 1.25)
    wrapped_layers = dict(prunable_layers(wrapped))
    for name, module in prunable_layers(plain):
        assert powerprop_of(wrapped_layers[name]) is not None, name
        torch.testing.assert_close(wrapped_layers[name].weight, module.weight, rtol=1e-5, atol=1e-7)
    assert powerprop_of(wrapped.conv1) is not None and powerprop_of(wrapped.fc) is not None
    for name, module in wrapped.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert not hasattr(module, "parametrizations"), name


def test_stored_weights_follow_inverse_power_of_initial_weights():
    plain = build_model("small_cnn", 3, seed=1)
    wrapped = powerpropify(copy.deepcopy(plain), 2.0)
    w = plain[0].weight.detach()
    v = wrapped[0].parametrizations.weight.original.detach()
    torch.testing.assert_close(v, torch.sign(w) * w.abs().sqrt())


def test_state_dict_round_trip_into_fresh_wrapped_model():
    source = powerpropify(build_model("small_cnn", 3, seed=1), 1.25)
    _train_steps(source, 3)
    target = powerpropify(build_model("small_cnn", 3, seed=2), 1.25)
    target.load_state_dict(source.state_dict())
    x = torch.randn(5, 1, 8, 8)
    source.eval(), target.eval()
    assert torch.equal(source(x), target(x))
    assert any(k.endswith("parametrizations.weight.original") for k in source.state_dict())


def test_beta_one_is_a_no_op_and_beta_below_one_is_rejected():
    model = build_model("small_cnn", 3)
    assert powerpropify(model, 1.0) is model
    assert all(powerprop_of(m) is None for _, m in prunable_layers(model))
    with pytest.raises(ValueError, match="0.5"):
        powerpropify(model, 0.5)
    with pytest.raises(ValueError):
        Powerprop(0.9)


def test_wrapped_and_unwrapped_models_agree_at_beta_one():
    from torch.nn.utils import parametrize

    plain = build_model("small_cnn", 4, seed=0)
    wrapped = copy.deepcopy(plain)
    for _, module in prunable_layers(wrapped):
        parametrize.register_parametrization(module, "weight", Powerprop(1.0))
    x = torch.randn(6, 1, 8, 8)
    y = torch.randint(0, 4, (6,))
    for model in (plain, wrapped):
        nn.functional.cross_entropy(model(x), y).backward()
    assert torch.equal(plain(x), wrapped(x))
    for (name, p), q in zip(prunable_weights(plain).items(), prunable_weights(wrapped).values(), strict=True):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("exponent", [1.25, 2.0])
def test_support_path_is_bit_identical_to_dense_path(exponent):
    from sparsyfed_lightning.sparse.powerprop import freeze_support, release_support

    torch.manual_seed(0)
    v = torch.randn(40, 30)
    v[torch.rand_like(v) < 0.9] = 0.0
    upstream = torch.randn(40, 30)
    results = []
    for support in (None, torch.nonzero(v.reshape(-1)).reshape(-1)):
        leaf = v.clone().requires_grad_(True)
        w = signed_power(leaf, exponent, support)
        w.backward(upstream)
        results.append((w.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    model = powerpropify(build_model("small_cnn", 3, width=32), exponent)
    with torch.no_grad():
        for weight in prunable_weights(model).values():
            weight.mul_(torch.rand_like(weight) < 0.1)
    assert freeze_support(model) == 2  # the two big convs; the 288-entry stem and the classifier stay dense
    big = [m for _, m in prunable_layers(model) if m.weight.numel() >= 4096]
    assert all(powerprop_of(m).support is not None for m in big)
    release_support(model)
    assert all(powerprop_of(m).support is None for _, m in prunable_layers(model))


def _graph_nodes(output: torch.Tensor) -> list[str]:
    """Class names of every node in the autograd graph behind `output`."""
    seen, stack, names = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


class _ThreeLinears(nn.Module):
    """Three linear layers of which the forward uses two (an unused layer must get no gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.unused = nn.Linear(16, 32), nn.Linear(32, 4), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


@pytest.mark.parametrize(
    ("backbone", "exponent", "density"),
    [("small_cnn", 1.25, 0.2), ("small_cnn", 1.25, 0.9), ("small_cnn", 1.75, 0.2), ("three_linears", 2.0, 0.2)],
)
def test_fused_layers_match_the_per_layer_path(backbone, exponent, density):
    """`freeze_support` computes the small layers' weights in one fused call per forward, sparse or
    dense: the same weights, gradients and SGD steps as each layer on its own path, and an unused
    layer still without a gradient; weights read outside a forward and after `release_support` are
    computed afresh."""
    from sparsyfed_lightning.sparse.powerprop import freeze_support, release_support

    torch.manual_seed(0)
    if backbone == "small_cnn":
        net, shape, classes = build_model("small_cnn", 3, width=32), (4, 1, 8, 8), 3
    else:
        net, shape, classes = _ThreeLinears(), (4, 16), 4
    model = powerpropify(net, exponent)
    with torch.no_grad():
        for weight in prunable_weights(model).values():
            weight.mul_(torch.rand_like(weight) < density)
    per_layer, fused = copy.deepcopy(model), model
    freeze_support(per_layer, fuse_max_numel=0)
    freeze_support(fused)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=1e-3) for m in (per_layer, fused)]
    for step in range(3):
        x, y = torch.randn(*shape), torch.randint(0, classes, (shape[0],))
        outputs = []
        for m, optimizer in zip((per_layer, fused), optimizers, strict=True):
            optimizer.zero_grad()
            out = m(x)
            nn.functional.cross_entropy(out, y).backward()
            outputs.append(out)
            if step == 0:
                assert _graph_nodes(out).count("_FusedSignedPowerBackward") == (m is fused)
        assert torch.equal(outputs[0], outputs[1])
        for (key, a), b in zip(prunable_weights(per_layer).items(), prunable_weights(fused).values(), strict=True):
            assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), key
        for optimizer in optimizers:
            optimizer.step()
    for (key, a), b in zip(prunable_weights(per_layer).items(), prunable_weights(fused).values(), strict=True):
        assert torch.equal(a, b), key
    if backbone == "three_linears":
        assert fused.unused.parametrizations.weight.original.grad is None
    for _, module in prunable_layers(fused):  # outside a forward: from the current v
        v = module.parametrizations.weight.original.detach()
        assert torch.equal(module.weight, signed_power(v, exponent))
    release_support(fused)
    assert "_FusedSignedPowerBackward" not in _graph_nodes(fused(torch.randn(*shape)))


def test_exponents_that_could_round_by_position_are_not_fused():
    from sparsyfed_lightning.sparse.powerprop import abs_pow_is_positional_exact, freeze_support

    assert [abs_pow_is_positional_exact(e - 1) for e in (1.25, 1.5, 1.75, 2.0, 3.0, 4.0, 1.3, 2.25)] == [
        True, True, True, True, True, True, False, False]
    model = powerpropify(build_model("small_cnn", 3, width=32), 1.3)
    with torch.no_grad():
        for weight in prunable_weights(model).values():
            weight.mul_(torch.rand_like(weight) < 0.2)
    assert freeze_support(model) == 2
    assert "_FusedSignedPowerBackward" not in _graph_nodes(model(torch.randn(2, 1, 8, 8)))
    assert "_SignedPowerBackward" in _graph_nodes(model(torch.randn(2, 1, 8, 8)))


@pytest.mark.parametrize("frozen_support", [False, True])
def test_per_client_exponents_match_each_client_alone(frozen_support):
    """A stacked layer with one exponent per client (chunks of rows) computes each chunk as a layer
    with that exponent alone, forward and backward; `right_inverse` inverts it."""
    torch.manual_seed(0)
    exponents = (1.25, 2.0, 1.7)
    v = torch.randn(3 * 4, 5, 3, 3)
    v[torch.rand_like(v) < 0.8] = 0.0
    upstream = torch.randn_like(v)
    stacked = Powerprop(2.0)
    stacked.set_client_exponents(exponents)
    assert stacked.client_exponents == exponents and not stacked.is_identity
    if frozen_support:
        stacked.support = torch.nonzero(v.reshape(-1)).reshape(-1)
    leaf = v.clone().requires_grad_(True)
    w = stacked(leaf)
    w.backward(upstream)
    for i, exponent in enumerate(exponents):
        part = v[4 * i : 4 * (i + 1)].clone().requires_grad_(True)
        alone = signed_power(part, exponent)
        alone.backward(upstream[4 * i : 4 * (i + 1)])
        torch.testing.assert_close(w[4 * i : 4 * (i + 1)], alone, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(leaf.grad[4 * i : 4 * (i + 1)], part.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stacked(stacked.right_inverse(w.detach())), w.detach(), rtol=1e-5, atol=1e-6)
    stacked.set_client_exponents([1.5] * 3)  # equal exponents collapse to the plain float
    assert stacked.client_exponents is None and stacked.exponent == 1.5
