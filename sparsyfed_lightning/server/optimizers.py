"""Server optimizers on the pseudo-gradient `delta = aggregate - global` (Reddi et al. 2021).

Every optimizer maps `(global_state, aggregate) -> new global state`; the aggregate is the client
average from `server.aggregation`, so any of them composes with any method.

Decisions:

* They update every floating state entry, BatchNorm running statistics included (the authors'
  FedAdam does, SPEC 7.1). Non-floating entries (`num_batches_tracked`) take the aggregate's value.
* Moments start at zero (`m_0 = v_0 = 0`), as in Flower's FedAdam/FedYogi/FedAdagrad and the authors'
  `fedadam_custom`; Reddi et al. also allow `v_0 = tau**2`, which is not used here. With `v_0 = 0`
  the first Yogi step equals the first Adam step.
* Moments are kept in `promote_types(entry dtype, float32)` on the entry's device, so bf16/fp16
  models do not accumulate in 16 bits; the new global entry is cast back to the entry's dtype.
* `FedAvg(lr=1)` returns the aggregate bit-exactly (not `g + (a - g)`, which can round).
* FedAdam's bias correction follows the authors' `fedadam_custom` (and Flower's `FedAdam`):
  `eta_t = lr * sqrt(1 - beta2**(t + 1)) / (1 - beta1**(t + 1))`, where `t = 1, 2, ...` counts the
  server updates made so far including this one (Flower's 1-based `server_round`). So the first
  update uses powers of 2, one step later than Kingma & Ba's `beta**t`. `bias_correction=False` is
  Reddi et al.'s form, `eta_t = lr`. FedYogi and FedAdagrad have no bias correction (Reddi, Flower).
* FedAvgM: `m <- momentum * m + delta; w <- g + lr * m` (Hsu et al. 2019; Flower's FedAvgM).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from sparsyfed_lightning.checks import check_number
from sparsyfed_lightning.server.aggregation import check_same_keys


def _check_lr(value: float, name: str = "lr") -> float:
    return check_number(value, f"server_optimizer.{name}", low=0, low_inclusive=False)


def _check_beta(value: float, name: str) -> float:
    return check_number(value, f"server_optimizer.{name}", low=0, high=1, high_inclusive=False)


class ServerOptimizer:
    """Base class: turns the global state and the client aggregate into the next global state.

    Subclasses implement `_update` for floating entries and name the moment buffers they keep in
    `_buffers`; the base class handles key checks, non-floating entries, step counting and
    checkpointing.
    """

    name: ClassVar[str] = "server_optimizer"
    _buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, lr: float) -> None:
        self.lr = _check_lr(lr)
        self.steps = 0
        self.moments: dict[str, dict[str, torch.Tensor]] = {b: {} for b in self._buffers}

    @torch.no_grad()
    def step(
        self, global_state: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Apply one server update; returns new tensors and leaves both inputs untouched."""
        check_same_keys(global_state, aggregate, "aggregate")
        self.steps += 1
        new_state = {}
        for key, current in global_state.items():
            target = aggregate[key]
            if target.shape != current.shape:
                raise ValueError(
                    f"aggregate entry {key!r} has shape {tuple(target.shape)}, "
                    f"global has {tuple(current.shape)}"
                )
            target = target.to(current.device)
            if not current.dtype.is_floating_point:
                new_state[key] = target.to(current.dtype, copy=True)
                continue
            compute = torch.promote_types(current.dtype, torch.float32)
            delta = target.to(compute) - current.to(compute)
            new_state[key] = self._update(key, current, target, delta).to(current.dtype)
        return new_state

    def _update(
        self, key: str, current: torch.Tensor, target: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def _moment(self, buffer: str, key: str, like: torch.Tensor) -> torch.Tensor:
        """The moment `buffer` of entry `key`, created as zeros on first use."""
        store = self.moments[buffer]
        if key not in store:
            store[key] = torch.zeros_like(like)
        return store[key]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: name, step count and moment buffers (cloned)."""
        return {
            "name": self.name,
            "steps": self.steps,
            "moments": {b: {k: t.clone() for k, t in store.items()} for b, store in self.moments.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` output; the optimizer's hyperparameters come from its constructor."""
        if state.get("name") != self.name:
            raise ValueError(f"server optimizer state is for {state.get('name')!r}, not {self.name!r}")
        if set(state["moments"]) != set(self._buffers):
            raise ValueError(
                f"{self.name} state has buffers {sorted(state['moments'])}, expected {list(self._buffers)}"
            )
        self.steps = int(state["steps"])
        self.moments = {b: {k: t.clone() for k, t in state["moments"][b].items()} for b in self._buffers}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k not in ("steps", "moments"))
        return f"{type(self).__name__}({params})"


class FedAvg(ServerOptimizer):
    """`w <- g + lr * delta`; `lr = 1` (default) is plain FedAvg and returns the aggregate exactly."""

    name = "fedavg"

    def __init__(self, lr: float = 1.0) -> None:
        super().__init__(lr)

    def _update(
        self, key: str, current: torch.Tensor, target: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        if self.lr == 1.0:
            return target.clone()
        return current.to(delta.dtype) + self.lr * delta


class FedAvgM(ServerOptimizer):
    """Server momentum: `m <- momentum * m + delta; w <- g + lr * m` (defaults lr 1.0, momentum 0.9)."""

    name = "fedavgm"
    _buffers = ("m",)

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(lr)
        self.momentum = _check_beta(momentum, "momentum")

    def _update(
        self, key: str, current: torch.Tensor, target: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        m = self._moment("m", key, delta)
        m.mul_(self.momentum).add_(delta)
        return current.to(delta.dtype) + self.lr * m


class _Adaptive(ServerOptimizer):
    """Shared body of FedAdam/FedYogi/FedAdagrad: `w <- g + eta_t * m / (sqrt(v) + tau)`."""

    _buffers = ("m", "v")

    def __init__(self, lr: float, beta1: float, tau: float) -> None:
        super().__init__(lr)
        self.beta1 = _check_beta(beta1, "beta1")
        self.tau = _check_lr(tau, "tau")

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        raise NotImplementedError

    def _step_size(self) -> float:
        return self.lr

    def _update(
        self, key: str, current: torch.Tensor, target: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        m = self._moment("m", key, delta)
        v = self._moment("v", key, delta)
        m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
        self._second_moment(v, delta * delta)
        return current.to(delta.dtype) + self._step_size() * m / (v.sqrt() + self.tau)


class FedAdam(_Adaptive):
    """FedAdam: `v <- beta2 * v + (1 - beta2) * delta**2`, bias-corrected step size (module docstring).

    Defaults are the authors' `fedadam_custom`: lr 0.01, beta1 0.9, beta2 0.99, tau 1e-3.
    """

    name = "fedadam"

    def __init__(
        self,
        lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        bias_correction: bool = True,
    ) -> None:
        super().__init__(lr, beta1, tau)
        self.beta2 = _check_beta(beta2, "beta2")
        self.bias_correction = bool(bias_correction)

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(delta_sq, alpha=1.0 - self.beta2)

    def _step_size(self) -> float:
        if not self.bias_correction:
            return self.lr
        t = self.steps + 1  # the authors' (and Flower's) `server_round + 1`
        return self.lr * math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)


class FedYogi(_Adaptive):
    """FedYogi: `v <- v - (1 - beta2) * delta**2 * sign(v - delta**2)`; defaults as FedAdam's."""

    name = "fedyogi"

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(lr, beta1, tau)
        self.beta2 = _check_beta(beta2, "beta2")

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.sub_((1.0 - self.beta2) * delta_sq * torch.sign(v - delta_sq))


class FedAdagrad(_Adaptive):
    """FedAdagrad: `v <- v + delta**2` (defaults lr 0.01, tau 1e-3).

    `beta1 = 0` (default, as Flower) uses the pseudo-gradient itself; Reddi et al. also allow momentum.
    """

    name = "fedadagrad"

    def __init__(self, lr: float = 0.01, tau: float = 1e-3, beta1: float = 0.0) -> None:
        super().__init__(lr, beta1, tau)

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.add_(delta_sq)


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)
}


def build_server_optimizer(name: str, **kwargs: Any) -> ServerOptimizer:
    """Instantiate a registered server optimizer by name (case-insensitive) with `kwargs`."""
    cls = SERVER_OPTIMIZERS.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown server optimizer {name!r}; known: {', '.join(SERVER_OPTIMIZERS)}")
    return cls(**kwargs)
