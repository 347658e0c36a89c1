"""The normalised step length: where on the loss's valley along the update a step lands.

Cockpit's "Alpha" quantity (Schneider, Dangel & Hennig, NeurIPS 2021, §3 and App. C), named
``step_length`` here because this project's alpha is the tail index. Along the update
d = θ₁ − θ₀, with s ∈ [0, 1] the fraction of the step (θ(s) = θ₀ + s d), fit a parabola

    q(s) = c + b s + a s²

to four noisy observations: the minibatch loss f at both ends and its directional derivative
g = ⟨∇L, d⟩ at both ends, weighted by the inverse of their variances (a maximum-likelihood fit
under Gaussian noise; the variances come from the per-sample losses and per-sample directional
derivatives: var = sample variance / N, the variance of a mean of N). If the fit is convex
(a > 0) its minimum is at s* = −b / (2a), and

    step_length = 1 / s* − 1 = −2a / b − 1,

the end point's position on the parabola rescaled so that the start is at −1, the valley floor
at 0 and the point opposite the start, at the same height, at +1. So −0.5 is a step half way
to the floor, 1 jumps to the opposite wall, > 1 climbs higher than it started, < −1 moved uphill.
A concave or flat fit (a <= 0) has no floor: the value is NaN and ``convex`` is False (Cockpit
logs −1 there; NaN keeps those steps from looking like "no progress"). Only the ratio of a to
b enters, so the length of d (reported as ``distance``) and a common scale of the four
variances do not matter.

Works for every optimizer: it needs only the params before and after the step and a function
that gives the per-sample losses on a minibatch. The per-sample directional derivatives are one
forward-mode product (a jvp) of the per-sample loss vector along d at each end:
exact inside a BatchNorm batch too, where the samples are coupled by the batch statistics
(their "noise" variance is then a heuristic, as for any per-sample quantity in BatchNorm). Cost:
two jvps, ~3-4 forward passes.

By default both ends are evaluated on the same minibatch (the one the step was computed from):
the step's own valley. Cockpit reads the end on the *next* minibatch (it reuses the next
training step's forward pass); pass ``end_losses_fn`` for that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor

Params = tuple[Tensor, ...]


class StepLength(NamedTuple):
    value: Tensor  # (P,) the normalised step length; NaN where the fit is not convex
    convex: Tensor  # (P,) bool: a > 0
    distance: Tensor  # (P,) ||θ₁ − θ₀||
    coeffs: Tensor  # (P, 3) the fit's (c, b, a) in q(s) = c + b s + a s², s in [0, 1]
    observations: Tensor  # (P, 4) f(0), f(1), g(0), g(1), g = <∇L, θ₁ − θ₀>
    variances: Tensor  # (P, 4) their variances (of the minibatch means)


def fit_step_length(observations: Tensor, variances: Tensor) -> StepLength:
    """The noise-weighted parabola fit and the step length, from the four observations.

    Args:
        observations: (P, 4) or (4,): f(0), f(1), g(0), g(1) with g the derivative along the
            whole step (``<∇L, θ₁ − θ₀>``).
        variances: same shape, the variance of each observation (>= 0).

    Zero variances (a noise-free observation) are floored at 1e-12 of the largest of the four,
    so they act as near-constraints; four zeros give an unweighted least-squares fit. The
    ``distance`` field is NaN (unknown here).
    """
    obs = torch.as_tensor(observations)
    var = torch.as_tensor(variances)
    if obs.shape[-1:] != (4,) or obs.dim() > 2 or var.shape != obs.shape:
        raise ValueError(
            f"observations and variances must both be (P, 4) or (4,), got {tuple(obs.shape)} "
            f"and {tuple(var.shape)}"
        )
    if not torch.isfinite(obs).all() or not torch.isfinite(var).all():
        raise ValueError("observations and variances must be finite")
    if (var < 0).any():
        raise ValueError("variances must be >= 0")
    squeeze = obs.dim() == 1
    obs, var = obs.reshape(-1, 4).double(), var.reshape(-1, 4).double()
    # Rows: q(0) = c, q(1) = c + b + a, q'(0) = b, q'(1) = b + 2a, on the unknowns (c, b, a).
    design = torch.tensor(
        [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0]],
        dtype=torch.float64,
        device=obs.device,
    )
    top = var.amax(1, keepdim=True)
    floor = torch.where(top > 0, top * 1e-12, torch.ones_like(top))
    w = var.clamp_min(0).maximum(floor).rsqrt()  # sqrt of the weights 1 / var
    coeffs = torch.linalg.lstsq(design * w[:, :, None], (obs * w)[:, :, None]).solution[..., 0]
    b, a = coeffs[:, 1], coeffs[:, 2]
    convex = a > 0
    value = torch.where(convex, -2 * a / b - 1, torch.full_like(a, float("nan")))
    nan = torch.full_like(a, float("nan"))
    out = StepLength(value, convex, nan, coeffs, obs, var)
    if squeeze:
        out = StepLength(*(t[0] for t in out))
    return out


def step_length(
    losses_fn: Callable[[Params], Tensor],
    params_before: Params,
    params_after: Params,
    end_losses_fn: Callable[[Params], Tensor] | None = None,
) -> StepLength:
    """The normalised step length of the step params_before -> params_after, per member.

    Args:
        losses_fn: ``params -> (P, N)`` per-sample losses on a minibatch (N >= 2), e.g.
            ``lambda ps: optimizee.losses(ps, x, y)``; its mean over N is the minibatch loss.
        params_before, params_after: tuples of tensors with a leading population dim P.
        end_losses_fn: the losses at the end point, if another minibatch (Cockpit's choice);
            default ``losses_fn``.

    A member whose params did not move gets NaN (and ``convex`` False).
    """
    before = _check(params_before, "params_before")
    after = _check(params_after, "params_after")
    if [p.shape for p in before] != [p.shape for p in after]:
        raise ValueError("params_before and params_after must have the same shapes")
    with torch.no_grad():
        direction = tuple((b - a).detach() for a, b in zip(before, after))
    f0, g0 = _losses_and_slopes(losses_fn, before, direction)
    f1, g1 = _losses_and_slopes(end_losses_fn or losses_fn, after, direction)
    if f0.shape[0] != before[0].shape[0]:
        raise ValueError(
            f"losses_fn must return (P, N) = ({before[0].shape[0]}, N) losses, got "
            f"{tuple(f0.shape)}"
        )
    obs = torch.stack([f0.mean(1), f1.mean(1), g0.mean(1), g1.mean(1)], 1)
    var = torch.stack([_var_of_mean(t) for t in (f0, f1, g0, g1)], 1)
    fit = fit_step_length(obs, var)
    distance = sum(d.double().flatten(1).square().sum(1) for d in direction).sqrt()
    moved = distance > 0
    value = torch.where(moved, fit.value, torch.full_like(fit.value, float("nan")))
    return fit._replace(value=value, convex=fit.convex & moved, distance=distance)


def _losses_and_slopes(losses_fn, params: Params, direction: Params) -> tuple[Tensor, Tensor]:
    """Per-sample losses (P, N) and their derivatives along ``direction``: one jvp (forward-mode
    dual tensors: ~2x cheaper than torch.func.jvp's wrappers here)."""
    with torch.no_grad(), fwad.dual_level():
        duals = tuple(fwad.make_dual(p, d) for p, d in zip(params, direction))
        losses, slopes = fwad.unpack_dual(losses_fn(duals))
    if slopes is None:  # the losses do not depend on the params
        slopes = torch.zeros_like(losses)
    if losses.dim() != 2 or losses.shape[1] < 2:
        raise ValueError(
            f"losses_fn must return per-sample losses (P, N) with N >= 2, got {tuple(losses.shape)}"
        )
    return losses.detach().double(), slopes.detach().double()


def _var_of_mean(t: Tensor) -> Tensor:
    return t.var(1, unbiased=True) / t.shape[1]


def _check(params: Params, what: str) -> Params:
    if not isinstance(params, (tuple, list)) or not params:
        raise ValueError(f"{what} must be a non-empty tuple of tensors")
    params = tuple(p.detach() for p in params)
    pop = params[0].shape[0] if params[0].dim() else 0
    if not pop or any(p.dim() == 0 or p.shape[0] != pop for p in params):
        raise ValueError(
            f"{what} need a shared leading population dim: {[tuple(p.shape) for p in params]}"
        )
    return params
