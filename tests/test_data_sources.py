"""End-to-end loading of Hub-schema fixtures (CIFAR-10/100, Speech Commands, local data) and its errors."""

from __future__ import annotations

import time

import datasets
import numpy as np
import pytest
import torch
from data_fixtures import (  # noqa: F401 - isolated_hf_cache is an autouse fixture
    SILENCE,
    SPEECH_NAMES,
    isolated_hf_cache,
    png_bytes,
    write_cifar,
    write_speech,
)

from sparsyfed_lightning.data import hub
from sparsyfed_lightning.data.hub import DatasetUnavailableError
from sparsyfed_lightning.data.module import FederatedDataModule


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    return write_speech(tmp_path_factory.mktemp("speech"))


def module(dataset, path, tmp_path, **kw):
    kw.setdefault("num_clients", 3)
    return FederatedDataModule(dataset, path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def central_test(dm):
    batches = list(dm.test_dataloader())
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def expected_images(pixels: np.ndarray) -> torch.Tensor:
    # ToTensor + Normalize(0.5, 0.5), written out.
    return torch.from_numpy((pixels.astype(np.float32) / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------- images
def test_cifar10_parquet_end_to_end(cifar10, tmp_path):
    dm = module("cifar10", cifar10.root, tmp_path)
    assert dm.num_classes == 10 and dm.input_shape == (3, 32, 32)  # known before any data is read
    dm.setup()
    x, y = central_test(dm)
    assert x.dtype == torch.float32 and x.shape == (30, 3, 32, 32)
    assert torch.allclose(x, expected_images(cifar10.test_pixels), atol=1e-6)
    assert torch.equal(y, torch.from_numpy(cifar10.test_labels))
    # Client train batches are rows of the train split with their own labels.
    train_x, train_y = expected_images(cifar10.train_pixels), torch.from_numpy(cifar10.train_labels)
    xb, yb = next(iter(dm.client_train_dataloader(0, seed=1)))
    assert xb.shape == (16, 3, 32, 32)
    for sample, label in zip(xb, yb, strict=True):
        matches = ((train_x - sample).abs().flatten(1).max(1).values < 1e-5).nonzero().flatten()
        assert len(matches) == 1 and train_y[matches[0]] == label
    assert [dm.client_num_samples(k) for k in range(3)] == [40, 40, 40]


def test_cifar100_fine_label(tmp_path):
    fixture = write_cifar(
        tmp_path / "c100", num_classes=100, label_column="fine_label", per_class_train=2, per_class_test=1
    )
    dm = module("cifar100", fixture.root, tmp_path, num_clients=4)
    assert dm.num_classes == 100
    dm.setup()
    x, y = central_test(dm)
    assert torch.equal(y, torch.from_numpy(fixture.test_labels))
    assert torch.allclose(x, expected_images(fixture.test_pixels), atol=1e-6)
    assert dm.class_counts().shape == (4, 100) and dm.class_counts().sum() == 4 * 50
    coarse = module("cifar100", fixture.root, tmp_path, label_column="coarse_label")
    assert coarse.num_classes == 20  # read from the ClassLabel, not the name


def test_augmentation_keeps_shapes_and_changes_samples(cifar10, tmp_path):
    torch.manual_seed(0)
    dm = module("cifar10", cifar10.root, tmp_path, augment=True, num_clients=1, batch_size=120)
    plain = module("cifar10", cifar10.root, tmp_path, num_clients=1, batch_size=120)
    ((xa, ya),) = list(dm.client_train_dataloader(0, seed=5))
    ((xp, yp),) = list(plain.client_train_dataloader(0, seed=5))
    assert torch.equal(ya, yp) and xa.shape == xp.shape == (120, 3, 32, 32)
    changed = (xa != xp).flatten(1).any(1).float().mean()
    assert changed > 0.8
    assert xa.min() >= -1 and xa.max() <= 1


# ---------------------------------------------------------------------------------------- audio
def test_speech_waveform_35_words(speech, tmp_path):
    dm = module("speech_commands", speech.root, tmp_path)
    assert dm.num_classes == 35 and dm.input_shape == (1, 8000)
    dm.setup()
    train_x, train_y = dm.train_tensors
    keep = speech.train_labels != SILENCE  # the 35-word task has no silence
    assert torch.equal(train_y, torch.from_numpy(speech.train_labels[keep]))
    assert train_x.shape == (int(keep.sum()), 1, 8000)
    # Row positions after dropping silence.
    position = {row: int(keep[:row].sum()) for row in speech.special_rows.values()}
    t = np.arange(8000) / 8000
    wave = torch.from_numpy(0.5 * np.sin(2 * np.pi * 440 * t)).float()
    sine = train_x[position[speech.special_rows["sine"]], 0]
    assert torch.allclose(sine[100:3900], wave[100:3900], atol=0.02)  # 0.5 s of 440 Hz ...
    assert sine[4100:].abs().max() < 0.02  # ... zero-padded to 1 s
    stereo = train_x[position[speech.special_rows["stereo"]], 0]
    assert torch.allclose(stereo[100:7900], wave[100:7900] / 2, atol=0.02)  # channels averaged
    resampled = train_x[position[speech.special_rows["rate_22k"]], 0]
    assert torch.allclose(resampled[100:7900], wave[100:7900], atol=0.02)  # 22.05 kHz input
    _, test_y = central_test(dm)
    assert torch.equal(test_y, torch.from_numpy(speech.test_labels[speech.test_labels != SILENCE]))


def test_speech_12_classes_with_silence_windows(speech, tmp_path):
    dm = module("speech_commands", speech.root, tmp_path, speech_classes=12)
    assert dm.num_classes == 12
    dm.setup()
    core = SPEECH_NAMES[:10]
    expected = []
    for row, label in enumerate(speech.train_labels):
        name = SPEECH_NAMES[label]
        mapped = 11 if name == "_silence_" else core.index(name) if name in core else 10
        # The 2.5 s background-noise clip gives two 1 s samples.
        expected += [mapped] * (2 if row == speech.special_rows["long_silence"] else 1)
    _, train_y = dm.train_tensors
    assert train_y.tolist() == expected
    _, test_y = central_test(dm)
    assert 11 in test_y.tolist() and len(test_y) == len(speech.test_labels)


def test_speech_logmel_features(speech, tmp_path):
    dm = module("speech_commands", speech.root, tmp_path, audio_features="logmel")
    assert dm.input_shape == (1, 40, 101)
    dm.setup()
    train_x, _ = dm.train_tensors
    assert train_x.shape[1:] == (1, 40, 101)
    keep = speech.train_labels != SILENCE
    sine = train_x[int(keep[: speech.special_rows["sine"]].sum()), 0]
    # 40 HTK mel bands over 0-8 kHz: the band centred nearest 440 Hz holds the sine's energy.
    mel = np.linspace(0, 2595 * np.log10(1 + 8000 / 700), 42)[1:-1]
    centres = 700 * (10 ** (mel / 2595) - 1)
    band = int(np.abs(centres - 440).argmin())
    assert abs(int(sine[:, 5:40].mean(1).argmax()) - band) <= 1
    assert sine[:, 60:].max() < -8  # the padded half is (log of) silence


def test_speech_skips_singleton_batches(speech, tmp_path):
    dm = module("speech_commands", speech.root, tmp_path, num_clients=1, batch_size=42)
    n = dm.client_num_samples(0)
    assert n % 42 == 1  # 43 words in the fixture's train split
    assert [x.shape[0] for x, _ in dm.client_train_dataloader(0)] == [42]


def test_undecodable_audio_names_the_row(tmp_path):
    fixture = write_speech(tmp_path / "bad", corrupt_train_row=5)
    dm = module("speech_commands", fixture.root, tmp_path)
    with pytest.raises(
        ValueError, match=r"train split, column 'audio': row 5 cannot be decoded as audio"
    ) as info:
        dm.setup()
    assert "\n" not in str(info.value)


def test_speech_official_archive_layout(tmp_path):
    import soundfile

    root = tmp_path / "speech_commands_v0.02"
    clips = {
        "yes/a_nohash_0.wav": 0.2,
        "yes/b_nohash_0.wav": 0.3,
        "no/c_nohash_0.wav": 0.4,
        "cat/d_nohash_0.wav": 0.5,
    }
    clips["_background_noise_/white_noise.wav"] = 0.1
    for name, level in clips.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        seconds = 3.0 if "noise" in name else 1.0
        soundfile.write(root / name, np.full(int(16000 * seconds), level, np.float32), 16000)
    (root / "testing_list.txt").write_text("no/c_nohash_0.wav\n")
    (root / "validation_list.txt").write_text("yes/b_nohash_0.wav\n")
    dm = module("speech_commands", root, tmp_path, num_clients=1, speech_classes=12)
    train_x, train_y = dm.train_tensors
    # yes/a -> 0, cat/d -> unknown (10), 3 s of background noise -> three silence samples (11).
    assert sorted(train_y.tolist()) == [0, 10, 11, 11, 11]
    assert torch.equal(dm.test_tensors[1], torch.tensor([1]))
    words = module("speech_commands", root, tmp_path / "w", num_clients=1)
    assert sorted(words.train_tensors[1].tolist()) == [0, 22]  # yes, cat; silence dropped


# ---------------------------------------------------------------------------------------- local
def test_local_save_to_disk_folder_with_string_labels(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(40, 8, 8), dtype=np.uint8)  # greyscale
    names = np.array(["cat", "dog"])[np.arange(40) % 2]
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.Value("string")})
    rows = {"picture": [{"bytes": png_bytes(p), "path": None} for p in pixels], "kind": list(names)}
    ds = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": ds.select(range(30)), "test": ds.select(range(30, 40))}).save_to_disk(
        tmp_path / "disk"
    )
    dm = module("local", tmp_path / "disk", tmp_path, num_clients=2, label_column="kind")
    assert dm.num_classes == 2 and dm.input_shape == (1, 8, 8)
    x, y = central_test(dm)
    assert torch.equal(y, torch.from_numpy((names[30:] == "dog").astype(np.int64)))  # sorted names
    assert torch.allclose(x[:, 0], torch.from_numpy(pixels[30:] / 255.0 * 2 - 1).float(), atol=1e-6)


def test_local_single_parquet_gets_a_stratified_holdout(tmp_path):
    labels = np.repeat(np.arange(4), 25)
    table = datasets.Dataset.from_dict(
        {"features": np.random.rand(100, 6).astype(np.float32), "label": labels}
    )
    table.to_parquet(tmp_path / "table.parquet")
    dm = module("local", tmp_path / "table.parquet", tmp_path, num_clients=2, image_column="features")
    assert dm.num_classes == 4 and dm.input_shape == (6,)
    _, test_y = dm.test_tensors
    assert np.bincount(test_y.numpy()).tolist() == [5, 5, 5, 5]
    assert dm.train_tensors[1].shape == (80,)


# ---------------------------------------------------------------------------------------- errors
def test_missing_columns_list_the_available_ones(cifar10, tmp_path):
    with pytest.raises(
        ValueError, match=r"label_column='nope' is not a column .*available columns: img, label"
    ):
        module("cifar10", cifar10.root, tmp_path, label_column="nope").setup()
    with pytest.raises(
        ValueError, match=r"label_column='fine_label' is not a column .*available columns: img, label"
    ):
        module("cifar100", cifar10.root, tmp_path).setup()
    with pytest.raises(ValueError, match=r"image_column='pixels' is not a column"):
        module("cifar10", cifar10.root, tmp_path, image_column="pixels").setup()


def test_labels_outside_the_class_range(tmp_path):
    fixture = write_cifar(tmp_path / "bad", per_class_train=2, per_class_test=1, bad_label=12)
    with pytest.raises(ValueError, match=r"label_column='label' holds 12 in row 3 .*must lie in \[0, 10\)"):
        module("cifar10", fixture.root, tmp_path).setup()


def test_undecodable_image_names_the_row(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    good = png_bytes(np.zeros((4, 4, 3), np.uint8))
    images = [{"bytes": good, "path": None}] * 3 + [{"bytes": b"garbage", "path": None}]
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}, features=features).to_parquet(
        tmp_path / "t.parquet"
    )
    with pytest.raises(ValueError, match=r"row 3 cannot be decoded as an image"):
        module("local", tmp_path / "t.parquet", tmp_path, num_clients=1).setup()


def test_unknown_dataset_and_missing_path(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"dataset='imagenet' is unknown; known datasets: cifar10, cifar100, digits, fashion_mnist, local, mnist",
    ):
        FederatedDataModule("imagenet")
    with pytest.raises(ValueError, match=r"path=None is invalid for dataset 'local'"):
        FederatedDataModule("local", cache_dir=str(tmp_path)).setup()
    with pytest.raises(ValueError, match=r"does not exist"):
        module("cifar10", tmp_path / "missing", tmp_path).setup()


def test_offline_hub_fails_fast_with_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub must not be probed when offline mode is requested")

    monkeypatch.setattr(hub, "hub_reachable", no_network)
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as info:
        FederatedDataModule("cifar10", cache_dir=str(tmp_path)).setup()
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "'cifar10'" in message and "uoft-cs/cifar10" in message and "--data.path" in message
    assert "\n" not in message


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError, match=r"dataset 'speech_commands': .*google/speech_commands"):
        FederatedDataModule("speech_commands", cache_dir=str(tmp_path)).prepare_data()
    assert time.perf_counter() - start < 10
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # the offline switch was undone


def test_hub_probe_answers_within_its_timeout(monkeypatch):
    import socket

    import huggingface_hub

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as server:  # a local stand-in for the Hub endpoint; nothing leaves the machine
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub.hub_reachable(timeout=2.0)
    start = time.perf_counter()
    assert not hub.hub_reachable(timeout=2.0)  # closed port
    assert time.perf_counter() - start < 3
