"""Backbones by name or by import path: `build_model(backbone, num_classes, ...)` builds and initialises one.

`backbone` is one of three things, LightningCLI style:

* a registered name (`MODELS`: `small_cnn`, `resnet18_cifar`, `vit`, ...);
* the import path of any `nn.Module` class or factory function (`torchvision.models.resnet18`,
  `mypkg.nets.MyNet`);
* a mapping `{"class_path": <import path>, "init_args": {...}}`.

`num_classes` and `in_channels` are passed when the builder's signature names them (`num_classes`;
`in_channels` or `in_chans`); `num_classes` also goes to a builder that takes `**kwargs` (the
torchvision convention). A builder that takes no input-channel argument keeps its default stem,
unless `in_channels` is given and differs from its first convolution's: that convolution is then
rebuilt with `in_channels` inputs (torchvision's ResNets are RGB; this lets them read 1-channel
digits or spectrograms). Every backbone gets the authors' truncated-normal initialisation (SPEC 3.3).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from sparsyfed_lightning.imports import import_object, import_path_of, looks_like_import_path, split_class_spec
from sparsyfed_lightning.models.init import truncated_normal_init
from sparsyfed_lightning.models.resnet import resnet18_cifar, resnet18_speech
from sparsyfed_lightning.models.small import logmel_cnn, small_cnn, small_resnet
from sparsyfed_lightning.models.vit import vit

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet18_speech": resnet18_speech,
    "logmel_cnn": logmel_cnn,
    "small_cnn": small_cnn,
    "small_resnet": small_resnet,
    "vit": vit,
}
BackboneSpec = str | Mapping[str, Any]
_KEY = "model.backbone"
_CHANNEL_ARGUMENTS = ("in_channels", "in_chans")


def _allowed() -> str:
    return (
        f"a registered name ({', '.join(sorted(MODELS))}), the import path of an nn.Module class or "
        "factory (e.g. torchvision.models.resnet18), or {class_path: ..., init_args: {...}}"
    )


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make `builder(num_classes, **kw)` available to `build_model` under `name`."""
    MODELS[name] = builder


def serialisable_backbone(backbone: object) -> BackboneSpec:
    """`backbone` in a form that hyperparameters can store: a class or function becomes its import path."""
    if isinstance(backbone, str):
        return backbone
    if isinstance(backbone, Mapping):
        split_class_spec(backbone, _KEY, _allowed())
        return {"class_path": backbone["class_path"], "init_args": dict(backbone.get("init_args") or {})}
    path = import_path_of(backbone) if callable(backbone) else None
    if path is None:
        raise ValueError(f"{_KEY}={backbone!r} is invalid; allowed: {_allowed()} (from Python: an importable class)")
    return path


def resolve_backbone(
    backbone: BackboneSpec | Callable[..., nn.Module],
) -> tuple[Callable[..., nn.Module], dict[str, Any], str]:
    """`(builder, init_args, path)` for a backbone spec; one-line ValueError naming `model.backbone` otherwise."""
    if isinstance(backbone, Mapping):
        path, init_args = split_class_spec(backbone, _KEY, _allowed())
    elif callable(backbone):  # from Python: the class or factory itself
        path = import_path_of(backbone) or getattr(backbone, "__qualname__", repr(backbone))
        return _check_builder(backbone, path), {}, path
    else:
        path, init_args = backbone, {}
    if path in MODELS:
        return MODELS[path], init_args, path
    if not looks_like_import_path(path):
        raise ValueError(f"{_KEY}={path!r} is unknown; allowed: {_allowed()}")
    return _check_builder(import_object(path, _KEY, _allowed()), path), init_args, path


def _check_builder(builder: Any, path: str) -> Callable[..., nn.Module]:
    """`builder` if it can be an nn.Module class or factory (a function's result is checked after the call)."""
    if not callable(builder) or (inspect.isclass(builder) and not issubclass(builder, nn.Module)):
        raise ValueError(f"{_KEY}={path!r} is not an nn.Module class or factory; allowed: {_allowed()}")
    return builder


def build_model(
    backbone: BackboneSpec | Callable[..., nn.Module],
    num_classes: int,
    *,
    in_channels: int | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a backbone (see the module doc) with the authors' truncated-normal initialisation.

    `kwargs` are extra builder arguments (merged over a mapping's `init_args`).
    """
    if num_classes < 1:
        raise ValueError(f"model.num_classes must be >= 1, got {num_classes}")
    if in_channels is not None and (not isinstance(in_channels, int) or in_channels < 1):
        raise ValueError(f"model.in_channels={in_channels!r} is invalid; it must be an integer >= 1 or null")
    builder, init_args, path = resolve_backbone(backbone)
    arguments = {**init_args, **kwargs}
    _link(arguments, builder, path, "num_classes", num_classes, ("num_classes",), through_kwargs=True)
    channel_argument = _link(arguments, builder, path, "in_channels", in_channels, _CHANNEL_ARGUMENTS)
    try:
        model = builder(**arguments)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{_KEY}={path!r} cannot be built with {arguments!r}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"{_KEY}={path!r} built a {type(model).__name__}, not an nn.Module; allowed: {_allowed()}"
        )
    if in_channels is not None and channel_argument is None:
        adapt_input_channels(model, in_channels)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return truncated_normal_init(model, generator)


def _link(
    arguments: dict[str, Any],
    builder: Callable[..., Any],
    path: str,
    what: str,
    value: int | None,
    names: tuple[str, ...],
    through_kwargs: bool = False,
) -> str | None:
    """Put `value` into `arguments` under the name the builder takes for `what`; returns that name or None."""
    if value is None:
        return None
    parameters = _parameters(builder)
    name = next((n for n in names if n in parameters), None)
    if name is None and through_kwargs and any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        name = names[0]
    if name is None:
        return None
    given = arguments.get(name)
    if given is not None and given != value:
        raise ValueError(f"{_KEY}={path!r} is given {name}={given!r}, but model.{what}={value!r}; drop one of them")
    arguments[name] = value
    return name


def _parameters(builder: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(builder).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass nothing by name
        return {}


def adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Rebuild the model's first convolution (registration order) to read `in_channels` channels.

    Nothing changes when it already does, or when the first conv/linear layer is not a convolution
    (its input features are not channels).
    """
    layers = ((name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear))
    first = next(layers, None)
    if first is None or not isinstance(first[1], nn.Conv1d | nn.Conv2d) or first[1].in_channels == in_channels:
        return
    name, conv = first
    if conv.groups != 1:
        raise ValueError(
            f"model.in_channels={in_channels} cannot be applied: the first convolution {name!r} is grouped "
            f"(groups={conv.groups}); give the backbone an input-channel argument instead"
        )
    replacement = type(conv)(
        in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attribute, replacement)
