"""sparsyfed-lightning: federated sparse training (SparsyFed and its baselines) on PyTorch Lightning.

The public API is importable from the package itself::

    from sparsyfed_lightning import ClientModule, FederatedDataModule, FederatedTrainer, SparsyFed

Importing the package stays light (`sparsyfed --version` and `sparsyfed plot` import it without
torch or Lightning): each name is imported from its module on first access (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_PUBLIC: dict[str, str] = {
    "ClientModule": "sparsyfed_lightning.client.module",
    "SparseTraining": "sparsyfed_lightning.client.sparse_training",
    "FederatedDataModule": "sparsyfed_lightning.data.module",
    "FederatedTrainer": "sparsyfed_lightning.federated.trainer",
    "FlowerConfig": "sparsyfed_lightning.federated.engines_flower",
    "UniformSampler": "sparsyfed_lightning.federated.sampling",
    "ClientSampler": "sparsyfed_lightning.federated.sampling",
    "Method": "sparsyfed_lightning.methods",
    "Dense": "sparsyfed_lightning.methods",
    "TopK": "sparsyfed_lightning.methods",
    "ZeroFL": "sparsyfed_lightning.methods",
    "FLASH": "sparsyfed_lightning.methods",
    "SparsyFed": "sparsyfed_lightning.methods",
    "SparsyFedSpectral": "sparsyfed_lightning.methods",
    "ServerOptimizer": "sparsyfed_lightning.server.optimizers",
    "FedAvg": "sparsyfed_lightning.server.optimizers",
    "FedAvgM": "sparsyfed_lightning.server.optimizers",
    "FedAdam": "sparsyfed_lightning.server.optimizers",
    "FedYogi": "sparsyfed_lightning.server.optimizers",
    "FedAdagrad": "sparsyfed_lightning.server.optimizers",
    "MODELS": "sparsyfed_lightning.models",
    "build_model": "sparsyfed_lightning.models",
    "register_model": "sparsyfed_lightning.models",
    "powerpropify": "sparsyfed_lightning.sparse",
}

__all__ = [
    "__version__",
    "build_model",
    "ClientModule",
    "ClientSampler",
    "Dense",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FederatedDataModule",
    "FederatedTrainer",
    "FedYogi",
    "FLASH",
    "FlowerConfig",
    "Method",
    "MODELS",
    "powerpropify",
    "register_model",
    "ServerOptimizer",
    "SparseTraining",
    "SparsyFed",
    "SparsyFedSpectral",
    "TopK",
    "UniformSampler",
    "ZeroFL",
]

if TYPE_CHECKING:  # what static tools and IDEs see; at run time `__getattr__` imports lazily
    from sparsyfed_lightning.client.module import ClientModule
    from sparsyfed_lightning.client.sparse_training import SparseTraining
    from sparsyfed_lightning.data.module import FederatedDataModule
    from sparsyfed_lightning.federated.engines_flower import FlowerConfig
    from sparsyfed_lightning.federated.sampling import ClientSampler, UniformSampler
    from sparsyfed_lightning.federated.trainer import FederatedTrainer
    from sparsyfed_lightning.methods import FLASH, Dense, Method, SparsyFed, SparsyFedSpectral, TopK, ZeroFL
    from sparsyfed_lightning.models import MODELS, build_model, register_model
    from sparsyfed_lightning.server.optimizers import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, ServerOptimizer
    from sparsyfed_lightning.sparse import powerpropify


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'sparsyfed_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
