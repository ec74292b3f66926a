"""Raw splits -> one input tensor and one label tensor per split, built once.

Two stages so that the on-disk feature cache stores the compact form:

* `materialise_split` decodes everything: images to uint8 `(N, C, H, W)`, audio to its features
  (`audio.py`), numeric arrays to float32 (uint8 arrays stay uint8: the images of
  `original_files.py`, a quarter of the size in the cache). Arrays stored as nested fixed-size
  lists are read through Arrow without a per-row copy. Labels are validated (integers in
  `[0, classes)`, no missing values) and mapped (Speech Commands label sets; rows mapped to -1 are
  dropped).
* `finalise` applies the normalisation (`transforms.normalise`) to images and to the arrays the
  source marks for it (the digits, the original files' images).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from sparsyfed_lightning.data.audio import AudioFeatures, materialise_audio
from sparsyfed_lightning.data.sources import SourceSplits
from sparsyfed_lightning.data.transforms import materialise_images, normalise

_BATCH_ROWS = 1024


def read_labels(ds: Any, source: SourceSplits, split: str) -> np.ndarray:
    """The stored labels of one split, checked to be integers in `[0, source.source_num_classes)`."""
    column = source.label_column
    values = ds.select_columns([column]).with_format("arrow")[:].column(column)
    where = f"of the {split} split of dataset {source.dataset!r}"
    if values.null_count:
        row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(
            f"label_column={column!r} is missing in row {row} {where}; every sample needs a label"
        )
    labels = values.to_numpy(zero_copy_only=False)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"label_column={column!r} holds {labels.dtype} values {where}; labels must be integer class ids "
            "or strings"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= source.source_num_classes))
    if len(bad):
        raise ValueError(
            f"label_column={column!r} holds {int(labels[bad[0]])} in row {int(bad[0])} {where}; "
            f"labels must lie in [0, {source.source_num_classes})"
        )
    return labels.astype(np.int64)


def iter_values(ds: Any, column: str) -> Iterator[tuple[int, Any]]:
    """(row, stored value) pairs of one column, read through Arrow so nothing gets decoded by `datasets`."""
    row = 0
    for table in ds.select_columns([column]).with_format("arrow").iter(batch_size=_BATCH_ROWS):
        for value in table.column(column).to_pylist():
            yield row, value
            row += 1


def materialise_split(
    source: SourceSplits, split: str, *, audio_features: AudioFeatures = "waveform"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded (not yet normalised) inputs and class ids of the `split` ("train" or "test") split."""
    ds = source.train if split == "train" else source.test
    stored = read_labels(ds, source, split)
    labels = source.label_map[stored] if source.label_map is not None else stored
    keep = labels >= 0
    describe = f"dataset {source.dataset!r}, {split} split, column {source.input_column!r}"
    if source.kind == "image":
        values = ((row, value) for row, value in iter_values(ds, source.input_column) if keep[row])
        return materialise_images(values, describe=describe), torch.from_numpy(labels[keep])
    if source.kind == "audio":
        audio = (
            (row, value, int(labels[row]), int(stored[row]) in source.split_labels)
            for row, value in iter_values(ds, source.input_column)
            if keep[row]
        )
        return materialise_audio(audio, features=audio_features, describe=describe)
    try:
        array = fixed_size_array(ds, source.input_column)
        if array is None:
            array = np.asarray(ds.select_columns([source.input_column]).with_format("numpy")[:][source.input_column])
        # A copy: Arrow's buffers are read-only, and the tensor must own its memory.
        inputs = torch.from_numpy(np.array(array, dtype=np.uint8 if array.dtype == np.uint8 else np.float32))
    except (TypeError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(
            f"{describe}: values are not a numeric array of one shape per row ({reason})"
        ) from err
    return inputs[torch.from_numpy(keep)], torch.from_numpy(labels[keep])


def fixed_size_array(ds: Any, column: str) -> np.ndarray | None:
    """A column of (nested) fixed-size lists of numbers as one array `(N, *shape)`, read through Arrow.

    None for any other column type (then `datasets`' NumPy formatting reads it, which for nested
    lists builds every row separately and widens integers to int64: seconds for 60,000 images).
    """
    import pyarrow as pa

    values = ds.select_columns([column]).with_format("arrow")[:].column(column)
    shape, value_type = [], values.type
    while pa.types.is_fixed_size_list(value_type):
        shape.append(value_type.list_size)
        value_type = value_type.value_type
    if not shape or not (pa.types.is_integer(value_type) or pa.types.is_floating(value_type)):
        return None
    flat = values.combine_chunks()
    for _ in shape:
        flat = flat.flatten()
    return flat.to_numpy(zero_copy_only=False).reshape(len(values), *shape)


def finalise(inputs: torch.Tensor, source: SourceSplits) -> torch.Tensor:
    """Model-ready float inputs: the paper's normalisation for images and arrays marked `normalize`."""
    if source.kind == "image" or source.normalize:
        return normalise(inputs)
    return inputs.float()
