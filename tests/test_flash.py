"""FLASH's two behaviours from the authors' code (SPEC 12.4, quirk 25), against references written
from SPEC's description, and their switches."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from sparsyfed_lightning.client.module import ClientModule
from sparsyfed_lightning.federated.client_runner import ClientRunner, decode_result, state_on_cpu
from sparsyfed_lightning.methods import FLASH
from sparsyfed_lightning.server.mask_search import DensityProfile, prune_to_profile

LR, WEIGHT_DECAY, SPARSITY = 0.05, 1e-3, 0.8


def reference_client(net: nn.Module, loader, mask_gradients: bool) -> dict[str, torch.Tensor]:
    """SPEC 12.4's client: record `param != 0` for every parameter on receipt, multiply every
    gradient by it before each SGD step (lr, weight decay 1e-3, no momentum), then prune the
    conv/linear weights globally to `SPARSITY` (round(s * N) smallest magnitudes)."""
    net = copy.deepcopy(net).train()
    masks = [p.detach() != 0 for p in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        if mask_gradients:
            for p, mask in zip(net.parameters(), masks, strict=True):
                p.grad.mul_(mask)
        optimizer.step()
    weights = [m.weight for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    magnitudes = torch.cat([w.detach().abs().reshape(-1) for w in weights]).numpy()
    pruned = np.argsort(magnitudes, kind="stable")[: round(SPARSITY * magnitudes.size)]
    keep = np.ones(magnitudes.size, dtype=bool)
    keep[pruned] = False
    with torch.no_grad():
        for w, part in zip(weights, np.split(keep, np.cumsum([w.numel() for w in weights])[:-1]), strict=True):
            w.mul_(torch.from_numpy(part).reshape(w.shape))
    return state_on_cpu(net)


@pytest.mark.parametrize("dense_warmup", [False, True])
def test_round_one_client_matches_the_reference(dense_warmup, digits_module):
    module = ClientModule("small_cnn", digits_module.num_classes, lr=LR, backbone_kwargs={"width": 8})
    method = FLASH(SPARSITY, dense_warmup=dense_warmup)
    module.net = method.prepare_model(module.net)
    received = state_on_cpu(module.net)
    expected = reference_client(module.net, digits_module.client_train_dataloader(0, seed=7), not dense_warmup)
    method.on_round_start(1)
    runner = ClientRunner(module, method, accelerator="cpu")
    sent = decode_result(runner.fit(0, received, digits_module.client_train_dataloader(0, seed=7), LR, 7))
    for key, value in expected.items():
        torch.testing.assert_close(sent[key], value, rtol=1e-5, atol=1e-7, msg=key)
    # The visible consequence: parameters that start at zero (BN betas, the classifier bias) train
    # only when round 1 is dense.
    zero_at_start = [k for k, v in received.items() if k.endswith("bias") and not torch.any(v != 0)]
    assert len(zero_at_start) == 4
    assert all(torch.any(sent[k] != 0) == dense_warmup for k in zero_at_start)


def _authors_pruned(tensor: torch.Tensor, densities: list[float], weights: list[int]) -> torch.Tensor:
    """SPEC 12.4's server for one tensor: d summed as density * (n_k / n) in floats, k = int(numel * d),
    the entries with |x| >= the k-th largest magnitude kept (ties kept), k = 0 keeps it whole."""
    n = sum(weights)
    d = 0.0
    for density, n_k in zip(densities, weights, strict=True):
        d += density * (n_k / n)
    k = int(tensor.numel() * d)
    if k == 0:
        return tensor.clone()
    threshold = np.sort(tensor.abs().reshape(-1).numpy())[::-1][k - 1]
    return torch.where(tensor.abs() >= threshold, tensor, torch.zeros_like(tensor))


def _clients(aggregate: dict[str, torch.Tensor], keep: dict[str, list[int]]) -> list[dict[str, torch.Tensor]]:
    """Ten client states whose tensor `key` has `keep[key][i]` non-zeros in client i."""
    states = []
    for i in range(10):
        state = {}
        for key, value in aggregate.items():
            flat = torch.ones(value.numel(), dtype=value.dtype)
            flat[keep[key][i] :] = 0
            state[key] = flat.reshape(value.shape)
        states.append(state)
    return states


def test_server_density_reproduces_the_floating_sum():
    g = torch.Generator().manual_seed(0)
    aggregate = {
        "bn.weight": torch.rand(16, generator=g) + 0.5,  # every client keeps it whole
        "conv.weight": torch.randn(8, 4, 3, 3, generator=g),
        "ties.weight": torch.tensor([3.0, -2.0, 2.0, 2.0, 1.0, 0.5, 0.25, 0.1]),  # a tie at the cut
        "fc.bias": torch.randn(10, generator=g),  # one client keeps one entry: k = 0
        "bn.num_batches_tracked": torch.tensor(40),
    }
    keep = {
        "bn.weight": [16] * 10,
        "conv.weight": [29, 30, 31, 28, 35, 29, 30, 27, 33, 31],
        "ties.weight": [3] * 10,
        "fc.bias": [1] + [0] * 9,
        "bn.num_batches_tracked": [1] * 10,
    }
    profile = DensityProfile()
    for state in _clients(aggregate, keep):
        profile.add(state, 500)
    pruned = prune_to_profile(aggregate, profile)
    for key, value in aggregate.items():
        if not value.is_floating_point():
            assert torch.equal(pruned[key], value)  # stays whole
            continue
        expected = _authors_pruned(value, [c / value.numel() for c in keep[key]], [500] * 10)
        assert torch.equal(pruned[key], expected), key
    # What the floating sum does: the smallest entry of a whole tensor goes, ties at the cut stay.
    bn = aggregate["bn.weight"]
    assert torch.equal(torch.nonzero(pruned["bn.weight"] == 0).reshape(-1), bn.argmin().reshape(1))
    assert int(torch.count_nonzero(pruned["ties.weight"])) == 4  # k = 3, plus the tied 2.0
    assert torch.equal(pruned["fc.bias"], aggregate["fc.bias"])

    exact = prune_to_profile(aggregate, profile, exact=True)
    assert torch.equal(exact["bn.weight"], bn)
    assert not torch.any(exact["fc.bias"] != 0)  # a mean of 0.1 non-zeros: none kept
    mean_kept = sum(keep["conv.weight"]) // 10  # 30.3 -> 30
    assert int(torch.count_nonzero(exact["conv.weight"])) == mean_kept
    assert int(torch.count_nonzero(exact["ties.weight"])) == 3  # exactly k, ties broken by index


@pytest.mark.parametrize("exact_density", [False, True])
def test_round_one_global_model_loses_one_entry_of_every_whole_tensor(exact_density, run_rounds, digits_module):
    sizes = [digits_module.client_num_samples(k) for k in range(6)]
    total = 0.0
    for n_k in sizes:
        total += 1.0 * (n_k / sum(sizes))
    assert total < 1.0  # what the authors' sum gives for a tensor all six clients keep whole
    trainer = run_rounds(FLASH(0.9, exact_density=exact_density), rounds=1, clients_per_round=6)
    state = trainer.global_state
    whole = [k for k in state if state[k].is_floating_point() and state[k].dim() == 1 and not k.endswith("bias")]
    assert len(whole) == 9  # three BatchNorms: weight, running mean, running variance
    for key in whole:
        assert int((state[key] == 0).sum()) == (0 if exact_density else 1), key


def test_options_are_checked_and_described():
    for key in ("dense_warmup", "exact_density"):
        with pytest.raises(ValueError, match=rf"^method.{key} must be true or false, got 'yes'$"):
            FLASH(**{key: "yes"})
    with pytest.raises(ValueError, match=r"^method.mask_search_round must be an integer >= 1, got 0$"):
        FLASH(mask_search_round=0)
    described = FLASH(dense_warmup=True).describe()
    assert described["dense_warmup"] is True and described["exact_density"] is False


def test_a_callback_group_calls_the_members_that_implement_a_hook_in_order():
    """The client fits run the method's callbacks as one `CallbackGroup` (FLASH's gradient masking
    above goes through it): each hook reaches exactly the members that implement it, in order."""
    import lightning as L

    from sparsyfed_lightning.client.callbacks import CallbackGroup

    calls = []

    class First(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            calls.append(("first", "on_fit_start", trainer, pl_module))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            calls.append(("first", "on_before_optimizer_step", optimizer))

    class Second(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            calls.append(("second", "on_fit_start", trainer, pl_module))

    group = CallbackGroup([First(), Second()])
    group.on_fit_start("trainer", "module")
    group.on_before_optimizer_step("trainer", "module", "optimizer")
    group.on_train_batch_end("trainer", "module", None, None, 0)  # nobody implements it: a no-op
    assert calls == [
        ("first", "on_fit_start", "trainer", "module"),
        ("second", "on_fit_start", "trainer", "module"),
        ("first", "on_before_optimizer_step", "optimizer"),
    ]
    assert "on_train_batch_end" not in vars(group) and "on_fit_start" in vars(group)
