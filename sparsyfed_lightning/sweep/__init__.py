"""Sweeps: a grid of `sparsyfed fit` runs, run as a pool over one machine's cores or GPUs, and its tables.

* `grid.py` - grid files: the runs (points), their `fit` arguments and directory names;
* `definition.py` - a sweep directory's layout and the definition a re-run must match;
* `pool.py` - the runs as `sparsyfed fit` processes over CPU/GPU slots, signals, no orphans;
* `overview.py` - the live overview (a rich table on a terminal, plain lines otherwise);
* `command.py` - `sparsyfed sweep`: check everything, then run what is not finished;
* `results.py`, `table.py`, `plots.py` - `sparsyfed table` and `sparsyfed plot` on a sweep directory.

This package sits above `lightning_cli.py` (it checks every run's configuration with the same
parser) and imports torch and Lightning only where it needs them, so `sparsyfed sweep --help`,
`sparsyfed table` and `sparsyfed plot SWEEP_DIR` start quickly.
"""
