"""The paper's LDA partition: statistics, exact sizes, sampling without replacement, seeds, errors."""

from __future__ import annotations

import numpy as np
import pytest

from sparsyfed_lightning.data.lda import lda_partition


def balanced_labels(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def mean_largest_class_fraction(labels: np.ndarray, clients: list[np.ndarray], num_classes: int) -> float:
    fractions = [np.bincount(labels[rows], minlength=num_classes).max() / len(rows) for rows in clients]
    return float(np.mean(fractions))


def partition(alpha: float, seed: int = 0, **kw):
    train, test = balanced_labels(10, 500), balanced_labels(10, 100, seed=1)
    kw.setdefault("num_clients", 50)
    return train, test, lda_partition(train, test, num_classes=10, alpha=alpha, seed=seed, **kw)


def test_large_alpha_is_close_to_uniform_and_small_alpha_concentrated():
    train, _, iid = partition(1000.0)
    _, _, skewed = partition(0.1)
    uniform = mean_largest_class_fraction(train, iid.train, 10)
    concentrated = mean_largest_class_fraction(train, skewed.train, 10)
    # 100 samples over 10 equally likely classes: the largest class holds about 0.16.
    assert uniform < 0.25
    # Dir(0.1) puts most of the mass on one or two classes.
    assert concentrated > 0.6
    per_client_classes = [len(np.unique(train[rows])) for rows in skewed.train]
    assert np.mean(per_client_classes) < 5


def test_exact_client_sizes_and_no_sample_used_twice():
    train, test, part = partition(0.1)
    assert [len(rows) for rows in part.train] == [100] * 50  # floor(5000 / 50)
    assert [len(rows) for rows in part.test] == [20] * 50  # floor(1000 / 50)
    for split, n in ((part.train, len(train)), (part.test, len(test))):
        everything = np.concatenate(split)
        assert len(np.unique(everything)) == len(everything)
        assert everything.min() >= 0 and everything.max() < n


def test_samples_per_client_and_leftover_rows():
    train = balanced_labels(4, 25)  # 100 samples
    part = lda_partition(train, balanced_labels(4, 5), num_clients=3, num_classes=4, alpha=1.0, seed=0)
    assert [len(rows) for rows in part.train] == [33, 33, 33]
    part = lda_partition(
        train, balanced_labels(4, 5), num_clients=3, num_classes=4, alpha=1.0, seed=0, samples_per_client=20
    )
    assert [len(rows) for rows in part.train] == [20, 20, 20]


def test_exhausted_classes_keep_sizes_exact():
    # Tiny alpha with every sample handed out: later clients find their favourite classes empty.
    train = balanced_labels(5, 20)
    part = lda_partition(train, balanced_labels(5, 4), num_clients=10, num_classes=5, alpha=0.01, seed=4)
    assert [len(rows) for rows in part.train] == [10] * 10
    assert sorted(np.concatenate(part.train).tolist()) == list(range(100))


def test_client_test_splits_follow_the_client_proportions():
    train, test, part = partition(0.1)

    def distance(train_rows, test_rows) -> float:  # total variation between class distributions
        p = np.bincount(train[train_rows], minlength=10) / len(train_rows)
        q = np.bincount(test[test_rows], minlength=10) / len(test_rows)
        return 0.5 * float(np.abs(p - q).sum())

    own = np.mean([distance(a, b) for a, b in zip(part.train, part.test, strict=True)])
    shifted = part.test[1:] + part.test[:1]
    other = np.mean([distance(a, b) for a, b in zip(part.train, shifted, strict=True)])
    assert own < 0.3 < 0.6 < other


def test_same_seed_same_partition_other_seed_different():
    _, _, a = partition(1.0, seed=7)
    _, _, b = partition(1.0, seed=7)
    _, _, c = partition(1.0, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a.train + a.test, b.train + b.test, strict=True))
    assert np.array_equal(a.proportions, b.proportions)
    assert not all(np.array_equal(x, y) for x, y in zip(a.train, c.train, strict=True))


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf")])
def test_invalid_alpha(alpha):
    with pytest.raises(ValueError, match=r"alpha=.*must be a finite number > 0"):
        partition(alpha)


def test_more_clients_than_samples():
    train, test = balanced_labels(2, 5), balanced_labels(2, 50)
    with pytest.raises(ValueError, match=r"num_clients=11 exceeds the 10 samples of the train split"):
        lda_partition(train, test, num_clients=11, num_classes=2, alpha=1.0, seed=0)


def test_samples_per_client_too_large():
    train, test = balanced_labels(2, 10), balanced_labels(2, 10)
    with pytest.raises(ValueError, match=r"samples_per_client=8 is invalid for num_clients=3.*at most 6"):
        lda_partition(train, test, num_clients=3, num_classes=2, alpha=1.0, seed=0, samples_per_client=8)
