"""TensorBatchLoader: lengths, batch shapes, partial/singleton batches, deterministic shuffles."""

from __future__ import annotations

import pytest
import torch

from sparsyfed_lightning.data.loaders import TensorBatchLoader


def make(n: int = 10, features: int = 3):
    inputs = torch.arange(n * features, dtype=torch.float32).reshape(n, features)
    labels = torch.arange(n)
    return inputs, labels


@pytest.mark.parametrize(
    ("n", "batch", "drop_last", "skip_singleton", "sizes"),
    [
        (10, 4, False, False, [4, 4, 2]),
        (10, 4, True, False, [4, 4]),
        (9, 4, False, True, [4, 4]),  # final batch of one skipped
        (9, 4, False, False, [4, 4, 1]),
        (10, 4, False, True, [4, 4, 2]),  # only size-1 batches are skipped
        (8, 4, False, True, [4, 4]),
        (1, 16, False, True, []),
        (3, 16, False, False, [3]),
    ],
)
def test_batch_sizes_and_len(n, batch, drop_last, skip_singleton, sizes):
    inputs, labels = make(n)
    loader = TensorBatchLoader(inputs, labels, batch, drop_last=drop_last, skip_singleton=skip_singleton)
    got = [x.shape[0] for x, _ in loader]
    assert got == sizes
    assert len(loader) == len(sizes)
    assert loader.num_samples == n


def test_unshuffled_batches_are_rows_in_order():
    inputs, labels = make(10)
    batches = list(TensorBatchLoader(inputs, labels, 4))
    assert torch.equal(torch.cat([x for x, _ in batches]), inputs)
    assert torch.equal(torch.cat([y for _, y in batches]), labels)
    assert batches[0][0].shape == (4, 3)


def test_shuffle_is_a_permutation_and_pairs_stay_aligned():
    inputs, labels = make(37)
    loader = TensorBatchLoader(inputs, labels, 8, shuffle=True, seed=3)
    xs, ys = zip(*loader, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert sorted(y.tolist()) == list(range(37))
    assert not torch.equal(y, labels)
    assert torch.equal(x, inputs[y])  # every input still carries its own label


def test_shuffles_are_deterministic_per_seed_and_differ_between_epochs():
    inputs, labels = make(50)

    def epochs(seed: int, count: int = 3) -> list[list[int]]:
        loader = TensorBatchLoader(inputs, labels, 7, shuffle=True, seed=seed)
        return [torch.cat([y for _, y in loader]).tolist() for _ in range(count)]

    first, again, other = epochs(11), epochs(11), epochs(12)
    assert first == again
    assert first[0] != first[1] != first[2]
    assert first != other
    # Independent of the global RNG.
    torch.manual_seed(0)
    assert epochs(11) == first


def test_indices_restrict_the_loader_to_a_subset():
    inputs, labels = make(20)
    rows = torch.tensor([2, 5, 7, 11, 19])
    loader = TensorBatchLoader(inputs, labels, 2, shuffle=True, seed=0, indices=rows)
    assert loader.num_samples == 5
    assert len(loader) == 3
    seen = torch.cat([y for _, y in loader])
    assert sorted(seen.tolist()) == rows.tolist()
    unshuffled = TensorBatchLoader(inputs, labels, 10, indices=rows)
    ((x, y),) = list(unshuffled)
    assert torch.equal(y, rows) and torch.equal(x, inputs[rows])


def test_transform_is_applied_to_each_batch():
    inputs, labels = make(6)
    loader = TensorBatchLoader(inputs, labels, 4, transform=lambda x: -x)
    x, _ = next(iter(loader))
    assert torch.equal(x, -inputs[:4])


def test_invalid_arguments():
    inputs, labels = make(6)
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatchLoader(inputs, labels, 0)
    with pytest.raises(ValueError, match="differ in length"):
        TensorBatchLoader(inputs, labels[:5], 2)
