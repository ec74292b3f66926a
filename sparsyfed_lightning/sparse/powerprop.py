"""Powerpropagation: `w = sign(v) * |v| ** beta` registered as a weight parametrization.

The stored parameter `v` is what the optimizer updates, what pruning ranks and what the federation
communicates. The gradient is `dL/dv = beta * |v| ** (beta - 1) * dL/dw`, which is exactly zero at
`v = 0` when `beta > 1`; with SGD without momentum a zero weight therefore stays zero for a whole
local round (SPEC 3.1), which is what makes the layer density constant within a round.

A custom autograd Function is used instead of composing `sign`, `abs` and `pow`: composed ops would
save two or three weight-sized intermediates for backward, while this one saves only `v` itself
(the parameter, already alive), so Powerprop adds no saved-tensor memory. Because zeros are frozen
within a local fit, `freeze_support` lets each layer compute on its non-zeros only during a fit
(at 95% sparsity, a twentieth of the elementwise work), bit-identically to the dense path.

A client-stacked layer (`models.stacked`: client i owns the i-th consecutive chunk of `v`) can give
each client its own exponent (`Powerprop.set_client_exponents`, the spectral variant): the exponent
is then a small device tensor broadcast over the rows of `v` (or over the frozen support), and the
same single autograd Function still saves only `v`.

During a fit `freeze_support` also fuses the small layers: one root forward pre-hook computes the
effective weights of every frozen layer below `FUSE_MAX_NUMEL` entries that shares one float
exponent in a single autograd call (`_FusedSignedPower`), and each layer's parametrization hands
out its part. Per layer and step that replaces an autograd Function call and about ten small
kernels in each direction by a share of one; on a small network, where those fixed costs rival
the arithmetic, this is most of what Powerprop costs (docs/PERFORMANCE.md). The arithmetic per
entry is the same, so the weights and gradients are those of the per-layer path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from sparsyfed_lightning.sparse.layers import prunable_layers


def abs_pow(v: torch.Tensor, exponent: float | torch.Tensor) -> torch.Tensor:
    """`|v| ** exponent`, through square roots and products when `4 * exponent` is a small integer.

    A tensor `exponent` (broadcast against `v`) always takes `pow`.

    `pow` with a fractional exponent costs about 3 ns per element on these CPUs against 0.5 ns for
    a square root, and beta = 1.25 (the paper's) needs `|v| ** 0.25` in every forward and backward.
    The results differ from `pow` by at most an ulp or two; forward and backward share this
    function, so the gradient stays the exact derivative of what the forward computed.
    """
    magnitude = v.abs()
    if isinstance(exponent, torch.Tensor):
        return magnitude.pow_(exponent)
    decomposed = _roots_and_power(exponent)
    if decomposed is None:
        return magnitude.pow_(exponent)
    roots, power = decomposed
    base = magnitude
    for _ in range(roots):
        base = base.sqrt_()
    return base if power == 1 else base.pow(power)


def _roots_and_power(exponent: float) -> tuple[int, int] | None:
    """`exponent` as (r, p) with `|v| ** exponent = (|v| ** (1 / 2**r)) ** p`, r square roots and an
    integer power, when `4 * exponent` is an integer from 1 to 16; None otherwise (`pow`)."""
    quarters = exponent * 4
    if quarters != round(quarters) or not 1 <= quarters <= 16:
        return None
    quarters = round(quarters)
    if quarters % 4 == 0:
        return 0, quarters // 4
    if quarters % 2 == 0:
        return 1, quarters // 2
    return 2, quarters


def abs_pow_is_positional_exact(exponent: float) -> bool:
    """Whether `abs_pow(v, exponent)` uses only abs, square roots and at most cubes of `v`.

    Those are correctly rounded, so an entry's result does not depend on where it sits in the
    tensor; `pow` with other exponents takes vectorised and scalar code paths that may differ in
    the last bit, so computing the same entries in a longer tensor could round differently.
    """
    decomposed = _roots_and_power(exponent)
    return decomposed is not None and decomposed[1] <= 3


class _SignedPower(torch.autograd.Function):
    """`v * |v| ** (exponent - 1)` (= sign(v)|v|^exponent) with a backward that saves only `v`.

    `exponent` is a float or a float64 tensor that broadcasts against `v` (without `support`) or
    against the support's entries (with it).

    With `support` (flat indices of the entries of `v` that may be non-zero) both directions
    compute on those entries only and leave the rest exactly zero, which is what the dense formula
    gives there; the arithmetic on the support is the same elementwise arithmetic, so the results
    are bit-identical to the dense path.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, exponent: float | torch.Tensor, support: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.exponent = exponent
        ctx.support = support
        if support is None:
            ctx.save_for_backward(v)
            return v * abs_pow(v, _minus_one(exponent, v.dtype))
        # index_select and scatter_ rather than v[support] / out[support] = ...: the same values,
        # about 4x faster on CPU (advanced indexing takes a slower general path).
        values = v.reshape(-1).index_select(0, support)
        scale = abs_pow(values, _minus_one(exponent, v.dtype))
        # The support is a few percent of the layer: keep exponent * |v|^(exponent - 1) on it for
        # the backward instead of recomputing it (a handful of kernels per layer per step).
        ctx.save_for_backward(v, scale.mul(_as_factor(exponent, v.dtype)))
        out = torch.zeros(v.numel(), dtype=v.dtype, device=v.device)
        out.scatter_(0, support, values * scale)
        return out.reshape(v.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        exponent, support = ctx.exponent, ctx.support
        if support is None:
            (v,) = ctx.saved_tensors
            return grad * abs_pow(v, _minus_one(exponent, v.dtype)).mul_(_as_factor(exponent, v.dtype)), None, None
        v, derivative = ctx.saved_tensors
        out = torch.zeros(v.numel(), dtype=grad.dtype, device=grad.device)
        out.scatter_(0, support, grad.reshape(-1).index_select(0, support) * derivative)
        return out.reshape(v.shape), None, None


def _minus_one(exponent: float | torch.Tensor, dtype: torch.dtype) -> float | torch.Tensor:
    """`exponent - 1`, computed in float64 as the float path computes it, then in `dtype`."""
    return exponent - 1.0 if isinstance(exponent, float) else (exponent - 1.0).to(dtype)


def _as_factor(exponent: float | torch.Tensor, dtype: torch.dtype) -> float | torch.Tensor:
    return exponent if isinstance(exponent, float) else exponent.to(dtype)


def signed_power(
    v: torch.Tensor, exponent: float | torch.Tensor, support: torch.Tensor | None = None
) -> torch.Tensor:
    """Differentiable `sign(v) * |v| ** exponent`; see `_SignedPower` for `exponent` and `support`."""
    return _SignedPower.apply(v, exponent, support)


class Powerprop(nn.Module):
    """Parametrization `v -> sign(v)|v|^exponent`; `right_inverse` maps an effective weight to `v`.

    `exponent` is a plain float attribute (not state): the spectral variant rewrites it once per
    round, and state dicts stay identical across methods with the same layer wrapping. A stacked
    layer whose clients differ gets `set_client_exponents`; `exponent` is then NaN.
    """

    def __init__(self, exponent: float) -> None:
        super().__init__()
        if exponent < 1.0:
            raise ValueError(f"Powerprop exponent must be >= 1, got {exponent}")
        self.exponent = float(exponent)
        self.client_exponents: tuple[float, ...] | None = None
        self._support: torch.Tensor | None = None
        # Device copies of `client_exponents`, per row of v and per support entry (built lazily).
        self._row_exponents: torch.Tensor | None = None
        self._support_exponents: torch.Tensor | None = None
        # (v, w) while a fused forward of the whole network has computed this layer's w from v.
        self._fused: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def support(self) -> torch.Tensor | None:
        """Flat indices of the entries of v that may be non-zero (see `freeze_support`), or None."""
        return self._support

    @support.setter
    def support(self, support: torch.Tensor | None) -> None:
        self._support = support
        self._support_exponents = None

    @property
    def is_identity(self) -> bool:
        """True when every exponent is 1 (w = v)."""
        return self.client_exponents is None and self.exponent == 1.0

    def set_client_exponents(self, exponents: Sequence[float]) -> None:
        """One exponent per stacked client, client i owning the i-th of `len(exponents)` chunks of v.

        Equal exponents collapse to the plain float `exponent`.
        """
        values = tuple(float(e) for e in exponents)
        if not values or min(values) < 1.0:
            raise ValueError(f"Powerprop exponents must be >= 1, got {values}")
        if len(set(values)) == 1:
            self.exponent, self.client_exponents = values[0], None
        else:
            self.exponent, self.client_exponents = math.nan, values
        self._row_exponents = self._support_exponents = None

    def _exponent_for(self, v: torch.Tensor) -> float | torch.Tensor:
        """The exponent operand of `signed_power` for v: a float unless the clients differ.

        Then a float64 device tensor, one entry per row of v (or per support entry), built on the
        first forward after the exponents or the support change.
        """
        if self.client_exponents is None:
            return self.exponent
        if self._row_exponents is None or self._row_exponents.device != v.device:
            self._row_exponents = self._per_row(self.client_exponents, v)
            self._support_exponents = None
        if self._support is None:
            return self._row_exponents
        if self._support_exponents is None:
            rows = torch.div(self._support, v.numel() // v.shape[0], rounding_mode="floor")
            self._support_exponents = self._row_exponents.reshape(-1)[rows]
        return self._support_exponents

    @staticmethod
    def _per_row(per_client: Sequence[float], like: torch.Tensor) -> torch.Tensor:
        """One value per client repeated over the client's rows of `like`, broadcastable to it (float64)."""
        values = torch.tensor(per_client, dtype=torch.float64, device=like.device)
        return values.repeat_interleave(like.shape[0] // len(per_client)).view(-1, *[1] * (like.dim() - 1))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        fused = self._fused
        if fused is not None and fused[0] is v:
            return fused[1]
        if self.is_identity:
            return v
        return signed_power(v, self._exponent_for(v), self._support)

    @torch.no_grad()
    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return w
        if self.client_exponents is None:
            return torch.sign(w) * w.abs().pow(1.0 / self.exponent)
        return torch.sign(w) * w.abs().pow(1.0 / self._per_row(self.client_exponents, w)).to(w.dtype)


def powerpropify(
    model: nn.Module, beta: float, *, keep_effective_weights: bool = True, skip: Iterable[str] = ()
) -> nn.Module:
    """Register Powerprop on the weight of every Conv1d/Conv2d/Linear layer of `model`, in place.

    `beta == 1` leaves the model untouched (an ordinary network). With `keep_effective_weights`
    the stored `v` is set to `sign(w)|w|^(1/beta)` so the effective weights keep the distribution
    they were initialised with (SPEC 3.3); without it `v` takes the current weight values as they
    are (the spectral variant's initialisation). Layers named in `skip` stay plain (e.g. those
    outside the authors' layer walk, `layers_outside_authors_walk`). Returns `model` for chaining.
    """
    if not math.isfinite(beta) or beta < 1.0:
        raise ValueError(f"beta must be a finite number >= 1, got {beta}")
    if beta == 1.0:
        return model
    skip = set(skip)
    layers = list(prunable_layers(model))
    if skip - {name for name, _ in layers}:
        raise ValueError(f"unknown layers to leave plain: {sorted(skip - {name for name, _ in layers})}")
    for name, module in layers:
        if name in skip:
            continue
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"{type(module).__name__} already carries a weight parametrization")
        if keep_effective_weights:
            parametrize.register_parametrization(module, "weight", Powerprop(beta))
        else:
            # Register with exponent 1 (identity inverse) so v keeps the raw values, then raise it.
            parametrization = Powerprop(1.0)
            parametrize.register_parametrization(module, "weight", parametrization)
            parametrization.exponent = float(beta)
    return model


# Below this density computing on the support (gather, pow, scatter) beats the dense elementwise ops;
# below this size the extra kernels of the support path cost more than the work they save (measured
# on CPU: 62 us dense against 109 us on the support for a 288-entry stem, 658 against 174 at 37k).
SUPPORT_DENSITY_LIMIT = 0.5
SUPPORT_MIN_NUMEL = 4096
# Frozen layers below this size are fused (see the module doc). Larger ones keep their own call:
# its fixed cost is small beside their arithmetic, and activation pruning can then store their
# effective weight as "recompute from v" instead of saving it (`ActivationPruning`, whose
# MIN_COMPACT_NUMEL is the same size).
FUSE_MAX_NUMEL = 1 << 18


@torch.no_grad()
def freeze_support(model: nn.Module, fuse_max_numel: int = FUSE_MAX_NUMEL) -> int:
    """Let every Powerprop layer compute on its current non-zeros only, until `release_support`.

    Valid while zeros of `v` stay zero, which holds during local training with beta > 1: the
    gradient and the weight-decay term of a zero entry are both exactly zero (SPEC 3.1), for any
    optimizer that maps a zero gradient to a zero step (SGD with or without momentum, Adam).
    Entries that become zero later are still computed (and give zero), so the support may only
    be a superset of the true one. Layers denser than `SUPPORT_DENSITY_LIMIT` or smaller than
    `SUPPORT_MIN_NUMEL` keep the dense path.

    Layers smaller than `fuse_max_numel` entries with one float exponent (the parametrization alone
    on the weight), whatever their density, are also fused, per exponent, into one autograd call
    per forward of `model` that computes on their non-zeros (0 fuses nothing), when the exponent's
    arithmetic rounds the same in any layout (`abs_pow_is_positional_exact`: 1.25, 1.5, 1.75, 2,
    2.5, 3, ...; other exponents keep one call per layer). Returns the number of layers switched to
    their own support path.
    """
    release_support(model)
    switched = 0
    fusable: dict[tuple[float, torch.device, torch.dtype], list[tuple[Powerprop, torch.Tensor, torch.Tensor]]] = {}
    for _, module in prunable_layers(model):
        parametrization = powerprop_of(module)
        if parametrization is None or parametrization.is_identity:
            continue
        stored = module.parametrizations.weight.original  # type: ignore[union-attr]
        support = torch.nonzero(stored.reshape(-1)).reshape(-1)
        sparse = support.numel() < SUPPORT_DENSITY_LIMIT * stored.numel()
        if sparse and stored.numel() >= SUPPORT_MIN_NUMEL:
            parametrization.support = support
            switched += 1
        else:
            parametrization.support = None
        alone = len(module.parametrizations.weight) == 1  # type: ignore[union-attr,arg-type]
        exact = parametrization.client_exponents is None and abs_pow_is_positional_exact(parametrization.exponent - 1)
        if alone and exact and stored.numel() < fuse_max_numel:
            key = (parametrization.exponent, stored.device, stored.dtype)
            fusable.setdefault(key, []).append((parametrization, stored, support))
    groups = [_FusionPlan.build(exponent, layers) for (exponent, _, _), layers in fusable.items() if len(layers) > 1]
    if groups:
        model._powerprop_fusion = _PowerpropFusion(model, groups)  # type: ignore[assignment]
    return switched


def release_support(model: nn.Module) -> None:
    """Return every Powerprop layer to dense computation, unfused (see `freeze_support`)."""
    fusion = model.__dict__.pop("_powerprop_fusion", None)
    if fusion is not None:
        fusion.remove()
    for _, module in prunable_layers(model):
        parametrization = powerprop_of(module)
        if parametrization is not None:
            parametrization.support = None


@dataclass
class _FusionPlan:
    """Layers whose effective weights one `_FusedSignedPower` call computes (one shared exponent)."""

    exponent: float
    parametrizations: list[Powerprop]
    stored: list[torch.Tensor]  # each layer's v
    supports: list[torch.Tensor]  # flat indices of each v's non-zeros
    flat_support: torch.Tensor  # the same indices into the layers' concatenation
    sizes: list[int]
    shapes: list[torch.Size]

    @staticmethod
    def build(exponent: float, layers: list[tuple[Powerprop, torch.Tensor, torch.Tensor]]) -> _FusionPlan:
        sizes = [stored.numel() for _, stored, _ in layers]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        supports = [support for _, _, support in layers]
        return _FusionPlan(
            exponent=exponent,
            parametrizations=[p for p, _, _ in layers],
            stored=[stored for _, stored, _ in layers],
            supports=supports,
            flat_support=torch.cat([support + offset for support, offset in zip(supports, offsets, strict=True)]),
            sizes=sizes,
            shapes=[stored.shape for _, stored, _ in layers],
        )


class _FusedSignedPower(torch.autograd.Function):
    """`_SignedPower` on the supports of several tensors sharing one float exponent, in one call.

    Inputs are a `_FusionPlan` and its tensors v_1..v_n; outputs w_1..w_n, views of one buffer.
    Gathering, the power and the products run once over the concatenated supports: entry by entry
    the arithmetic of the per-layer support path. A w_i that gets no gradient leaves v_i without one,
    as the per-layer path would.
    """

    @staticmethod
    def forward(ctx, plan: _FusionPlan, *stored: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        values = torch.cat([v.reshape(-1).index_select(0, s) for v, s in zip(stored, plan.supports, strict=True)])
        scale = abs_pow(values, plan.exponent - 1.0)
        ctx.plan = plan
        ctx.save_for_backward(scale.mul(plan.exponent))
        out = torch.zeros(sum(plan.sizes), dtype=values.dtype, device=values.device)
        out.scatter_(0, plan.flat_support, values * scale)
        return tuple(part.view(shape) for part, shape in zip(out.split(plan.sizes), plan.shapes, strict=True))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        plan: _FusionPlan = ctx.plan
        (derivative,) = ctx.saved_tensors
        parts = [
            g.reshape(-1).index_select(0, s) if g is not None else s.new_zeros(s.shape, dtype=derivative.dtype)
            for g, s in zip(grads, plan.supports, strict=True)
        ]
        out = torch.zeros(sum(plan.sizes), dtype=derivative.dtype, device=derivative.device)
        out.scatter_(0, plan.flat_support, torch.cat(parts) * derivative)
        views = out.split(plan.sizes)
        return None, *(
            view.view(shape) if g is not None else None
            for view, shape, g in zip(views, plan.shapes, grads, strict=True)
        )


class _PowerpropFusion:
    """Hooks on a model's forward that compute its fused layers' weights once per forward (see `freeze_support`).

    The weights are handed to the parametrizations for the duration of that forward only, so a
    weight read outside a forward of `model` (or after the optimizer has stepped) is computed afresh.
    """

    def __init__(self, model: nn.Module, plans: list[_FusionPlan]) -> None:
        self.plans = plans
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._before_forward),
            model.register_forward_hook(self._after_forward, always_call=True),
        ]

    def _before_forward(self, module: nn.Module, args: object) -> None:
        for plan in self.plans:
            weights = _FusedSignedPower.apply(plan, *plan.stored)
            for parametrization, stored, weight in zip(plan.parametrizations, plan.stored, weights, strict=True):
                parametrization._fused = (stored, weight)

    def _after_forward(self, module: nn.Module, args: object, output: object) -> None:
        for plan in self.plans:
            for parametrization in plan.parametrizations:
                parametrization._fused = None

    def remove(self) -> None:
        self._after_forward(None, None, None)  # type: ignore[arg-type]
        for handle in self._handles:
            handle.remove()


def powerprop_of(module: nn.Module) -> Powerprop | None:
    """The Powerprop parametrization on a layer's weight, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:  # type: ignore[union-attr]
        if isinstance(p, Powerprop):
            return p
    return None
