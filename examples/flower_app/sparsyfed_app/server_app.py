"""The ServerApp: `sparsyfed fit` on the run's config, its clients reached through this run's grid."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from sparsyfed_app.task import config_args, own_argv
from sparsyfed_lightning import cli
from sparsyfed_lightning.federated.flower_app import attach_grid

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the whole federated loop here; the Flower engine sends each round's clients through `grid`."""
    run_dir = str(context.run_config["run-dir"])
    args = ["fit", *config_args(context), "--trainer.run_dir", run_dir, "--overwrite"]
    with attach_grid(grid), own_argv():
        status = cli.main(args)
    if status != 0:
        raise RuntimeError(f"sparsyfed fit {' '.join(args[1:])} exited with status {status}")
