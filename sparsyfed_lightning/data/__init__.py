"""Data layer (DESIGN.md layer 3): sources, partitioners, transforms and the `FederatedDataModule`.

Modules, one job each:

* `sources` - raw train/test splits (Hub ids, local parquet/arrow/`save_to_disk`, scikit-learn digits);
  `hub` - Hub loading that fails fast offline; `speech` - Speech Commands label sets and archive.
* `transforms` - image decoding, the paper's normalisation, augmentation; `audio` - soundfile
  decoding and waveform/log-mel features; `materialise` - raw splits -> tensors.
* `lda` - the paper's LDA partition; `partitioners` - the name registry and flwr-datasets adapters.
* `cache` - atomic on-disk cache of partitions and features.
* `loaders` - `TensorBatchLoader`; `module` - `FederatedDataModule`.

Exports are resolved lazily so that e.g. `TensorBatchLoader` does not import Lightning or `datasets`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TensorBatchLoader": "sparsyfed_lightning.data.loaders",
    "FederatedDataModule": "sparsyfed_lightning.data.module",
    "DatasetUnavailableError": "sparsyfed_lightning.data.hub",
    "Partition": "sparsyfed_lightning.data.lda",
    "lda_partition": "sparsyfed_lightning.data.lda",
    "partition_dataset": "sparsyfed_lightning.data.partitioners",
    "DATASETS": "sparsyfed_lightning.data.sources",
    "PARTITIONERS": "sparsyfed_lightning.data.partitioners",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
