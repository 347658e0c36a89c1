"""One optimizer protocol for the learned optimizer and every baseline.

An optimizer is a pair of pure functions::

    state = opt.init_state(params)
    updates, new_state = opt.update(grads, state, params)   # params: only for weight decay

and the optimizee takes ``params + updates`` (so plain SGD returns ``-lr * grads``). Nothing is
mutated, so an analysis can *replay* an update on any gradient with the current state without
advancing it. ``update`` also accepts gradients with extra leading dimensions (a batch of
gradients, e.g. per-sample ones) against one state: it then returns a batch of updates and the
unadvanced state. That is how the covariance and tail-index analyses get per-sample and
per-minibatch updates: :func:`replay`.

An optimizer may also implement ``opt.replay(grads, state, params) -> updates``: the same
numbers as ``update`` on a batch of gradients, computed faster by sharing what the batch shares
(the LSTM optimizer does: :mod:`l2o.lstm_replay`). :func:`replay` uses it when it is there.

And ``opt.linear_gain(state) -> float``, where the update is ``c * g + b`` for every gradient
``g`` under that state (``b`` not depending on ``g``): SGD's, with any momentum, dampening,
Nesterov or weight decay. Then the update noise is exactly ``c`` times the gradient noise, and
the covariance analysis takes the update covariance as ``c**2`` times the gradient's instead of
replaying (:func:`linear_gain`). The tail index still replays: its pooled estimate reads
noise entries at rounding level, where ``c (g_i - g)`` and ``U(g_i) - U(g)`` differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

Params = tuple[Tensor, ...]
State = dict[str, Any]

# Gradient coordinates (samples x coordinates) per ``update`` call of a chunked replay: bounds
# the temporaries of a replayed LSTM update to ~0.5 GB.
ROW_BUDGET = 2**18


@runtime_checkable
class Optimizer(Protocol):
    name: str

    def init_state(self, params: Params) -> State: ...

    def update(
        self, grads: Params, state: State, params: Params | None = None
    ) -> tuple[Params, State]: ...


def apply_updates(params: Params, updates: Params) -> Params:
    return tuple(p + u for p, u in zip(params, updates))


@torch.no_grad()
def replay(
    opt: Optimizer,
    grads: Params,
    state: State,
    params: Params | None = None,
    chunk_size: int | None = None,
) -> Params:
    """The optimizer's updates of a batch of gradients (leading dim N) under one state.

    The state is not advanced; the updates are detached (an analysis, not meta-training). Uses
    the optimizer's own ``replay`` method when it has one, else :func:`chunked_replay`.
    """
    own = getattr(opt, "replay", None)
    if own is not None:
        return own(grads, state, params)
    return chunked_replay(opt, grads, state, params, chunk_size)


def linear_gain(opt: Optimizer, state: State) -> float | None:
    """``c`` of an update that is ``c * g + b`` in the gradient ``g`` under ``state``, or None
    where the optimizer does not declare one (or declares 0: no noise to read)."""
    own = getattr(opt, "linear_gain", None)
    gain = None if own is None else own(state)
    return None if gain is None or gain == 0 else float(gain)


def chunked_replay(
    opt: Optimizer,
    grads: Params,
    state: State,
    params: Params | None = None,
    chunk_size: int | None = None,
) -> Params:
    """:func:`replay` through ``opt.update`` alone, ``chunk_size`` gradients per call.

    ``chunk_size=None``: as many as ``ROW_BUDGET`` gradient coordinates allow.
    """
    out = [updates for _, updates in replay_chunks(opt, grads, state, params, chunk_size)]
    if len(out) == 1:
        return out[0]
    return tuple(torch.cat(parts) for parts in zip(*out))


def replay_chunks(
    opt: Optimizer,
    grads: Params,
    state: State,
    params: Params | None = None,
    chunk_size: int | None = None,
) -> Iterator[tuple[int, Params]]:
    """``(start, updates)`` of each ``opt.update`` call of :func:`chunked_replay`: the updates
    of ``grads[start : start + chunk]`` (for callers that consume chunks without a concat)."""
    n = grads[0].shape[0]
    if chunk_size is None:
        coords = sum(g[0].numel() for g in grads)
        chunk_size = max(1, ROW_BUDGET // max(1, coords))
    chunk = max(1, chunk_size)
    for start in range(0, n, chunk):
        part = tuple(g[start : start + chunk] for g in grads)
        yield start, opt.update(part, state, params)[0]


def _zeros(params: Params) -> Params:
    return tuple(torch.zeros_like(p) for p in params)


def _check_lr(lr: float) -> None:
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")


# --------------------------------------------------------------------------- baselines
@dataclass(frozen=True)
class SGD:
    """torch.optim.SGD semantics (momentum buffer starts as the first gradient)."""

    lr: float = 0.1
    momentum: float = 0.9
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    name: str = "sgd"

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening == 0")

    def init_state(self, params: Params) -> State:
        return {"step": 0, "momentum": _zeros(params)}

    def update(self, grads, state, params=None):
        if self.weight_decay:
            grads = tuple(g + self.weight_decay * p for g, p in zip(grads, _need(params)))
        if self.momentum == 0:
            return tuple(-self.lr * g for g in grads), {**state, "step": state["step"] + 1}
        if state["step"] == 0:  # torch's buffer starts as a copy of the first gradient
            bufs = tuple(g.clone() for g in grads)
        else:
            bufs = tuple(
                self.momentum * b + (1 - self.dampening) * g
                for b, g in zip(state["momentum"], grads)
            )
        direction = (
            tuple(g + self.momentum * b for g, b in zip(grads, bufs)) if self.nesterov else bufs
        )
        new_state = {"step": state["step"] + 1, "momentum": bufs}
        return tuple(-self.lr * d for d in direction), new_state

    def linear_gain(self, state: State) -> float:
        """The update is ``-lr * k * g`` plus terms free of ``g`` (weight decay, the momentum
        buffer): ``k`` is 1 at the first step (the buffer starts as the gradient) and without
        momentum, ``1 - dampening`` later, and Nesterov adds ``momentum`` times that."""
        if self.momentum == 0:
            return -self.lr
        k = 1.0 if state["step"] == 0 else 1.0 - self.dampening
        return -self.lr * (1.0 + self.momentum * k if self.nesterov else k)


@dataclass(frozen=True)
class Adam:
    """torch.optim.Adam semantics (L2 weight decay added to the gradient)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    name: str = "adam"

    def __post_init__(self) -> None:
        _check_lr(self.lr)

    def init_state(self, params: Params) -> State:
        return {"step": 0, "exp_avg": _zeros(params), "exp_avg_sq": _zeros(params)}

    def update(self, grads, state, params=None):
        b1, b2 = self.betas
        if self.weight_decay:
            grads = tuple(g + self.weight_decay * p for g, p in zip(grads, _need(params)))
        step = state["step"] + 1
        m = tuple(b1 * m + (1 - b1) * g for m, g in zip(state["exp_avg"], grads))
        v = tuple(b2 * v + (1 - b2) * g * g for v, g in zip(state["exp_avg_sq"], grads))
        step_size = self.lr / (1 - b1**step)
        bc2_sqrt = (1 - b2**step) ** 0.5
        updates = tuple(-step_size * mi / (vi.sqrt() / bc2_sqrt + self.eps) for mi, vi in zip(m, v))
        return updates, {"step": step, "exp_avg": m, "exp_avg_sq": v}


@dataclass(frozen=True)
class Lion:
    """Lion (Chen et al. 2023): sign of interpolated momentum, decoupled weight decay."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    name: str = "lion"

    def __post_init__(self) -> None:
        _check_lr(self.lr)

    def init_state(self, params: Params) -> State:
        return {"step": 0, "exp_avg": _zeros(params)}

    def update(self, grads, state, params=None):
        b1, b2 = self.betas
        direction = tuple(
            torch.sign(b1 * m + (1 - b1) * g) for m, g in zip(state["exp_avg"], grads)
        )
        if self.weight_decay:
            direction = tuple(d + self.weight_decay * p for d, p in zip(direction, _need(params)))
        m = tuple(b2 * m + (1 - b2) * g for m, g in zip(state["exp_avg"], grads))
        return tuple(-self.lr * d for d in direction), {"step": state["step"] + 1, "exp_avg": m}


@dataclass(frozen=True)
class LionSGD:
    """lion_weight * Lion update + (1 - lion_weight) * SGD update, each with its own state."""

    lion: Lion = Lion()
    sgd: SGD = SGD()
    lion_weight: float = 0.5
    name: str = "lion_sgd"

    def __post_init__(self) -> None:
        if not 0.0 <= self.lion_weight <= 1.0:
            raise ValueError(f"lion_weight must be in [0, 1], got {self.lion_weight}")

    def init_state(self, params: Params) -> State:
        return {"lion": self.lion.init_state(params), "sgd": self.sgd.init_state(params)}

    def update(self, grads, state, params=None):
        u_lion, s_lion = self.lion.update(grads, state["lion"], params)
        u_sgd, s_sgd = self.sgd.update(grads, state["sgd"], params)
        w = self.lion_weight
        updates = tuple(w * a + (1 - w) * b for a, b in zip(u_lion, u_sgd))
        return updates, {"lion": s_lion, "sgd": s_sgd}


def _need(params: Params | None) -> Params:
    if params is None:
        raise ValueError("weight decay needs the current params: call update(grads, state, params)")
    return params


BASELINES = {"sgd": SGD, "adam": Adam, "lion": Lion, "lion_sgd": LionSGD}


def make_baseline(name: str, lr: float, **kwargs: Any) -> Optimizer:
    """Build a baseline by name.

    For ``lion_sgd``, ``lr`` is the SGD part's rate; ``lion_lr`` (default 1e-4), ``lion_betas``,
    ``lion_weight_decay`` configure the Lion part, ``momentum`` (default 0.9), ``nesterov``,
    ``weight_decay`` the SGD part, and ``lion_weight`` the mix.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown optimizer {name!r}; baselines are {sorted(BASELINES)}")
    if name == "lion_sgd":
        lion = {
            k.removeprefix("lion_"): kwargs.pop(k)
            for k in list(kwargs)
            if k in ("lion_lr", "lion_betas", "lion_weight_decay")
        }
        sgd = {
            k: kwargs.pop(k)
            for k in list(kwargs)
            if k in ("momentum", "dampening", "nesterov", "weight_decay")
        }
        if set(kwargs) - {"lion_weight"}:
            raise ValueError(f"unknown lion_sgd option(s) {sorted(set(kwargs) - {'lion_weight'})}")
        return LionSGD(Lion(**{"lr": 1e-4, **lion}), SGD(lr=lr, **sgd), **kwargs)
    try:
        return BASELINES[name](lr=lr, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad option for {name}: {err}") from err
