"""FederatedDataModule on the offline digits: sizes, loaders, caching, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import isolated_hf_cache  # noqa: F401 - autouse fixture
from flwr_datasets.partitioner import IidPartitioner
from sklearn.datasets import load_digits

from sparsyfed_lightning.data import module as module_file
from sparsyfed_lightning.data.module import FederatedDataModule


def digits(tmp_path, **kw) -> FederatedDataModule:
    return FederatedDataModule("digits", cache_dir=str(tmp_path / "cache"), **kw)


def all_rows(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def same_partition(a: FederatedDataModule, b: FederatedDataModule, splits=("train",)) -> bool:
    pairs = [
        (x, y) for s in splits for x, y in zip(getattr(a.partition, s), getattr(b.partition, s), strict=True)
    ]
    return all(np.array_equal(x, y) for x, y in pairs)


def test_config_facts_need_no_data(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("num_classes/input_shape must not load data")

    monkeypatch.setattr(module_file, "load_source", no_loading)
    assert digits(tmp_path).num_classes == 10
    assert digits(tmp_path).input_shape == (1, 8, 8)
    speech = FederatedDataModule("speech_commands", speech_classes=12, audio_features="logmel")
    assert speech.num_classes == 12 and speech.input_shape == (1, 40, 101)
    assert FederatedDataModule("cifar100").num_classes == 100
    assert digits(tmp_path).in_channels == 1 and FederatedDataModule("cifar10").in_channels == 3
    assert speech.in_channels == 1


def test_in_channels_of_flat_feature_vectors_is_none(tmp_path):
    dm = digits(tmp_path)
    dm._train = (torch.zeros(4, 64), torch.zeros(4))  # what a local dataset of numeric columns materialises
    assert dm.input_shape == (64,) and dm.in_channels is None


def test_digits_split_sizes_values_and_client_sizes(tmp_path):
    dm = digits(tmp_path, num_clients=10, alpha=0.5)
    dm.setup()
    train_x, train_y = dm.train_tensors
    test_x, test_y = dm.test_tensors
    # Stratified 80/20: every digit keeps round(20 %) of its samples in the test split.
    per_class = np.bincount(load_digits().target)
    assert np.array_equal(np.bincount(test_y.numpy()), np.round(0.2 * per_class))
    n_test = int(np.round(0.2 * per_class).sum())
    assert len(test_y) == n_test and len(train_y) == 1797 - n_test
    assert train_x.shape == (1797 - n_test, 1, 8, 8) and train_x.min() == -1 and train_x.max() == 1
    assert [dm.client_num_samples(k) for k in range(10)] == [(1797 - n_test) // 10] * 10
    assert [dm.client_test_dataloader(k).num_samples for k in range(10)] == [n_test // 10] * 10
    fixed = digits(tmp_path, num_clients=10, samples_per_client=50)
    assert [fixed.client_num_samples(k) for k in range(10)] == [50] * 10


def test_digit_pixels_are_the_scaled_sklearn_images(tmp_path):
    dm = digits(tmp_path)
    bunch = load_digits()
    x, y = dm.train_tensors
    expected = torch.from_numpy((bunch.images / 16.0 - 0.5) / 0.5).float()
    for row in (0, 100, 1000):
        match = ((expected - x[row, 0]).abs().flatten(1).max(1).values < 1e-6).nonzero().flatten()
        assert len(match) >= 1 and int(y[row]) in bunch.target[match.numpy()].tolist()


def test_client_loaders_cover_exactly_the_client_rows(tmp_path):
    dm = digits(tmp_path, num_clients=5, batch_size=16)
    counts = dm.class_counts()
    assert counts.shape == (5, 10)
    for cid in range(5):
        loader = dm.client_train_dataloader(cid, seed=cid)
        n = dm.client_num_samples(cid)
        assert len(loader) == -(-n // 16)
        x, y = all_rows(loader)
        assert len(y) == n and np.array_equal(np.bincount(y.numpy(), minlength=10), counts[cid])
        train_x, train_y = dm.train_tensors
        rows = dm.client_train_indices(cid)
        assert torch.equal(torch.sort(y).values, torch.sort(train_y[rows]).values)
    # Same seed, same epoch order; a different seed, another order.
    first = all_rows(dm.client_train_dataloader(2, seed=9))[1]
    assert torch.equal(first, all_rows(dm.client_train_dataloader(2, seed=9))[1])
    assert not torch.equal(first, all_rows(dm.client_train_dataloader(2, seed=10))[1])


def test_central_test_loader_is_the_full_test_split_in_order(tmp_path):
    dm = digits(tmp_path, test_batch_size=100)
    loader = dm.test_dataloader()
    assert len(loader) == 4  # about 360 samples in batches of 100
    x, y = all_rows(loader)
    assert torch.equal(x, dm.test_tensors[0]) and torch.equal(y, dm.test_tensors[1])
    vx, vy = all_rows(dm.val_dataloader())
    assert torch.equal(vx, x) and torch.equal(vy, y)


def test_partition_cache_is_read_back_and_seed_changes_partition(tmp_path, monkeypatch):
    first = digits(tmp_path, num_clients=8, alpha=0.3, seed=4)
    first.setup()
    assert not first.partition_from_cache and not first.features_from_cache
    files = list((tmp_path / "cache").rglob("*"))
    assert any(f.suffix == ".npz" for f in files) and not any(f.name.endswith(".tmp") for f in files)

    def recompute(*args, **kwargs):
        raise AssertionError("the cached partition should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(module_file, "partition_dataset", recompute)
        second = digits(tmp_path, num_clients=8, alpha=0.3, seed=4)
        second.setup()
    assert second.partition_from_cache and second.features_from_cache
    assert same_partition(first, second, splits=("train", "test"))
    other = digits(tmp_path, num_clients=8, alpha=0.3, seed=5)
    other.setup()
    assert not other.partition_from_cache
    assert not same_partition(first, other)
    # Without the cache (fresh folder) the same seed gives the same partition.
    fresh = FederatedDataModule("digits", num_clients=8, alpha=0.3, seed=4, cache_dir=str(tmp_path / "fresh"))
    fresh.setup()
    assert not fresh.partition_from_cache
    assert same_partition(first, fresh, splits=("train", "test"))


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    dm = digits(tmp_path, num_clients=4)
    dm.setup()
    for entry in (tmp_path / "cache").rglob("*.npz"):
        entry.write_bytes(b"not an npz file")
    again = digits(tmp_path, num_clients=4)
    again.setup()
    assert not again.partition_from_cache
    assert same_partition(dm, again)


def test_setup_is_idempotent(tmp_path):
    dm = digits(tmp_path)
    dm.setup("fit")
    tensors = dm.train_tensors
    partition = dm.partition
    dm.setup("test")
    assert dm.train_tensors[0] is tensors[0] and dm.partition is partition


def test_flwr_partitioners_through_the_module(tmp_path):
    iid = digits(tmp_path, partitioner="iid", num_clients=6)
    assert sum(iid.client_num_samples(k) for k in range(6)) == len(iid.train_tensors[1])
    dirichlet = digits(tmp_path, partitioner="dirichlet", num_clients=6, alpha=0.2)
    assert dirichlet.class_counts().sum() == len(iid.train_tensors[1])
    plugged = digits(tmp_path, partitioner=IidPartitioner(num_partitions=6), num_clients=6)
    plugged.setup()
    assert not plugged.partition_from_cache and "partitioner" not in plugged.hparams
    assert [plugged.client_num_samples(k) for k in range(6)] == [iid.client_num_samples(k) for k in range(6)]


def test_plot_class_counts_writes_a_png(tmp_path):
    dm = digits(tmp_path, num_clients=4)
    dm.plot_class_counts(str(tmp_path / "counts.png"))
    data = (tmp_path / "counts.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_hyperparameters_are_saved_and_parse_from_a_cli(tmp_path):
    from jsonargparse import ArgumentParser

    dm = digits(tmp_path, alpha=0.1, num_clients=7)
    assert dm.hparams["alpha"] == 0.1 and dm.hparams["num_clients"] == 7
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(FederatedDataModule, "data")
    config = parser.parse_args(
        ["--data.dataset", "cifar10", "--data.alpha", "0.1", "--data.speech_classes", "12"]
    )
    assert config.data.dataset == "cifar10" and config.data.alpha == 0.1 and config.data.speech_classes == 12
    assert config.data.partitioner == "lda" and config.data.path is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, r"alpha=0.0 is invalid"),
        ({"alpha": -2}, r"alpha=-2 is invalid"),
        (
            {"partitioner": "shard"},
            r"partitioner='shard' is unknown; known partitioners: dirichlet, iid, lda",
        ),
        ({"num_clients": 0}, r"num_clients=0 is invalid"),
        ({"batch_size": 0}, r"batch_size=0 is invalid"),
        ({"speech_classes": 10}, r"speech_classes=10 is invalid; allowed: 35, 12"),
        ({"audio_features": "mfcc"}, r"audio_features='mfcc' is unknown; known: waveform, logmel"),
        ({"device": "gpu0"}, r"device='gpu0' is invalid"),
        ({"samples_per_client": 0}, r"samples_per_client=0 is invalid"),
    ],
)
def test_bad_configuration_is_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FederatedDataModule("digits", **kwargs)


def test_bad_sizes_are_rejected_at_setup(tmp_path):
    n_train = len(digits(tmp_path).train_tensors[1])
    with pytest.raises(
        ValueError, match=rf"num_clients=2000 exceeds the {n_train} samples of the train split"
    ):
        digits(tmp_path, num_clients=2000).setup()
    with pytest.raises(
        ValueError, match=rf"samples_per_client=500 is invalid for num_clients=10.*at most {n_train // 10}"
    ):
        digits(tmp_path, num_clients=10, samples_per_client=500).setup()
    with pytest.raises(ValueError, match=r"path='x' is not used by dataset 'digits'"):
        FederatedDataModule("digits", path="x", cache_dir=str(tmp_path)).setup()
    dm = digits(tmp_path, num_clients=3)
    with pytest.raises(ValueError, match=r"cid=3 is invalid; client ids lie in \[0, 3\)"):
        dm.client_train_dataloader(3)
    with pytest.raises(ValueError, match=r"augment=True is invalid for dataset 'speech_commands'"):
        FederatedDataModule("speech_commands", augment=True)
