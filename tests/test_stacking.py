"""Client stacking: several clients trained as one grouped network give each client's own result."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsyfed_lightning.data.loaders import StackedBatchLoader, TensorBatchLoader, batch_layout
from sparsyfed_lightning.federated.errors import RunFailedError
from sparsyfed_lightning.models import build_model
from sparsyfed_lightning.models.stacked import StackedLinear, stack_network, stack_states, unstack_state
from sparsyfed_lightning.sparse import (
    ActivationPruning,
    global_magnitude_prune,
    powerpropify,
    prunable_weights,
)

SHAPES = {
    "small_cnn": ((1, 8, 8), {"width": 8}),
    "logmel_cnn": ((1, 16, 16), {"width": 8}),
    "resnet18_cifar": ((3, 8, 8), {}),
    "resnet18_speech": ((1, 64), {}),
    "small_resnet": ((1, 28, 28), {"width": 4}),
}


def _clients(name: str, copies: int) -> list[nn.Module]:
    shape, kwargs = SHAPES[name]
    return [build_model(name, 5, seed=seed, **kwargs) for seed in range(copies)]


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("training", [False, True])
def test_stacked_network_computes_every_client_separately(name, training):
    copies = 2 if name.startswith("resnet") else 3
    singles = _clients(name, copies)
    stacked = stack_network(singles[0], copies)
    stacked.load_state_dict(stack_states([s.state_dict() for s in singles], stacked.state_dict()))
    inputs = [torch.randn(4, *SHAPES[name][0], generator=torch.Generator().manual_seed(10 + i)) for i in range(copies)]
    for net in [*singles, stacked]:
        net.train(training)
    with torch.no_grad():
        expected = torch.cat([net(x) for net, x in zip(singles, inputs, strict=True)], dim=1)
        got = stacked(torch.cat(inputs, dim=1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if training:  # BatchNorm running statistics are per client too
        states = unstack_state(stacked.state_dict(), copies, singles[0].state_dict())
        for single, state in zip(singles, states, strict=True):
            for key, value in single.state_dict().items():
                torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_stack_and_unstack_round_trip_exactly():
    singles = _clients("small_cnn", 3)
    states = [s.state_dict() for s in singles]
    stacked = stack_network(singles[0], 3)
    back = unstack_state(stack_states(states, stacked.state_dict()), 3, states[0])
    for original, restored in zip(states, back, strict=True):
        assert original.keys() == restored.keys()
        for key in original:
            assert torch.equal(original[key], restored[key]), key
    assert isinstance(stacked[-1], StackedLinear) and stacked[-1].weight.shape == (3 * 5, 16, 1)


def test_unsupported_layers_are_refused_by_name():
    with pytest.raises(ValueError, match="LayerNorm"):
        stack_network(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), 2)


def test_batch_layout_and_stacked_loader():
    x, y = torch.randn(20, 2, 3), torch.arange(20)
    assert batch_layout(TensorBatchLoader(x, y, 8)) == (8, 8, 4)
    assert batch_layout(TensorBatchLoader(x, y, 8, drop_last=True)) == (8, 8)
    assert batch_layout(TensorBatchLoader(x[:17], y[:17], 8, skip_singleton=True)) == (8, 8)
    assert batch_layout(TensorBatchLoader(x, y, 5)) == (5, 5, 5, 5)
    assert batch_layout([(x, y)]) is None
    loaders = [TensorBatchLoader(x, y + 100 * i, 8, shuffle=True, seed=i) for i in range(3)]
    alone = [list(TensorBatchLoader(x, y + 100 * i, 8, shuffle=True, seed=i)) for i in range(3)]
    stacked = list(StackedBatchLoader(loaders))
    assert len(stacked) == 3
    for step, (xs, ys) in enumerate(stacked):
        assert ys.shape == (len(alone[0][step][1]), 3)
        for i in range(3):
            assert torch.equal(xs[:, 2 * i : 2 * i + 2], alone[i][step][0])
            assert torch.equal(ys[:, i], alone[i][step][1])
    with pytest.raises(ValueError, match="same batch sizes"):
        StackedBatchLoader([TensorBatchLoader(x, y, 8), TensorBatchLoader(x[:18], y[:18], 8)])


def test_stacked_loader_gives_each_client_the_random_transforms_it_draws_alone():
    def jitter(batch: torch.Tensor) -> torch.Tensor:  # draws from torch's global generator
        return batch + torch.rand(batch.shape)

    x, y = torch.randn(20, 2, 3), torch.arange(20)
    seeds = [11, 12, 13]
    alone = []
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)  # what seed_everything does before a client trains alone
        alone.append(list(TensorBatchLoader(x, y, 8, shuffle=True, seed=i, transform=jitter)))
    torch.manual_seed(0)
    loaders = [TensorBatchLoader(x, y, 8, shuffle=True, seed=i, transform=jitter) for i in range(3)]
    before = torch.get_rng_state()
    for step, (xs, _) in enumerate(StackedBatchLoader(loaders, seeds)):
        for i in range(3):
            assert torch.equal(xs[:, 2 * i : 2 * i + 2], alone[i][step][0])
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left as it was
    with pytest.raises(ValueError, match="got 2 seeds for 3"):
        StackedBatchLoader(loaders, seeds[:2])


@pytest.mark.parametrize("threshold", ["first_batch", "per_step"])
@pytest.mark.parametrize("min_compact_numel", [0, 10**9])
def test_activation_pruning_gives_each_stacked_client_its_own_keep_fraction(threshold, min_compact_numel):
    """The stacked weight gradient equals each client's gradient with its own pruned input."""
    copies = 3
    singles = [build_model("small_cnn", 5, seed=i, width=8) for i in range(copies)]
    stacked = stack_network(singles[0], copies)
    for i, net in enumerate(singles):  # different densities per client
        global_magnitude_prune(prunable_weights(net).values(), [0.5, 0.8, 0.95][i])
    stacked.load_state_dict(stack_states([s.state_dict() for s in singles], stacked.state_dict()))
    for net in [*singles, stacked]:
        powerpropify(net, 1.25, keep_effective_weights=False)
    inputs = [torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(copies)]
    labels = [torch.randint(0, 5, (6,), generator=torch.Generator().manual_seed(9 + i)) for i in range(copies)]
    for net, clients in [*((s, 1) for s in singles), (stacked, copies)]:
        net.train()
        pruning = ActivationPruning(net, threshold=threshold, min_compact_numel=min_compact_numel, clients=clients)
        pruning.attach()
        if clients == 1:
            x, y = inputs[singles.index(net)], labels[singles.index(net)]
            nn.functional.cross_entropy(net(x), y).backward()
        else:
            logits = net(torch.cat(inputs, dim=1)).view(6, copies, 5)
            sum(nn.functional.cross_entropy(logits[:, i], labels[i]) for i in range(copies)).backward()
        if clients > 1:
            keeps = [pruning._states[name].client_keep for name in pruning.layers]
            assert all(len(set(k)) == copies for k in keeps[1:])  # really different per client
        pruning.detach()
    for key, grad in ((k, p.grad) for k, p in stacked.named_parameters()):
        parts = grad.view(copies, -1)
        for i, single in enumerate(singles):
            expected = dict(single.named_parameters())[key].grad
            torch.testing.assert_close(parts[i], expected.reshape(-1), rtol=1e-4, atol=1e-6, msg=key)


class EqualSizeData:
    """Synthetic clients with equal sample counts (the case stacking applies to), plus one odd client."""

    num_classes = 4

    def __init__(self, clients: int = 4, samples: int = 40, odd_samples: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.num_clients = clients
        self.sizes = [samples] * clients
        if odd_samples is not None:
            self.sizes[-1] = odd_samples
        self.inputs = [torch.randn(n, 1, 6, 6, generator=g) for n in self.sizes]
        self.labels = [torch.randint(0, 4, (n,), generator=g) for n in self.sizes]
        self.transform = None

    def setup(self, stage: str | None = None) -> None:
        pass

    def client_train_dataloader(self, cid: int, seed: int = 0) -> TensorBatchLoader:
        return TensorBatchLoader(
            self.inputs[cid], self.labels[cid], 16, shuffle=True, seed=seed, transform=self.transform
        )

    def test_dataloader(self) -> TensorBatchLoader:
        return TensorBatchLoader(self.inputs[0], self.labels[0], 64)


def _run(method, data, stack_clients, rounds=3, **kwargs):
    from sparsyfed_lightning.client.module import ClientModule
    from sparsyfed_lightning.federated.client_runner import decode_result
    from sparsyfed_lightning.federated.server import FederatedServer
    from sparsyfed_lightning.federated.trainer import FederatedTrainer

    uplinks: list[tuple[int, dict[str, float], dict[str, torch.Tensor]]] = []
    original = FederatedServer.receive

    def receive(self, result):
        uplinks.append((result.cid, result.metrics, decode_result(result)))
        return original(self, result)

    FederatedServer.receive = receive
    try:
        model = ClientModule("small_cnn", data.num_classes, lr=0.05, backbone_kwargs={"width": 8})
        trainer = FederatedTrainer(method=method, rounds=rounds, clients_per_round=data.num_clients,
                                   accelerator="cpu", progress="none", stack_clients=stack_clients, **kwargs)
        trainer.fit(model, datamodule=data)
    finally:
        FederatedServer.receive = original
    return trainer, uplinks


def _methods():
    from sparsyfed_lightning.methods import FLASH, Dense, SparsyFed, SparsyFedSpectral, TopK, ZeroFL

    return {
        "dense": lambda: Dense(),
        "topk": lambda: TopK(0.9),
        "flash": lambda: FLASH(0.9),
        "sparsyfed": lambda: SparsyFed(0.9),
        "sparsyfed_per_step": lambda: SparsyFed(0.9, threshold="per_step"),
        "sparsyfed_beta_one": lambda: SparsyFed(0.9, beta=1.0),
        "zerofl": lambda: ZeroFL(0.9),
        "sparsyfed_spectral": lambda: SparsyFedSpectral(0.9),
    }


@pytest.mark.parametrize("name", list(_methods()))
def test_stacked_round_matches_sequential_clients(name):
    """Same uplinks (masks exactly, values to rounding) and metrics with and without stacking."""
    data = EqualSizeData(odd_samples=33)  # three stack, the odd one trains alone
    sequential, seq_uplinks = _run(_methods()[name](), data, 1)
    stacked, stk_uplinks = _run(_methods()[name](), data, 3)
    assert [cid for cid, _, _ in stk_uplinks] == [cid for cid, _, _ in seq_uplinks]
    for (cid, seq_metrics, seq_state), (_, stk_metrics, stk_state) in zip(seq_uplinks, stk_uplinks, strict=True):
        for key, value in seq_state.items():
            torch.testing.assert_close(stk_state[key], value, rtol=1e-3, atol=1e-5, msg=f"client {cid} {key}")
            if key in sequential.server.prunable_keys:
                assert torch.equal(stk_state[key] != 0, value != 0), (cid, key)
        assert stk_metrics.keys() == seq_metrics.keys()
        for key, value in seq_metrics.items():
            assert math.isclose(stk_metrics[key], value, rel_tol=1e-4), (cid, key)
    for a, b in zip(sequential.history, stacked.history, strict=True):
        assert a.get("uplink_bytes") == b.get("uplink_bytes")
        assert math.isclose(a["test_loss"], b["test_loss"], rel_tol=1e-4)


def test_augmented_clients_stacked_see_the_augmentations_they_see_alone():
    """Random crops and flips draw from the global generator; stacking must not change the draws."""
    from sparsyfed_lightning.data.transforms import RandomCropFlip
    from sparsyfed_lightning.methods import Dense

    data = EqualSizeData()
    data.transform = RandomCropFlip(6, 6)
    _, alone = _run(Dense(), data, 1, rounds=2)
    _, stacked = _run(Dense(), data, 4, rounds=2)
    for (_, _, a), (_, _, b) in zip(alone, stacked, strict=True):
        for key, value in a.items():
            torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_clients_of_different_sizes_train_alone_bit_identically():
    from sparsyfed_lightning.methods import SparsyFed

    data = EqualSizeData()
    data.sizes = [40, 41, 42, 43]
    data.inputs = [x[:n] for x, n in zip(EqualSizeData(samples=43).inputs, data.sizes, strict=True)]
    data.labels = [y[:n] for y, n in zip(EqualSizeData(samples=43).labels, data.sizes, strict=True)]
    alone, alone_uplinks = _run(SparsyFed(0.9), data, 1, rounds=2)
    stacked, stacked_uplinks = _run(SparsyFed(0.9), data, 4, rounds=2)
    assert stacked.runner._stacked == {}  # no two clients share a batch layout
    for (_, _, a), (_, _, b) in zip(alone_uplinks, stacked_uplinks, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
    for a, b in zip(alone.history, stacked.history, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith("time")} == {
            k: v for k, v in b.items() if not k.startswith("time")
        }


def test_methods_and_models_that_cannot_stack_train_clients_alone():
    from sparsyfed_lightning.methods import Dense

    class Unstackable(Dense):
        supports_stacking = False

    trainer, _ = _run(Unstackable(), EqualSizeData(), 4, rounds=1)
    assert trainer.runner._stacked == {} and not trainer.runner.can_stack()
    trainer, _ = _run(Dense(), EqualSizeData(), 4, rounds=1, gradient_clip_val=1.0)  # a norm over all clients
    assert trainer.runner._stacked == {} and not trainer.runner.can_stack()
    trainer, _ = _run(Dense(), EqualSizeData(), 4, rounds=1)
    assert set(trainer.runner._stacked) == {4}
    assert all(m.training for m in trainer.runner._stacked[4][0].net.modules())  # trained in training mode


def test_a_model_with_layers_that_cannot_stack_trains_clients_alone(monkeypatch):
    from sparsyfed_lightning.methods import Dense
    from sparsyfed_lightning.models import MODELS

    def normed(num_classes: int, width: int = 8) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, width, 3), nn.GroupNorm(2, width), nn.Flatten(), nn.Linear(16 * width, num_classes)
        )

    monkeypatch.setitem(MODELS, "small_cnn", normed)
    trainer, uplinks = _run(Dense(), EqualSizeData(), 4, rounds=1)
    assert not trainer.runner.can_stack() and trainer.runner._stacked == {}
    assert "GroupNorm" in trainer.runner._stacking_refused
    assert len(uplinks) == 4


def test_a_failed_stacked_fit_is_retried_alone_so_only_the_failing_client_fails(monkeypatch):
    from sparsyfed_lightning.federated.client_runner import ClientRunner
    from sparsyfed_lightning.methods import Dense

    def broken(self, cids, *args, **kwargs):
        raise RuntimeError("out of memory")

    alone = ClientRunner.fit

    def client_1_fails(self, cid, *args, **kwargs):
        if cid == 1:
            raise RuntimeError("client 1 is broken")
        return alone(self, cid, *args, **kwargs)

    monkeypatch.setattr(ClientRunner, "fit_stacked", broken)
    monkeypatch.setattr(ClientRunner, "fit", client_1_fails)
    data = EqualSizeData(odd_samples=33)
    trainer, uplinks = _run(Dense(), data, 3, rounds=1, accept_failures=True)
    assert [cid for cid, _, _ in uplinks] == [0, 2, 3]  # the group of 0, 1, 2 went on one at a time
    assert trainer.history[-1]["failures"] == {1: "RuntimeError: client 1 is broken"}
    with pytest.raises(RunFailedError, match="out of memory .in a fit of 3 stacked clients; trainer.stack_clients=1"):
        _run(Dense(), data, 3, rounds=1)


@pytest.mark.parametrize("value", [0, -3, "many"])
def test_stack_clients_must_be_auto_or_positive(value):
    from sparsyfed_lightning.federated.trainer import FederatedTrainer

    expected = f"trainer.stack_clients must be 'auto' or an integer >= 1, got {value!r}"
    with pytest.raises(ValueError, match=expected) as error:
        FederatedTrainer(progress="none", stack_clients=value)
    assert "\n" not in str(error.value)


def test_auto_stacks_small_cpu_steps_and_leaves_large_ones_alone():
    """auto: 10 clients per fit for steps under the CPU threshold, 1 above it, from the forward FLOPs."""
    from sparsyfed_lightning.federated.engine_setup import STACK_ON_CPU_BELOW_FLOPS
    from sparsyfed_lightning.methods import Dense

    small = EqualSizeData()  # 6x6 inputs: well under the threshold
    trainer, _ = _run(Dense(), small, "auto", rounds=1)
    assert trainer.history[-1]["stacked_clients"] == 4
    assert set(trainer.runner._stacked) == {4}
    flops = trainer.runner.forward_flops(small.client_train_dataloader(0))
    assert 0 < flops < STACK_ON_CPU_BELOW_FLOPS
    large = EqualSizeData(samples=20)
    large.inputs = [torch.randn(20, 1, 96, 96) for _ in range(4)]  # about 16x the threshold
    trainer, uplinks = _run(Dense(), large, "auto", rounds=1)
    assert trainer.runner.forward_flops(large.client_train_dataloader(0)) > STACK_ON_CPU_BELOW_FLOPS
    assert trainer.history[-1]["stacked_clients"] == 1 and trainer.runner._stacked == {} and len(uplinks) == 4


def _backward_matches_alone(singles: list[nn.Module], stacked: nn.Module, inputs: list, labels: list) -> None:
    """One backward of every client alone and of the stacked network; the gradients agree per client."""
    copies = len(singles)
    for net in [*singles, stacked]:
        net.zero_grad()
    for net, x, y in zip(singles, inputs, labels, strict=True):
        nn.functional.cross_entropy(net(x), y).backward()
    logits = stacked(torch.cat(inputs, dim=1)).view(inputs[0].shape[0], copies, -1)
    sum(nn.functional.cross_entropy(logits[:, i], labels[i]) for i in range(copies)).backward()
    for key, param in stacked.named_parameters():
        for i, single in enumerate(singles):
            expected = dict(single.named_parameters())[key].grad.reshape(-1)
            torch.testing.assert_close(param.grad.view(copies, -1)[i], expected, rtol=1e-4, atol=1e-6, msg=key)


def _differently_pruned_clients(copies: int) -> tuple[list[nn.Module], nn.Module]:
    """`copies` small CNNs with their own weights and densities, and their stacked network (plain)."""
    singles = [build_model("small_cnn", 5, seed=i, width=32) for i in range(copies)]
    stacked = stack_network(singles[0], copies)
    for i, net in enumerate(singles):
        global_magnitude_prune(prunable_weights(net).values(), [0.5, 0.8, 0.95][i])
    stacked.load_state_dict(stack_states([s.state_dict() for s in singles], stacked.state_dict()))
    return singles, stacked


@pytest.mark.parametrize("frozen_support", [False, True])
def test_spectral_exponents_and_powerprop_per_stacked_client(frozen_support):
    """Each stacked client gets the exponents it computes alone, and trains with them."""
    from sparsyfed_lightning.sparse import freeze_support, powerprop_of, update_spectral_exponents
    from sparsyfed_lightning.sparse.layers import prunable_layers

    copies = 3
    singles, stacked = _differently_pruned_clients(copies)
    alone = []
    for net in [*singles, stacked]:
        powerpropify(net, 2.0, keep_effective_weights=False)  # as the spectral variant wraps
    for net in singles:
        alone.append(update_spectral_exponents(net, seed=7))
    together = update_spectral_exponents(stacked, seed=7, clients=copies)
    for name, exponents in together.items():
        assert list(exponents) == [a[name] for a in alone], name  # bit-identical: same draws, same chunk
    assert all(powerprop_of(m).client_exponents is not None for _, m in prunable_layers(stacked))
    if frozen_support:
        assert freeze_support(stacked) > 0 and sum(freeze_support(s) for s in singles) > 0
    inputs = [torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(copies)]
    labels = [torch.randint(0, 5, (4,), generator=torch.Generator().manual_seed(9 + i)) for i in range(copies)]
    for net in [*singles, stacked]:
        net.train()
    _backward_matches_alone(singles, stacked, inputs, labels)
    # Powerprop saves v itself (a parameter) and, on the support path, its derivative there: never w.
    for name, module in prunable_layers(stacked):
        saved = module.weight.grad_fn.saved_tensors
        support = powerprop_of(module).support
        assert saved[0].data_ptr() == module.parametrizations.weight.original.data_ptr(), name
        assert len(saved) == 1 if support is None else saved[1].numel() == support.numel(), name


def test_weight_topk_gives_each_stacked_client_its_own_threshold():
    from sparsyfed_lightning.sparse import WeightTopK

    copies = 3
    singles, stacked = _differently_pruned_clients(copies)
    inputs = [torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(copies)]
    hooks = [WeightTopK(net, 0.9).attach() for net in singles]
    hooks.append(WeightTopK(stacked, 0.9, clients=copies).attach())
    for step in range(2):  # the conv thresholds are frozen after the first forward, linear ones are not
        for net, x in zip(singles, inputs, strict=True):
            net(x * (step + 1)).sum().backward()
        stacked(torch.cat(inputs, dim=1) * (step + 1)).sum().backward()
        for key, weight in prunable_weights(stacked).items():
            for i, single in enumerate(singles):
                alone = prunable_weights(single)[key].detach().reshape(-1)
                assert torch.equal(weight.detach().view(copies, -1)[i] != 0, alone != 0), key
        with torch.no_grad():  # a step that lets pruned weights regrow differently per client
            for net in [*singles, stacked]:
                for p in net.parameters():
                    p.sub_(0.1 * p.grad)
                    p.grad = None
    thresholds = hooks[-1]._thresholds
    assert all(t.shape == (copies,) and len(set(t.tolist())) == copies for t in thresholds.values())


def test_stacked_clients_overflow_their_compact_copies_as_they_would_alone():
    """Capacities are per client: a client whose batch overflows stores what it stores alone, and
    the overflow is counted for that client only."""
    copies = 3
    singles, stacked = _differently_pruned_clients(copies)
    for net in [*singles, stacked]:
        powerpropify(net, 1.25, keep_effective_weights=False)
        net.train()
    batches = [[torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(10 * step + i)) for i in range(copies)]
               for step in range(2)]
    batches[1][1] = batches[1][1] * 4  # client 1's second batch overflows its frozen thresholds
    labels = [torch.randint(0, 5, (4,), generator=torch.Generator().manual_seed(9 + i)) for i in range(copies)]
    prunings = [ActivationPruning(net, min_compact_numel=0, headroom=1.0).attach() for net in singles]
    together = ActivationPruning(stacked, min_compact_numel=0, headroom=1.0, clients=copies).attach()
    for inputs in batches:
        _backward_matches_alone(singles, stacked, inputs, labels)
    alone = [p.take_overflows() for p in prunings]
    assert alone[1] and alone[0] != alone[1]  # overflows happened, and not alike for every client
    names = set().union(*alone)
    assert together.take_overflows() == {n: [a.get(n, [0])[0] for a in alone] for n in names}
