"""Any ``torch.optim.Optimizer`` in the optimizer protocol, run functionally.

:class:`TorchOptimizer` wraps an optimizer class and its options so that it behaves like the
project's baselines::

    opt = make_torch_optimizer("torch.optim.RAdam", lr=1e-3, betas=(0.9, 0.99))
    state = opt.init_state(params)
    updates, state = opt.update(grads, state, params)     # params + updates: the next params

Every call builds a throwaway instance of the optimizer over *copies* of the params, loads the
state (a deep copy of the optimizer's ``state_dict()``), sets ``.grad`` to copies of the grads,
calls ``step()`` once, and reads back ``update = new_param - param`` and the new ``state_dict()``.
Nothing of the caller's tensors is touched, so the analyses can replay an update on any gradient
under the current state without advancing the run (gradients with extra leading dims: a batch
replayed against one state, as the protocol says).

Population: params carry a leading population dim P. Optimizers that are known to act on each
coordinate separately (:data:`ELEMENTWISE`: SGD, Adam, AdamW, RAdam, NAdam, ...) see the P
members as one tensor per parameter; any other optimizer (Muon, Prodigy, SOAP, Adafactor: they
couple the coordinates of a matrix, of a tensor, or of all tensors) runs once per member, on
that member's own tensors, with its own state. A batch of N replayed gradients is stacked into
one big parameter for an elementwise optimizer (one ``step()`` for all N, tested equal to the
loop) and looped over otherwise.

Precision: the update is read back as a difference ``new - old``. In float32 that difference
carries the rounding of ``new`` (~6e-8 |param|), large against small updates, so by default the
optimizer runs in float64 on float32/float16 params (``upcast``) and the update and the state
are cast back; third-party optimizers that hard-code their state dtype (heavyball) run in the
params' own dtype.

Schedule-free optimizers (``schedulefree.AdamWScheduleFree`` and kin) keep two sequences: y,
where the gradient is evaluated (the point their ``.train()`` mode puts in the model), and x,
the averaged point their ``.eval()`` mode puts there for evaluation. The protocol's params are
y: the optimizee's training loss and gradient are taken there, exactly as in training with
schedule-free. :meth:`TorchOptimizer.eval_params` gives x, the point at which schedule-free
means the model to be *evaluated* (test loss, accuracy); for every other optimizer it returns
the params unchanged.

The updates are detached: these optimizers are baselines, not meta-trained.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from l2o.optimizers import Optimizer, Params, State

# Classes whose update of a coordinate reads only that coordinate (and scalars that depend on
# the step count and the hyperparameters): a batch of replays stacked as one big tensor gives
# each replay exactly its own update. Checked by name so that the optional packages need not
# be importable; a subclass is *not* assumed elementwise (it may override step).
ELEMENTWISE = frozenset(
    {
        "torch.optim.SGD",
        "torch.optim.Adam",
        "torch.optim.AdamW",
        "torch.optim.RAdam",
        "torch.optim.NAdam",
        "torch.optim.Adagrad",
        "torch.optim.RMSprop",
        "torch.optim.Adamax",
        "torch.optim.Adadelta",
        "torch.optim.Rprop",
        "torch.optim.ASGD",
        "schedulefree.AdamWScheduleFree",
        "schedulefree.SGDScheduleFree",
        "schedulefree.RAdamScheduleFree",
    }
)
# Optimizers that cannot be replayed as one step on a given gradient.
NOT_REPLAYABLE = {
    "torch.optim.LBFGS": "it re-evaluates the loss through its closure several times per step",
    "torch.optim.SparseAdam": "it takes sparse gradients only",
    "heavyball.SAMWrapper": "it evaluates the loss through its closure twice per step",
}
# Packages whose optimizers run correctly in float64 (see the module docstring's precision).
UPCAST_SAFE_PACKAGES = ("torch", "schedulefree", "prodigyopt")
# Classes that take tensors of one ndim only: make_torch_optimizer routes the others.
MATRIX_ONLY = {"torch.optim.Muon": 2}


def dotted_path(cls: type) -> str:
    """'torch.optim.RAdam' for torch.optim.RAdam (the public path, not torch.optim.radam.RAdam)."""
    module = cls.__module__
    parts = module.split(".")
    # Prefer the shortest importable module path that exposes the class.
    for k in range(1, len(parts) + 1):
        candidate = ".".join(parts[:k])
        try:
            if getattr(importlib.import_module(candidate), cls.__name__, None) is cls:
                return f"{candidate}.{cls.__name__}"
        except ImportError:  # pragma: no cover - the module imported once already
            continue
    return f"{module}.{cls.__name__}"


def resolve_class(spec: str | type) -> type:
    """An optimizer class from itself or from its dotted path ('torch.optim.RAdam')."""
    if isinstance(spec, type):
        cls = spec
    elif isinstance(spec, str):
        module_name, _, name = spec.rpartition(".")
        if not module_name:
            raise ValueError(
                f"optimizer class path {spec!r} must be dotted, e.g. torch.optim.RAdam"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(
                f"cannot import {module_name!r} for optimizer {spec!r} ({err}); the zoo's "
                "optimizers come with the optional extra: pip install -e '.[zoo]'"
            ) from err
        cls = getattr(module, name, None)
        if cls is None:
            raise ValueError(f"module {module_name!r} has no optimizer {name!r}")
    else:
        raise TypeError(f"optimizer class must be a class or a dotted path, got {spec!r}")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"{spec!r} is not a torch.optim.Optimizer subclass")
    return cls


def check_replayable(cls: type) -> None:
    """Raise for optimizers whose step is not one update of one given gradient."""
    path = dotted_path(cls)
    if path in NOT_REPLAYABLE:
        raise ValueError(f"{path} cannot be replayed functionally: {NOT_REPLAYABLE[path]}")
    closure = inspect.signature(cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"{path} cannot be replayed functionally: its step() requires a closure that "
            "re-evaluates the loss (use its closure-free variant, if any)"
        )


# --------------------------------------------------------------------------- the adapter
@dataclass(frozen=True)
class TorchOptimizer:
    """A ``torch.optim.Optimizer`` class and its options as a protocol optimizer.

    Args:
        optimizer_class: the class, or its dotted path (``"torch.optim.RAdam"``,
            ``"schedulefree.AdamWScheduleFree"``).
        lr: the learning rate (``lr=`` of the constructor); None keeps the class's default.
            Read back as ``.lr`` (evaluate.py's ``lr: tune`` builds one adapter per rate).
        options: the constructor's other keyword arguments.
        elementwise: whether the update of a coordinate reads only that coordinate; None looks
            the class up in :data:`ELEMENTWISE`. True enables the stacked population and the
            stacked batch replay; claim it only for such optimizers.
        upcast: run the optimizer in float64 on lower-precision params (see the module
            docstring); None: on for torch.optim, schedulefree and prodigyopt.
        name: defaults to the class name, lower-cased.

    Raises ``ValueError`` at construction for optimizers that cannot be replayed (L-BFGS, any
    step that requires a closure, SparseAdam) and for options the class rejects.
    """

    optimizer_class: type | str
    lr: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    elementwise: bool | None = None
    upcast: bool | None = None
    name: str = ""

    def __post_init__(self) -> None:
        cls = resolve_class(self.optimizer_class)
        object.__setattr__(self, "optimizer_class", cls)
        check_replayable(cls)
        path = dotted_path(cls)
        if "lr" in self.options:
            raise ValueError(f"give the learning rate of {path} as lr=, not in options")
        if "params" in self.options:
            raise ValueError("options must not contain 'params': the adapter passes them")
        object.__setattr__(self, "options", dict(self.options))
        if self.elementwise is None:
            object.__setattr__(self, "elementwise", path in ELEMENTWISE)
        if self.upcast is None:
            object.__setattr__(self, "upcast", path.split(".")[0] in UPCAST_SAFE_PACKAGES)
        if not self.name:
            object.__setattr__(self, "name", cls.__name__.lower())
        # Validate the options now (a clear error before any step), on a 2-D probe tensor:
        # 2-D suits every class, including Muon.
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        probe = self._build([torch.zeros(2, 2)])
        if self.lr is None:
            object.__setattr__(self, "lr", probe.param_groups[0].get("lr"))

    @property
    def class_path(self) -> str:
        return dotted_path(self.optimizer_class)

    def _kwargs(self) -> dict[str, Any]:
        return {**self.options, **({} if self.lr is None else {"lr": self.lr})}

    def _build(self, leaves: list[Tensor]) -> torch.optim.Optimizer:
        try:
            return self.optimizer_class(leaves, **self._kwargs())
        except (TypeError, ValueError) as err:
            shapes = [tuple(t.shape) for t in leaves]
            raise ValueError(
                f"{self.class_path}({self._kwargs()}) on tensors of shapes {shapes}: {err}"
            ) from err

    # ------------------------------------------------------------------ protocol
    def init_state(self, params: Params) -> State:
        params = _check_params(params)
        groups = [list(params)] if self.elementwise else _members(params)
        members = []
        for group in groups:
            leaves = [self._work(p) for p in group]
            opt = self._build(leaves)
            _enter_train_mode(opt)
            members.append(self._export(opt, group))
        return {"step": 0, "members": tuple(members)}

    def update(
        self, grads: Params, state: State, params: Params | None = None
    ) -> tuple[Params, State]:
        if params is None:
            raise ValueError(
                f"{self.name}: a torch.optim optimizer needs the current params: call "
                "update(grads, state, params)"
            )
        params = _check_params(params)
        extra = _extra_dims(grads, params)
        members = state["members"]
        expected = 1 if self.elementwise else params[0].shape[0]
        if len(members) != expected:
            raise ValueError(
                f"{self.name}: the state holds {len(members)} member(s) but the params need "
                f"{expected}: was it made by init_state on these params?"
            )
        with torch.no_grad():
            if not extra:
                return self._step_all(grads, state, params)
            lead = grads[0].shape[: len(extra)]
            n = int(torch.Size(lead).numel())
            flat = tuple(g.reshape(n, *p.shape) for g, p in zip(grads, params))
            if self.elementwise:
                updates = self._replay_stacked(flat, members[0], params)
            else:
                updates = self._replay_loop(flat, members, params)
            return tuple(u.reshape(*lead, *p.shape) for u, p in zip(updates, params)), state

    def eval_params(self, params: Params, state: State) -> Params:
        """The point at which the optimizer means the model to be evaluated.

        For schedule-free optimizers, x (what their ``.eval()`` puts in the model): the
        average of the iterates, not y where the gradient was taken. Every other optimizer
        evaluates at the params themselves (returned unchanged).
        """
        if not callable(getattr(self.optimizer_class, "eval", None)):
            return params
        params = _check_params(params)
        with torch.no_grad():
            groups = [list(params)] if self.elementwise else _members(params)
            out: list[list[Tensor]] = []
            for group, member in zip(groups, state["members"], strict=True):
                leaves = [self._work(p) for p in group]
                opt = self._load(leaves, member)
                opt.eval()
                out.append([leaf.to(p.dtype) for leaf, p in zip(leaves, group)])
            return tuple(out[0]) if self.elementwise else tuple(map(torch.stack, zip(*out)))

    # ------------------------------------------------------------------ internals
    def _work(self, t: Tensor) -> Tensor:
        """A private copy of t, in float64 when upcasting."""
        dtype = torch.float64 if self.upcast and t.is_floating_point() else t.dtype
        return t.detach().to(dtype=dtype, copy=True)

    def _export(self, opt: torch.optim.Optimizer, like: list[Tensor]) -> dict:
        """A private copy of opt.state_dict(), tensors cast back to the params' dtype."""
        dtype = like[0].dtype

        def back(t: Tensor) -> Tensor:
            if self.upcast and t.is_floating_point() and t.dim() > 0:
                return t.to(dtype=dtype, copy=True)
            return t.clone()

        return _map_tensors(opt.state_dict(), back)

    def _load(self, leaves: list[Tensor], member: dict) -> torch.optim.Optimizer:
        opt = self._build(leaves)

        def fwd(t: Tensor) -> Tensor:
            if self.upcast and t.is_floating_point() and t.dim() > 0:
                return t.to(dtype=torch.float64, copy=True)
            return t.clone()

        opt.load_state_dict(_map_tensors(member, fwd))
        # The adapter's learning rate wins over the one saved in the state (a state reused
        # across a tuning grid). Only lr: other options may be transformed by a constructor.
        if self.lr is not None:
            for group in opt.param_groups:
                if "lr" in group:
                    group["lr"] = self.lr
        return opt

    def _step(self, group: list[Tensor], grads: list[Tensor], member: dict, export: bool = True):
        leaves = [self._work(p) for p in group]
        before = [leaf.clone() for leaf in leaves]
        opt = self._load(leaves, member)
        for leaf, g in zip(leaves, grads):
            leaf.grad = g.detach().to(dtype=leaf.dtype, copy=True)
        opt.step()
        updates = [(a - b).to(p.dtype) for a, b, p in zip(leaves, before, group)]
        return updates, (self._export(opt, group) if export else None)

    def _step_all(self, grads: Params, state: State, params: Params):
        if self.elementwise:
            updates, member = self._step(list(params), list(grads), state["members"][0])
            new_members = (member,)
        else:
            per_member, new = [], []
            for m, (group, member) in enumerate(zip(_members(params), state["members"])):
                u, member = self._step(group, [g[m] for g in grads], member)
                per_member.append(u)
                new.append(member)
            updates = [torch.stack(us) for us in zip(*per_member)]
            new_members = tuple(new)
        return tuple(updates), {"step": state["step"] + 1, "members": new_members}

    def _replay_stacked(self, grads: Params, member: dict, params: Params) -> list[Tensor]:
        """N replays of an elementwise optimizer as one step on (N, *shape) parameters."""
        n = grads[0].shape[0]
        shapes = [tuple(p.shape) for p in params]

        def widen(t: Tensor, shape: tuple[int, ...]) -> Tensor:
            return t.expand(n, *shape) if tuple(t.shape) == shape else t

        member = copy.copy(member)
        member["state"] = {
            k: {key: _map_tensors(v, lambda t, s=shapes[k]: widen(t, s)) for key, v in st.items()}
            for k, st in member["state"].items()
        }
        wide = [p.expand(n, *p.shape) for p in params]
        updates, _ = self._step(wide, list(grads), member, export=False)
        return updates

    def _replay_loop(self, grads: Params, members: tuple, params: Params) -> list[Tensor]:
        out = []
        for i in range(grads[0].shape[0]):
            per_member = [
                self._step(group, [g[i, m] for g in grads], member, export=False)[0]
                for m, (group, member) in enumerate(zip(_members(params), members))
            ]
            out.append([torch.stack(us) for us in zip(*per_member)])
        return [torch.stack(us) for us in zip(*out)]


# --------------------------------------------------------------------------- composites
@dataclass(frozen=True)
class ByNdim:
    """Route each parameter tensor by its per-member ndim: ``ndim``-D tensors to ``matrix``,
    the others to ``other`` (e.g. Muon on the weight matrices, AdamW on biases and BatchNorm
    parameters, as torch.optim.Muon's documentation prescribes). Both are protocol optimizers.
    ``lr`` is the matrix optimizer's."""

    matrix: Optimizer
    other: Optimizer
    ndim: int = 2
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(
                self, "name", f"{self.matrix.name}+{getattr(self.other, 'name', 'other')}"
            )

    @property
    def lr(self) -> float | None:
        return getattr(self.matrix, "lr", None)

    def eval_params(self, params: Params, state: State) -> Params:
        out = list(params)
        for key, opt in (("matrix", self.matrix), ("other", self.other)):
            idx = state["index"][key]
            if idx and hasattr(opt, "eval_params"):
                for i, p in zip(idx, opt.eval_params(_pick(params, idx), state[key])):
                    out[i] = p
        return tuple(out)

    def init_state(self, params: Params) -> State:
        params = _check_params(params)
        matrix = tuple(i for i, p in enumerate(params) if p.dim() - 1 == self.ndim)
        other = tuple(i for i in range(len(params)) if i not in matrix)
        return {
            "index": {"matrix": matrix, "other": other},
            "matrix": self.matrix.init_state(_pick(params, matrix)) if matrix else None,
            "other": self.other.init_state(_pick(params, other)) if other else None,
        }

    def update(self, grads, state, params=None):
        out: list[Tensor | None] = [None] * len(grads)
        new_state = dict(state)
        for key, opt in (("matrix", self.matrix), ("other", self.other)):
            idx = state["index"][key]
            if not idx:
                continue
            sub = None if params is None else _pick(params, idx)
            updates, new_state[key] = opt.update(_pick(grads, idx), state[key], sub)
            for i, u in zip(idx, updates):
                out[i] = u
        return tuple(out), new_state


def make_torch_optimizer(
    optimizer_class: str | type,
    lr: float | None = None,
    *,
    other: Mapping[str, Any] | None = None,
    elementwise: bool | None = None,
    upcast: bool | None = None,
    name: str = "",
    **options: Any,
) -> Optimizer:
    """A protocol optimizer from a torch.optim-style class path and its options.

    ``make_torch_optimizer("torch.optim.RAdam", 1e-3, betas=(0.9, 0.99))``. For a class that
    takes 2-D parameters only (``torch.optim.Muon``) the other tensors go to ``other``, a spec
    ``{"class_path": ..., **options}`` (default, as in Muon's documentation: AdamW with
    lr = 3e-4, weight_decay = 0.01); ``other`` also routes the non-2-D tensors of any class.
    """
    cls = resolve_class(optimizer_class)
    main = TorchOptimizer(cls, lr, options, elementwise, upcast, name)
    ndim = MATRIX_ONLY.get(dotted_path(cls))
    if other is None and ndim is None:
        return main
    if other is None:
        other = {"class_path": "torch.optim.AdamW", "lr": 3e-4, "weight_decay": 0.01}
    other = dict(other)
    if "class_path" not in other:
        raise ValueError(f"other={other} needs a class_path, e.g. torch.optim.AdamW")
    other_cls = other.pop("class_path")
    other_lr = other.pop("lr", None)
    rest = TorchOptimizer(other_cls, other_lr, other)
    return ByNdim(main, rest, ndim or 2, name or f"{main.name}+{rest.name}")


# --------------------------------------------------------------------------- helpers
def _check_params(params: Params) -> Params:
    if not isinstance(params, (tuple, list)) or not params:
        raise ValueError(
            "params must be a non-empty tuple of tensors with a leading population dim"
        )
    params = tuple(params)
    pop = params[0].shape[0] if params[0].dim() else None
    if pop is None or any(p.dim() == 0 or p.shape[0] != pop for p in params):
        shapes = [tuple(p.shape) for p in params]
        raise ValueError(f"params need one leading population dim shared by all: {shapes}")
    return params


def _members(params: Params) -> list[list[Tensor]]:
    return [[p[m] for p in params] for m in range(params[0].shape[0])]


def _pick(seq, idx):
    return tuple(seq[i] for i in idx)


def _extra_dims(grads: Params, params: Params) -> tuple[int, ...]:
    """The leading dims of grads beyond params' shapes (the replay batch), checked."""
    if len(grads) != len(params):
        raise ValueError(f"{len(grads)} gradient tensors for {len(params)} parameter tensors")
    k = grads[0].dim() - params[0].dim()
    for i, (g, p) in enumerate(zip(grads, params)):
        if g.dim() - p.dim() != k or k < 0 or tuple(g.shape[k:]) != tuple(p.shape):
            raise ValueError(
                f"gradient {i} has shape {tuple(g.shape)}; expected (*batch, {tuple(p.shape)})"
            )
        if tuple(g.shape[:k]) != tuple(grads[0].shape[:k]):
            raise ValueError("all gradients need the same leading batch dims")
    return tuple(grads[0].shape[:k])


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """A copy of a nested dict/list/tuple with fn applied to every tensor."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_map_tensors(v, fn) for v in obj)
    return copy.deepcopy(obj)


def _enter_train_mode(opt: torch.optim.Optimizer) -> None:
    """Schedule-free optimizers step only in train mode; the gradient point y is the params."""
    train, evaluate = getattr(opt, "train", None), getattr(opt, "eval", None)
    if callable(train) and callable(evaluate):
        train()
