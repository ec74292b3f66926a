"""Does a model fit the data, and does a saved state fit the model? Checked before a run starts.

Both checks turn what would be a traceback deep inside the first round (a channel mismatch in the
first convolution, a state dict with other keys or shapes) into one line naming the options.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsyfed_lightning.client.module import ClientModule
from sparsyfed_lightning.federated.errors import CheckpointError


def check_model_fits_data(model: ClientModule, datamodule: Any) -> None:
    """One forward pass of two zero samples shaped like the data: the model must take them and
    return one logit per class. A one-line ValueError otherwise (before any round runs).

    Data modules without an `input_shape` (duck-typed ones in tests) are not checked.
    """
    if not hasattr(type(datamodule), "input_shape"):
        return
    shape = tuple(datamodule.input_shape)
    what = f"model.backbone={model.hparams.backbone!r}"
    net = model.net
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            logits = net(torch.zeros(2, *shape, device=next(net.parameters()).device))
    except Exception as error:  # noqa: BLE001 - any failure here is a model/data mismatch
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"{what} cannot take the inputs of data.dataset={datamodule.dataset!r} (one sample has shape {shape}): "
            f"{first}; check model.backbone_kwargs (e.g. in_channels={shape[0]})"
        ) from None
    finally:
        net.train(was_training)
    if logits.dim() != 2 or logits.shape[1] != datamodule.num_classes:
        raise ValueError(
            f"{what} returns outputs of shape {tuple(logits.shape)} for a batch of 2, but data.dataset="
            f"{datamodule.dataset!r} has {datamodule.num_classes} classes (expected (2, {datamodule.num_classes}))"
        )


def check_state_fits_model(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: Any) -> None:
    """A one-line CheckpointError when a saved global state does not match the model's state."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        if missing or unexpected:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        else:
            key = wrong[0]
            detail = f"{key} has shape {tuple(state[key].shape)}, the model {tuple(expected[key].shape)}"
        raise CheckpointError(f"{source} does not fit the configured model and method ({detail})")
