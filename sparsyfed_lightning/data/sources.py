"""Dataset sources: where the raw train and test splits come from, all as `datasets.Dataset`s.

| name | source | input / label columns |
|---|---|---|
| `cifar10` | Hub `uoft-cs/cifar10` | `img` / `label` (10) |
| `cifar100` | Hub `uoft-cs/cifar100` | `img` / `fine_label` (100) |
| `fashion_mnist` | Hub `zalando-datasets/fashion_mnist` (70,000 28x28 grey images) | `image` / `label` (10) |
| `mnist` | Hub `ylecun/mnist` (70,000 28x28 grey digits) | `image` / `label` (10) |
| `speech_commands` | Hub `google/speech_commands`, `refs/convert/parquet`, `v0.02` | `audio` / `label` (36) |
| `digits` | scikit-learn's bundled `load_digits` (1,797 real 8x8 digits) | `image` / `label` (10) |
| `local` | `path`: parquet/arrow file or folder, `save_to_disk` folder | `image_column` / `label_column` |

(In the Speech Commands conversion `_silence_` is label 35.)

* `path` replaces the Hub for the Hub datasets too: a folder of parquet files in the Hub's schema
  (e.g. a snapshot of the dataset repository; splits are recognised from file/folder names such as
  `train-00000-of-00001.parquet` or `train/0000.parquet`) goes through the same `load_dataset` and
  the same code afterwards. For the Speech Commands parquet conversion, point `path` at its `v0.02`
  folder. It may also hold the files the datasets' creators distribute (`original_files.py`):
  the IDX files of `fashion_mnist` / `mnist` (e.g. `/usr/share/datasets/fashion-mnist` from
  Debian's `dataset-fashion-mnist`, or torchvision's `FashionMNIST/raw`), torchvision's pickled
  `cifar-10-batches-py` / `cifar-100-python` folders, and for `speech_commands` the extracted
  official archive (`speech.py`). These give the same pixels as the Hub copies, normalised the same way.
* Splits: `train`, and `test` (else `validation`); a source with only a train split gets a fixed
  stratified 80/20 hold-out (seed `HOLDOUT_SEED`, independent of the partition seed so the test
  set never changes with it).
* `digits`: pixel values 0..16 scaled to [0, 1], then normalised like the images; the train/test
  split is that same fixed stratified 80/20 hold-out (1,438 train / 359 test).
* `local` column defaults: the input is the first `Image`/`Audio` column (else `image`/`img`), the
  label is the first `ClassLabel` column (else `label`). String labels become class ids in sorted
  name order. The input may be images, audio (decoded like Speech Commands, no label mapping) or a
  numeric array column (used as stored, no normalisation).
* The number of classes is the `ClassLabel`'s when the label column is one, else max label + 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsyfed_lightning.data import original_files, speech
from sparsyfed_lightning.data.cache import array_digest
from sparsyfed_lightning.data.hub import load_hub_dataset

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "digits", "fashion_mnist", "local", "mnist", "speech_commands")
HOLDOUT_SEED = 0
HOLDOUT_FRACTION = 0.2
_AUDIO_MAGIC = (b"RIFF", b"fLaC", b"OggS", b"FORM")


@dataclass(frozen=True)
class HubSource:
    """Where a named dataset lives on the Hub and what its columns are."""

    repo_id: str
    input_column: str
    label_column: str
    kind: str
    num_classes: int
    revision: str | None = None
    data_dir: str | None = None


HUB_SOURCES: dict[str, HubSource] = {
    "cifar10": HubSource("uoft-cs/cifar10", "img", "label", "image", 10),
    "cifar100": HubSource("uoft-cs/cifar100", "img", "fine_label", "image", 100),
    "fashion_mnist": HubSource("zalando-datasets/fashion_mnist", "image", "label", "image", 10),
    "mnist": HubSource("ylecun/mnist", "image", "label", "image", 10),
    "speech_commands": HubSource(
        "google/speech_commands",
        "audio",
        "label",
        "audio",
        36,
        revision="refs/convert/parquet",
        data_dir="v0.02",
    ),
}


@dataclass(frozen=True)
class SourceSplits:
    """Raw train/test splits plus what is needed to turn them into tensors."""

    dataset: str
    train: Any  # datasets.Dataset
    test: Any  # datasets.Dataset
    input_column: str
    label_column: str
    kind: str  # "image" | "audio" | "array"
    num_classes: int  # after `label_map`
    source_num_classes: int  # stored labels must lie in [0, source_num_classes)
    fingerprint: str
    label_map: np.ndarray | None = None  # stored label -> class id, -1 drops the row
    split_labels: frozenset[int] = field(default_factory=frozenset)  # stored labels whose long clips are cut
    normalize: bool = False  # "array" inputs in [0, 1] that get the images' normalisation


def check_dataset(dataset: str) -> None:
    """Reject an unknown dataset name."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} is unknown; known datasets: {', '.join(DATASETS)}")


def known_num_classes(dataset: str, speech_classes: int, label_column: str | None) -> int | None:
    """Number of classes derivable from the configuration alone (None: the data must be read)."""
    if dataset == "digits":
        return 10
    if dataset == "speech_commands":
        return speech_classes
    hub = HUB_SOURCES.get(dataset)
    if hub is not None and label_column in (None, hub.label_column):
        return hub.num_classes
    return None


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) rows: `round(fraction * n_c)` rows of every class c go to test."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        test.append(rows[: int(round(fraction * len(rows)))])
    test_rows = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    train_rows = np.setdiff1d(np.arange(len(labels)), test_rows)
    return train_rows, test_rows


def load_digits_source() -> SourceSplits:
    """scikit-learn's digits as `datasets.Dataset`s with the fixed stratified hold-out."""
    import datasets
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    labels = bunch.target.astype(np.int64)
    features = datasets.Features(
        {
            "image": datasets.Array3D(shape=(1, 8, 8), dtype="float32"),
            "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
        }
    )
    train_rows, test_rows = stratified_holdout(labels, HOLDOUT_FRACTION, HOLDOUT_SEED)
    train, test = (
        datasets.Dataset.from_dict({"image": images[rows], "label": labels[rows]}, features=features)
        for rows in (train_rows, test_rows)
    )
    return SourceSplits(
        dataset="digits",
        train=train,
        test=test,
        input_column="image",
        label_column="label",
        kind="array",
        num_classes=10,
        source_num_classes=10,
        fingerprint=array_digest(images, labels, train_rows),
        normalize=True,
    )


def load_local(path: str, also_accepted: str = ""):
    """A `DatasetDict` from a parquet/arrow file, a `save_to_disk` folder or a folder of data files.

    `also_accepted` names what else the dataset's `path` may hold, for the error messages.
    """
    import datasets
    from datasets.data_files import EmptyDatasetError

    location = Path(path).expanduser()
    expected = "a parquet/arrow file or a dataset folder" + (f", or {also_accepted}" if also_accepted else "")
    if not location.exists():
        raise ValueError(f"path={path!r} does not exist; give {expected}")
    if location.is_file():
        builder = {".parquet": "parquet", ".arrow": "arrow"}.get(location.suffix)
        if builder is None:
            raise ValueError(
                f"path={path!r} has the unsupported suffix {location.suffix!r}; "
                "use a .parquet or .arrow file or a folder"
            )
        loaded = datasets.load_dataset(builder, data_files={"train": str(location)})
    elif (location / "dataset_dict.json").is_file() or (location / "state.json").is_file():
        loaded = datasets.load_from_disk(str(location))
    else:
        try:
            loaded = datasets.load_dataset(str(location))
        except EmptyDatasetError as err:
            raise ValueError(f"path={path!r} holds no data files; expected {expected}") from err
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def column_numpy(ds: Any, column: str) -> np.ndarray:
    """One scalar column as a NumPy array (through Arrow: no per-row Python objects)."""
    values = ds.select_columns([column]).with_format("arrow")[:].column(column)
    return values.to_numpy(zero_copy_only=False)


def pick_splits(splits: Any, dataset: str, label_column: str) -> tuple[Any, Any]:
    """(train, test): `test`, else `validation`, else a fixed stratified hold-out of `train`."""
    train = splits["train"]
    for name in ("test", "validation"):
        if name in splits:
            return train, splits[name]
    train_rows, test_rows = stratified_holdout(
        column_numpy(train, label_column), HOLDOUT_FRACTION, HOLDOUT_SEED
    )
    return train.select(train_rows), train.select(test_rows)


def _check_column(ds: Any, key: str, column: str, dataset: str, split: str) -> None:
    if column not in ds.column_names:
        raise ValueError(
            f"{key}={column!r} is not a column of dataset {dataset!r} ({split} split); "
            f"available columns: {', '.join(ds.column_names)}"
        )


def _default_local_columns(ds: Any) -> tuple[str | None, str | None]:
    import datasets

    input_column = next(
        (name for name, f in ds.features.items() if isinstance(f, datasets.Image | datasets.Audio)), None
    )
    if input_column is None:
        input_column = next((name for name in ("image", "img") if name in ds.column_names), "image")
    label_column = next(
        (name for name, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), "label"
    )
    return input_column, label_column


def detect_kind(ds: Any, column: str, dataset: str) -> str:
    """ "image", "audio" or "array" from the column's feature type (or the first stored bytes)."""
    import datasets

    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.Audio):
        return "audio"
    if isinstance(feature, dict) and "bytes" in feature:
        first = ds.select_columns([column]).with_format("arrow")[:1].column(column).to_pylist()
        data = (first[0] or {}).get("bytes") if first else None
        return "audio" if data and data[:4] in _AUDIO_MAGIC else "image"
    if isinstance(feature, datasets.Value) and feature.dtype == "binary":
        first = ds.select_columns([column]).with_format("arrow")[:1].column(column).to_pylist()
        return "audio" if first and first[0] and first[0][:4] in _AUDIO_MAGIC else "image"
    if isinstance(feature, datasets.Array2D | datasets.Array3D | datasets.Array4D | datasets.Array5D):
        return "array"
    if isinstance(feature, datasets.List | datasets.LargeList | list):
        return "array"
    raise ValueError(
        f"image_column={column!r} of dataset {dataset!r} has type {feature}; expected an image, audio "
        "or numeric array column"
    )


def _encode_string_labels(train: Any, test: Any, column: str) -> tuple[Any, Any]:
    """Cast a string label column to a ClassLabel shared by both splits (sorted names)."""
    import datasets

    if not (
        isinstance(train.features[column], datasets.Value)
        and train.features[column].dtype in ("string", "large_string")
    ):
        return train, test
    names = sorted(set(column_numpy(train, column).tolist()) | set(column_numpy(test, column).tolist()))
    label = datasets.ClassLabel(names=[str(n) for n in names])
    return train.cast_column(column, label), test.cast_column(column, label)


def _class_count(train: Any, test: Any, column: str) -> int:
    """The ClassLabel's class count, else max label + 1 over both splits."""
    import datasets

    feature = train.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    top = max((int(np.max(column_numpy(ds, column))) for ds in (train, test) if ds.num_rows), default=-1)
    return max(top + 1, 1)


def load_source(
    dataset: str,
    *,
    path: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    speech_classes: int = 35,
) -> SourceSplits:
    """Load the raw train and test splits of `dataset` (Hub, local path, or scikit-learn's digits)."""
    check_dataset(dataset)
    if dataset == "digits":
        if path is not None:
            raise ValueError(
                f"path={path!r} is not used by dataset 'digits' (it ships with scikit-learn); unset it"
            )
        return load_digits_source()
    if dataset == "local" and path is None:
        raise ValueError(
            "path=None is invalid for dataset 'local'; give a parquet/arrow file or a dataset folder"
        )

    hub = HUB_SOURCES.get(dataset)
    fingerprint = None
    location = Path(path).expanduser() if path is not None else None
    originals = original_files.locate(dataset, location) if location is not None else None
    if dataset == "speech_commands" and location is not None and speech.is_archive(location):
        train, test, fingerprint = speech.load_archive(location)
        splits = {"train": train, "test": test}
    elif originals is not None:
        train, test, fingerprint = original_files.load(dataset, originals)
        splits = {"train": train, "test": test}
    elif path is not None:
        splits = load_local(path, original_files.describe(dataset))
    else:
        assert hub is not None
        splits = load_hub_dataset(
            dataset, hub.repo_id, revision=hub.revision, data_dir=hub.data_dir,
            local_formats=original_files.describe(dataset),
        )
    if "train" not in splits:
        raise ValueError(f"dataset {dataset!r} has no 'train' split; available splits: {', '.join(splits)}")

    default_input, default_label = (
        (hub.input_column, hub.label_column) if hub is not None else _default_local_columns(splits["train"])
    )
    input_column, label_column = image_column or default_input, label_column or default_label
    _check_column(splits["train"], "image_column", input_column, dataset, "train")
    _check_column(splits["train"], "label_column", label_column, dataset, "train")
    train, test = pick_splits(splits, dataset, label_column)
    _check_column(test, "image_column", input_column, dataset, "test")
    _check_column(test, "label_column", label_column, dataset, "test")
    train, test = _encode_string_labels(train, test, label_column)
    fingerprint = fingerprint or f"{train._fingerprint}:{test._fingerprint}"

    if dataset == "speech_commands":
        import datasets

        feature = train.features[label_column]
        names = feature.names if isinstance(feature, datasets.ClassLabel) else list(speech.LABELS_V2)
        return SourceSplits(
            dataset=dataset,
            train=train,
            test=test,
            input_column=input_column,
            label_column=label_column,
            kind="audio",
            num_classes=speech_classes,
            source_num_classes=len(names),
            fingerprint=fingerprint,
            label_map=speech.label_map(names, speech_classes),
            split_labels=frozenset(i for i, name in enumerate(names) if name == speech.SILENCE),
        )
    if originals is not None:
        kind = "array"  # uint8 images (C, H, W), normalised like decoded ones
    else:
        kind = hub.kind if hub is not None else detect_kind(train, input_column, dataset)
    if hub is not None and label_column == hub.label_column:
        num_classes = hub.num_classes
    else:
        num_classes = _class_count(train, test, label_column)
    return SourceSplits(
        dataset=dataset,
        train=train,
        test=test,
        input_column=input_column,
        label_column=label_column,
        kind=kind,
        num_classes=num_classes,
        source_num_classes=num_classes,
        fingerprint=fingerprint,
        normalize=originals is not None,
    )
