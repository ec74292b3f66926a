"""Objects named by import path, LightningCLI style: `"pkg.mod.Name"` or `{"class_path": ..., "init_args": {...}}`.

Used wherever a configuration names user code (a backbone, a data transform). Errors are one line
naming the option (`key`), the value and what is allowed. Imports nothing heavy itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def looks_like_import_path(value: object) -> bool:
    """Whether `value` is a dotted name such as `torchvision.models.resnet18`."""
    return isinstance(value, str) and "." in value and all(part.isidentifier() for part in value.split("."))


def import_object(path: str, key: str, allowed: str) -> Any:
    """The object that the dotted `path` names (the longest importable module prefix, then attributes).

    `key` names the option and `allowed` says what it accepts, for the one-line error.
    """
    if not looks_like_import_path(path):
        raise ValueError(f"{key}={path!r} is invalid; allowed: {allowed}")
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            target: Any = importlib.import_module(module_name)
        except ImportError as error:
            if error.name is not None and not module_name.startswith(error.name):
                # The module exists but fails to import something itself: say so, it is not a typo.
                raise ValueError(f"{key}={path!r} cannot be imported: {error}") from error
            continue
        try:
            for attribute in parts[split:]:
                target = getattr(target, attribute)
        except AttributeError:
            break
        return target
    raise ValueError(f"{key}={path!r} does not resolve to an importable object; allowed: {allowed}")


def split_class_spec(spec: Mapping[str, Any], key: str, allowed: str) -> tuple[str, dict[str, Any]]:
    """`(class_path, init_args)` of a `{"class_path": ..., "init_args": {...}}` mapping, checked."""
    unknown = set(spec) - {"class_path", "init_args"}
    class_path, init_args = spec.get("class_path"), spec.get("init_args") or {}
    if unknown or not isinstance(class_path, str) or not isinstance(init_args, Mapping):
        raise ValueError(f"{key}={dict(spec)!r} is invalid; allowed: {allowed}")
    return class_path, dict(init_args)


def instantiate(spec: str | Mapping[str, Any], key: str, allowed: str) -> Any:
    """Call the class or factory named by `spec` (an import path, or class_path + init_args)."""
    path, init_args = (spec, {}) if isinstance(spec, str) else split_class_spec(spec, key, allowed)
    target = import_object(path, key, allowed)
    if not callable(target):
        raise ValueError(f"{key}={path!r} names a {type(target).__name__}, not a class or function; allowed: {allowed}")
    try:
        return target(**init_args)
    except TypeError as error:
        raise ValueError(f"{key}={path!r} cannot be built with init_args {init_args!r}: {error}") from error


def import_path_of(obj: object) -> str | None:
    """The dotted path that imports `obj` back (a module-level class or function), or None."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not name or "<" in name:
        return None
    try:
        found: Any = importlib.import_module(module)
        for attribute in name.split("."):
            found = getattr(found, attribute)
    except (ImportError, AttributeError):
        return None
    return f"{module}.{name}" if found is obj else None
