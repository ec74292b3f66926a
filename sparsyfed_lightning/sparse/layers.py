"""Finding the layers that sparsity applies to, and their stored and effective weights.

Every method in this project acts on the weights of `Conv1d`/`Conv2d`/`Linear` layers only
(BatchNorm affine parameters and buffers are never pruned, SPEC section 5). When a layer carries a
Powerprop parametrization its *stored* tensor `v` (``parametrizations.weight.original``) is what is
trained, pruned and communicated; its *effective* weight `w` is ``module.weight``.

Which layers a method wraps (Powerprop, SWAT) follows the authors' layer-replacement walk on the
backbones that declare it (`AUTHORS_LAYER_WALK`, set by the paper's ResNet-18 builders): see
`layers_outside_authors_walk`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
# A backbone with this attribute set to True is one the authors' layer-replacement walk was run on.
AUTHORS_LAYER_WALK = "authors_layer_walk"


def prunable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield `(name, module)` for every conv/linear layer, in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            yield name, module


def layers_outside_authors_walk(model: nn.Module) -> list[str]:
    """The conv/linear layers the authors' layer-replacement walk leaves plain (SPEC 3.2, quirk 24).

    Their helper finds the layers to replace through `dir(module)` while recursing into every
    child, and `nn.Module.__dir__` omits child names that start with a digit, so a layer held
    directly by an `nn.Sequential` is never replaced: in ResNet-18 the three 1x1 downsample convs
    (`layerN.0.downsample.0`). Only backbones marked with `AUTHORS_LAYER_WALK` report such layers
    (the walk would leave a model built as one `nn.Sequential` entirely plain); for every other
    backbone the list is empty and every layer is wrapped.
    """
    if not getattr(model, AUTHORS_LAYER_WALK, False):
        return []
    return [name for name, _ in prunable_layers(model) if name.rsplit(".", 1)[-1][:1].isdigit()]


def is_linear(module: nn.Module) -> bool:
    """A fully connected layer: `nn.Linear`, or a layer marked `acts_as_linear` (`StackedLinear`).

    The faithful activation threshold is frozen after the first batch for convolutions only.
    """
    return isinstance(module, nn.Linear) or getattr(module, "acts_as_linear", False)


def stored_weight(module: nn.Module) -> nn.Parameter:
    """The trainable tensor of a layer: `v` under Powerprop, the plain weight otherwise."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original  # type: ignore[union-attr,return-value]
    return module.weight  # type: ignore[return-value]


def stored_weight_key(layer_name: str, module: nn.Module) -> str:
    """The state-dict key of a layer's stored weight."""
    prefix = f"{layer_name}." if layer_name else ""
    if parametrize.is_parametrized(module, "weight"):
        return f"{prefix}parametrizations.weight.original"
    return f"{prefix}weight"


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Stored weights of every conv/linear layer keyed by their state-dict key."""
    return {stored_weight_key(name, m): stored_weight(m) for name, m in prunable_layers(model)}


@torch.no_grad()
def layer_densities(model: nn.Module) -> dict[str, torch.Tensor]:
    """Fraction of non-zero stored weights per conv/linear layer, as 0-d device tensors (no sync)."""
    return {
        name: torch.count_nonzero(stored_weight(m)).to(torch.float32) / stored_weight(m).numel()
        for name, m in prunable_layers(model)
    }


# Layers that hold weight matrices the sparse machinery cannot reach: Powerprop, activation
# pruning and pruning act on the `weight` of Conv1d/Conv2d/Linear layers through their own forward.
_UNREACHABLE_WEIGHTS: tuple[tuple[type[nn.Module], str], ...] = (
    (
        nn.MultiheadAttention,
        "it keeps its input projection as a raw Parameter and uses out_proj's weight without calling "
        "out_proj, so Powerprop, activation pruning and pruning would miss them; write attention with "
        "nn.Linear projections (as the `vit` backbone does)",
    ),
    (nn.Embedding, "its table is not a conv/linear weight and would stay dense and unpruned"),
    (nn.EmbeddingBag, "its table is not a conv/linear weight and would stay dense and unpruned"),
    (nn.RNNBase, "its weight matrices are raw Parameters of a fused kernel and would stay dense and unpruned"),
    (nn.RNNCellBase, "its weight matrices are raw Parameters and would stay dense and unpruned"),
)


def unsupported_layers(model: nn.Module) -> list[tuple[str, str, str]]:
    """`(name, type, reason)` for every layer whose weights the sparse methods cannot handle.

    Besides the known types above, any other `torch.nn` layer that owns a weight of two or more
    dimensions outside Conv1d/Conv2d/Linear (Conv3d, ConvTranspose*, Bilinear, ...) is listed.
    Parameters of a model's own modules (learned position embeddings, class tokens) and
    normalisation parameters are not: like biases they are trained and sent dense.
    """
    found: list[tuple[str, str, str]] = []
    inside_refused: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in inside_refused):
            continue  # e.g. out_proj inside a refused MultiheadAttention
        reason = next((why for kind, why in _UNREACHABLE_WEIGHTS if isinstance(module, kind)), None)
        if reason is None and not isinstance(module, PRUNABLE_TYPES) and type(module).__module__.startswith("torch.nn"):
            if any(p.dim() >= 2 for p in module.parameters(recurse=False)):
                reason = "only Conv1d, Conv2d and Linear weights are sparsified; its weight would stay dense"
        if reason is not None:
            found.append((name or "(the model)", type(module).__name__, reason))
            inside_refused.append(name)
    return found


def check_supported_layers(model: nn.Module, method: str) -> None:
    """Raise a one-line ValueError naming the first layer that `method` cannot handle (see `unsupported_layers`)."""
    unsupported = unsupported_layers(model)
    if unsupported:
        name, kind, reason = unsupported[0]
        more = f" (and {len(unsupported) - 1} more such layers)" if len(unsupported) > 1 else ""
        raise ValueError(
            f"model.backbone: layer {name!r} ({kind}) cannot be trained by method {method}: {reason}{more}"
        )
