"""Partitioner registry: flwr-datasets `dirichlet`/`iid`, pluggable Partitioner objects, errors."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from flwr_datasets.partitioner import Partitioner, ShardPartitioner

from sparsyfed_lightning.data.partitioners import partition_dataset


def labels(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


TRAIN, TEST = labels(10, 100), labels(10, 20, seed=1)


def run(partitioner, **kw):
    kw.setdefault("num_clients", 10)
    kw.setdefault("alpha", 1.0)
    kw.setdefault("seed", 0)
    return partition_dataset(partitioner, TRAIN, TEST, num_classes=10, **kw)


def test_iid_covers_every_sample_once_in_equal_shards_with_mixed_classes():
    part = run("iid")
    rows = np.concatenate(part.train)
    assert sorted(rows.tolist()) == list(range(len(TRAIN)))
    assert [len(r) for r in part.train] == [100] * 10
    # A contiguous shard of the unshuffled labels would not be IID; the seeded shuffle makes it so.
    assert all(len(np.unique(TRAIN[r])) >= 8 for r in part.train)
    assert [len(r) for r in part.test] == [20] * 10
    assert len(np.unique(np.concatenate(part.test))) == 200


def test_dirichlet_is_skewed_for_small_alpha_and_deterministic():
    skewed, again, other = (
        run("dirichlet", alpha=0.1),
        run("dirichlet", alpha=0.1),
        run("dirichlet", alpha=0.1, seed=1),
    )
    fractions = [np.bincount(TRAIN[r], minlength=10).max() / len(r) for r in skewed.train]
    assert np.mean(fractions) > 0.5
    assert sorted(np.concatenate(skewed.train).tolist()) == list(range(len(TRAIN)))
    assert all(np.array_equal(a, b) for a, b in zip(skewed.train, again.train, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(skewed.train, other.train, strict=True))


def test_a_partitioner_object_can_be_plugged_in():
    part = run(ShardPartitioner(num_partitions=10, partition_by="label", num_shards_per_partition=2, seed=3))
    assert sum(len(r) for r in part.train) == len(TRAIN)
    assert all(len(np.unique(TRAIN[r])) <= 2 for r in part.train)


def test_partitioner_sees_the_source_label_column_name():
    seen = {}

    class Recording(Partitioner):
        def load_partition(self, partition_id: int) -> datasets.Dataset:
            seen["columns"] = self.dataset.column_names
            return self.dataset.shard(num_shards=10, index=partition_id)

        @property
        def num_partitions(self) -> int:
            return 10

    run(Recording(), label_column="fine_label")
    assert seen["columns"] == ["fine_label", "row"]


def test_unknown_partitioner_name():
    with pytest.raises(
        ValueError, match=r"partitioner='shards' is unknown; known partitioners: dirichlet, iid, lda"
    ):
        run("shards")


def test_client_left_empty_is_an_error():
    class LeavesOneEmpty(Partitioner):
        def load_partition(self, partition_id: int) -> datasets.Dataset:
            return self.dataset.select(
                [] if partition_id == 3 else range(partition_id, len(self.dataset), 10)
            )

        @property
        def num_partitions(self) -> int:
            return 10

    with pytest.raises(ValueError, match=r"partitioner=LeavesOneEmpty left client 3 empty"):
        run(LeavesOneEmpty())


def test_num_partitions_must_match_num_clients():
    with pytest.raises(ValueError, match=r"num_partitions=5, but num_clients=10"):
        run(ShardPartitioner(num_partitions=5, partition_by="label", num_shards_per_partition=2))


def test_dirichlet_alpha_and_sizes_are_checked():
    with pytest.raises(ValueError, match=r"alpha=0.*> 0"):
        run("dirichlet", alpha=0)
    with pytest.raises(ValueError, match=r"num_clients=2000 exceeds the 1000 samples"):
        run("iid", num_clients=2000)
    with pytest.raises(ValueError, match=r"samples_per_client=5 only applies to partitioner='lda'"):
        run("iid", samples_per_client=5)
