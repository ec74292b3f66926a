"""The communication codec: every uplink and downlink message is bytes, and its length is the cost.

Each tensor is written in whichever of three encodings is smallest for it:

* DENSE  - the raw little-endian bytes;
* SPARSE - the non-zero positions as gaps between consecutive sorted indices, each gap an unsigned
  LEB128 varint, followed by the non-zero values;
* BITMAP - a packed bitmap of the non-zeros (`ceil(numel / 8)` bytes), followed by the values.

Decisions:

* "Zero" means all bits zero. Values are compared as same-width integers, so `-0.0` and NaN
  payloads are kept as values and every tensor round-trips bit-exactly (the metrics in
  `sparse.masks` use numerical `!= 0` instead, as the authors' analyses did). The flip side:
  a `-0.0` costs as much as any stored value. Pruning by multiplication (`w * mask`) turns every
  pruned negative weight into `-0.0` (about half the zeros), which made a 95%-sparse ResNet-18
  uplink 0.56x dense fp32 instead of 0.06x; prune with `masked_fill_`/`where`, or add `0.0`
  (`-0.0 + 0.0 == +0.0`, every other value unchanged) before encoding.
* Gap coding is what makes a 95%-sparse message small: at 5% density the mean gap is ~19, so nearly
  every gap fits one varint byte and a kept fp32 value costs ~5 bytes against the 80 bytes of dense
  fp32 it replaces (~1/16). Plain int32 indices (1/10) or a bitmap (1/12.3) miss the 1/15 target.
  Each gap is `index - previous_index - 1`, so runs of consecutive non-zeros cost 0x00 bytes.
* Everything is vectorised in NumPy; the only Python loops run over at most nine varint byte
  positions, over tensors, and over header fields.
* A message carries a magic, a format version, its type (state dict or single tensor) and a CRC-32
  trailer, so truncation and bit flips are reported as a one-line `ValueError` rather than decoded
  into wrong weights. The CRC costs 4 bytes and about 0.25 ms per megabyte here.
* Ties between candidate sizes go to DENSE, then SPARSE, then BITMAP (cheapest to decode first).

Format version 1 (integers little-endian; `varint` = unsigned LEB128):

    message = b"SF" | version u8 | type u8 | content | crc32 u32 of everything before it
    content = varint n | n * (varint key_len | key utf-8 | record)       (type 0, a state dict)
            | record                                                      (type 1, one tensor)
    record  = dtype u8 | ndim u8 | ndim * varint dim | encoding u8 | body
    DENSE   body = numel * itemsize bytes
    SPARSE  body = varint nnz | varint gap_bytes | gap varints | nnz * itemsize value bytes
    BITMAP  body = ceil(numel / 8) bitmap bytes (bit i of byte j is entry 8j+i) | popcount * itemsize
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch

MAGIC = b"SF"
FORMAT_VERSION = 1
_STATE, _TENSOR = 0, 1
DENSE, SPARSE, BITMAP = 0, 1, 2

# Codes are part of the format: append new dtypes, never reorder. Each dtype travels as the signed or
# unsigned integer of its width (bfloat16 has no NumPy dtype; torch's `.view` reinterprets it).
_DTYPES: tuple[tuple[torch.dtype, torch.dtype], ...] = (
    (torch.float32, torch.int32),
    (torch.float64, torch.int64),
    (torch.float16, torch.int16),
    (torch.bfloat16, torch.int16),
    (torch.int64, torch.int64),
    (torch.int32, torch.int32),
    (torch.int16, torch.int16),
    (torch.int8, torch.int8),
    (torch.uint8, torch.uint8),
    (torch.bool, torch.uint8),
)
_CODE_OF = {dtype: code for code, (dtype, _) in enumerate(_DTYPES)}
_MAX_NDIM = 64
_MAX_NUMEL = 1 << 48  # guards allocations against corrupt shapes; far beyond any model tensor
_MAX_VARINT_BYTES = 9  # 63 bits: every index and size fits


@dataclass
class MessageStats:
    """Byte accounting of one or more messages; `+` sums them (per round, cumulative)."""

    encoded_bytes: int = 0
    dense_bytes: int = 0  # sum of numel * element_size: the raw tensors
    dense_fp32_bytes: int = 0  # numel * 4 for floating tensors, element size otherwise
    num_tensors: int = 0
    numel: int = 0
    nonzero: int = 0  # entries with any bit set
    dense_tensors: int = 0
    sparse_tensors: int = 0
    bitmap_tensors: int = 0

    def __add__(self, other: MessageStats) -> MessageStats:
        return MessageStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def ratio_to_dense_fp32(self) -> float:
        """Encoded bytes over the dense fp32 bytes (1/15 = 15x smaller)."""
        return self.encoded_bytes / self.dense_fp32_bytes if self.dense_fp32_bytes else 1.0


# ----------------------------------------------------------------------------------------------
# Varints


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_len(value: int) -> int:
    return max(1, -(-value.bit_length() // 7))


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    """Byte length of each unsigned LEB128 varint of a uint64 array."""
    lengths = np.ones(values.shape, dtype=np.int64)
    top = int(values.max()) if values.size else 0
    shift = 7
    while shift < 64 and (1 << shift) <= top:
        lengths += values >= np.uint64(1 << shift)
        shift += 7
    return lengths


def _encode_varints(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated LEB128 varints of a uint64 array (one vector pass per byte position)."""
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty(int(ends[-1]) if ends.size else 0, dtype=np.uint8)
    for b in range(int(lengths.max()) if lengths.size else 0):
        sel = np.flatnonzero(lengths > b)
        chunk = (values[sel] >> np.uint64(7 * b)) & np.uint64(0x7F)
        more = (lengths[sel] > b + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + b] = (chunk | more).astype(np.uint8)
    return out


def _decode_varints(buf: np.ndarray, count: int) -> np.ndarray:
    """Inverse of `_encode_varints` for exactly `count` values; raises ValueError otherwise."""
    if buf.size == 0:
        if count:
            raise ValueError("corrupt codec payload: empty index stream")
        return np.zeros(0, dtype=np.uint64)
    if buf[-1] & 0x80:
        raise ValueError("corrupt codec payload: index stream ends inside a varint")
    ends = np.flatnonzero(buf < 0x80)
    if ends.size != count:
        raise ValueError(f"corrupt codec payload: {ends.size} indices where {count} were announced")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    longest = int(lengths.max())
    if longest > _MAX_VARINT_BYTES:
        raise ValueError("corrupt codec payload: index varint longer than 63 bits")
    values = (buf[starts] & 0x7F).astype(np.uint64)
    for b in range(1, longest):
        sel = np.flatnonzero(lengths > b)
        values[sel] |= (buf[starts[sel] + b] & 0x7F).astype(np.uint64) << np.uint64(7 * b)
    return values


# ----------------------------------------------------------------------------------------------
# Encoding


def _bits_of(t: torch.Tensor) -> tuple[int, np.ndarray]:
    """dtype code and the tensor's entries as a flat little-endian integer array (no copy on CPU)."""
    code = _CODE_OF.get(t.dtype)
    if code is None:
        known = ", ".join(str(d).removeprefix("torch.") for d, _ in _DTYPES)
        raise ValueError(f"codec cannot encode dtype {t.dtype}; supported: {known}")
    flat = t.detach().cpu().contiguous().view(-1)
    bits = flat.view(_DTYPES[code][1]).numpy()
    return code, bits.astype(bits.dtype.newbyteorder("<"), copy=False)


@dataclass
class _Plan:
    """One tensor's chosen encoding and everything needed to write it."""

    code: int
    shape: tuple[int, ...]
    bits: np.ndarray
    encoding: int
    body_size: int
    nonzero: int
    indices: np.ndarray | None = None
    gaps: np.ndarray | None = None
    gap_lengths: np.ndarray | None = None

    def header(self) -> bytes:
        dims = b"".join(_varint_bytes(d) for d in self.shape)
        return bytes((self.code, len(self.shape))) + dims + bytes((self.encoding,))

    def header_size(self) -> int:
        return 3 + sum(_varint_len(d) for d in self.shape)


def _sparse_size(nonzero: int, itemsize: int, gap_bytes: int) -> int:
    """Body size of SPARSE: count, stream length, gap varints, values."""
    return _varint_len(nonzero) + _varint_len(gap_bytes) + gap_bytes + nonzero * itemsize


def _plan(t: torch.Tensor) -> _Plan:
    code, bits = _bits_of(t)
    numel, itemsize = bits.size, bits.itemsize
    nonzero = int(np.count_nonzero(bits))
    dense = numel * itemsize
    bitmap = (numel + 7) // 8 + nonzero * itemsize
    plan = _Plan(code, tuple(t.shape), bits, DENSE, dense, nonzero)
    # SPARSE costs at least one byte per index plus two count bytes: skip the index work when even
    # that lower bound cannot win (dense tensors, most BatchNorm entries).
    if 2 + nonzero * (itemsize + 1) <= min(dense - 1, bitmap):
        indices = np.flatnonzero(bits)
        gaps = np.diff(indices, prepend=-1).astype(np.uint64) - np.uint64(1)
        gap_lengths = _varint_lengths(gaps)
        sparse = _sparse_size(nonzero, itemsize, int(gap_lengths.sum()))
        if sparse < dense and sparse <= bitmap:
            return _Plan(code, plan.shape, bits, SPARSE, sparse, nonzero, indices, gaps, gap_lengths)
    if bitmap < dense:
        return _Plan(code, plan.shape, bits, BITMAP, bitmap, nonzero)
    return plan


def _body(plan: _Plan) -> list[bytes | memoryview]:
    bits = plan.bits
    if plan.encoding == DENSE:
        return [memoryview(bits).cast("B")] if bits.size else []
    if plan.encoding == SPARSE:
        assert plan.indices is not None and plan.gaps is not None and plan.gap_lengths is not None
        stream = _encode_varints(plan.gaps, plan.gap_lengths)
        return [
            _varint_bytes(plan.nonzero),
            _varint_bytes(stream.size),
            stream.tobytes(),
            bits[plan.indices].tobytes(),
        ]
    return [np.packbits(bits, bitorder="little").tobytes(), bits[bits != 0].tobytes()]


def _count(stats: MessageStats, plan: _Plan) -> None:
    """Add one tensor's sizes (not its encoded bytes) to `stats`."""
    numel, itemsize = plan.bits.size, plan.bits.itemsize
    stats.num_tensors += 1
    stats.numel += numel
    stats.nonzero += plan.nonzero
    stats.dense_bytes += numel * itemsize
    stats.dense_fp32_bytes += numel * (4 if _DTYPES[plan.code][0].is_floating_point else itemsize)
    if plan.encoding == DENSE:
        stats.dense_tensors += 1
    elif plan.encoding == SPARSE:
        stats.sparse_tensors += 1
    else:
        stats.bitmap_tensors += 1


def _envelope(kind: int, chunks: list[bytes | memoryview]) -> bytes:
    chunks = [MAGIC, bytes((FORMAT_VERSION, kind)), *chunks]
    crc = 0
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
    chunks.append(crc.to_bytes(4, "little"))
    return b"".join(chunks)


def encode_state_with_stats(state: Mapping[str, torch.Tensor]) -> tuple[bytes, MessageStats]:
    """Encode a state dict and return the payload together with its byte accounting."""
    chunks: list[bytes | memoryview] = [_varint_bytes(len(state))]
    stats = MessageStats()
    for key, tensor in state.items():
        plan = _plan(tensor)
        name = key.encode("utf-8")
        chunks += [_varint_bytes(len(name)), name, plan.header(), *_body(plan)]
        _count(stats, plan)
    payload = _envelope(_STATE, chunks)
    stats.encoded_bytes = len(payload)
    return payload, stats


def encode_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """Encode a state dict (any device; keys kept in order) into one self-checking message."""
    return encode_state_with_stats(state)[0]


def encode_tensor(t: torch.Tensor) -> bytes:
    """Encode a single tensor into one self-checking message."""
    plan = _plan(t)
    return _envelope(_TENSOR, [plan.header(), *_body(plan)])


def message_stats(state: Mapping[str, torch.Tensor]) -> MessageStats:
    """Byte accounting of `encode_state(state)` without writing the payload.

    `encoded_bytes` equals `len(encode_state(state))`: the same per-tensor plans are sized, only
    the gap varints and value copies are not materialised.
    """
    stats = MessageStats(encoded_bytes=len(MAGIC) + 2 + _varint_len(len(state)) + 4)
    for key, tensor in state.items():
        plan = _plan(tensor)
        name_len = len(key.encode("utf-8"))
        stats.encoded_bytes += _varint_len(name_len) + name_len + plan.header_size() + plan.body_size
        _count(stats, plan)
    return stats


# ----------------------------------------------------------------------------------------------
# Decoding


class _Reader:
    """Bounds-checked cursor over a payload; every failure is a one-line ValueError."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.view):
            raise ValueError(f"corrupt codec payload: truncated (needs {n} bytes at offset {self.pos})")
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value = 0
        for shift in range(0, 7 * _MAX_VARINT_BYTES, 7):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
        raise ValueError("corrupt codec payload: varint longer than 63 bits")


def _array(view: memoryview, int_dtype: torch.dtype, count: int) -> np.ndarray:
    """A writable native-order copy of `count` little-endian integers."""
    np_dtype = torch.empty(0, dtype=int_dtype).numpy().dtype
    little = np.frombuffer(view, dtype=np_dtype.newbyteorder("<"), count=count)
    return little.astype(np_dtype)  # astype copies, which also makes the array writable


def _read_record(reader: _Reader) -> torch.Tensor:
    code = reader.u8()
    if code >= len(_DTYPES):
        raise ValueError(f"corrupt codec payload: unknown dtype code {code}")
    dtype, int_dtype = _DTYPES[code]
    ndim = reader.u8()
    if ndim > _MAX_NDIM:
        raise ValueError(f"corrupt codec payload: {ndim} dimensions")
    shape = tuple(reader.varint() for _ in range(ndim))
    numel = math.prod(shape)
    if numel > _MAX_NUMEL:
        raise ValueError(f"corrupt codec payload: implausible shape {shape}")
    itemsize = torch.empty(0, dtype=int_dtype).element_size()
    encoding = reader.u8()
    if encoding == DENSE:
        flat = _array(reader.take(numel * itemsize), int_dtype, numel)
    elif encoding == SPARSE:
        nonzero = reader.varint()
        if nonzero > numel:
            raise ValueError(f"corrupt codec payload: {nonzero} non-zeros in {numel} entries")
        stream = np.frombuffer(reader.take(reader.varint()), dtype=np.uint8)
        gaps = _decode_varints(stream, nonzero)
        # Checked in float before the int64 cumsum so corrupt gaps cannot wrap around.
        if float(gaps.sum(dtype=np.float64)) + nonzero > numel:
            raise ValueError("corrupt codec payload: index beyond the tensor")
        indices = np.cumsum(gaps.astype(np.int64) + 1) - 1
        values = _array(reader.take(nonzero * itemsize), int_dtype, nonzero)
        flat = np.zeros(numel, dtype=values.dtype)
        flat[indices] = values
    elif encoding == BITMAP:
        packed = np.frombuffer(reader.take((numel + 7) // 8), dtype=np.uint8)
        bits = np.unpackbits(packed, bitorder="little")
        if bits[numel:].any():
            raise ValueError("corrupt codec payload: bitmap padding bits set")
        mask = bits[:numel].view(bool)
        nonzero = int(np.count_nonzero(mask))
        values = _array(reader.take(nonzero * itemsize), int_dtype, nonzero)
        flat = np.zeros(numel, dtype=values.dtype)
        flat[mask] = values
    else:
        raise ValueError(f"corrupt codec payload: unknown encoding {encoding}")
    return torch.from_numpy(flat).view(dtype).reshape(shape)


def _open(payload: bytes | bytearray | memoryview, kind: int) -> _Reader:
    """Check magic, version, type and CRC; return a reader over the content."""
    view = memoryview(payload).cast("B")
    if len(view) < len(MAGIC) + 6 or view[: len(MAGIC)] != MAGIC:
        raise ValueError("corrupt codec payload: not a sparsyfed codec message")
    version, got_kind = view[len(MAGIC)], view[len(MAGIC) + 1]
    if version != FORMAT_VERSION:
        raise ValueError(f"codec payload has format version {version}; this build reads {FORMAT_VERSION}")
    if got_kind != kind:
        names = {_STATE: "state dict", _TENSOR: "tensor"}
        raise ValueError(f"codec payload holds a {names.get(got_kind, got_kind)}, not a {names[kind]}")
    if zlib.crc32(view[:-4]) != int.from_bytes(view[-4:], "little"):
        raise ValueError("corrupt codec payload: checksum mismatch")
    reader = _Reader(view[:-4])
    reader.pos = len(MAGIC) + 2
    return reader


def _finish(reader: _Reader) -> None:
    if reader.pos != len(reader.view):
        raise ValueError(f"corrupt codec payload: {len(reader.view) - reader.pos} trailing bytes")


def decode_state(payload: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Decode `encode_state`'s message into CPU tensors (same keys, order, dtypes, shapes, bits)."""
    reader = _open(payload, _STATE)
    state: dict[str, torch.Tensor] = {}
    for _ in range(reader.varint()):
        try:
            key = bytes(reader.take(reader.varint())).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("corrupt codec payload: key is not UTF-8") from None
        if key in state:
            raise ValueError(f"corrupt codec payload: duplicate key {key!r}")
        state[key] = _read_record(reader)
    _finish(reader)
    return state


def decode_tensor(payload: bytes | bytearray | memoryview) -> torch.Tensor:
    """Decode `encode_tensor`'s message into a CPU tensor."""
    reader = _open(payload, _TENSOR)
    tensor = _read_record(reader)
    _finish(reader)
    return tensor
