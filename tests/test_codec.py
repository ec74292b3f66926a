"""Codec: bit-exact round trips, byte counts against an independent size model, corruption errors."""

from __future__ import annotations

import math
import struct
import zlib

import pytest
import torch

from sparsyfed_lightning.federated.codec import (
    decode_state,
    decode_tensor,
    encode_state,
    encode_state_with_stats,
    encode_tensor,
    message_stats,
)

ALL_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:  # torch refuses to reinterpret some empty views
        return torch.zeros(0, dtype=torch.uint8)
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    assert got.device.type == "cpu"
    assert torch.equal(raw_bytes(got), raw_bytes(expected.cpu()))


# --- an independent model of the format's sizes (from the format description, not the code) ---


def leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def reference_sizes(t: torch.Tensor) -> dict[str, int]:
    """Body sizes of the three encodings, with 'zero' meaning all bytes of the entry are zero."""
    itemsize = t.element_size()
    per_entry = raw_bytes(t).reshape(t.numel(), itemsize)
    positions = [i for i, row in enumerate(per_entry.tolist()) if any(row)]
    gaps, previous = [], -1
    for i in positions:
        gaps.append(i - previous - 1)
        previous = i
    gap_bytes = sum(len(leb128(g)) for g in gaps)
    values = len(positions) * itemsize
    return {
        "dense": t.numel() * itemsize,
        "sparse": len(leb128(len(positions))) + len(leb128(gap_bytes)) + gap_bytes + values,
        "bitmap": math.ceil(t.numel() / 8) + values,
    }


def expected_tensor_message_len(t: torch.Tensor) -> int:
    # magic(2) version(1) type(1) | dtype(1) ndim(1) dims encoding(1) | body | crc(4)
    dims = sum(len(leb128(d)) for d in t.shape)
    return 4 + 3 + dims + min(reference_sizes(t).values()) + 4


def encoding_byte(payload: bytes, t: torch.Tensor) -> int:
    return payload[4 + 2 + sum(len(leb128(d)) for d in t.shape)]


def sparse_tensor(
    numel: int, density: float, dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=g) + 3.0  # never zero
    keep = torch.rand(numel, generator=g) < density
    return (values * keep).to(dtype)


# --- golden message, written out by hand ---


def test_sparse_message_matches_hand_written_bytes():
    t = torch.zeros(1000)
    t[3], t[4], t[200] = 1.0, -2.0, 0.5
    # dense 4000 B, bitmap 125 + 12 B, sparse 1 + 1 + 4 + 12 B -> sparse.
    # gaps: 3, 4-3-1 = 0, 200-4-1 = 195 = 0b1_1000011 -> varints 03 | 00 | C3 01.
    content = (
        b"SF\x01\x01"  # magic, version 1, type 1 (tensor)
        + b"\x00\x01\xe8\x07"  # dtype float32, 1 dim, 1000 = E8 07
        + b"\x01"  # SPARSE
        + b"\x03\x04"  # 3 non-zeros, 4 gap bytes
        + b"\x03\x00\xc3\x01"
        + struct.pack("<3f", 1.0, -2.0, 0.5)
    )
    expected = content + struct.pack("<I", zlib.crc32(content))
    assert encode_tensor(t) == expected
    assert_bit_identical(decode_tensor(expected), t)


# --- round trips ---


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.03, 0.3, 1.0])
def test_every_dtype_round_trips(dtype, density):
    t = sparse_tensor(777, density, torch.float64).mul(7).to(dtype).reshape(7, 111)
    assert_bit_identical(decode_tensor(encode_tensor(t)), t)


@pytest.mark.parametrize(
    "t",
    [
        torch.zeros(0),
        torch.zeros(3, 0, 2, dtype=torch.float16),
        torch.tensor(2.5),
        torch.tensor(0, dtype=torch.int64),
        torch.tensor(True),
        torch.tensor([7.0]),
        torch.tensor([0.0]),
        torch.randn(40, 30),
        torch.zeros(5, 5, 5),
        sparse_tensor(1_000_000, 0.05),
        torch.zeros(1_000_000),
        torch.randn(1_000_000, dtype=torch.float64),
    ],
    ids=lambda t: f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}",
)
def test_shapes_round_trip(t):
    assert_bit_identical(decode_tensor(encode_tensor(t)), t)


def test_negative_zero_nan_payloads_and_infinities_survive():
    bits = torch.tensor([0, 0x80000000, 0x7FC00001, -0x00400001, 0x7F800000, 0x00000001], dtype=torch.int64)
    t = torch.zeros(100, dtype=torch.int32)
    t[[1, 10, 20, 30, 40, 50]] = bits.to(torch.int32)  # 0, -0.0, NaN payload, -NaN, +inf, denormal
    t = t.view(torch.float32)
    decoded = decode_tensor(encode_tensor(t))
    assert_bit_identical(decoded, t)
    assert torch.signbit(decoded[10]) and decoded[10] == 0
    # -0.0 is not "zero" for the codec (all bits would have to be zero): 5 stored values.
    assert message_stats({"t": t}).nonzero == 5


def test_half_precision_special_values():
    for dtype, int_dtype in ((torch.float16, torch.int16), (torch.bfloat16, torch.int16)):
        t = torch.tensor([0, -0x8000, 0x7E01, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=int_dtype).view(dtype)
        assert_bit_identical(decode_tensor(encode_tensor(t)), t)


def test_state_round_trip_keeps_keys_order_dtypes_shapes():
    state = {
        "z.weight": sparse_tensor(64 * 27, 0.05).reshape(64, 3, 3, 3),
        "a.running_var": torch.rand(64),
        "a.num_batches_tracked": torch.tensor(17),
        "mask": torch.rand(10, 10) > 0.9,
        "half": torch.randn(33).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "ünïcode.key": torch.arange(5, dtype=torch.int32),
    }
    decoded = decode_state(encode_state(state))
    assert list(decoded) == list(state)
    for key in state:
        assert_bit_identical(decoded[key], state[key])
    decoded["a.running_var"].add_(1.0)  # decoded tensors are writable copies
    assert not torch.equal(decoded["a.running_var"], state["a.running_var"])


def test_non_contiguous_and_grad_tensors_are_encoded_by_value():
    base = sparse_tensor(600, 0.1).reshape(20, 30).requires_grad_()
    t = base.t()[::2]
    assert_bit_identical(decode_tensor(encode_tensor(t)), t.detach().contiguous())


def test_empty_state():
    assert decode_state(encode_state({})) == {}


# --- byte counts ---


@pytest.mark.parametrize("density", [0.0, 0.0005, 0.01, 0.05, 0.1, 0.125, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.uint8])
def test_chosen_encoding_is_the_smallest(density, dtype):
    t = sparse_tensor(3001, density, dtype, seed=int(density * 1e4))
    payload = encode_tensor(t)
    sizes = reference_sizes(t)
    assert len(payload) == expected_tensor_message_len(t)
    smallest = min(sizes.values())
    # ties go to dense, then sparse, then bitmap
    expected_kind = next(i for i, name in enumerate(("dense", "sparse", "bitmap")) if sizes[name] == smallest)
    assert encoding_byte(payload, t) == expected_kind


def _kind_for(t: torch.Tensor) -> int:
    return encoding_byte(encode_tensor(t), t)


def test_ties_and_near_ties_by_hand():
    # uint8, 8 entries, 7 non-zeros: dense 8 B, bitmap 1 + 7 = 8 B, sparse 1 + 1 + 7 + 7 = 16 B -> tie, DENSE.
    t = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    assert _kind_for(t) == 0
    # uint8, 80 entries, 8 consecutive non-zeros: dense 80, sparse 1 + 1 + 8 + 8 = 18,
    # bitmap 10 + 8 = 18 -> tie, SPARSE.
    t = torch.zeros(80, dtype=torch.uint8)
    t[:8] = 9
    assert _kind_for(t) == 1
    # float32, 8000 entries, 995 consecutive non-zeros then two after long gaps:
    # gap bytes 995 + 2 + 2 = 999; sparse 2 + 2 + 999 + 4 * 997 = 4991 > bitmap 1000 + 3988 = 4988.
    t = torch.zeros(8000)
    t[:995] = 1.0
    t[3000] = 2.0
    t[7999] = 3.0
    assert reference_sizes(t) == {"dense": 32000, "sparse": 4991, "bitmap": 4988}
    assert _kind_for(t) == 2


def test_four_byte_gaps():
    t = torch.zeros(3_000_000, dtype=torch.uint8)
    t[[0, 2_999_999]] = 1
    # gaps 0 and 2_999_998 (>= 2**21: 4 bytes); sparse body 1 + 1 + 5 + 2
    payload = encode_tensor(t)
    assert len(payload) == 4 + (3 + len(leb128(3_000_000))) + (1 + 1 + 5 + 2) + 4
    assert_bit_identical(decode_tensor(payload), t)


def test_long_gaps_need_multi_byte_varints():
    t = torch.zeros(1_000_000)
    t[[0, 300, 999_999]] = torch.tensor([1.0, 2.0, 3.0])
    # gaps 0, 299 (2 bytes), 999_698 (3 bytes) -> 6 gap bytes; sparse body 1 + 1 + 6 + 12
    payload = encode_tensor(t)
    assert len(payload) == 4 + (3 + len(leb128(1_000_000))) + (1 + 1 + 6 + 12) + 4
    assert_bit_identical(decode_tensor(payload), t)


def test_message_stats_match_the_payload():
    state = {
        "w": sparse_tensor(5000, 0.05).reshape(50, 100),
        "bn": torch.randn(50).to(torch.float16),
        "bias": torch.randn(50, dtype=torch.float64),
        "nbt": torch.tensor(3),
        "ids": torch.zeros(8, dtype=torch.int32),
    }
    payload, stats = encode_state_with_stats(state)
    assert stats.encoded_bytes == len(payload)
    assert message_stats(state) == stats
    assert stats.dense_bytes == 5000 * 4 + 50 * 2 + 50 * 8 + 8 + 8 * 4
    assert stats.dense_fp32_bytes == 5000 * 4 + 50 * 4 + 50 * 4 + 8 + 8 * 4
    assert stats.num_tensors == 5 and stats.numel == 5000 + 50 + 50 + 1 + 8
    assert stats.dense_tensors + stats.sparse_tensors + stats.bitmap_tensors == 5
    assert stats.sparse_tensors >= 1  # w at 5% density
    # header: magic, version, type, count | per key: name length, name, record | crc
    expected = 4 + 1 + 4
    for key, t in state.items():
        expected += 1 + len(key) + (expected_tensor_message_len(t) - 8)
    assert len(payload) == expected
    both = stats + stats
    assert both.encoded_bytes == 2 * len(payload) and both.num_tensors == 10


def test_five_percent_density_is_at_most_one_fifteenth_of_dense_fp32():
    state = {
        "conv.weight": sparse_tensor(1_000_000, 0.05).reshape(1000, 1000),
        "bn.weight": torch.randn(1000),  # dense extras as in a real uplink
        "bn.running_mean": torch.randn(1000),
        "bn.num_batches_tracked": torch.tensor(100),
    }
    payload, stats = encode_state_with_stats(state)
    assert stats.dense_fp32_bytes == 4 * 1_002_000 + 8
    assert len(payload) <= stats.dense_fp32_bytes / 15
    assert stats.ratio_to_dense_fp32 == len(payload) / stats.dense_fp32_bytes


# --- errors ---


def _small_payload() -> bytes:
    return encode_state({"a": sparse_tensor(300, 0.05), "b": torch.randn(4), "c": sparse_tensor(300, 0.4)})


def test_every_truncation_is_a_value_error():
    payload = _small_payload()
    for n in range(len(payload)):
        with pytest.raises(ValueError):
            decode_state(payload[:n])


def test_every_single_byte_flip_is_a_value_error():
    payload = bytearray(_small_payload())
    for i in range(len(payload)):
        corrupt = bytearray(payload)
        corrupt[i] ^= 0x10
        with pytest.raises(ValueError):
            decode_state(bytes(corrupt))


def _with_crc(content: bytes) -> bytes:
    return content + struct.pack("<I", zlib.crc32(content))


def test_structurally_corrupt_payloads_with_valid_checksum():
    # Index 200 in a 100-entry tensor.
    bad_index = (
        b"SF\x01\x01" + b"\x00\x01\x64" + b"\x01\x03\x04\x03\x00\xc3\x01" + struct.pack("<3f", 1, 2, 3)
    )
    # Four gap varints where three non-zeros are announced.
    bad_count = (
        b"SF\x01\x01" + b"\x00\x01\xe8\x07" + b"\x01\x03\x04\x03\x00\x00\x01" + struct.pack("<3f", 1, 2, 3)
    )
    # Unknown dtype code and unknown encoding.
    bad_dtype = b"SF\x01\x01" + b"\x63\x01\x01\x00" + b"\x00"
    bad_kind = b"SF\x01\x01" + b"\x00\x01\x01\x07" + b"\x00\x00\x00\x00"
    # Bitmap with padding bits set: 3 entries, bitmap 0b1111_0001, one value.
    bad_padding = b"SF\x01\x01" + b"\x08\x01\x03\x02" + b"\xf1\x05"
    for content in (bad_index, bad_count, bad_dtype, bad_kind, bad_padding):
        with pytest.raises(ValueError, match="corrupt"):
            decode_tensor(_with_crc(content))


def test_envelope_errors_are_one_line_value_errors():
    payload = _small_payload()
    cases = {
        "not a sparsyfed": b"XX" + payload[2:],
        "format version": payload[:2] + b"\x09" + payload[3:],
        "trailing": _with_crc(payload[:-4] + b"\x00"),
        "checksum": payload[:-1] + bytes([payload[-1] ^ 1]),
    }
    for needle, corrupt in cases.items():
        with pytest.raises(ValueError, match=needle) as info:
            decode_state(corrupt)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="not a tensor"):
        decode_tensor(payload)


def test_unsupported_dtype_is_a_value_error():
    with pytest.raises(ValueError, match="complex64"):
        encode_tensor(torch.zeros(3, dtype=torch.complex64))
