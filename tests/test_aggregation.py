"""Weighted averaging of client states against hand-computed means."""

from __future__ import annotations

import math

import pytest
import torch

from sparsyfed_lightning.server.aggregation import WeightedAverage, weighted_average


def _clients():
    a = {
        "w": torch.tensor([1.0, 2.0, 0.0]),
        "bn.running_var": torch.tensor([0.5], dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(10),
        "neg": torch.tensor([-10, 7], dtype=torch.int64),
        "h": torch.tensor([1.0, 3.0], dtype=torch.float16),
    }
    b = {
        "w": torch.tensor([3.0, -2.0, 0.0]),
        "bn.running_var": torch.tensor([1.5], dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(13),
        "neg": torch.tensor([-13, 8], dtype=torch.int64),
        "h": torch.tensor([2.0, 5.0], dtype=torch.float16),
    }
    return a, b


def test_unequal_weights_against_hand_computed_mean():
    a, b = _clients()
    avg = WeightedAverage()
    avg.add(a, 1.0)
    avg.add(b, 3.0)
    out = avg.result()
    assert avg.total_weight == 4.0 and avg.count == 2
    # (1*1 + 3*3)/4 = 2.5, (1*2 + 3*-2)/4 = -1.0, 0
    assert torch.equal(out["w"], torch.tensor([2.5, -1.0, 0.0]))
    # (0.5 + 4.5)/4 = 1.25
    assert torch.equal(out["bn.running_var"], torch.tensor([1.25], dtype=torch.float64))
    # (10 + 39)/4 = 12.25 -> 12, int64 kept
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert out["bn.num_batches_tracked"].item() == 12
    # (-10 - 39)/4 = -12.25 -> -12 (truncation toward zero, not floor); (7 + 24)/4 = 7.75 -> 7
    assert out["neg"].tolist() == [-12, 7]
    # (1 + 6)/4 = 1.75, (3 + 15)/4 = 4.5, back to float16
    assert out["h"].dtype == torch.float16 and out["h"].tolist() == [1.75, 4.5]
    assert list(out) == list(a)


def test_streaming_keeps_no_client_state_and_convenience_matches():
    a, b = _clients()
    avg = WeightedAverage()
    avg.add(a, 1.0)
    a["w"].fill_(100.0)  # mutating a client after add must not change the result
    avg.add(b, 3.0)
    assert avg.result()["w"].tolist() == [2.5, -1.0, 0.0]
    a, b = _clients()
    expected = avg.result()
    got = weighted_average([a, b], [1, 3])
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_equal_integer_values_survive_non_trivial_weights():
    states = [{"n": torch.tensor(37)} for _ in range(3)]
    assert weighted_average(states, [500, 333, 17])["n"].item() == 37


def test_float32_average_is_accumulated_in_float64():
    # 2**24 + 1 is not a float32, so a float32 running sum drops both ones (2**24 / 3 = 5592405.33);
    # in float64 the sum is 16777218 and the mean 5592406 exactly.
    states = [{"x": torch.tensor([16777216.0])}, {"x": torch.tensor([1.0])}, {"x": torch.tensor([1.0])}]
    assert weighted_average(states, [1, 1, 1])["x"].item() == 5592406.0


def test_negative_zero_comes_out_positive():
    states = [{"x": torch.tensor([-0.0])}, {"x": torch.tensor([-0.0])}]
    out = weighted_average(states, [1, 2])["x"]
    assert out.item() == 0.0 and not torch.signbit(out).item()


def test_key_mismatch_names_the_keys():
    a, b = _clients()
    b.pop("neg")
    b["extra.key"] = torch.zeros(1)
    avg = WeightedAverage()
    avg.add(a, 1.0)
    with pytest.raises(ValueError, match=r"missing \['neg'\].*extra \['extra.key'\]"):
        avg.add(b, 1.0)


def test_shape_mismatch_and_bad_weights():
    a, b = _clients()
    b["w"] = torch.zeros(4)
    with pytest.raises(ValueError, match="'w' has shape"):
        weighted_average([a, b], [1, 1])
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="weight"):
            WeightedAverage().add(a, bad)
    with pytest.raises(ValueError, match="before any"):
        WeightedAverage().result()
    with pytest.raises(ValueError, match="2 states but 1 weights"):
        weighted_average([a, a], [1])
