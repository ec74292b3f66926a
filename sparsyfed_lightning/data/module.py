"""`FederatedDataModule`: per-client train/test loaders and the central test loader.

`setup()` runs the whole data path once and keeps the result:

1. `sources.load_source` - the raw train/test splits (Hub, local path, or scikit-learn digits);
2. `materialise` - one decoded tensor per split (images uint8, audio features, arrays), cached on
   disk keyed by the source fingerprint and feature settings, then normalised in memory;
3. `partitioners.partition_dataset` - every client's train and test rows, cached on disk keyed by
   the dataset fingerprint, the labels, the partitioner settings and the seed;
4. everything (inputs, labels, per-client index tensors) moves to `device` once.

A client loader is then a `TensorBatchLoader` over the shared split restricted to the client's index
tensor: building the loaders of a round costs microseconds and no data is copied.

Loader conventions (SPEC section 5): client train loaders shuffle with the `seed` the orchestrator
passes per (round, client), keep the last partial batch, and for audio skip a final batch of size
1 (as the paper's speech task). Test loaders never shuffle; the central test set (`test_dataloader`,
also `val_dataloader`) is the full test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from sparsyfed_lightning.data import cache
from sparsyfed_lightning.data.audio import feature_shape
from sparsyfed_lightning.data.lda import Partition, check_alpha
from sparsyfed_lightning.data.loaders import TensorBatchLoader
from sparsyfed_lightning.data.materialise import finalise, materialise_split
from sparsyfed_lightning.data.partitioners import check_partitioner, partition_dataset
from sparsyfed_lightning.data.sources import (
    HUB_SOURCES,
    SourceSplits,
    check_dataset,
    known_num_classes,
    load_source,
)
from sparsyfed_lightning.data.transforms import PerSampleTransform, RandomCropFlip, build_transforms

_IMAGE_SHAPES = {
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "digits": (1, 8, 8),
    "fashion_mnist": (1, 28, 28),
    "mnist": (1, 28, 28),
}


class FederatedDataModule(LightningDataModule):
    """Federated splits of one dataset: per-client train/test loaders and the central test loader.

    Args:
        dataset: `digits` (offline default, scikit-learn's bundled 8x8 digits), `cifar10`,
            `cifar100`, `fashion_mnist`, `mnist`, `speech_commands` (v0.02) or `local` (see
            `sources.py`).
        path: local copy of the data instead of the Hub: a parquet folder in the Hub's schema, a
            parquet/arrow file, a `save_to_disk` folder; for `fashion_mnist` / `mnist` the IDX
            files (e.g. `/usr/share/datasets/fashion-mnist`, or torchvision's `FashionMNIST/raw`),
            for `cifar10` / `cifar100` torchvision's pickled batches (`cifar-10-batches-py`,
            `cifar-100-python`), for `speech_commands` the extracted official archive
            (`original_files.py`, `speech.py`). Required for `local`.
        partitioner: `lda` (the paper's), `dirichlet` or `iid` (flwr-datasets). From Python a
            `flwr_datasets.partitioner.Partitioner` instance is accepted too (not cached on disk).
        num_clients: number of clients.
        alpha: Dirichlet concentration for `lda` and `dirichlet` (paper: 1000, 1.0, 0.1).
        samples_per_client: `lda` client train size; default `floor(n_train / num_clients)`.
        batch_size: client train batch size (paper: 16).
        test_batch_size: batch size of every test loader (paper: 256).
        seed: partition seed (the Dirichlet draws and sampling); loaders get their own seeds.
        cache_dir: where partitions and decoded features are cached; default
            `~/.cache/sparsyfed_lightning` (or under `$XDG_CACHE_HOME`).
        augment: random crop + horizontal flip per training sample (images only; paper: off).
        transforms: more transforms of each client training sample, applied after `augment`: from
            YAML a list of `{"class_path": "torchvision.transforms.v2.RandomRotation", "init_args":
            {...}}` (or import paths), from Python also transform objects (see `transforms.py`).
        audio_features: `waveform` (the paper's 8 kHz waveform, `(1, 8000)`) or `logmel` (40 log-mel
            bands, 30 ms window, 10 ms hop: `(1, 40, 101)`).
        speech_classes: 35 (the paper's words) or 12 (10 commands + unknown + silence).
        image_column: input column (images, audio or numeric arrays) instead of the default.
        label_column: label column instead of the default.
        device: where the materialised tensors and index tensors live (e.g. `cuda`).
    """

    def __init__(
        self,
        dataset: str = "digits",
        *,
        path: str | None = None,
        partitioner: str = "lda",
        num_clients: int = 10,
        alpha: float = 1.0,
        samples_per_client: int | None = None,
        batch_size: int = 16,
        test_batch_size: int = 256,
        seed: int = 0,
        cache_dir: str | None = None,
        augment: bool = False,
        transforms: list[dict[str, Any]] | None = None,
        audio_features: Literal["waveform", "logmel"] = "waveform",
        speech_classes: Literal[35, 12] = 35,
        image_column: str | None = None,
        label_column: str | None = None,
        device: str = "cpu",
    ) -> None:
        super().__init__()
        check_dataset(dataset)
        check_partitioner(partitioner)
        check_alpha(alpha)
        for key, value in (
            ("num_clients", num_clients),
            ("batch_size", batch_size),
            ("test_batch_size", test_batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} is invalid; it must be an integer >= 1")
        if samples_per_client is not None and (
            isinstance(samples_per_client, bool) or not isinstance(samples_per_client, int) or samples_per_client < 1
        ):
            raise ValueError(
                f"samples_per_client={samples_per_client!r} is invalid; it must be an integer >= 1 or null"
            )
        if audio_features not in ("waveform", "logmel"):
            raise ValueError(f"audio_features={audio_features!r} is unknown; known: waveform, logmel")
        if speech_classes not in (35, 12):
            raise ValueError(f"speech_classes={speech_classes!r} is invalid; allowed: 35, 12")
        if augment and dataset == "speech_commands":
            raise ValueError(
                "augment=True is invalid for dataset 'speech_commands'; augmentation is for images only"
            )
        try:
            self.device = torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"device={device!r} is invalid; use e.g. cpu, cuda, cuda:1") from err
        check_device_available(self.device, "device")
        user_transforms = build_transforms(transforms)  # bad class paths fail here, before any data
        unsaved = [] if isinstance(partitioner, str) else ["partitioner"]
        if transforms is not None and not all(isinstance(t, str | dict) for t in transforms):
            unsaved.append("transforms")  # objects given from Python are not configuration
        self.save_hyperparameters(ignore=unsaved or None)

        self.dataset = dataset
        self.path = path
        self.partitioner = partitioner
        self.num_clients = num_clients
        self.alpha = float(alpha)
        self.samples_per_client = samples_per_client
        self.batch_size = batch_size
        self.test_batch_size = test_batch_size
        self.seed = seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else cache.default_cache_dir()
        self.augment = augment
        self.transforms = user_transforms
        self.audio_features = audio_features
        self.speech_classes = speech_classes
        self.image_column = image_column
        self.label_column = label_column

        # Filled by setup(); the flags say whether the last setup read the on-disk caches.
        self.partition: Partition | None = None
        self.partition_from_cache = False
        self.features_from_cache = False
        self._source: SourceSplits | None = None
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None
        self._train_index: list[torch.Tensor] = []
        self._test_index: list[torch.Tensor] = []
        self._train_labels: np.ndarray | None = None
        self._transform: PerSampleTransform | None = None
        self._skip_singleton = dataset == "speech_commands"

    # ------------------------------------------------------------------ configuration-level facts
    @property
    def num_classes(self) -> int:
        """Number of classes; from the configuration when possible, else from the label column."""
        known = known_num_classes(self.dataset, self.speech_classes, self.label_column)
        return known if known is not None else self._get_source().num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, e.g. `(1, 8, 8)` for digits or `(1, 8000)` for speech waveforms."""
        if self._train is not None:
            return tuple(self._train[0].shape[1:])
        if self.dataset == "speech_commands":
            return feature_shape(self.audio_features)
        if self.dataset in _IMAGE_SHAPES and self.image_column is None:
            return _IMAGE_SHAPES[self.dataset]
        self.setup()
        assert self._train is not None
        return tuple(self._train[0].shape[1:])

    @property
    def in_channels(self) -> int | None:
        """Channels of one input (`input_shape[0]`), e.g. 1 for digits, 3 for CIFAR; None for flat vectors.

        Read from the configuration when `input_shape` is known without loading (linked to
        `model.in_channels` by the CLI).
        """
        shape = self.input_shape
        return shape[0] if len(shape) >= 2 else None

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Download a Hub dataset into the `datasets` cache (nothing to do for local data)."""
        if self.dataset in HUB_SOURCES and self.path is None:
            self._get_source()

    def setup(self, stage: str | None = None) -> None:
        """Load, materialise and partition once; later calls return immediately."""
        if self._train is not None:
            return
        source = self._get_source()
        train_x, train_y, test_x, test_y = self._features(source)
        self.partition = self._partition(source, train_y.numpy(), test_y.numpy())
        self._train_labels = train_y.numpy()
        self._transform = self._train_transform(train_x)
        self._skip_singleton = source.kind == "audio"
        device = self.device
        self._train_index = [torch.from_numpy(rows).to(device) for rows in self.partition.train]
        self._test_index = [torch.from_numpy(rows).to(device) for rows in self.partition.test]
        self._test = (test_x.to(device), test_y.to(device))
        self._train = (train_x.to(device), train_y.to(device))

    # ------------------------------------------------------------------ loaders
    def client_num_samples(self, cid: int) -> int:
        """Number of training samples of client `cid`."""
        return int(self._client_rows(cid, "train").shape[0])

    def client_train_indices(self, cid: int) -> torch.Tensor:
        """Client `cid`'s rows of the train split (on `device`)."""
        return self._client_rows(cid, "train")

    def client_train_dataloader(self, cid: int, seed: int = 0) -> TensorBatchLoader:
        """Shuffled training batches of client `cid`; `seed` fixes the epoch permutations."""
        rows = self._client_rows(cid, "train")
        assert self._train is not None
        return TensorBatchLoader(
            *self._train,
            self.batch_size,
            shuffle=True,
            seed=seed,
            skip_singleton=self._skip_singleton,
            transform=self._transform,
            indices=rows,
        )

    def client_test_dataloader(self, cid: int) -> TensorBatchLoader:
        """Client `cid`'s test split (same class proportions as its train split), in order."""
        rows = self._client_rows(cid, "test")
        assert self._test is not None
        return TensorBatchLoader(*self._test, self.test_batch_size, indices=rows)

    def test_dataloader(self) -> TensorBatchLoader:
        """The central test set: the full test split, in order."""
        self.setup()
        assert self._test is not None
        return TensorBatchLoader(*self._test, self.test_batch_size)

    def val_dataloader(self) -> TensorBatchLoader:
        """Same as `test_dataloader` (the paper evaluates the global model on the test split)."""
        return self.test_dataloader()

    @property
    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole materialised train split `(inputs, labels)` on `device`."""
        self.setup()
        assert self._train is not None
        return self._train

    @property
    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole materialised test split `(inputs, labels)` on `device`."""
        self.setup()
        assert self._test is not None
        return self._test

    # ------------------------------------------------------------------ statistics
    def class_counts(self) -> np.ndarray:
        """(num_clients, num_classes) table of every client's training samples per class."""
        self.setup()
        assert self.partition is not None and self._train_labels is not None
        return np.stack(
            [
                np.bincount(self._train_labels[rows], minlength=self.num_classes)
                for rows in self.partition.train
            ]
        )

    def plot_class_counts(self, path: str) -> None:
        """Save a PNG of `class_counts()`: every client's samples per class, with a class legend."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        from sparsyfed_lightning.data.figures import class_counts_figure

        name = self.partitioner if isinstance(self.partitioner, str) else type(self.partitioner).__name__
        title = f"{self.dataset}: {name}, alpha={self.alpha:g}, {self.num_clients} clients, seed {self.seed}"
        figure = class_counts_figure(self.class_counts(), title)
        FigureCanvasAgg(figure)  # a Figure with its own Agg canvas: no pyplot state, no display needed
        figure.savefig(path, format="png", dpi=120)

    # ------------------------------------------------------------------ internals
    def _get_source(self) -> SourceSplits:
        if self._source is None:
            self._source = load_source(
                self.dataset,
                path=self.path,
                image_column=self.image_column,
                label_column=self.label_column,
                speech_classes=self.speech_classes,
            )
        return self._source

    def _train_transform(self, train_x: torch.Tensor) -> PerSampleTransform | None:
        """Augmentation, then the user transforms, of every client train batch (None: neither).

        User transforms are tried on one training sample first: one that fails or changes the shape
        is a configuration error (the global RNG is left as it was).
        """
        steps = []
        if self.augment:
            if train_x.dim() != 4:
                raise ValueError(
                    f"augment=True is invalid for dataset {self.dataset!r}: inputs of shape "
                    f"{tuple(train_x.shape[1:])} are not images"
                )
            steps += RandomCropFlip(train_x.shape[2], train_x.shape[3]).transforms
        steps += self.transforms
        if not steps:
            return None
        transform = PerSampleTransform(steps)
        if self.transforms and len(train_x):
            sample = train_x[:1]
            with torch.random.fork_rng(devices=[]):
                try:
                    changed = transform(sample)
                except Exception as error:  # noqa: BLE001 - any failure of user code is reported in one line
                    reason = " ".join(f"{type(error).__name__}: {error}".split())
                    raise ValueError(
                        f"data.transforms fail on a training sample of shape {tuple(sample.shape[1:])}: {reason}"
                    ) from error
            if changed.shape != sample.shape:
                raise ValueError(
                    f"data.transforms change a training sample's shape from {tuple(sample.shape[1:])} to "
                    f"{tuple(changed.shape[1:])}; they must keep it (the model and the test data use the original)"
                )
        return transform

    def _client_rows(self, cid: int, split: str) -> torch.Tensor:
        self.setup()
        if not (isinstance(cid, int | np.integer) and 0 <= cid < self.num_clients):
            raise ValueError(f"cid={cid!r} is invalid; client ids lie in [0, {self.num_clients})")
        return (self._train_index if split == "train" else self._test_index)[int(cid)]

    def _features(
        self, source: SourceSplits
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoded inputs and labels of both splits, from the feature cache when possible."""
        settings = {"input_column": source.input_column, "label_column": source.label_column}
        if source.kind == "audio":
            settings["audio_features"] = self.audio_features
            settings["speech_classes"] = self.speech_classes if source.dataset == "speech_commands" else None
        key = cache.cache_key(
            kind="features", dataset=source.dataset, fingerprint=source.fingerprint, **settings
        )
        file = self.cache_dir / "features" / f"{source.dataset}-{key}.pt"
        stored = cache.load_tensors(file)
        names = ("train_x", "train_y", "test_x", "test_y")
        self.features_from_cache = stored is not None and all(name in stored for name in names)
        if not self.features_from_cache:
            train_x, train_y = materialise_split(source, "train", audio_features=self.audio_features)
            test_x, test_y = materialise_split(source, "test", audio_features=self.audio_features)
            stored = dict(zip(names, (train_x, train_y, test_x, test_y), strict=True))
            cache.save_tensors(file, stored)
        assert stored is not None
        return (
            finalise(stored["train_x"], source),
            stored["train_y"],
            finalise(stored["test_x"], source),
            stored["test_y"],
        )

    def _partition(self, source: SourceSplits, train_y: np.ndarray, test_y: np.ndarray) -> Partition:
        """Every client's rows, from the partition cache when possible."""

        def compute() -> Partition:
            return partition_dataset(
                self.partitioner,
                train_y,
                test_y,
                num_clients=self.num_clients,
                num_classes=source.num_classes,
                alpha=self.alpha,
                seed=self.seed,
                samples_per_client=self.samples_per_client,
                label_column=source.label_column,
            )

        self.partition_from_cache = False
        if not isinstance(self.partitioner, str):
            return compute()  # an arbitrary Partitioner object has no fingerprintable settings
        key = cache.cache_key(
            kind="partition",
            dataset=source.dataset,
            fingerprint=source.fingerprint,
            labels=cache.array_digest(train_y, test_y),
            num_classes=source.num_classes,
            partitioner=self.partitioner,
            alpha=self.alpha if self.partitioner != "iid" else None,
            num_clients=self.num_clients,
            samples_per_client=self.samples_per_client,
            seed=self.seed,
        )
        file = self.cache_dir / "partitions" / f"{source.dataset}-{self.partitioner}-{key}.npz"
        cached = _partition_from_arrays(cache.load_arrays(file), self.num_clients, len(train_y), len(test_y))
        if cached is not None:
            self.partition_from_cache = True
            return cached
        partition = compute()
        cache.save_arrays(file, _partition_to_arrays(partition))
        return partition


def check_device_available(device: torch.device, key: str) -> None:
    """A one-line ValueError when `device` does not exist on this machine (e.g. `cuda:7` with 2 GPUs)."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{key}={str(device)!r} is invalid: this machine has no CUDA device; use cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{key}={str(device)!r} is invalid: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{key}={str(device)!r} is invalid: MPS is not available on this machine; use cpu")


def _partition_to_arrays(partition: Partition) -> dict[str, np.ndarray]:
    arrays = {}
    for split in ("train", "test"):
        parts = getattr(partition, split)
        arrays[f"{split}_rows"] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
    if partition.proportions is not None:
        arrays["proportions"] = partition.proportions
    return arrays


def _partition_from_arrays(
    arrays: dict[str, np.ndarray] | None, num_clients: int, n_train: int, n_test: int
) -> Partition | None:
    """A cached partition, or None when missing or inconsistent with the data (then it is recomputed)."""
    if arrays is None:
        return None
    splits = {}
    for split, size in (("train", n_train), ("test", n_test)):
        rows, offsets = arrays.get(f"{split}_rows"), arrays.get(f"{split}_offsets")
        if rows is None or offsets is None or len(offsets) != num_clients + 1 or offsets[-1] != len(rows):
            return None
        if len(rows) and (rows.min() < 0 or rows.max() >= size):
            return None
        splits[split] = [rows[offsets[k] : offsets[k + 1]].astype(np.int64) for k in range(num_clients)]
    return Partition(train=splits["train"], test=splits["test"], proportions=arrays.get("proportions"))
