"""Small datasets written in the Hugging Face Hub's schemas, for the data-layer tests.

The parquet files carry the same `huggingface` schema metadata the Hub's files do (`Image`,
`Audio`, `ClassLabel` features), so `datasets.load_dataset` sees what it would see for
`uoft-cs/cifar10`, `uoft-cs/cifar100` or the Speech Commands parquet conversion. Everything here
is independent of the code under test: expected values are computed from the generated arrays.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
from PIL import Image

# The Speech Commands v0.02 conversion's ClassLabel names, in its order (`_silence_` = 35).
SPEECH_NAMES = (
    ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
    + ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    + ["bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow"]
    + ["backward", "forward", "follow", "learn", "visual", "_silence_"]
)
SILENCE = 35
BYTES_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(autouse=True)
def isolated_hf_cache(tmp_path_factory, monkeypatch):
    """Keep `datasets`' own cache (arrow copies of the fixtures) out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def wav_bytes(samples: np.ndarray, rate: int = 16_000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_hub_parquet(path: Path, columns: dict[str, pa.Array], features: dict[str, dict]) -> Path:
    """A parquet file with the Hub's `huggingface` schema metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns)
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    pq.write_table(table.replace_schema_metadata(metadata), path)
    return path


@dataclass
class ImageFixture:
    root: Path
    train_pixels: np.ndarray  # (N, 32, 32, 3) uint8
    train_labels: np.ndarray
    test_pixels: np.ndarray
    test_labels: np.ndarray


def write_cifar(
    root: Path,
    *,
    num_classes: int = 10,
    label_column: str = "label",
    per_class_train: int = 12,
    per_class_test: int = 3,
    seed: int = 0,
    bad_label: int | None = None,
) -> ImageFixture:
    """A CIFAR-like snapshot `root/plain_text/{train,test}-00000-of-00001.parquet` (`img` PNG structs)."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
        if bad_label is not None and split == "train":
            labels[3] = bad_label
        pixels = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
        images = pa.array([{"bytes": png_bytes(p), "path": None} for p in pixels], type=BYTES_STRUCT)
        features = {
            "img": {"_type": "Image"},
            label_column: {"_type": "ClassLabel", "names": [f"class_{c}" for c in range(num_classes)]},
        }
        columns = {"img": images, label_column: pa.array(labels, type=pa.int64())}
        if label_column == "fine_label":  # CIFAR-100 also stores the 20 superclasses
            columns["coarse_label"] = pa.array(labels % 20, type=pa.int64())
            features["coarse_label"] = {"_type": "ClassLabel", "names": [f"super_{c}" for c in range(20)]}
        write_hub_parquet(root / "plain_text" / f"{split}-00000-of-00001.parquet", columns, features)
        splits[split] = (pixels, labels)
    return ImageFixture(root, *splits["train"], *splits["test"])


def sine(freq: float, seconds: float, rate: int = 16_000, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@dataclass
class SpeechFixture:
    root: Path  # the `v0.02` folder
    train_labels: np.ndarray  # stored (36-name) labels per row
    test_labels: np.ndarray
    special_rows: dict[str, int]  # train rows of the hand-made clips


def write_speech(root: Path, *, seed: int = 0, corrupt_train_row: int | None = None) -> SpeechFixture:
    """A Speech-Commands-like conversion `root/v0.02/{train,validation,test}/0000.parquet` (WAV bytes)."""
    rng = np.random.default_rng(seed)
    folder = root / "v0.02"
    features = {
        "audio": {"_type": "Audio", "sampling_rate": 16000},
        "label": {"_type": "ClassLabel", "names": SPEECH_NAMES},
        "is_unknown": {"_type": "Value", "dtype": "bool"},
        "speaker_id": {"_type": "Value", "dtype": "string"},
        "utterance_id": {"_type": "Value", "dtype": "int8"},
    }
    result = {}
    special: dict[str, int] = {}
    for split, words in (("train", 40), ("validation", 4), ("test", 12)):
        labels = list(rng.integers(0, 35, size=words))
        clips = [rng.normal(0, 0.1, size=int(rng.integers(8000, 16000))).astype(np.float32) for _ in labels]
        audio = [wav_bytes(clip) for clip in clips]
        if split == "train":
            # 440 Hz for half a second (padded to 1 s), a long background-noise recording, a
            # stereo clip and a clip stored at 22.05 kHz.
            special = {"sine": len(labels), "long_silence": len(labels) + 1}
            labels += [0, SILENCE]
            audio += [wav_bytes(sine(440, 0.5)), wav_bytes(rng.normal(0, 0.1, 40000).astype(np.float32))]
            special["stereo"] = len(labels)
            labels.append(1)
            audio.append(wav_bytes(np.stack([sine(440, 1.0), np.zeros(16000, np.float32)], axis=1)))
            special["rate_22k"] = len(labels)
            labels.append(2)
            audio.append(wav_bytes(sine(440, 1.0, rate=22050), rate=22050))
            if corrupt_train_row is not None:
                audio[corrupt_train_row] = b"this is not a wav file"
        if split == "test":
            labels.append(SILENCE)  # a 1 s silence clip, as in the official test set
            audio.append(wav_bytes(np.zeros(16000, np.float32)))
        names = [SPEECH_NAMES[label] for label in labels]
        columns = {
            "audio": pa.array(
                [
                    {"bytes": b, "path": f"{n}/{i:08x}_nohash_0.wav"}
                    for i, (b, n) in enumerate(zip(audio, names, strict=True))
                ],
                type=BYTES_STRUCT,
            ),
            "label": pa.array(labels, type=pa.int64()),
            "is_unknown": pa.array([n not in SPEECH_NAMES[:10] and n != "_silence_" for n in names]),
            "speaker_id": pa.array([f"{i % 7:08x}" for i in range(len(labels))]),
            "utterance_id": pa.array([0] * len(labels), type=pa.int8()),
        }
        write_hub_parquet(folder / split / "0000.parquet", columns, features)
        result[split] = np.asarray(labels)
    return SpeechFixture(folder, result["train"], result["test"], special)


# ------------------------------------------------------------------ the creators' own file formats
FASHION_IDX = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: 0, 0, type 0x08, ndim, big-endian uint32 sizes, values."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


@dataclass
class ArrayFixture:
    root: Path
    train_pixels: np.ndarray  # (N, C, H, W) uint8
    train_labels: np.ndarray
    test_pixels: np.ndarray
    test_labels: np.ndarray


def write_idx(
    folder: Path, *, gz: bool = True, per_class_train: int = 6, per_class_test: int = 2, seed: int = 0
) -> ArrayFixture:
    """Fashion-MNIST-like IDX files (28x28 grey, 10 classes) in `folder`, gzip-compressed or not."""
    import gzip

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
        pixels = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        for name, array in zip(FASHION_IDX[split], (pixels, labels), strict=True):
            data = idx_bytes(array)
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
        splits[split] = (pixels[:, None], labels.astype(np.int64))
    return ArrayFixture(folder, *splits["train"], *splits["test"])


def write_cifar_batches(root: Path, *, classes: int = 10, per_batch: int = 8, seed: int = 0) -> ArrayFixture:
    """torchvision's on-disk CIFAR layout under `root`: `cifar-10-batches-py` (five train batches and
    `test_batch`) or, with `classes=100`, `cifar-100-python` (`train`, `test`), pickled like the
    originals (dicts of a uint8 `data` array of rows R..G..B and label lists), with meta files."""
    import pickle

    rng = np.random.default_rng(seed)
    cifar100 = classes == 100
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    names = {
        "train": ["train"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test"] if cifar100 else ["test_batch"],
    }
    splits = {}
    for split, files in names.items():
        pixels, labels = [], []
        for name in files:
            rows = per_batch * (5 if cifar100 and split == "train" else 1)
            data = rng.integers(0, 256, size=(rows, 3 * 32 * 32), dtype=np.uint8)
            fine = rng.integers(0, classes, size=rows).tolist()
            batch = {"batch_label": f"{name} of 1", "data": data, "filenames": [f"{i}.png" for i in range(rows)]}
            if cifar100:
                batch.update(fine_labels=fine, coarse_labels=[label // 5 for label in fine])
            else:
                batch["labels"] = fine
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
            pixels.append(data.reshape(rows, 3, 32, 32))
            labels += fine
        splits[split] = (np.concatenate(pixels), np.asarray(labels, dtype=np.int64))
    if cifar100:
        meta = {
            "fine_label_names": [f"fine_{i}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i}" for i in range(20)],
        }
        (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    else:
        meta = {"label_names": [f"class_{i}" for i in range(10)], "num_cases_per_batch": per_batch}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return ArrayFixture(root, *splits["train"], *splits["test"])
