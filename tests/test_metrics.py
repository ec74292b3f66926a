"""Round metrics on hand-built tensors and masks."""

from __future__ import annotations

import io
import math

import pytest
import torch

from sparsyfed_lightning.sparse.masks import (
    density,
    density_gain,
    mask_iou,
    nonzero_masks,
    pack_masks,
    packed_mask_iou,
    per_tensor_density,
    regrowth_counts,
    unpack_masks,
)


def test_density_pooled_and_per_tensor():
    tensors = {
        "a": torch.tensor([0.0, 1.0, 2.0, 0.0]),
        "b": torch.tensor([[0.0, 0.0], [0.0, 3.0]]),
        "empty": torch.zeros(0),
    }
    assert density(tensors) == 3 / 8
    assert per_tensor_density(tensors) == {"a": 0.5, "b": 0.25}
    with pytest.raises(ValueError, match="no entries"):
        density({"empty": torch.zeros(0)})


def test_negative_zero_is_zero_and_nan_is_not():
    t = {"x": torch.tensor([-0.0, 0.0, math.nan, 1.0])}
    assert nonzero_masks(t)["x"].tolist() == [False, False, True, True]
    assert density(t) == 0.5


def test_regrowth_counts_by_hand():
    g = {"w": torch.tensor([0.0, 1.0, 2.0, 0.0, 3.0]), "b": torch.tensor([[0.0, 4.0]])}
    x = {"w": torch.tensor([5.0, 0.0, 2.5, 0.0, 0.0]), "b": torch.tensor([[6.0, 4.0]])}
    # w: index 0 appears; indices 1 and 4 disappear. b: index 0 appears.
    assert regrowth_counts(g, x) == (2, 2)
    assert regrowth_counts(x, g) == (2, 2)
    assert regrowth_counts(g, g) == (0, 0)
    with pytest.raises(ValueError, match="keys differ"):
        regrowth_counts(g, {"w": x["w"]})
    with pytest.raises(ValueError, match="shapes"):
        regrowth_counts(g, {"w": x["w"], "b": torch.zeros(2)})


def test_mask_iou_pooled_over_tensors():
    a = {
        "w": torch.tensor([1, 1, 0, 0], dtype=torch.bool),
        "b": torch.tensor([[1, 0], [0, 0]], dtype=torch.bool),
    }
    b = {
        "w": torch.tensor([0, 1, 1, 0], dtype=torch.bool),
        "b": torch.tensor([[1, 0], [0, 1]], dtype=torch.bool),
    }
    # intersections 1 + 1 = 2, unions 3 + 2 = 5 (not the mean of per-tensor IoUs, (1/3 + 1/2)/2)
    assert mask_iou(a, b) == 2 / 5
    assert mask_iou(a, a) == 1.0


def test_mask_iou_of_empty_masks_is_one():
    empty = {"w": torch.zeros(5, dtype=torch.bool)}
    assert mask_iou(empty, empty) == 1.0
    assert mask_iou(empty, {"w": torch.ones(5, dtype=torch.bool)}) == 0.0
    assert mask_iou({}, {}) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_equals_unpacked(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"odd": (13,), "conv": (4, 3, 3, 3), "scalar": (), "empty": (0,), "row": (1, 9)}
    a = {k: torch.rand(s, generator=g) < 0.3 for k, s in shapes.items()}
    b = {k: torch.rand(s, generator=g) < 0.3 for k, s in shapes.items()}
    packed_a, packed_b = pack_masks(a), pack_masks(b)
    assert packed_a["odd"][0].dtype == torch.uint8 and packed_a["odd"][0].numel() == 2
    assert packed_mask_iou(packed_a, packed_b) == mask_iou(a, b)
    unpacked = unpack_masks(packed_a)
    assert all(torch.equal(unpacked[k], a[k]) for k in a)


def test_padding_bits_do_not_count():
    a = {"m": torch.tensor([True, False, True])}
    b = {"m": torch.tensor([True, True, False])}
    bits_a, shape = pack_masks(a)["m"]
    bits_b, _ = pack_masks(b)["m"]
    # set every padding bit (entries 3..7) in both snapshots, whichever bits of the byte they are
    padding = ~pack_masks({"m": torch.ones(3, dtype=torch.bool)})["m"][0]
    assert padding.item() != 0
    dirty_a = {"m": (bits_a | padding, shape)}
    dirty_b = {"m": (bits_b | padding, shape)}
    assert packed_mask_iou(dirty_a, dirty_b) == 1 / 3


def test_packed_masks_survive_a_weights_only_checkpoint():
    packed = pack_masks({"w": torch.tensor([[True, False, True]])})
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert torch.equal(unpack_masks(loaded)["w"], torch.tensor([[True, False, True]]))


def test_density_gain():
    assert density_gain(0.08, 0.05) == pytest.approx(0.03)
    assert density_gain(0.05, 0.05) == 0.0
    with pytest.raises(ValueError, match="target_density"):
        density_gain(0.1, 1.5)
