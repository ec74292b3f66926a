"""Magnitude pruning: exact counts, ties and bad input, against a NumPy stable-sort reference."""

import numpy as np
import pytest
import torch

from sparsyfed_lightning.sparse import global_magnitude_prune, layerwise_magnitude_prune, magnitude_threshold


def _reference_keep(arrays, sparsity):
    """Keep mask by stable argsort: the round(s*N) smallest |x| (lowest index first on ties) pruned."""
    flat = np.concatenate([np.abs(a.numpy()).ravel() for a in arrays])
    n_prune = round(sparsity * flat.size)
    order = np.argsort(flat, kind="stable")
    keep = np.ones(flat.size, dtype=bool)
    keep[order[:n_prune]] = False
    return keep


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.999])
def test_global_prune_exact_count_and_selection(sparsity):
    torch.manual_seed(0)
    tensors = [torch.randn(40, 30), torch.randn(7), torch.randn(3, 3, 5, 5)]
    originals = [t.clone() for t in tensors]
    masks = global_magnitude_prune(tensors, sparsity)
    total = sum(t.numel() for t in tensors)
    pruned = sum(int((t == 0).sum()) for t in tensors)
    assert pruned == round(sparsity * total)
    expected_keep = _reference_keep(originals, sparsity)
    got_keep = np.concatenate([m.numpy().ravel() for m in masks])
    assert np.array_equal(got_keep, expected_keep)
    for t, o, m in zip(tensors, originals, masks, strict=True):
        assert torch.equal(t, o * m)


def test_ties_are_pruned_lowest_index_first():
    t = torch.tensor([3.0, 1.0, -1.0, 1.0, 2.0, -1.0])
    global_magnitude_prune([t], 0.5)  # three of the four entries with |x| = 1 go, in index order
    assert t.tolist() == [3.0, 0.0, 0.0, 0.0, 2.0, -1.0]


def test_existing_zeros_count_toward_the_amount():
    t = torch.tensor([0.0, 0.0, 5.0, 4.0, 3.0, 2.0, 1.0, 6.0, 7.0, 8.0])
    global_magnitude_prune([t], 0.3)
    assert int((t == 0).sum()) == 3
    assert t[6] == 0 and t[5] != 0


def test_all_zero_tensors_and_full_ties():
    zeros = [torch.zeros(10), torch.zeros(3, 3)]
    global_magnitude_prune(zeros, 0.9)
    assert all(torch.equal(z, torch.zeros_like(z)) for z in zeros)
    same = torch.full((10,), 2.0)
    global_magnitude_prune([same], 0.5)
    assert same.tolist() == [0.0] * 5 + [2.0] * 5


def test_global_differs_from_layerwise():
    small = torch.full((10,), 0.1)
    large = torch.full((10,), 5.0)
    global_magnitude_prune([small, large], 0.5)
    assert int((small == 0).sum()) == 10 and int((large == 0).sum()) == 0
    small, large = torch.full((10,), 0.1), torch.full((10,), 5.0)
    layerwise_magnitude_prune([small, large], 0.5)
    assert int((small == 0).sum()) == 5 and int((large == 0).sum()) == 5


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_bad_sparsity_is_rejected_with_its_value(bad):
    t = torch.randn(5)
    with pytest.raises(ValueError, match="sparsity must be a number in \\[0, 1\\)"):
        global_magnitude_prune([t], bad)
    with pytest.raises(ValueError, match=str(bad).replace("(", "").split(".")[0]):
        layerwise_magnitude_prune([t], bad)


@pytest.mark.parametrize("keep", [1e-7, 0.05, 0.3, 1.0])
def test_threshold_is_kth_largest_magnitude(keep):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6)
    k = min(x.numel(), max(1, int(np.ceil(keep * x.numel()))))
    expected = np.sort(np.abs(x.numpy()).ravel())[::-1][k - 1]
    assert magnitude_threshold(x, keep).item() == pytest.approx(float(expected), abs=0)


def test_pruned_entries_are_positive_zeros():
    t = -torch.rand(1000) - 0.1  # all negative: a multiplicative mask would leave -0.0
    global_magnitude_prune([t], 0.9)
    zeros = t[t == 0]
    assert zeros.numel() == 900
    assert not torch.any(torch.signbit(zeros))


def test_min_layer_density_guards_every_layer_and_keeps_the_exact_count():
    torch.manual_seed(0)
    small = torch.randn(1000) * 0.01  # would be wiped out entirely by global pruning at 99%
    large = torch.randn(200)
    originals = [small.clone(), large.clone()]
    global_magnitude_prune([small, large], 0.99, min_layer_density=0.005)
    assert int((small != 0).sum()) + int((large != 0).sum()) == 1200 - round(0.99 * 1200)
    assert int((small != 0).sum()) == 5  # ceil(0.005 * 1000) reserved, the five largest
    top5 = torch.topk(originals[0].abs(), 5).indices
    assert torch.all(small[top5] != 0)
    unguarded = [o.clone() for o in originals]
    global_magnitude_prune(unguarded, 0.99)
    assert int((unguarded[0] != 0).sum()) == 0


@pytest.mark.parametrize("bad", [-0.1, 0.02, 0.5])
def test_min_layer_density_must_leave_room_for_the_target(bad):
    with pytest.raises(ValueError, match="min_layer_density"):
        global_magnitude_prune([torch.randn(100)], 0.99, min_layer_density=bad)


@pytest.mark.parametrize("keep", [1e-7, 0.05, 0.3, 1.0])
def test_threshold_per_group_and_at_a_device_keep_fraction_match_the_host_path(keep):
    """Chunks (stacked clients) get their own thresholds; a tensor keep fraction (sort + gather, no
    host read) selects exactly what the float one (topk) selects."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 6, 6)  # three chunks
    expected = torch.stack([magnitude_threshold(chunk, keep) for chunk in x])
    assert torch.equal(magnitude_threshold(x, keep, groups=3), expected)
    assert torch.equal(magnitude_threshold(x, torch.full((3,), keep, dtype=torch.float64), groups=3), expected)
    assert torch.equal(magnitude_threshold(x[0], torch.tensor([keep])), expected[0])
