"""`from sparsyfed_lightning import ...` gives the public API, while `import sparsyfed_lightning` stays light."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import sparsyfed_lightning

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves_to_its_defining_object():
    from sparsyfed_lightning.client.module import ClientModule
    from sparsyfed_lightning.data.module import FederatedDataModule
    from sparsyfed_lightning.federated.engines_flower import FlowerConfig
    from sparsyfed_lightning.federated.trainer import FederatedTrainer
    from sparsyfed_lightning.methods import FLASH, Dense, SparsyFed, SparsyFedSpectral, TopK, ZeroFL
    from sparsyfed_lightning.server.optimizers import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

    expected = {
        "ClientModule": ClientModule, "FederatedDataModule": FederatedDataModule, "FederatedTrainer": FederatedTrainer,
        "FlowerConfig": FlowerConfig, "Dense": Dense, "TopK": TopK, "ZeroFL": ZeroFL, "FLASH": FLASH,
        "SparsyFed": SparsyFed, "SparsyFedSpectral": SparsyFedSpectral, "FedAvg": FedAvg, "FedAvgM": FedAvgM,
        "FedAdam": FedAdam, "FedYogi": FedYogi, "FedAdagrad": FedAdagrad,
    }
    for name, obj in expected.items():
        assert getattr(sparsyfed_lightning, name) is obj, name
    assert set(sparsyfed_lightning.__all__) == {"__version__", *sparsyfed_lightning._PUBLIC}
    for name in sparsyfed_lightning.__all__:
        assert getattr(sparsyfed_lightning, name) is not None, name
    assert set(sparsyfed_lightning.__all__) <= set(dir(sparsyfed_lightning))
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        sparsyfed_lightning.Nope  # noqa: B018


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("sparsyfed_lightning", ("torch", "lightning", "numpy", "matplotlib")),  # `sparsyfed --version`
        ("sparsyfed_lightning.plots", ("torch", "lightning", "torchvision")),  # `sparsyfed plot`
    ],
)
def test_light_imports_load_neither_torch_nor_lightning(module, absent):
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"
