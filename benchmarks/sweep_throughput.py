"""Sweep throughput: the same runs one after another, against `sparsyfed sweep` running them as a pool.

Both sides run the same `--runs` runs of `configs/demo.yaml` (seeds 0, 1, ...; `--rounds` rounds each),
every run a `sparsyfed fit` process limited to one thread:

* one after another: a plain loop of `sparsyfed fit` processes (what one did before sweeps);
* pool: `sparsyfed sweep --workers W --threads 1`, its own start-up and the up-front check of every
  run's configuration included.

Each side starts from empty run directories; the two are interleaved `--repeats` times and the
fastest wall time of each is reported (interference on a shared machine only adds time), with the
ratio sequential / pool. On a 2-core CPU the pool's ideal is 2x; every run's own start-up (about 7 s
of imports) is paid on both sides.

    python -m benchmarks.sweep_throughput [--runs 4] [--rounds 20] [--workers 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import print_table

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"


def _fit_arguments(rounds: int) -> list[str]:
    return ["--trainer.rounds", str(rounds), "--trainer.eval_every", str(rounds), "--trainer.checkpoint_every", "0",
            "--trainer.progress", "none"]


def sequential(folder: Path, runs: int, rounds: int) -> float:
    """Wall time of `runs` fit processes one after another (1 thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    for seed in range(runs):
        subprocess.run([sys.executable, "-m", "sparsyfed_lightning.cli", "fit", "--config", str(DEMO),
                        "--trainer.seed", str(seed), "--model.init_seed", str(seed), *_fit_arguments(rounds),
                        "--trainer.run_dir", str(folder / f"seed={seed}")],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def pool(folder: Path, runs: int, rounds: int, workers: int) -> float:
    """Wall time of the same runs as one `sparsyfed sweep` with `workers` workers of 1 thread."""
    grid = folder.parent / "grid.yaml"
    grid.write_text(f"trainer.seed,model.init_seed: {list(range(runs))}\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sparsyfed_lightning.cli", "sweep", "--config", str(DEMO), "--grid",
                    str(grid), "--out", str(folder), "--workers", str(workers), "--threads", "1", "--",
                    *_fit_arguments(rounds)],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {"sequential": [], "pool": []}
    scratch = Path(tempfile.mkdtemp(prefix="sweep-throughput-"))
    try:
        for repeat in range(args.repeats):
            for name in times:
                folder = scratch / f"{name}-{repeat}" / "runs"
                folder.parent.mkdir(parents=True)
                seconds = (sequential(folder, args.runs, args.rounds) if name == "sequential"
                           else pool(folder, args.runs, args.rounds, args.workers))
                times[name].append(seconds)
                print(f"repeat {repeat + 1}: {name} {seconds:.1f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best = {name: min(values) for name, values in times.items()}
    rows = [
        [f"{args.runs} runs one after another (1 thread each)", f"{best['sequential']:.1f}", "1.00x"],
        [f"sparsyfed sweep, {args.workers} workers x 1 thread", f"{best['pool']:.1f}",
         f"{best['sequential'] / best['pool']:.2f}x"],
    ]
    print_table(f"sweep throughput: {args.runs} runs of configs/demo.yaml at {args.rounds} rounds, best of "
                f"{args.repeats}, {os.cpu_count()} CPU cores",
                ["", "wall time (s)", "throughput vs one after another"], rows)
    return best


if __name__ == "__main__":
    main()
