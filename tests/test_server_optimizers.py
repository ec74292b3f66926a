"""Server optimizers against updates computed by hand (scalar Python floats), resume, validation."""

from __future__ import annotations

import io
import math

import pytest
import torch

from sparsyfed_lightning.server.optimizers import (
    SERVER_OPTIMIZERS,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    build_server_optimizer,
)

G0 = [1.0, -2.0]
# Aggregates of three rounds; entry 1 has a zero pseudo-gradient in round 1.
AGGREGATES = [[1.5, -2.0], [1.08, -1.0], [3.0, -1.5]]
NBT = [7, 9, 12]  # num_batches_tracked of each round's aggregate


def run(optimizer, aggregates=AGGREGATES):
    """Apply the optimizer over the rounds; returns the float entry after each round."""
    state = {"w": torch.tensor(G0, dtype=torch.float64), "bn.num_batches_tracked": torch.tensor(3)}
    history = []
    for agg, nbt in zip(aggregates, NBT, strict=True):
        aggregate = {"w": torch.tensor(agg, dtype=torch.float64), "bn.num_batches_tracked": torch.tensor(nbt)}
        state = optimizer.step(state, aggregate)
        # integer entries take the aggregate's value, whatever the optimizer
        assert state["bn.num_batches_tracked"].dtype == torch.int64
        assert state["bn.num_batches_tracked"].item() == nbt
        history.append(state["w"].tolist())
    return history


def assert_history(got, expected):
    for g_round, e_round in zip(got, expected, strict=True):
        for g, e in zip(g_round, e_round, strict=True):
            assert g == pytest.approx(e, rel=1e-12, abs=1e-15)


def test_fedavg_lr_one_is_the_aggregate_exactly():
    g = {"w": torch.rand(1000) * 10, "n": torch.tensor(4)}
    a = {"w": torch.rand(1000) * 1e-3, "n": torch.tensor(8)}
    assert not torch.equal(g["w"] + (a["w"] - g["w"]), a["w"])  # the naive update would round
    out = FedAvg().step(g, a)
    assert torch.equal(out["w"], a["w"]) and out["n"].item() == 8
    assert out["w"] is not a["w"]


def test_fedavg_server_lr():
    expected, g = [], G0[:]
    for a in AGGREGATES:
        g = [gi + 0.5 * (ai - gi) for gi, ai in zip(g, a, strict=True)]
        expected.append(g)
    # round 1 by hand: 1 + 0.5 * 0.5 = 1.25; -2 + 0 = -2
    assert expected[0] == [1.25, -2.0]
    assert_history(run(FedAvg(lr=0.5)), expected)


def test_fedavgm():
    lr, mu = 0.5, 0.9
    expected, g, m = [], G0[:], [0.0, 0.0]
    for a in AGGREGATES:
        d = [ai - gi for gi, ai in zip(g, a, strict=True)]
        m = [mu * mi + di for mi, di in zip(m, d, strict=True)]
        g = [gi + lr * mi for gi, mi in zip(g, m, strict=True)]
        expected.append(g)
    # round 1: m = d = (0.5, 0) -> w = (1.25, -2); round 2: d = (1.08 - 1.25, 1) = (-0.17, 1),
    # m = (0.45 - 0.17, 1) = (0.28, 1) -> w = (1.39, -1.5)
    assert expected[0] == [1.25, -2.0]
    assert expected[1] == pytest.approx([1.39, -1.5])
    assert_history(run(FedAvgM(lr=lr, momentum=mu)), expected)


def adam_reference(lr, b1, b2, tau, bias_correction):
    expected, g, m, v = [], G0[:], [0.0, 0.0], [0.0, 0.0]
    for t, a in enumerate(AGGREGATES, start=1):
        eta = lr * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1)) if bias_correction else lr
        new_g = []
        for i in range(2):
            d = a[i] - g[i]
            m[i] = b1 * m[i] + (1 - b1) * d
            v[i] = b2 * v[i] + (1 - b2) * (d * d)
            new_g.append(g[i] + eta * m[i] / (math.sqrt(v[i]) + tau))
        g = new_g
        expected.append(g)
    return expected


@pytest.mark.parametrize("bias_correction", [True, False])
def test_fedadam(bias_correction):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    expected = adam_reference(lr, b1, b2, tau, bias_correction)
    # Round 1 by hand: d = 0.5, m = 0.05, v = 0.0025, sqrt(v) = 0.05; the first update uses the
    # authors' t + 1 = 2: eta = 0.1 * sqrt(1 - 0.99**2) / (1 - 0.9**2). Entry 1: d = 0 -> unchanged.
    eta = 0.1 * math.sqrt(0.0199) / 0.19 if bias_correction else 0.1
    assert expected[0][0] == pytest.approx(1.0 + eta * 0.05 / 0.051)
    assert expected[0][1] == -2.0
    opt = FedAdam(lr=lr, beta1=b1, beta2=b2, tau=tau, bias_correction=bias_correction)
    assert_history(run(opt), expected)


def test_fedyogi_takes_both_branches_of_the_sign():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    expected, g, m, v, signs = [], G0[:], [0.0, 0.0], [0.0, 0.0], []
    for a in AGGREGATES:
        new_g = []
        for i in range(2):
            d = a[i] - g[i]
            m[i] = b1 * m[i] + (1 - b1) * d
            s = (v[i] > d * d) - (v[i] < d * d)
            signs.append(s)
            v[i] = v[i] - (1 - b2) * (d * d) * s
            new_g.append(g[i] + lr * m[i] / (math.sqrt(v[i]) + tau))
        g = new_g
        expected.append(g)
    # v starts at 0: round 1 grows v (sign -1) like Adam; round 2's small step on entry 0 shrinks it
    # (sign +1): v - 0.01 d^2 instead of Adam's 0.99 v + 0.01 d^2.
    assert signs[0] == -1 and signs[2] == 1 and signs[4] == -1
    assert_history(run(FedYogi(lr=lr, beta1=b1, beta2=b2, tau=tau)), expected)


def test_fedadagrad():
    lr, tau = 0.1, 1e-3
    expected, g, v = [], G0[:], [0.0, 0.0]
    for a in AGGREGATES:
        new_g = []
        for i in range(2):
            d = a[i] - g[i]
            v[i] = v[i] + d * d
            new_g.append(g[i] + lr * d / (math.sqrt(v[i]) + tau))
        g = new_g
        expected.append(g)
    # round 1: d = 0.5, v = 0.25 -> 1 + 0.1 * 0.5 / 0.501
    assert expected[0][0] == pytest.approx(1 + 0.05 / 0.501)
    assert_history(run(FedAdagrad(lr=lr, tau=tau)), expected)


def _random_rounds(n_rounds=3):
    g = torch.Generator().manual_seed(0)
    state = {
        "w": torch.randn(4, 5, generator=g),
        "bn.running_mean": torch.randn(5, generator=g),
        "bn.num_batches_tracked": torch.tensor(0),
        "half": torch.randn(3, generator=g).to(torch.bfloat16),
    }
    aggregates = [
        {
            k: (v + torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v + r + 1)
            for k, v in state.items()
        }
        for r in range(n_rounds)
    ]
    return state, aggregates


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_resume_from_state_dict_equals_uninterrupted(name):
    state, aggregates = _random_rounds()
    opt = build_server_optimizer(name, lr=0.3)
    uninterrupted = state
    for agg in aggregates:
        uninterrupted = opt.step(uninterrupted, agg)

    first = build_server_optimizer(name, lr=0.3)
    resumed = first.step(state, aggregates[0])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = build_server_optimizer(name, lr=0.3)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    for agg in aggregates[1:]:
        resumed = second.step(resumed, agg)
    assert list(resumed) == list(uninterrupted)
    for key in uninterrupted:
        assert resumed[key].dtype == state[key].dtype
        assert torch.equal(resumed[key], uninterrupted[key]), key


def test_inputs_are_not_modified_and_integer_entries_have_no_moments():
    state, aggregates = _random_rounds(1)
    before = {k: v.clone() for k, v in state.items()}
    opt = FedAdam()
    opt.step(state, aggregates[0])
    assert all(torch.equal(state[k], before[k]) for k in state)
    assert "bn.num_batches_tracked" not in opt.state_dict()["moments"]["v"]
    assert set(opt.state_dict()["moments"]["m"]) == {"w", "bn.running_mean", "half"}


def test_hyperparameter_validation_names_the_argument():
    cases = [
        (FedAvg, {"lr": 0.0}, "lr"),
        (FedAvg, {"lr": math.nan}, "lr"),
        (FedAvgM, {"momentum": 1.0}, "momentum"),
        (FedAdam, {"beta1": 1.0}, "beta1"),
        (FedAdam, {"beta2": -0.1}, "beta2"),
        (FedYogi, {"tau": 0.0}, "tau"),
        (FedAdagrad, {"lr": -1.0}, "lr"),
    ]
    for cls, kwargs, name in cases:
        with pytest.raises(ValueError, match=f"^server_optimizer.{name} must"):
            cls(**kwargs)


def test_registry_and_errors():
    assert set(SERVER_OPTIMIZERS) == {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}
    opt = build_server_optimizer("FedAdam", lr=0.05, bias_correction=False)
    assert isinstance(opt, FedAdam) and opt.lr == 0.05 and opt.name == "fedadam"
    with pytest.raises(ValueError, match="unknown server optimizer 'adamw'; known: fedavg"):
        build_server_optimizer("adamw")
    with pytest.raises(ValueError, match="is for 'fedavg', not 'fedadam'"):
        FedAdam().load_state_dict(FedAvg().state_dict())
    state, aggregates = _random_rounds(1)
    aggregates[0].pop("w")
    with pytest.raises(ValueError, match=r"missing \['w'\]"):
        FedAvg().step(state, aggregates[0])
