"""Tensor and module mechanics of sparse training: no Lightning, no federation."""

from sparsyfed_lightning.sparse.activations import ActivationPruning, CompactReLU, pack_bits, unpack_bits
from sparsyfed_lightning.sparse.host_sync import HostSyncRecorder
from sparsyfed_lightning.sparse.layers import (
    AUTHORS_LAYER_WALK,
    layer_densities,
    layers_outside_authors_walk,
    prunable_layers,
    prunable_weights,
    stored_weight,
    stored_weight_key,
)
from sparsyfed_lightning.sparse.memory import SavedTensorMeter
from sparsyfed_lightning.sparse.powerprop import (
    Powerprop,
    freeze_support,
    powerprop_of,
    powerpropify,
    release_support,
    signed_power,
)
from sparsyfed_lightning.sparse.pruning import (
    check_sparsity,
    global_magnitude_prune,
    keep_largest_with_ties_,
    layerwise_magnitude_prune,
    magnitude_threshold,
    prune_smallest_,
    smallest_magnitude_mask,
)
from sparsyfed_lightning.sparse.spectral import spectral_exponent, update_spectral_exponents
from sparsyfed_lightning.sparse.swat import WeightTopK

__all__ = [
    "AUTHORS_LAYER_WALK",
    "ActivationPruning",
    "CompactReLU",
    "HostSyncRecorder",
    "Powerprop",
    "SavedTensorMeter",
    "WeightTopK",
    "check_sparsity",
    "freeze_support",
    "global_magnitude_prune",
    "keep_largest_with_ties_",
    "layer_densities",
    "layers_outside_authors_walk",
    "layerwise_magnitude_prune",
    "magnitude_threshold",
    "pack_bits",
    "powerprop_of",
    "powerpropify",
    "prunable_layers",
    "prunable_weights",
    "prune_smallest_",
    "release_support",
    "signed_power",
    "smallest_magnitude_mask",
    "spectral_exponent",
    "stored_weight",
    "stored_weight_key",
    "unpack_bits",
    "update_spectral_exponents",
]
