"""sparsyfed-lightning: federated sparse training (SparsyFed and its baselines) on PyTorch Lightning."""

__version__ = "0.1.0"
