"""Any learned optimizer as a ``torch.optim.Optimizer``: the drop-in for your own model.

    from l2o import LearnedOptimizer
    opt = LearnedOptimizer(model.parameters(), checkpoint="runs/.../last.ckpt")
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

Each parameter is updated by the learned optimizer's protocol (``l2o.optimizers``) on a
population-of-one view of it (``p[None]``): ``p += lr * update``, with that parameter's protocol
state in ``self.state[p]``, so ``state_dict()`` / ``load_state_dict()`` resume exactly. Running
each tensor on its own gives what one call on all of them gives: both learned optimizers are
coordinatewise, and ``MLPLOpt``'s RMS normalisation is per tensor anyway.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class LearnedOptimizer(torch.optim.Optimizer):
    """A meta-trained learned optimizer, used like ``torch.optim.Adam``.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer. A group may
            set its own ``lr``.
        checkpoint: a meta-training checkpoint (``train.py fit``'s ``last.ckpt`` / ``best-*.ckpt``),
            loaded with ``torch.load(weights_only=True)`` by
            ``l2o.checkpoints.load_learned_optimizer``.
        learned_optimizer: a learned-optimizer module (``l2o.lstm.LSTMOptimizer``,
            ``l2o.mlp_lopt.MLPLOpt``, or any ``nn.Module`` with the optimizer protocol) instead of
            a checkpoint; or, with ``checkpoint``, the class that the checkpoint must hold.
        lr: scales the learned update (1.0 = as meta-trained); what ``torch.optim.lr_scheduler``
            schedules.

    The learned optimizer is copied (the copy is frozen, in eval mode, and survives
    ``copy.deepcopy`` and pickling); ``opt.learned_optimizer`` is that copy. It runs in each
    parameter's dtype and on its device (a converted copy per dtype and device). Parameters
    whose ``.grad`` is None (and empty ones) are skipped, as in torch.optim; sparse gradients
    are refused.
    Memory: the LSTM keeps 2 x layers x hidden (80 for the study's) numbers per coordinate,
    MLPLOpt one per momentum decay plus one.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        checkpoint: str | Path | None = None,
        learned_optimizer: nn.Module | type[nn.Module] | None = None,
        lr: float = 1.0,
    ) -> None:
        if isinstance(lr, Tensor) or not isinstance(lr, (int, float)) or not lr >= 0:
            raise ValueError(f"lr must be a number >= 0 (1.0 = as meta-trained), got {lr!r}")
        net = _resolve(checkpoint, learned_optimizer)
        super().__init__(params, {"lr": float(lr)})
        net = copy.deepcopy(net).eval()
        net.requires_grad_(False)
        self.learned_optimizer = net
        self._nets: dict[tuple[torch.device, torch.dtype], nn.Module] = {}

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        """One learned update of every parameter that has a gradient; returns the closure's
        loss when a closure is given (it is called with gradients enabled, first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepping = [(group["lr"], p) for group in self.param_groups for p in group["params"]]
        for _, p in stepping:  # refuse before touching anything
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(
                    "LearnedOptimizer does not support sparse gradients (got one for a parameter "
                    f"of shape {tuple(p.shape)}): use nn.Embedding(sparse=False), or a sparse "
                    "optimizer such as torch.optim.SparseAdam for that parameter"
                )
        for lr, p in stepping:
            if p.grad is None or p.numel() == 0:  # nothing to update (the LSTM cannot run on 0)
                continue
            net = self._net_for(p)
            view = (p.detach().unsqueeze(0),)  # a population of one
            state = self.state[p]
            if not state:
                state = net.init_state(view)
            (update,), new_state = net.update((p.grad.detach().unsqueeze(0),), state, view)
            self.state[p] = new_state
            if isinstance(lr, Tensor):
                p.add_(update[0] * lr)
            else:
                p.add_(update[0], alpha=lr)
        return loss

    def _net_for(self, p: Tensor) -> nn.Module:
        """The learned optimizer in p's dtype on p's device (the LSTM's cells need both)."""
        key = (p.device, p.dtype)
        if key not in self._nets:
            ref = next(self.learned_optimizer.parameters(), None)
            if ref is None or (ref.device, ref.dtype) == key:
                self._nets[key] = self.learned_optimizer
            else:
                self._nets[key] = copy.deepcopy(self.learned_optimizer).to(p.device, p.dtype)
        return self._nets[key]

    # ------------------------------------------------------------------ persistence
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, then a check that the state is this learned optimizer's for these
        parameters; a refused state dict leaves the optimizer as it was (not half-loaded)."""
        state, groups = self.state, self.param_groups
        try:
            super().load_state_dict(state_dict)
            self._check_states()
        except Exception:
            self.state, self.param_groups = state, groups
            raise

    def _check_states(self) -> None:
        """A state dict of another learned optimizer (or of Adam, or of this class with another
        config) fails here, not mid-step: each state must have the keys and tensor shapes that
        ``init_state`` gives the parameter (probed on the meta device: no memory)."""
        name = type(self.learned_optimizer).__name__
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                probe = self.learned_optimizer.init_state(
                    (torch.empty((1, *p.shape), dtype=p.dtype, device="meta"),)
                )
                if set(state) != set(probe):
                    raise ValueError(
                        f"this state dict holds state keys {sorted(state)}, but {name} uses "
                        f"{sorted(probe)}: it was saved by another optimizer"
                    )
                shapes = state.get("shapes")
                if shapes is not None and tuple(map(tuple, shapes)) != ((1, *p.shape),):
                    raise ValueError(
                        f"state dict state of shape {tuple(map(tuple, shapes))} for a parameter "
                        f"of shape {tuple(p.shape)}: the parameters are not the saved ones"
                    )
                for key, want in probe.items():
                    got = state[key]
                    if isinstance(want, Tensor) and (
                        not isinstance(got, Tensor) or got.shape != want.shape
                    ):
                        found = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
                        raise ValueError(
                            f"state {key!r} of a parameter of shape {tuple(p.shape)} is {found}, "
                            f"but this {name} makes {tuple(want.shape)}: the state dict was saved "
                            f"with another {name} config (this one: "
                            f"{self.learned_optimizer.config()})"
                        )

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults, state and param_groups: without this the meta-network would
        # be silently lost by copy.deepcopy and pickling.
        return {**super().__getstate__(), "learned_optimizer": self.learned_optimizer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # load_state_dict passes only state and param_groups
        self._nets = {}

    def __repr__(self) -> str:
        name = type(self).__name__
        head = f"{name}[{type(self.learned_optimizer).__name__}] ("
        return super().__repr__().replace(name + " (", head, 1)


def _resolve(
    checkpoint: str | Path | None, learned_optimizer: nn.Module | type[nn.Module] | None
) -> nn.Module:
    if isinstance(learned_optimizer, type):
        if checkpoint is None:
            raise ValueError(
                f"learned_optimizer={learned_optimizer.__name__} is a class: pass checkpoint=PATH "
                "to load its weights, or an instance"
            )
        return _load(checkpoint, learned_optimizer)
    if learned_optimizer is not None and checkpoint is not None:
        raise ValueError(
            "pass either checkpoint=PATH or learned_optimizer=MODULE, not both (a class with "
            "checkpoint= checks what the checkpoint holds)"
        )
    if checkpoint is not None:
        return _load(checkpoint, None)
    if learned_optimizer is None:
        raise ValueError(
            "LearnedOptimizer needs checkpoint=PATH (from `python train.py fit`) or "
            "learned_optimizer=MODULE (e.g. l2o.mlp_lopt.MLPLOpt())"
        )
    _check_protocol(learned_optimizer)
    return learned_optimizer


def _load(path: str | Path, expected: type[nn.Module] | None) -> nn.Module:
    from l2o.checkpoints import CheckpointError, load_learned_optimizer

    net, _ = load_learned_optimizer(path)
    if expected is not None and not isinstance(net, expected):
        found = f"{type(net).__module__}.{type(net).__qualname__}"
        raise CheckpointError(
            f"{path} holds a {found}, not the {expected.__module__}.{expected.__qualname__} "
            "asked for: pass that checkpoint's class, or the checkpoint of the one you want"
        )
    _check_protocol(net)
    return net


def _check_protocol(net: Any) -> None:
    if not isinstance(net, nn.Module) or not all(
        callable(getattr(net, f, None)) for f in ("init_state", "update")
    ):
        raise TypeError(
            "learned_optimizer must be an nn.Module with the optimizer protocol (init_state, "
            f"update), e.g. l2o.mlp_lopt.MLPLOpt(); got {type(net).__name__}"
        )
