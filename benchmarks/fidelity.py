"""docs/RESULTS.md's reduced reproduction on the offline digits data, as `sparsyfed sweep` + `sparsyfed table`.

The study is three grid files under `configs/sweeps/` over one base configuration,
`configs/fidelity_digits.yaml` (the demo's setup at 60 rounds; seeds vary the initial model and the
clients' shuffles, the partition is fixed per alpha). This script only runs the two commands:

    python -m benchmarks.fidelity [--study fidelity|guarded|ablations] [--workers N] [--threads T] [-- fit args]

is

    sparsyfed sweep --config configs/fidelity_digits.yaml --grid configs/sweeps/digits_<study>.yaml \\
        --out sweeps/digits_<study> [--workers N] [--threads T] [-- fit args]
    sparsyfed table sweeps/digits_<study>

Re-running it resumes the sweep. `-- --trainer.stack_clients 1` trains every client alone, as the
tables in docs/RESULTS.md were first measured (a different sweep directory: use `--out`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparsyfed_lightning.cli import main as sparsyfed

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ("fidelity", "guarded", "ablations")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=STUDIES, default="fidelity")
    parser.add_argument("--out", help="sweep directory (default: sweeps/digits_<study>)")
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--threads", default="1")
    args = parser.parse_args(argv[:split])
    out = args.out or f"sweeps/digits_{args.study}"
    status = sparsyfed(["sweep", "--config", str(ROOT / "configs" / "fidelity_digits.yaml"),
                        "--grid", str(ROOT / "configs" / "sweeps" / f"digits_{args.study}.yaml"), "--out", out,
                        "--workers", args.workers, "--threads", args.threads, *argv[split:]])
    if status in (0, 1):  # a failed run is shown as missing
        sparsyfed(["table", out])
    return status


if __name__ == "__main__":
    sys.exit(main())
