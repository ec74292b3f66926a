"""Federated sparse-training methods, one file each, looked up by name.

Adding a method means adding one file with a `Method` subclass and one line in `METHODS`.
"""

from __future__ import annotations

from typing import Any

from sparsyfed_lightning.methods.base import Method
from sparsyfed_lightning.methods.dense import Dense
from sparsyfed_lightning.methods.flash import FLASH
from sparsyfed_lightning.methods.sparsyfed import SparsyFed
from sparsyfed_lightning.methods.sparsyfed_spectral import SparsyFedSpectral
from sparsyfed_lightning.methods.topk import TopK
from sparsyfed_lightning.methods.zerofl import ZeroFL

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Dense, TopK, ZeroFL, FLASH, SparsyFed, SparsyFedSpectral)
}


def build_method(name: str, **kwargs: Any) -> Method:
    """Instantiate a method by its registry name (e.g. `build_method("sparsyfed", sparsity=0.99)`)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name](**kwargs)


__all__ = ["FLASH", "METHODS", "Dense", "Method", "SparsyFed", "SparsyFedSpectral", "TopK", "ZeroFL", "build_method"]
