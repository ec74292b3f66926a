"""A sweep directory and the definition it is kept to.

    SWEEP_DIR/
      sweep.yaml      the definition: base configs (paths and SHA-256 of their content), the grid,
                      the extra `fit` arguments, and every run's name and values
      runs/NAME/      one `sparsyfed fit` run directory per grid point
      logs/NAME.log   the output of that run's `sparsyfed fit` processes (appended per attempt)
      table.md, table.csv, *.png   written by `sparsyfed table` and `sparsyfed plot`

`sweep.yaml` is written once, when the sweep first starts. Re-running `sparsyfed sweep` on the same
directory must give the same definition (the same grid, extra arguments, and configs with the same
content, wherever they are): it then skips the finished runs and resumes the others. A different
definition is refused with one line, since finished runs would no longer match it; a different grid
means a new sweep directory (`--out`). Readers (`sparsyfed table`, `sparsyfed plot`) need only this
file and the run directories, not torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sparsyfed_lightning.sweep.grid import RunPoint, grid_keys

DEFINITION_NAME = "sweep.yaml"
RUNS_DIR = "runs"
LOGS_DIR = "logs"
FORMAT = "sparsyfed-lightning/sweep-1"


class SweepDefinitionError(ValueError):
    """A sweep directory whose definition is missing, unreadable or different (one line)."""


@dataclass
class SweepDefinition:
    """What a sweep runs: `fit --config C... <point arguments> <fit_args>` for every point of `grid`."""

    configs: list[str]  # absolute paths of the base configs, in order
    config_sha256: list[str]
    grid: Any  # the parsed grid file
    fit_args: list[str]
    points: list[RunPoint]

    @classmethod
    def create(cls, configs: list[str], grid: Any, fit_args: list[str], points: list[RunPoint]) -> SweepDefinition:
        """The definition of a new sweep (reads the configs to fingerprint them)."""
        paths = [str(Path(c).absolute()) for c in configs]
        return cls(paths, [file_sha256(p) for p in paths], grid, list(fit_args), points)

    @property
    def keys(self) -> list[str]:
        """The grid's dotted keys in order of first appearance."""
        return grid_keys(self.grid)

    def run_dir(self, sweep_dir: Path, point: RunPoint) -> Path:
        return sweep_dir / RUNS_DIR / point.name

    def log_path(self, sweep_dir: Path, point: RunPoint) -> Path:
        return sweep_dir / LOGS_DIR / f"{point.name}.log"

    def fit_arguments(self, point: RunPoint, run_dir: Path) -> list[str]:
        """The `sparsyfed fit` arguments of a point's run (without `--resume`/`--overwrite`).

        The sweep's plain progress lines go to the run's log; `fit_args` come after the point's values
        so that they can refine them, and the run directory comes last so that nothing overrides it.
        """
        arguments = [item for config in self.configs for item in ("--config", config)]
        return [*arguments, *point.fit_arguments(), "--trainer.progress", "plain", *self.fit_args,
                "--trainer.run_dir", str(run_dir)]

    def to_yaml(self) -> str:
        content = {
            "format": FORMAT,
            "configs": [{"path": p, "sha256": s} for p, s in zip(self.configs, self.config_sha256, strict=True)],
            "grid": self.grid,
            "fit_args": self.fit_args,
            "runs": [{"name": p.name, "values": p.values} for p in self.points],
        }
        header = "# Written by `sparsyfed sweep`; re-running the sweep checks it is unchanged. Do not edit.\n"
        return header + yaml.safe_dump(content, sort_keys=False, allow_unicode=True)

    @classmethod
    def read(cls, sweep_dir: str | Path) -> SweepDefinition:
        """The definition stored in a sweep directory (`SweepDefinitionError` if there is none)."""
        path = Path(sweep_dir) / DEFINITION_NAME
        if not path.is_file():
            raise SweepDefinitionError(f"{sweep_dir} is not a sweep directory (no {DEFINITION_NAME})")
        try:
            content = yaml.safe_load(path.read_text())
            if not isinstance(content, dict) or content.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            return cls(
                configs=[c["path"] for c in content["configs"]],
                config_sha256=[c["sha256"] for c in content["configs"]],
                grid=content["grid"],
                fit_args=list(content["fit_args"]),
                points=[RunPoint(r["name"], dict(r["values"])) for r in content["runs"]],
            )
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise SweepDefinitionError(f"{path} cannot be read: {reason}") from None

    def difference(self, other: SweepDefinition) -> str | None:
        """What differs from `other` in words (None: the same sweep). Config paths may differ."""
        if len(self.configs) != len(other.configs):
            return f"it was started with {len(other.configs)} --config files, not {len(self.configs)}"
        for path, digest, old_path, old_digest in zip(self.configs, self.config_sha256, other.configs,
                                                       other.config_sha256, strict=True):
            if digest != old_digest:
                return f"--config {path} differs from the {old_path} it was started with"
        if self.grid != other.grid:
            return "its grid differs from the one it was started with"
        if self.fit_args != other.fit_args:
            return f"the extra fit arguments {self.fit_args} differ from the {other.fit_args} it was started with"
        return None


def is_sweep_dir(path: str | Path) -> bool:
    """Whether `path` is a sweep directory (holds a `sweep.yaml`)."""
    return (Path(path) / DEFINITION_NAME).is_file()


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
