"""One optimizee step, the single definition used by meta-training, meta-testing and tuning.

The gradient an optimizer sees is always detached (as in Andrychowicz et al. 2016 and the
study): the learned optimizer is meta-trained through its *outputs*, not through second
derivatives of the optimizee's loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from l2o.optimizees import Optimizee
from l2o.optimizers import Optimizer, Params, State, apply_updates


class InnerStep(NamedTuple):
    loss: Tensor  # (P,) loss at the params *before* the update, on this minibatch
    grads: Params  # its gradient, detached: what the optimizer saw
    updates: Params
    params: Params  # params + updates
    state: State  # the optimizer's next state


def inner_step(
    optimizee: Optimizee,
    opt: Optimizer,
    params: Params,
    state: State,
    x: Tensor,
    y: Tensor,
    meta: bool = False,
) -> InnerStep:
    """Loss and gradient at ``params`` on ``(x, y)``, the optimizer's update, the new params.

    ``meta=False`` (meta-testing, tuning, meta-validation): everything returned is detached.
    ``meta=True`` (meta-training): params that already carry the graph of earlier updates keep
    it, and the loss, updates and new params stay on the graph of the learned optimizer's
    weights, so that a meta-loss over the unroll can be backpropagated.
    """
    if not meta or not params[0].requires_grad:
        params = tuple(p.detach().requires_grad_(True) for p in params)
    with torch.enable_grad():
        loss = optimizee.loss(params, x, y)
        grads = torch.autograd.grad(loss.sum(), params, retain_graph=meta)
    with torch.set_grad_enabled(meta):
        updates, new_state = opt.update(grads, state, params)
        new_params = apply_updates(params, updates)
    if not meta:
        loss = loss.detach()
        new_params = tuple(p.detach() for p in new_params)
        updates = tuple(u.detach() for u in updates)
    return InnerStep(loss, grads, updates, new_params, new_state)
