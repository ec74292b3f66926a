"""Datasets read from the files their creators distribute, in the layouts torchvision keeps on disk.

* `fashion_mnist`, `mnist`: the four IDX files `train-images-idx3-ubyte`,
  `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each optionally
  `.gz`. `path` is the folder holding them (e.g. `/usr/share/datasets/fashion-mnist` from Debian's
  `dataset-fashion-mnist`), torchvision's `raw` folder, the `FashionMNIST` / `MNIST` folder above
  it, or torchvision's dataset root above that.
* `cifar10`: torchvision's `cifar-10-batches-py` folder (pickled `data_batch_1` ... `data_batch_5`,
  `test_batch`, optionally `batches.meta`) or the root holding it.
* `cifar100`: torchvision's `cifar-100-python` folder (pickled `train`, `test`, optionally `meta`)
  or the root holding it.

The result is the same `datasets.Dataset`s the Hub copies give, with the Hub's column names (`image`
/ `label`; `img` / `label`; `img` / `fine_label` + `coarse_label`), except that the images are
stored as uint8 arrays `(C, H, W)` (nested fixed-size lists, read back through Arrow without a copy)
instead of PNG bytes: the pixels, and so the materialised tensors after the same normalisation,
are identical. Row order is the files' (CIFAR-10: `data_batch_1` to `_5`).

The pickles are read with an unpickler that accepts only NumPy arrays and plain containers, so a
file that is not what it claims cannot run code. Every problem (a missing file, a wrong magic
number, a truncated file, sizes that do not match) is one `ValueError` naming the file.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparsyfed_lightning.data.cache import array_digest

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UNSIGNED_BYTE = 0x08
# The Hub's ClassLabel names of zalando-datasets/fashion_mnist.
FASHION_MNIST_CLASSES = (
    "T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class Layout:
    """Where one dataset's original files live and what they are called."""

    kind: str  # "idx" | "cifar"
    folder_names: tuple[str, ...]  # torchvision's folders below the root, outermost first
    files: dict[str, tuple[str, ...]]  # split -> file names (IDX: images, labels)
    input_column: str
    classes: dict[str, tuple[str, ...] | int]  # label column (the Hub's name) -> class names or count
    description: str


LAYOUTS: dict[str, Layout] = {
    "fashion_mnist": Layout(
        "idx", ("FashionMNIST", "raw"), IDX_FILES, "image", {"label": FASHION_MNIST_CLASSES},
        "the IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (optionally .gz), or torchvision's FashionMNIST/raw folder",
    ),
    "mnist": Layout(
        "idx", ("MNIST", "raw"), IDX_FILES, "image", {"label": tuple("0123456789")},
        "the IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (optionally .gz), or torchvision's MNIST/raw folder",
    ),
    "cifar10": Layout(
        "cifar", ("cifar-10-batches-py",),
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        "img", {"label": 10},
        "torchvision's cifar-10-batches-py folder (data_batch_1 ... data_batch_5, test_batch)",
    ),
    "cifar100": Layout(
        "cifar", ("cifar-100-python",), {"train": ("train",), "test": ("test",)},
        "img", {"fine_label": 100, "coarse_label": 20},
        "torchvision's cifar-100-python folder (train, test)",
    ),
}
# Pickle keys of the CIFAR batches for each Hub label column.
_CIFAR_LABEL_KEYS = {"label": "labels", "fine_label": "fine_labels", "coarse_label": "coarse_labels"}
_CIFAR_META = {"cifar10": ("batches.meta", {"label": "label_names"}),
               "cifar100": ("meta", {"fine_label": "fine_label_names", "coarse_label": "coarse_label_names"})}


def describe(dataset: str) -> str:
    """What `path` may hold for `dataset` besides parquet/arrow files in the Hub's schema ('' if nothing)."""
    layout = LAYOUTS.get(dataset)
    return layout.description if layout is not None else ""


def locate(dataset: str, path: Path) -> Path | None:
    """The folder under `path` holding `dataset`'s original files, or None when there are none.

    Looks at `path` itself and at torchvision's folders below it. A folder holding only some of the
    files is an error naming the first one missing.
    """
    layout = LAYOUTS.get(dataset)
    if layout is None or not path.is_dir():
        return None
    candidates = [path] + [path.joinpath(*layout.folder_names[i:]) for i in range(len(layout.folder_names))]
    names = [name for split in layout.files.values() for name in split]
    for folder in candidates:
        if any(_find(folder, name, layout.kind) for name in names):
            for name in names:
                if _find(folder, name, layout.kind) is None:
                    suffix = " (or .gz)" if layout.kind == "idx" else ""
                    raise ValueError(
                        f"path={str(path)!r}: {folder / name}{suffix} is missing; {dataset} needs {layout.description}"
                    )
            return folder
    return None


def load(dataset: str, folder: Path) -> tuple[Any, Any, str]:
    """`dataset`'s train and test `datasets.Dataset`s from `folder` (see `locate`) and a content fingerprint."""
    layout = LAYOUTS[dataset]
    read = _read_idx_split if layout.kind == "idx" else _read_cifar_split
    splits = {split: read(folder, names, layout) for split, names in layout.files.items()}
    classes = _classes(dataset, folder, layout)
    train, test = (_to_dataset(*splits[split], layout.input_column, classes) for split in ("train", "test"))
    fingerprint = array_digest(*(a for images, labels in splits.values() for a in (images, *labels.values())))
    return train, test, fingerprint


# ------------------------------------------------------------------------------------------ IDX
def _find(folder: Path, name: str, kind: str) -> Path | None:
    """`folder/name`, or for IDX files `folder/name.gz`, if it is a file (the uncompressed one first)."""
    for candidate in (folder / name, folder / f"{name}.gz") if kind == "idx" else (folder / name,):
        if candidate.is_file():
            return candidate
    return None


def read_idx(file: Path) -> np.ndarray:
    """One IDX file of unsigned bytes (the MNIST format), gzip-compressed or not, as a uint8 array.

    Format: two zero bytes, the type code 0x08, the number of dimensions d, d big-endian uint32
    sizes, then the values in row-major order.
    """
    try:
        data = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ValueError(f"{file} cannot be read as a gzip file: {' '.join(str(err).split())}") from err
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != _IDX_UNSIGNED_BYTE:
        magic = data[:4].hex() or "none"
        raise ValueError(f"{file} is not an IDX file of unsigned bytes (magic {magic}, expected 000008xx)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{file} is truncated: its header needs {header} bytes, the file has {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) != header + math.prod(shape):
        raise ValueError(
            f"{file} holds {len(data) - header} values after its header, expected {math.prod(shape)} for shape {shape}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _read_idx_split(folder: Path, names: tuple[str, ...], layout: Layout) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    image_file, label_file = (_find(folder, name, "idx") for name in names)
    assert image_file is not None and label_file is not None  # `locate` checked
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3:
        raise ValueError(f"{image_file} holds an array of shape {images.shape}; expected images (N, height, width)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{label_file} holds labels of shape {labels.shape}; expected one per image of {image_file} ({len(images)})"
        )
    return images[:, None], {"label": labels.astype(np.int64)}


# ---------------------------------------------------------------------------------------- CIFAR
class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays, dicts, lists, strings and numbers, and refuses anything else."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")  # NumPy 2 moved it
        return super().find_class(module, name)


def _unpickle(file: Path) -> dict:
    try:
        # latin1: how NumPy arrays pickled by Python 2 (the CIFAR files) must be decoded.
        batch = _ArraysOnlyUnpickler(io.BytesIO(file.read_bytes()), encoding="latin1").load()
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a CIFAR batch"
        raise ValueError(f"{file} cannot be read as a pickled CIFAR batch: {' '.join(str(err).split())}") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{file} holds a {type(batch).__name__}; expected a pickled CIFAR batch (a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _read_cifar_split(folder: Path, names: tuple[str, ...], layout: Layout) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    images, labels = [], {column: [] for column in layout.classes}
    for name in names:
        file = folder / name
        batch = _unpickle(file)
        keys = ["data", *(_CIFAR_LABEL_KEYS[c] for c in layout.classes)]
        if any(key not in batch for key in keys):
            raise ValueError(f"{file} has the keys {sorted(batch)}; expected {keys}")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{file}: 'data' is {data.dtype} {data.shape}; expected uint8 (N, 3072) rows of 32x32 RGB")
        images.append(data.reshape(-1, 3, 32, 32))  # each row: the red, green, blue planes
        for column in layout.classes:
            values = np.asarray(batch[_CIFAR_LABEL_KEYS[column]], dtype=np.int64).reshape(-1)
            if len(values) != len(data):
                raise ValueError(f"{file} has {len(values)} {_CIFAR_LABEL_KEYS[column]} for {len(data)} images")
            labels[column].append(values)
    return np.concatenate(images), {c: np.concatenate(v) for c, v in labels.items()}


def _classes(dataset: str, folder: Path, layout: Layout) -> dict[str, tuple[str, ...] | int]:
    """Class names (or counts) per label column; CIFAR's from its meta file when it has them all."""
    classes = dict(layout.classes)
    meta_file, keys = _CIFAR_META.get(dataset, ("", {}))
    if layout.kind == "cifar" and (folder / meta_file).is_file():
        meta = _unpickle(folder / meta_file)
        for column, key in keys.items():
            names = tuple(str(n) for n in meta.get(key, ()))
            if len(names) == classes[column]:
                classes[column] = names
    return classes


# -------------------------------------------------------------------------------------- Dataset
def _to_dataset(images: np.ndarray, labels: dict[str, np.ndarray], input_column: str,
                classes: dict[str, tuple[str, ...] | int]):
    """A `datasets.Dataset` over the arrays (images as nested fixed-size lists: no per-row objects)."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    column = pa.array(np.ascontiguousarray(images).reshape(-1))
    for size in reversed(images.shape[1:]):
        column = pa.FixedSizeListArray.from_arrays(column, size)
    table = pa.table({input_column: column, **{c: pa.array(v) for c, v in labels.items()}})
    features = datasets.Features.from_arrow_schema(table.schema)
    for name, known in classes.items():
        if isinstance(known, int):
            features[name] = datasets.ClassLabel(num_classes=known)
        else:
            features[name] = datasets.ClassLabel(names=list(known))
    return datasets.Dataset(InMemoryTable(table.replace_schema_metadata(features.arrow_schema.metadata)))
