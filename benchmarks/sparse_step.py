"""One training step of resnet18_cifar: dense vs Powerprop vs Powerprop + activation pruning.

Weights are pruned layer-wise to the given sparsity (the "95% layer sparsity" of the target), the
step is forward + cross-entropy + backward + SGD. Prints step time and memory as ratios to the dense
step measured in the same run: on CPU the bytes saved for backward (SavedTensorMeter), on CUDA also
the peak allocated memory of the step (`max_memory_allocated` minus the memory held before it).
Returns, per variant, the step time, saved and peak MiB (peak: None off CUDA) and their ratios.

    python -m benchmarks.sparse_step [--device cuda] [--batch-size 32] [--sparsity 0.95] [--backbone small_cnn]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from benchmarks._common import (
    BACKBONES,
    add_common_arguments,
    apply_common_arguments,
    interleaved_medians,
    print_table,
    synchronize,
)
from sparsyfed_lightning.models import build_model
from sparsyfed_lightning.sparse import (
    ActivationPruning,
    SavedTensorMeter,
    freeze_support,
    layerwise_magnitude_prune,
    powerpropify,
    prunable_weights,
)


def _make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pruning: ActivationPruning | None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    if pruning is not None:
        pruning.attach()
    return step


def _saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    with SavedTensorMeter() as meter:
        loss = nn.functional.cross_entropy(model(x), y)
    del loss
    return meter.activation_bytes


def _peak_bytes(step, device: torch.device) -> int:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | None]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--beta", type=float, default=1.25)
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="resnet18_cifar")
    add_common_arguments(parser, repeats=5)
    args = parser.parse_args(argv)
    device = apply_common_arguments(args)
    torch.manual_seed(0)

    kwargs, shape = BACKBONES[args.backbone]
    dense = build_model(args.backbone, 10, seed=0, **kwargs)
    layerwise_magnitude_prune(prunable_weights(dense).values(), args.sparsity)
    powerprop = powerpropify(copy.deepcopy(dense), args.beta)
    pruned_first = copy.deepcopy(powerprop)
    pruned_each = copy.deepcopy(powerprop)
    for model in (powerprop, pruned_first, pruned_each):
        freeze_support(model)  # what a SparsyFed client fit does (FrozenSupportCallback)
    models = {
        "dense": (dense, None),
        "powerprop": (powerprop, None),
        "powerprop+AP (first_batch)": (pruned_first, ActivationPruning(pruned_first)),
        "powerprop+AP (per_step)": (pruned_each, ActivationPruning(pruned_each, threshold="per_step")),
    }
    x = torch.randn(args.batch_size, *shape, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    steps = {}
    for name, (model, pruning) in models.items():
        model.to(device).train()
        steps[name] = _make_step(model, x, y, pruning)
    times = interleaved_medians(steps, args.repeats, device)
    saved = {name: _saved_bytes(model, x, y) for name, (model, _) in models.items()}
    peaks = {name: _peak_bytes(step, device) for name, step in steps.items()} if device.type == "cuda" else {}

    results: dict[str, dict[str, float | None]] = {}
    rows = []
    for name in models:
        results[name] = {
            "step_ms": times[name] * 1e3,
            "time_ratio": times[name] / times["dense"],
            "saved_mib": saved[name] / 2**20,
            "saved_ratio": saved[name] / saved["dense"],
            "peak_mib": peaks[name] / 2**20 if peaks else None,
            "peak_ratio": peaks[name] / peaks["dense"] if peaks else None,
        }
        row = [name, f"{times[name] * 1e3:.1f}", f"{results[name]['time_ratio']:.2f}x",
               f"{saved[name] / 2**20:.1f}", f"{results[name]['saved_ratio']:.2f}x"]
        if peaks:
            row += [f"{peaks[name] / 2**20:.1f}", f"{results[name]['peak_ratio']:.2f}x"]
        rows.append(row)
    header = ["variant", "step ms", "time/dense", "saved MiB", "saved/dense"]
    if peaks:
        header += ["peak MiB", "peak/dense"]
    print_table(
        f"sparse_step: {args.backbone}, batch {args.batch_size}, {args.sparsity:.0%} layer sparsity, "
        f"beta {args.beta}, {device} (targets: time <= 1.15x, saved memory <= 0.6x)",
        header,
        rows,
    )
    return results


if __name__ == "__main__":
    main()
