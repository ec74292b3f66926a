"""What a client process needs to train: picklable construction arguments, not live objects.

Clients trained in other processes (Flower ClientApps, the device workers of `trainer.devices > 1`)
rebuild the client side (data module, `ClientModule`, method, `ClientRunner`) from a `ClientSpec`
once per process and reuse it: `ClientWorker` is that client side. A client's update is a pure
function of what it receives (state, round, learning rate, seed), so a worker's result is the one
the in-process engine would compute.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparsyfed_lightning.federated.client_runner import ClientResult




def constructor_kwargs(obj: Any) -> dict[str, Any]:
    """The keyword arguments that rebuild `obj`: Lightning `hparams` first, then same-named attributes.

    Methods, `ClientModule` and `FederatedDataModule` follow the convention that every constructor
    argument is kept as a hyperparameter or an attribute of the same name (what LightningCLI needs
    too); an argument found in neither place is an error rather than a silent default.
    """
    hparams = dict(getattr(obj, "hparams", {}) or {})
    kwargs: dict[str, Any] = {}
    for name, parameter in inspect.signature(type(obj).__init__).parameters.items():
        if name == "self" or parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update({k: v for k, v in hparams.items() if k not in kwargs})
            continue
        if name in hparams:
            kwargs[name] = hparams[name]
        elif hasattr(obj, name):
            kwargs[name] = getattr(obj, name)
        else:
            raise ValueError(
                f"training clients in other processes (engine='flower', trainer.devices > 1) rebuilds "
                f"{type(obj).__name__} there, but its constructor argument {name!r} is neither a hyperparameter "
                "nor an attribute of the same name"
            )
    return kwargs


@dataclass(frozen=True)
class ClientSpec:
    """How to build one client side (data, model, method, runner) in another process.

    Args:
        model_class / model_kwargs: the `ClientModule` (or subclass) and its constructor arguments.
        method_class / method_kwargs: the `Method` and its constructor arguments.
        data_class / data_kwargs: the `FederatedDataModule` (or compatible) and its arguments.
        local_epochs: epochs per client fit.
        trainer_kwargs: the client Trainer's arguments (accelerator, precision, ...).
        key: identifies the run; a process rebuilds its client side when the key changes.
    """

    model_class: type
    model_kwargs: dict[str, Any]
    method_class: type
    method_kwargs: dict[str, Any]
    data_class: type
    data_kwargs: dict[str, Any]
    local_epochs: int = 1
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    @classmethod
    def from_objects(
        cls, model: Any, method: Any, datamodule: Any, local_epochs: int, trainer_kwargs: dict[str, Any], key: str
    ) -> ClientSpec:
        """Capture the construction arguments of live objects (their state is not shipped)."""
        return cls(
            type(model), constructor_kwargs(model),
            type(method), constructor_kwargs(method),
            type(datamodule), constructor_kwargs(datamodule),
            local_epochs, dict(trainer_kwargs), key,
        )


class ClientWorker:
    """The client side of one run inside one process: built once, reused for every message."""

    def __init__(self, spec: ClientSpec) -> None:
        from sparsyfed_lightning.federated.client_runner import ClientRunner

        self.spec = spec
        self.datamodule = spec.data_class(**spec.data_kwargs)
        self.datamodule.setup("fit")
        self.method = spec.method_class(**spec.method_kwargs)
        model = spec.model_class(**spec.model_kwargs)
        model.net = self.method.prepare_model(model.net)
        model._federated_prepared = True  # the flag FederatedTrainer checks before wrapping
        self.runner = ClientRunner(model, self.method, spec.local_epochs, **spec.trainer_kwargs)

    def fit(self, round_index: int, cid: int, downlink: bytes, lr: float, seed: int) -> ClientResult:
        """Train client `cid` of round `round_index` exactly as the in-process engine does."""
        from sparsyfed_lightning.federated.codec import decode_state

        self.method.on_round_start(round_index)
        loader = self.datamodule.client_train_dataloader(cid, seed=seed)
        return self.runner.fit(cid, decode_state(downlink), loader, lr, seed)

    def fit_group(
        self, round_index: int, group: list[int], downlink: bytes, lr: float, seeds: dict[int, int], retry_alone: bool
    ) -> dict[int, ClientResult | str]:
        """Train a group of clients (stacked when it has several) as the in-process engine does."""
        from sparsyfed_lightning.federated.codec import decode_state
        from sparsyfed_lightning.federated.engines import fit_client_group

        # Client-side method state that depends on the round (e.g. FLASH's masking from round 2) is
        # set by the server's `on_round_start` in-process; this process's method copy needs it too.
        self.method.on_round_start(round_index)
        loaders = {cid: self.datamodule.client_train_dataloader(cid, seed=seeds[cid]) for cid in group}
        return fit_client_group(self.runner, group, decode_state(downlink), loaders, lr, seeds, retry_alone)
