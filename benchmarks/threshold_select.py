"""Cost of selecting the activation-pruning thresholds of one ResNet-18 training step.

The conv/linear inputs of resnet18_cifar at batch 32 are recorded from one forward pass; for each,
the magnitude of the k-th largest entry (k = 5% of the entries) is selected with the project's
`magnitude_threshold` (topk on the smaller side of the cut), with a full `sort`, and, on CPU only
as a reference, with `kthvalue` (which the design forbids: 84 ms against 2-4 ms on an H200). All
are printed as ratios to the dense forward + backward step measured in the same run: this is what
`threshold: per_step` pays on top of the faithful `first_batch` at every step.

    python -m benchmarks.threshold_select [--device cuda] [--keep 0.05]
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from benchmarks._common import add_common_arguments, apply_common_arguments, interleaved_medians, print_table
from sparsyfed_lightning.models import build_model
from sparsyfed_lightning.sparse import magnitude_threshold, prunable_layers


def layer_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The inputs of every conv/linear layer during one forward pass."""
    inputs: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].detach()))
               for _, m in prunable_layers(model)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return inputs


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--keep", type=float, default=0.05)
    add_common_arguments(parser, repeats=5)
    args = parser.parse_args(argv)
    device = apply_common_arguments(args)
    model = build_model("resnet18_cifar", 10, seed=0).to(device)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    inputs = layer_inputs(model, x)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    def by_sort() -> None:
        for t in inputs:
            k = max(1, math.ceil(args.keep * t.numel()))
            _ = torch.sort(t.reshape(-1).abs(), descending=True).values[k - 1]

    def by_kthvalue() -> None:
        for t in inputs:
            k = max(1, math.ceil(args.keep * t.numel()))
            _ = torch.kthvalue(t.reshape(-1).abs(), t.numel() - k + 1).values

    variants = {
        "dense step (fwd+bwd)": step,
        "magnitude_threshold (topk)": lambda: [magnitude_threshold(t, args.keep) for t in inputs],
        "sort": by_sort,
    }
    if device.type == "cpu":
        variants["kthvalue (reference)"] = by_kthvalue
    # Sanity: all selections agree exactly.
    for t in inputs:
        k = max(1, math.ceil(args.keep * t.numel()))
        expected = torch.sort(t.reshape(-1).abs(), descending=True).values[k - 1]
        assert torch.equal(magnitude_threshold(t, args.keep), expected)
    times = interleaved_medians(variants, args.repeats, device)
    base = times["dense step (fwd+bwd)"]
    rows = [[name, f"{1e3 * seconds:.1f}", f"{seconds / base:.2f}x"] for name, seconds in times.items()]
    print_table(
        f"threshold_select: {len(inputs)} conv/linear inputs of resnet18_cifar, batch {args.batch_size}, "
        f"keep {args.keep:.0%}, {device}",
        ["work", "ms", "vs dense step"],
        rows,
    )
    return {name: seconds / base for name, seconds in times.items()}


if __name__ == "__main__":
    main()
