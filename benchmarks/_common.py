"""Shared helpers for the benchmark scripts: device choice, interleaved timing, table printing."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

# Backbones the benchmarks can run: (constructor keyword arguments, input shape of one sample).
BACKBONES: dict[str, tuple[dict, tuple[int, ...]]] = {
    "resnet18_cifar": ({}, (3, 32, 32)),
    "small_cnn": ({"width": 32}, (1, 8, 8)),
}


def add_common_arguments(parser: argparse.ArgumentParser, repeats: int = 3) -> None:
    """The options every benchmark takes: --device, --repeats, --threads."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def apply_common_arguments(args: argparse.Namespace) -> torch.device:
    """Set the thread count and return the device the benchmark runs on."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def pick_device(requested: str) -> torch.device:
    """`auto` means CUDA when present, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    variants: dict[str, Callable[[], None]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, float]:
    """Best (minimum) wall time of each variant, running them round-robin so drift hits all alike.

    The minimum, not the median: on these shared 2-core machines interference only ever adds time,
    so the fastest repeat is the best estimate of the undisturbed cost (as `timeit` advises).
    """
    for _ in range(warmup):
        for run in variants.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in samples.items()}


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """Print a plain fixed-width table."""
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in [h, *[r[i] for r in rows]]) for i, h in enumerate(header)]
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))
