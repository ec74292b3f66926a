"""Fashion-MNIST / MNIST from IDX files and CIFAR from torchvision's pickled batches (`--data.path`)."""

from __future__ import annotations

import gzip
import pickle
import shutil
import time

import numpy as np
import pyarrow as pa
import pytest
import torch
from data_fixtures import (  # noqa: F401 - isolated_hf_cache is an autouse fixture
    BYTES_STRUCT,
    FASHION_IDX,
    idx_bytes,
    isolated_hf_cache,
    png_bytes,
    write_cifar_batches,
    write_hub_parquet,
    write_idx,
)

from sparsyfed_lightning.data import hub
from sparsyfed_lightning.data.hub import DatasetUnavailableError
from sparsyfed_lightning.data.module import FederatedDataModule


def module(dataset, path, tmp_path, **kw):
    kw.setdefault("num_clients", 3)
    return FederatedDataModule(dataset, path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def normalised(pixels: np.ndarray) -> torch.Tensor:
    """ToTensor + Normalize(0.5, 0.5) of uint8 (N, C, H, W) pixels, written out."""
    return torch.from_numpy((pixels.astype(np.float32) / 255.0 - 0.5) / 0.5)


def assert_splits(dm: FederatedDataModule, fixture) -> None:
    for (x, y), pixels, labels in (
        (dm.train_tensors, fixture.train_pixels, fixture.train_labels),
        (dm.test_tensors, fixture.test_pixels, fixture.test_labels),
    ):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, normalised(pixels), rtol=0, atol=1e-6)
        assert torch.equal(y, torch.from_numpy(labels))


# ------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
def test_idx_files_end_to_end(dataset, gz, tmp_path):
    fixture = write_idx(tmp_path / "files", gz=gz)
    dm = module(dataset, fixture.root, tmp_path)
    assert dm.num_classes == 10 and dm.input_shape == (1, 28, 28)  # known before any data is read
    dm.setup()
    assert_splits(dm, fixture)
    assert [dm.client_num_samples(k) for k in range(3)] == [20, 20, 20]
    xb, _ = next(iter(dm.client_train_dataloader(0, seed=1)))
    assert xb.shape == (16, 1, 28, 28)
    again = module(dataset, fixture.root, tmp_path)
    again.setup()
    assert again.features_from_cache and again.partition_from_cache


@pytest.mark.parametrize("where", ["root", "FashionMNIST", "raw"])
def test_torchvision_layout_from_any_of_its_folders(where, tmp_path):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    fixture = write_idx(raw, gz=True)
    for split in FASHION_IDX.values():  # torchvision keeps the extracted files beside the archives
        for name in split:
            (raw / name).write_bytes(gzip.decompress((raw / f"{name}.gz").read_bytes()))
    path = {"root": tmp_path / "data", "FashionMNIST": raw.parent, "raw": raw}[where]
    dm = module("fashion_mnist", path, tmp_path)
    dm.setup()
    assert_splits(dm, fixture)


def test_mnist_torchvision_root(tmp_path):
    fixture = write_idx(tmp_path / "data" / "MNIST" / "raw", gz=False, seed=3)
    dm = module("mnist", tmp_path / "data", tmp_path)
    dm.setup()
    assert_splits(dm, fixture)


def test_idx_gives_the_pixels_the_hub_copy_gives(tmp_path):
    """The Hub's copy stores the same images as grey PNGs; both paths materialise the same tensors."""
    fixture = write_idx(tmp_path / "idx")
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": [str(i) for i in range(10)]}}
    for split, pixels, labels in (
        ("train", fixture.train_pixels, fixture.train_labels),
        ("test", fixture.test_pixels, fixture.test_labels),
    ):
        images = pa.array([{"bytes": png_bytes(p[0]), "path": None} for p in pixels], type=BYTES_STRUCT)
        columns = {"image": images, "label": pa.array(labels, type=pa.int64())}
        write_hub_parquet(tmp_path / "hub" / "fashion_mnist" / f"{split}-00000-of-00001.parquet", columns, features)
    from_idx = module("fashion_mnist", fixture.root, tmp_path)
    from_hub = module("fashion_mnist", tmp_path / "hub", tmp_path)
    assert torch.equal(from_idx.train_tensors[0], from_hub.train_tensors[0])
    assert torch.equal(from_idx.test_tensors[0], from_hub.test_tensors[0])
    assert torch.equal(from_idx.train_tensors[1], from_hub.train_tensors[1])


def _break(folder, name, data: bytes) -> None:
    (folder / f"{name}.gz").write_bytes(gzip.compress(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", r"t10k-labels-idx1-ubyte \(or .gz\) is missing; fashion_mnist needs the IDX files"),
        ("magic", r"t10k-labels-idx1-ubyte.gz is not an IDX file of unsigned bytes \(magic 00000d01"),
        ("truncated", r"t10k-labels-idx1-ubyte.gz holds 19 values after its header, expected 20 for shape \(20,\)"),
        ("not_gzip", r"t10k-labels-idx1-ubyte.gz cannot be read as a gzip file"),
        ("count", r"t10k-labels-idx1-ubyte.gz holds labels of shape \(21,\); expected one per image of .*\(20\)"),
    ],
)
def test_bad_idx_files_are_one_line_naming_the_file(damage, message, tmp_path):
    fixture = write_idx(tmp_path / "files")
    folder, name = fixture.root, "t10k-labels-idx1-ubyte"
    labels = fixture.test_labels.astype(np.uint8)
    if damage == "missing":
        (folder / f"{name}.gz").unlink()
    elif damage == "magic":
        _break(folder, name, bytes([0, 0, 0x0D, 1]) + idx_bytes(labels)[4:])
    elif damage == "truncated":
        _break(folder, name, idx_bytes(labels)[:-1])
    elif damage == "not_gzip":
        (folder / f"{name}.gz").write_bytes(b"plain bytes, not gzip")
    else:
        _break(folder, name, idx_bytes(np.append(labels, 1)))
    with pytest.raises(ValueError, match=message) as error:
        module("fashion_mnist", folder, tmp_path).setup()
    assert "\n" not in str(error.value)
    assert not (tmp_path / "cache").exists()  # nothing half-written


def test_a_folder_without_data_says_what_it_expects(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no data files; expected a parquet/arrow file .*, or the IDX files"):
        module("fashion_mnist", tmp_path / "empty", tmp_path).setup()
    with pytest.raises(ValueError, match=r"holds no data files; .*or torchvision's cifar-10-batches-py folder"):
        module("cifar10", tmp_path / "empty", tmp_path).setup()


def test_hub_fashion_mnist_offline_is_one_line_with_the_local_options(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: pytest.fail("probed the Hub while offline"))
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as info:
        FederatedDataModule("fashion_mnist", cache_dir=str(tmp_path)).setup()
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "'fashion_mnist'" in message and "zalando-datasets/fashion_mnist" in message
    assert "--data.path" in message and "train-images-idx3-ubyte" in message and "\n" not in message


# ---------------------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("inside", [False, True])
def test_cifar10_pickled_batches(inside, tmp_path):
    fixture = write_cifar_batches(tmp_path / "data")
    path = fixture.root / "cifar-10-batches-py" if inside else fixture.root
    dm = module("cifar10", path, tmp_path)
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32)
    assert_splits(dm, fixture)
    assert len(fixture.train_labels) == 40  # five batches, in file order


def test_cifar100_pickled_batches_fine_and_coarse_labels(tmp_path):
    fixture = write_cifar_batches(tmp_path / "data", classes=100)
    dm = module("cifar100", fixture.root, tmp_path)
    assert dm.num_classes == 100
    assert_splits(dm, fixture)
    coarse = module("cifar100", fixture.root, tmp_path, label_column="coarse_label")
    assert coarse.num_classes == 20
    assert torch.equal(coarse.train_tensors[1], torch.from_numpy(fixture.train_labels // 5))


def test_cifar_pickles_that_are_not_batches_are_refused(tmp_path):
    fixture = write_cifar_batches(tmp_path / "data")
    folder = fixture.root / "cifar-10-batches-py"

    class RunsCode:  # what a malicious pickle does: call a function while loading
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": RunsCode()}, protocol=2))
    refused = r"data_batch_3 cannot be read as a pickled CIFAR batch: refusing to load shutil.rmtree"
    with pytest.raises(ValueError, match=refused):
        module("cifar10", fixture.root, tmp_path).setup()
    assert (tmp_path / "victim").exists()
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"data_batch_3: 'data' is uint8 \(2, 100\); expected uint8 \(N, 3072\)"):
        module("cifar10", fixture.root, tmp_path).setup()
    (folder / "test_batch").unlink()
    with pytest.raises(ValueError, match=r"cifar-10-batches-py/test_batch is missing; cifar10 needs torchvision's"):
        module("cifar10", fixture.root, tmp_path).setup()
