"""The `sparsyfed` command: a light front that imports Lightning only for the commands that need it.

`--version`, `--help`, `plot`, `table` and `sweep --help` answer without importing torch or Lightning
(about 7 s of imports on a 2-core machine); `fit`, `validate` and `test` run the LightningCLI in
`lightning_cli.py`; `sweep`, `table` and `plot SWEEP_DIR` are in the `sweep` package.
Exit statuses are listed in docs/RELIABILITY.md.
"""

from __future__ import annotations

import sys

from sparsyfed_lightning import __version__

HELP = f"""usage: sparsyfed COMMAND [options]

Federated sparse training (SparsyFed and its baselines) on PyTorch Lightning. sparsyfed-lightning {__version__}

commands:
  fit        run a federated training run: sparsyfed fit --config configs/demo.yaml [--group.key value ...]
             (--resume RUN continues a stopped run; --overwrite replaces an existing run directory)
  validate   evaluate a saved global model: sparsyfed validate --config RUN/config.yaml --ckpt_path RUN/global_model.pt
  test       same as validate (the central test set is the only held-out set)
  plot       draw a run's figures, or compare runs: sparsyfed plot RUN [RUN ...] [--out DIR]
             (a sweep directory: the sweep's comparison figures, sparsyfed plot SWEEP_DIR)
  sweep      run a grid of fit runs over this machine's cores or GPUs, resumably:
             sparsyfed sweep --config base.yaml --grid grid.yaml [--out SWEEP_DIR] [--workers N|auto]
             [--threads T] [--runs_per_device K] [-- fit arguments]
  table      a sweep's paper-style tables (Markdown, and SWEEP_DIR/table.csv): sparsyfed table SWEEP_DIR

options:
  -h, --help     show this help; `sparsyfed COMMAND --help` lists every option of a command
  -V, --version  print the version

exit status: 0 done, 1 the run failed (sweep: a run failed), 2 bad configuration or input file,
             130/143 interrupted (SIGINT/SIGTERM)
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sparsyfed` console script; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        print(HELP, file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(HELP)
        return 0
    if args[0] in ("--version", "-V"):
        print(f"sparsyfed-lightning {__version__}")
        return 0
    if args[0] == "plot":
        from sparsyfed_lightning.sweep.definition import is_sweep_dir

        if any(is_sweep_dir(a) for a in args[1:] if not a.startswith("-")):
            from sparsyfed_lightning.sweep.plots import plot_sweep_main

            return plot_sweep_main(args[1:])
        from sparsyfed_lightning.plots import plot_main

        return plot_main(args[1:])
    if args[0] == "sweep":
        from sparsyfed_lightning.sweep.command import sweep_main

        return sweep_main(args[1:])
    if args[0] == "table":
        from sparsyfed_lightning.sweep.table import table_main

        return table_main(args[1:])
    from sparsyfed_lightning.lightning_cli import run_lightning_cli

    # `main(argv)` called from Python (tests, notebooks) passes its own arguments; None lets
    # LightningCLI read sys.argv itself.
    return run_lightning_cli(None if argv is None else args)


def console_main() -> None:
    """`sparsyfed` console-script wrapper (exits with `main`'s status)."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
