"""Image decoding, the paper's normalisation, and optional augmentation.

* Decoding: stored images (`{"bytes", "path"}` structs, as `datasets.Image` keeps them, or raw
  bytes) are decoded with PIL once per split into one uint8 tensor `(N, C, H, W)`. Colour images
  become RGB, grey ones stay single-channel (decided by the first row).
* Normalisation (SPEC 13.1): `ToTensor` (uint8 -> [0, 1]) followed by `Normalize(0.5, 0.5)` per
  channel, applied once to the whole split with `torchvision.transforms.v2.functional`, never per
  epoch. Inputs already scaled to [0, 1] (the digits) get the same `Normalize`.
* Augmentation (off by default; the paper uses none): per sample a `v2.RandomCrop` to the input
  size with `H // 8` padding (4 for CIFAR) filled with normalised black (-1), then
  `v2.RandomHorizontalFlip`. It runs inside the loader on each batch and uses torch's global RNG.
  Flips are not label-preserving for digits; augmentation is meant for CIFAR.
* User transforms (`data.transforms`): any callables on one sample, typically torchvision v2
  transforms given by `class_path`/`init_args`, applied after the augmentation, per sample, to the
  normalised float tensors of the client train loaders (never to test data). Like the augmentation
  they draw from torch's global RNG, which each client fit seeds from its own seed, so a client's
  draws are the same whether it trains alone or stacked with others (`loaders.StackedBatchLoader`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from sparsyfed_lightning.data.stored import stored_source
from sparsyfed_lightning.imports import instantiate

_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def decode_image(value: dict | bytes | None):
    """Open one stored image value with PIL (bytes preferred, else the path)."""
    from PIL import Image

    image = Image.open(stored_source(value))
    image.load()
    return image


def materialise_images(values: Iterable[tuple[int, dict | bytes | None]], *, describe: str) -> torch.Tensor:
    """Decode `(row, value)` items into one uint8 tensor `(N, C, H, W)`.

    `describe` names the dataset, split and column in errors. Every image must have the size and
    channel layout of the first one.
    """
    arrays: list[np.ndarray] = []
    mode = None
    for row, value in values:
        try:
            image = decode_image(value)
        except Exception as err:  # PIL raises UnidentifiedImageError/OSError/... on bad bytes
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ValueError(f"{describe}: row {row} cannot be decoded as an image: {reason}") from err
        if mode is None:
            mode = "L" if image.mode in _GREY_MODES else "RGB"
        array = np.asarray(image.convert(mode), dtype=np.uint8)
        if arrays and array.shape != arrays[0].shape:
            raise ValueError(
                f"{describe}: row {row} has shape {array.shape}, but row 0 has {arrays[0].shape}; "
                "all images must have the same size"
            )
        arrays.append(array)
    if not arrays:
        return torch.zeros((0, 3, 0, 0), dtype=torch.uint8)
    stacked = np.stack(arrays)
    if stacked.ndim == 3:
        stacked = stacked[..., None]
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def normalise(images: torch.Tensor) -> torch.Tensor:
    """`ToTensor` + `Normalize(0.5, 0.5)` per channel of a batch `(N, C, ...)` (uint8 or floats in [0, 1])."""
    from torchvision.transforms.v2 import functional as F

    x = F.to_dtype(images, torch.float32, scale=True) if images.dtype == torch.uint8 else images.float()
    channels = x.shape[1]
    return F.normalize(x, mean=[0.5] * channels, std=[0.5] * channels)


SampleTransform = Callable[[torch.Tensor], torch.Tensor]
_ALLOWED = (
    'a transform object, an import path, or {"class_path": ..., "init_args": {...}} of a callable class '
    "(e.g. torchvision.transforms.v2.RandomRotation)"
)


class PerSampleTransform:
    """Apply `transforms` in order to every sample of a batch, each sample with its own random draws.

    v2 transforms draw one set of parameters per call, so a batch call would crop or rotate every
    sample the same way; one call per sample keeps them independent.
    """

    def __init__(self, transforms: Sequence[SampleTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        samples = []
        for sample in batch:
            for transform in self.transforms:
                sample = transform(sample)
            samples.append(sample)
        return torch.stack(samples)


class RandomCropFlip(PerSampleTransform):
    """Per-sample `v2.RandomCrop` (with padding) + `v2.RandomHorizontalFlip` on a normalised batch."""

    def __init__(self, height: int, width: int, padding: int | None = None) -> None:
        from torchvision.transforms import v2

        self.padding = max(1, height // 8) if padding is None else padding
        super().__init__([v2.RandomCrop((height, width), padding=self.padding, fill=-1.0), v2.RandomHorizontalFlip()])


def build_transforms(specs: Sequence[Any] | None) -> list[SampleTransform]:
    """The user transforms of `data.transforms`: objects as they are, import paths and class_path dicts built.

    One-line ValueError naming `data.transforms[i]` for anything that cannot be imported, built or called.
    """
    if specs is None:
        return []
    if isinstance(specs, str | dict) or not isinstance(specs, Sequence):
        raise ValueError(f"data.transforms={specs!r} is invalid; it must be a list of transforms, each {_ALLOWED}")
    built = []
    for index, spec in enumerate(specs):
        key = f"data.transforms[{index}]"
        transform = instantiate(spec, key, _ALLOWED) if isinstance(spec, str | dict) else spec
        if not callable(transform):
            raise ValueError(f"{key}={spec!r} is not callable on a sample; allowed: {_ALLOWED}")
        built.append(transform)
    return built
