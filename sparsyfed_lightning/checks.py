"""Type and range checks for user-facing options, shared by every layer (no torch, no project imports).

The Python API and the CLI reject the same bad values with the same one-line `ValueError`: its
message names the key, says what is allowed and shows the value, e.g.
`trainer.rounds must be an integer >= 1, got True`. Booleans are not numbers here (`rounds=True` is
a mistake, not 1), strings are not numbers (`sparsity="0.9"` is refused rather than parsed), and NaN
or infinity is never a valid hyperparameter.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """`value` as a float if it is a finite real number within the bounds, else a one-line ValueError.

    Bounds are optional; `low_inclusive`/`high_inclusive` choose `[` or `(` on each side.
    """
    ok = _is_real(value) and math.isfinite(float(value))
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        raise ValueError(f"{name} must be {_describe_range(low, high, low_inclusive, high_inclusive)}, got {value!r}")
    return float(value)


def check_integer(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` if it is an integer (not a bool) within `[minimum, maximum]`, else a one-line ValueError."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and minimum is not None:
        ok = value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        if minimum is not None and maximum is not None:
            allowed = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            allowed = f"an integer >= {minimum}"
        elif maximum is not None:
            allowed = f"an integer <= {maximum}"
        else:
            allowed = "an integer"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def check_flag(value: Any, name: str) -> bool:
    """`value` if it is a bool, else a one-line ValueError (`"false"` or 0 are not flags)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_choice(value: Any, name: str, allowed: tuple[Any, ...]) -> Any:
    """`value` if it is one of `allowed`, else a one-line ValueError listing them."""
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def _describe_range(low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool) -> str:
    if low is not None and high is not None:
        return f"a number in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    if low is not None:
        return f"a number {'>=' if low_inclusive else '>'} {low:g}"
    if high is not None:
        return f"a number {'<=' if high_inclusive else '<'} {high:g}"
    return "a finite number"
