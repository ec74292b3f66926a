"""Grid files: which runs a sweep is made of, their `sparsyfed fit` arguments and their names.

A grid file is YAML, either

* a mapping of dotted keys (any key `sparsyfed fit` accepts: `method`, `method.sparsity`,
  `data.alpha`, `trainer.seed`, ...) to lists of values: the runs are the product of the lists; or
* a list of such mappings: the runs are the union of their products (in order, duplicates once),
  e.g. the sparse methods x sparsities, plus `Dense` once per alpha and seed.

A scalar stands for a one-element list. Several keys that vary together are written as one key
joined by commas, `trainer.seed,model.init_seed: [0, 1, 2]`; each value is given to every key, or,
when it is a list as long as the keys, zipped with them (`a,b: [[0, 10], [1, 11]]`).

Run names are built from the values, in the order the keys first appear in the grid file:
`method=TopK,sparsity=0.99,alpha=0.1,seed=0`. A key is named by its last component unless two keys
of the grid share it (then by the whole dotted key); tied keys by their first key; class paths by
their class name. Names are stable: the same grid file always gives the same names.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Keys the sweep itself sets for every run (`trainer.run_dir`, resume/overwrite) or that would make
# the runs something else than a `fit` of the sweep's configs.
RESERVED_KEYS = ("trainer.run_dir", "resume", "overwrite", "config", "print_config", "ckpt_path")
_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_CLASS_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_MAX_NAME = 200  # bytes; file systems allow 255 per path component


class GridError(ValueError):
    """A grid file that cannot be used (the message is one line naming the file and the problem)."""


@dataclass(frozen=True)
class RunPoint:
    """One run of a sweep: its name and the value of every grid key it sets (dotted key -> value)."""

    name: str
    values: dict[str, Any] = field(hash=False)

    def fit_arguments(self) -> list[str]:
        """`--key value` arguments for `sparsyfed fit`, a key always before its sub-keys
        (`--method TopK` before `--method.sparsity 0.99`)."""
        keys = sorted(self.values, key=lambda key: key.count("."))  # stable: grid order within a depth
        arguments: list[str] = []
        for key in keys:
            arguments += [f"--{key}", cli_value(self.values[key])]
        return arguments


def load_grid(path: str | Path) -> Any:
    """The parsed content of a grid file (`GridError` if it cannot be read)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise GridError(f"--grid {path} cannot be read: {reason}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise GridError(f"--grid {path} is not valid YAML{where}: {problem}") from None


def expand_grid(grid: Any, source: str = "grid") -> list[RunPoint]:
    """The runs of a parsed grid (see the module doc), named; `GridError` for a malformed grid."""
    blocks = grid if isinstance(grid, list) else [grid]
    if not blocks or grid is None:
        raise GridError(f"{source} defines no runs; it must be a mapping of dotted keys to lists of values "
                        "(or a list of such mappings)")
    points: list[dict[str, Any]] = []
    order: list[str] = []  # keys as written (tied keys joined by commas), first appearance first
    for index, block in enumerate(blocks):
        where = source if len(blocks) == 1 and not isinstance(grid, list) else f"{source}, entry {index + 1}"
        if not isinstance(block, Mapping) or not block:
            raise GridError(f"{where} must be a non-empty mapping of dotted keys to lists of values, "
                            f"got {_short(block)}")
        axes = []
        for written, values in block.items():
            keys = _parse_key(written, where)
            if written not in order:
                order.append(written)
            axes.append([_assign(keys, value, written, where) for value in _as_list(values, written, where)])
        for combination in itertools.product(*axes):
            point: dict[str, Any] = {}
            for assignment in combination:
                point.update(assignment)
            if point not in points:
                points.append(point)
    _check_tied_keys_are_consistent(order, source)
    names = run_names(points, order)
    return [RunPoint(name, point) for name, point in zip(names, points, strict=True)]


def run_names(points: list[dict[str, Any]], order: list[str]) -> list[str]:
    """One directory name per point (see the module doc); unique, at most 200 bytes each."""
    labels = {written: _parse_key(written, "grid")[0].rsplit(".", 1)[-1] for written in order}
    clashing = {label for label in labels.values() if list(labels.values()).count(label) > 1}
    labels = {w: (_parse_key(w, "grid")[0] if label in clashing else label) for w, label in labels.items()}
    names = []
    for point in points:
        parts = []
        for written in order:
            key = _parse_key(written, "grid")[0]
            if key in point:
                parts.append(f"{labels[written]}={name_value(point[key])}")
        names.append(",".join(parts))
    plain = list(names)
    for index, name in enumerate(plain):
        # A value whose characters were replaced can meet another one; long names are cut. Both get
        # a short digest of the point so that every run has its own directory.
        if plain.count(name) > 1 or len(name.encode()) > _MAX_NAME:
            digest = hashlib.sha256(json.dumps(points[index], sort_keys=True).encode()).hexdigest()[:8]
            names[index] = f"{name.encode()[:_MAX_NAME - 9].decode(errors='ignore')}-{digest}"
    return names


def name_value(value: Any) -> str:
    """A value as written in a run name: `0.99`, `1` (for 1.0), `TopK` (for a class path), `true`."""
    if isinstance(value, float):
        text = repr(value)
        text = text[:-2] if text.endswith(".0") else text
    elif isinstance(value, str) and _CLASS_PATH.match(value):
        text = value.rsplit(".", 1)[-1]
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return _NAME_UNSAFE.sub("_", text) or "_"


def cli_value(value: Any) -> str:
    """A value as a `sparsyfed fit` argument: strings as they are, everything else as JSON (YAML-readable)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def is_seed_key(key: str) -> bool:
    """Whether a dotted key is a seed (`trainer.seed`, `model.init_seed`, `data.seed`)."""
    return key.rsplit(".", 1)[-1].endswith("seed")


def grid_keys(grid: Any) -> list[str]:
    """The dotted keys a parsed (valid) grid sets, tied keys split, in order of first appearance."""
    keys: list[str] = []
    for block in grid if isinstance(grid, list) else [grid]:
        for written in block:
            keys += [key for key in _parse_key(written, "grid") if key not in keys]
    return keys


# -- internals ---------------------------------------------------------------------------------------
def _parse_key(written: Any, where: str) -> list[str]:
    if not isinstance(written, str):
        raise GridError(f"{where}: key {written!r} is invalid; keys are dotted names such as method.sparsity")
    keys = [key.strip() for key in written.split(",")]
    for key in keys:
        if key.startswith("-"):
            raise GridError(f"{where}: key {written!r} is invalid; write it without dashes, e.g. "
                            f"{key.lstrip('-')}")
        if not _KEY.match(key):
            raise GridError(f"{where}: key {written!r} is invalid; keys are dotted names such as method.sparsity")
        if key in RESERVED_KEYS:
            raise GridError(f"{where}: key {key!r} cannot be swept; the sweep sets it for every run "
                            f"(reserved: {', '.join(RESERVED_KEYS)})")
    if len(set(keys)) != len(keys):
        raise GridError(f"{where}: key {written!r} names the same key twice")
    return keys


def _as_list(values: Any, written: str, where: str) -> list[Any]:
    if not isinstance(values, list):
        return [values]
    if not values:
        raise GridError(f"{where}: {written}=[] is invalid; give at least one value")
    return values


def _assign(keys: list[str], value: Any, written: str, where: str) -> dict[str, Any]:
    if len(keys) == 1:
        return {keys[0]: value}
    if not isinstance(value, list):
        return dict.fromkeys(keys, value)
    if len(value) != len(keys):
        raise GridError(f"{where}: {written}={value!r} is invalid; each value of tied keys is one value for all "
                        f"of them or a list of {len(keys)} values, one per key")
    return dict(zip(keys, value, strict=True))


def _check_tied_keys_are_consistent(order: list[str], source: str) -> None:
    """A key must not be set both alone and as part of tied keys, or in two different ties."""
    seen: dict[str, str] = {}
    for written in order:
        for key in _parse_key(written, source):
            if key in seen and seen[key] != written:
                raise GridError(f"{source}: key {key!r} appears both as {seen[key]!r} and as {written!r}; "
                                "write it the same way everywhere")
            seen[key] = written


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
