"""Uplink message size of a globally pruned model: codec bytes against dense fp32 and the entropy bound.

Builds the model's state dict, prunes its conv/linear weights (state entries ending in `weight` with
more than one dimension) globally to each sparsity with `global_magnitude_prune`, encodes the whole
state (BatchNorm entries included, as the uplink does) and prints per sparsity: encoded bytes, dense
fp32 bytes, their ratio (target at 95%: <= 1/15 = 0.0667), the theoretical minimum (entropy of each
tensor's non-zero mask plus the full width of every kept value: 32 bits for floats) and the ratio
encoded / minimum, the median encode and decode times, and how many pruned entries are `-0.0`
(the codec keeps those bit-exactly, so they cost as much as any other value).

    python -m benchmarks.codec_bytes [--model resnet18_cifar] [--sparsities 0.9 0.95 0.99 0.999]
"""

from __future__ import annotations

import argparse
import math

import torch

from benchmarks._common import interleaved_medians, print_table
from sparsyfed_lightning.federated.codec import decode_state, encode_state, encode_state_with_stats
from sparsyfed_lightning.models import MODELS, build_model
from sparsyfed_lightning.sparse import global_magnitude_prune


def _entropy_bits(p: float) -> float:
    """Binary entropy in bits."""
    return 0.0 if p <= 0.0 or p >= 1.0 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def minimum_bytes(state: dict[str, torch.Tensor]) -> float:
    """Entropy bound: per tensor `numel * H(density) + nonzero * value bits`, in bytes."""
    bits = 0.0
    for t in state.values():
        numel = t.numel()
        if not numel:
            continue
        width = 32 if t.is_floating_point() else 8 * t.element_size()
        raw = (
            t.reshape(-1).view(torch.uint8).reshape(numel, -1) if t.dtype != torch.bool else t.reshape(-1, 1)
        )
        nonzero = int(raw.ne(0).any(dim=1).sum())  # any bit set, as the codec counts
        bits += numel * _entropy_bits(nonzero / numel) + nonzero * width
    return bits / 8


def _count_negative_zeros(tensors: list[torch.Tensor]) -> int:
    return sum(int(((t == 0) & torch.signbit(t)).sum()) for t in tensors)


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18_cifar", choices=sorted(MODELS))
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.99, 0.999])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    base = build_model(args.model, args.num_classes, seed=0).state_dict()
    rows: list[list[object]] = []
    for sparsity in args.sparsities:
        state = {k: v.detach().clone() for k, v in base.items()}
        weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() > 1]
        global_magnitude_prune(weights, sparsity)
        payload, stats = encode_state_with_stats(state)
        decoded = decode_state(payload)
        for key, tensor in state.items():  # the benchmark is only meaningful if the codec is lossless
            assert torch.equal(
                decoded[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
            )
        times = interleaved_medians(
            {"encode": lambda s=state: encode_state(s), "decode": lambda p=payload: decode_state(p)},
            repeats=args.repeats,
            device=torch.device("cpu"),
        )
        minimum = minimum_bytes(state)
        rows.append(
            [
                f"{sparsity:g}",
                _count_negative_zeros(weights),
                stats.encoded_bytes,
                stats.dense_fp32_bytes,
                f"{stats.ratio_to_dense_fp32:.4f} (1/{1 / stats.ratio_to_dense_fp32:.1f})",
                f"{minimum:.0f}",
                f"{stats.encoded_bytes / minimum:.3f}",
                f"{stats.dense_tensors}/{stats.sparse_tensors}/{stats.bitmap_tensors}",
                f"{1e3 * times['encode']:.1f}",
                f"{1e3 * times['decode']:.1f}",
            ]
        )
    header = [
        "sparsity",
        "-0.0 entries",
        "encoded B",
        "dense fp32 B",
        "ratio",
        "minimum B",
        "enc/min",
        "dense/sparse/bitmap",
        "encode ms",
        "decode ms",
    ]
    numel = sum(t.numel() for t in base.values())
    print_table(f"codec bytes: {args.model}, {numel:,} state entries, whole state dict", header, rows)
    return rows


if __name__ == "__main__":
    main()
