"""Run every benchmark and print one table of ratios: `python -m benchmarks [--device cuda]`.

On a CPU this runs the CPU suite (`sparse_step`, `round_overhead`, `threshold_select`,
`codec_bytes` at the CPU shapes). With `--device cuda` (or `auto` on a machine with a GPU) it runs
the GPU suite of `benchmarks/gpu.py` instead, which also writes one JSON (`--out`); `--quick` runs
that suite with tiny sizes on any device (`--device cpu --quick` is what CI runs).

Each benchmark also prints its own detailed table. Ratios are against baselines measured in the same
run (dense step, plain PyTorch round, dense fp32 message), never absolute times.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks import codec_bytes, gpu, round_overhead, sparse_step, threshold_select
from benchmarks._common import pick_device, print_table


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 3; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="the GPU suite with tiny sizes, on any device")
    parser.add_argument("--out", default=None, help="the GPU suite's JSON (default under benchmarks/out/)")
    args = parser.parse_args(argv)
    if args.quick or pick_device(args.device).type == "cuda":
        forwarded = ["--device", args.device, "--threads", str(args.threads)]
        forwarded += ["--quick"] if args.quick else []
        forwarded += ["--out", args.out] if args.out else []
        forwarded += ["--repeats", str(args.repeats)] if args.repeats else []
        return gpu.main(forwarded)
    repeats = args.repeats or 3
    common = ["--device", args.device, "--repeats", str(repeats), "--threads", str(args.threads)]

    step = sparse_step.main(common)
    rounds = round_overhead.main(common)["ratios"]
    thresholds = threshold_select.main(common)
    codec = codec_bytes.main(["--repeats", str(repeats)])

    rows = [
        ["sparse_step", "powerprop step time / dense", f"{step['powerprop']['time_ratio']:.2f}x", "-"],
        ["sparse_step", "SparsyFed step time (first_batch) / dense",
         f"{step['powerprop+AP (first_batch)']['time_ratio']:.2f}x", "<= 1.15x"],
        ["sparse_step", "SparsyFed step time (per_step) / dense",
         f"{step['powerprop+AP (per_step)']['time_ratio']:.2f}x", "-"],
        ["sparse_step", "SparsyFed saved activation bytes / dense",
         f"{step['powerprop+AP (first_batch)']['saved_ratio']:.2f}x", "<= 0.6x"],
    ]
    if step["dense"]["peak_ratio"] is not None:
        rows.append(["sparse_step", "SparsyFed peak memory / dense",
                     f"{step['powerprop+AP (first_batch)']['peak_ratio']:.2f}x", "-"])
    rows += [
        ["round_overhead", "dense round (stacked, default) / plain", f"{rounds['dense (stacked)']:.2f}x", "<= 1.15x"],
        ["round_overhead", "SparsyFed round (stacked, default) / plain", f"{rounds['sparsyfed (stacked)']:.2f}x",
         "<= 1.15x"],
        ["round_overhead", "dense round, each client alone / plain", f"{rounds['dense (alone)']:.2f}x", "-"],
        ["round_overhead", "SparsyFed round, each client alone / plain", f"{rounds['sparsyfed (alone)']:.2f}x", "-"],
        ["round_overhead", "minimal LightningModule, each client alone / plain",
         f"{rounds[round_overhead.FLOOR]:.2f}x", "-"],
        ["threshold_select", "topk selection, all layers / dense step",
         f"{thresholds['magnitude_threshold (topk)']:.2f}x", "-"],
    ]
    for row in codec:
        if row[0] == "0.95":
            rows.append(["codec_bytes", "uplink bytes at 95% / dense fp32", row[4], "<= 1/15"])
    print_table("summary", ["benchmark", "measure", "value", "target"], rows)
    return rows


if __name__ == "__main__":
    main()
