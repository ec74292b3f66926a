"""`ClientModule`: the LightningModule every client (and the server's evaluation) runs.

One module instance serves a whole run: the orchestrator loads the global state into it before each
client fit and reads the trained state out afterwards, so nothing is rebuilt per client. The
optimizer is created fresh by every `Trainer.fit` (`configure_optimizers`), which is the authors'
"no optimizer state across rounds" (SPEC 4.4); `lr` is rewritten by the orchestrator every round.

The training step keeps its running loss on the device and logs once per epoch: a `self.log` per
step costs more than the arithmetic of the small models. SGD runs fused (one kernel per parameter,
no Python loop over them) on the devices that have the kernel: the same update with the weight
decay added in another order, so it can differ from the per-tensor loop in the last bit.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from sparsyfed_lightning.checks import check_integer, check_number
from sparsyfed_lightning.models import build_model
from sparsyfed_lightning.models.registry import serialisable_backbone


class ClientModule(L.LightningModule):
    """Classifier trained with SGD and cross-entropy; the sparse behaviour comes from callbacks.

    Args:
        backbone: a name from `sparsyfed_lightning.models.MODELS`, the import path of any
            `nn.Module` class or factory (e.g. `torchvision.models.resnet18`), or
            `{"class_path": ..., "init_args": {...}}`; from Python also the class or factory itself
            (stored as its import path). See `models.registry` for how `num_classes` and
            `in_channels` reach it.
        num_classes: number of classes (linked from the data module by the CLI).
        in_channels: input channels (linked from the data module by the CLI); None keeps the
            backbone's default.
        lr: client learning rate of round 1 before decay (the orchestrator sets each round's value).
        weight_decay: SGD weight decay (the paper: 1e-3).
        momentum: SGD momentum (the paper: 0; zero weights stay frozen under any value when beta > 1,
            but the faithful setting has none).
        backbone_kwargs: extra keyword arguments of the backbone builder (e.g. `width`, `in_channels`).
        init_seed: seed of the initial weights (the server's single random initial model).
    """

    def __init__(
        self,
        backbone: str | dict[str, Any] = "small_cnn",
        num_classes: int = 10,
        in_channels: int | None = None,
        lr: float = 0.1,
        weight_decay: float = 1e-3,
        momentum: float = 0.0,
        backbone_kwargs: dict[str, Any] | None = None,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        backbone = serialisable_backbone(backbone)
        check_number(lr, "model.lr", low=0, low_inclusive=False)
        check_number(weight_decay, "model.weight_decay", low=0)
        check_number(momentum, "model.momentum", low=0, high=1, high_inclusive=False)
        check_integer(num_classes, "model.num_classes", minimum=1)
        check_integer(init_seed, "model.init_seed", minimum=0)
        self.save_hyperparameters()
        self.hparams["backbone"] = backbone  # a class given from Python is kept as its import path
        self.lr = lr
        extra = dict(backbone_kwargs or {})
        given = extra.pop("in_channels", None)  # older configs set it here
        if given is not None and in_channels is not None and given != in_channels:
            raise ValueError(
                f"model.backbone_kwargs.in_channels={given!r} contradicts model.in_channels={in_channels!r}; "
                "drop one of them"
            )
        in_channels = in_channels if in_channels is not None else given
        if "num_classes" in extra:
            raise ValueError("model.backbone_kwargs.num_classes is invalid; set model.num_classes instead")
        try:
            # Warnings of a build that fails (e.g. "Initializing zero-element tensors") are noise
            # beside the error; those of a build that works are passed on.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.net: nn.Module = build_model(backbone, num_classes, in_channels=in_channels, seed=init_seed,
                                                  **extra)
        except ValueError:
            raise  # already one line naming the option (an unknown backbone, a refused argument)
        except Exception as error:  # noqa: BLE001 - any other failure to build is a bad model configuration
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(
                f"model.backbone={backbone!r} with model.backbone_kwargs={backbone_kwargs!r} cannot be built: {reason}"
            ) from None
        for warning in caught:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self._train_loss_sum: torch.Tensor | None = None
        self._train_batches = 0
        # > 1 when `net` is a client-stacked network (`models.stacked`): training batches then hold
        # that many clients' batches side by side and the loss is the sum of the clients' losses.
        self.stacked_clients = 1

    @override
    def __setattr__(self, name: str, value: object) -> None:
        # Lightning sets `_current_fx_name` around every hook it calls (about 40 times a training
        # step); nn.Module's __setattr__ first searches its parameters, buffers and submodules,
        # which on a small network costs as much as a kernel. These names are plain attributes.
        if name in _PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        if stage == "train" and self.stacked_clients > 1:
            return self._stacked_train_loss(logits, y)
        loss = nn.functional.cross_entropy(logits, y)
        if stage == "train":
            self._add_train_loss(loss.detach())
        else:
            accuracy = self.val_accuracy if stage == "val" else self.test_accuracy
            accuracy.update(logits, y)
            self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=y.shape[0])
            self.log(f"{stage}_accuracy", accuracy, on_step=False, on_epoch=True)
        return loss

    def _stacked_train_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum of the stacked clients' mean losses: logits (B, k * C), labels (B, k)."""
        batch, copies = y.shape
        losses = nn.functional.cross_entropy(logits.reshape(batch * copies, -1), y.reshape(-1), reduction="none")
        per_client = losses.view(batch, copies).mean(0)
        self._add_train_loss(per_client.detach())
        return per_client.sum()

    def _add_train_loss(self, detached: torch.Tensor) -> None:
        """Add one batch's loss (one per stacked client) to the epoch's running sum, on the device."""
        self._train_loss_sum = detached if self._train_loss_sum is None else self._train_loss_sum + detached
        self._train_batches += 1

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        if self.automatic_optimization:
            return loss
        # The lean step (`automatic_optimization = False`, set by the client runner): the same
        # zero-grad, backward and step as Lightning's automatic loop, in this order, without its
        # closure machinery. `manual_backward` and the wrapped optimizer's `step` still run the
        # backward and before-optimizer-step hooks and the precision plugin.
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        return loss

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    @override
    def on_train_epoch_start(self) -> None:
        self._train_loss_sum = None
        self._train_batches = 0

    def mean_train_loss(self) -> float:
        """Mean training loss over the batches of the last epoch (one host sync)."""
        return self.mean_train_losses()[0]

    def mean_train_losses(self) -> list[float]:
        """Each stacked client's mean training loss over the last epoch (one entry when not stacked)."""
        if self._train_loss_sum is None or self._train_batches == 0:
            return [float("nan")] * self.stacked_clients
        return [value / self._train_batches for value in self._train_loss_sum.reshape(-1).tolist()]

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        parameters = list(self.net.parameters())
        return torch.optim.SGD(
            parameters,
            lr=self.lr,
            weight_decay=self.hparams.weight_decay,
            momentum=self.hparams.momentum,
            fused=bool(parameters) and all(_has_fused_sgd(p) for p in parameters),
        )


# Attributes set every step that are never parameters, buffers or modules (see `__setattr__`).
_PLAIN_ATTRIBUTES = frozenset({"_current_fx_name", "_train_loss_sum", "_train_batches"})

# Devices whose torch builds have the fused SGD kernel (torch's list is private); elsewhere the
# per-tensor loop runs.
_FUSED_SGD_DEVICES = ("cpu", "cuda")


def _has_fused_sgd(parameter: torch.Tensor) -> bool:
    return parameter.device.type in _FUSED_SGD_DEVICES and parameter.is_floating_point()

