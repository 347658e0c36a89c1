"""Truncation schedules: how long each inner run lasts, and when each member restarts.

Meta-training cuts inner runs into truncations of ``unroll`` steps (one ``training_step`` each).
A :class:`TruncationSchedule` keeps, for each *member* (an optimizee of the TBPTT population, or
an antithetic pair of PES), the length of its current run and how many steps it has done, and
says at every truncation which members start a fresh run:

- run lengths are constant, or drawn per run from a log-uniform distribution between bounds
  (short horizons often, long ones sometimes: learned_optimization's and Celo's practice);
- with ``desync=True`` each member's first run starts at a random step offset, so that members
  restart at different truncations and every truncation mixes early and late inner steps.

Runs start and end on truncation boundaries (lengths are multiples of ``unroll``): a member never
restarts in the middle of a truncation, so the carried state is replaced between truncations and
a truncation's meta-loss never mixes two runs (this keeps ``log`` of the truncation's summed
losses a per-run objective, see :mod:`l2o.estimators`). With unroll 20 and runs of hundreds of
steps the rounding is immaterial.

Every random draw is a function of (seed, member, run index), so the whole state is three
integer tensors (:meth:`TruncationSchedule.state_dict`): a resumed run continues exactly.

Per LightningModule ``training_step`` (members = population, or PES pairs)::

    trunc = schedule.next_truncation()        # trunc.restart: (M,) bool
    if trunc.restart.any():
        fresh = optimizee.init(M, generator)  # only the restarted rows are used
        params = restart_members(trunc.restart, fresh, params)
        state = restart_state(learned_optimizer, state, learned_optimizer.init_state(fresh),
                              trunc.restart)  # or pes.reset(carry, trunc.restart, fresh)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from l2o.data import seeded_generator
from l2o.optimizers import State
from l2o.trees import tree_map

DISTRIBUTIONS = ("constant", "log_uniform")
_LENGTH, _OFFSET = 0, 1  # salts: a run's length and its first-run offset are independent draws


def log_uniform(generator: torch.Generator, n: int, low: float, high: float) -> Tensor:
    """n draws (float64) with log X ~ U(log low, log high)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))


class Truncation(NamedTuple):
    restart: Tensor  # (M,) bool: members that start a fresh run at this truncation
    step: Tensor  # (M,) long: each member's step within its run at the truncation's start
    run: Tensor  # (M,) long: each member's run index (0 for its first run)


class TruncationSchedule:
    """Per-member inner-run lengths and step counters, advanced one truncation at a time.

    Args:
        members: optimizees that run side by side (TBPTT population, or PES pairs).
        unroll: optimizee steps per truncation; run lengths are multiples of it.
        min_steps: the run length (``constant``), or the lower bound (``log_uniform``).
        max_steps: upper bound of ``log_uniform`` lengths (ignored for ``constant``).
        distribution: ``constant`` or ``log_uniform`` (rounded to the nearest multiple of
            ``unroll`` inside [min_steps, max_steps]).
        desync: start each member's first run at a random truncation boundary of its run
            (uniform over 0, unroll, ..., length - unroll), so members restart at different
            truncations instead of in lockstep.
        seed: seed of the draws; mix in the DDP rank (e.g. ``seed * 1000 + rank``) for per-rank
            schedules.
    """

    def __init__(
        self,
        members: int,
        unroll: int,
        min_steps: int,
        max_steps: int | None = None,
        distribution: str = "constant",
        desync: bool = False,
        seed: int = 0,
    ) -> None:
        if members < 1 or unroll < 1:
            raise ValueError(f"members and unroll must be >= 1, got {members} and {unroll}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if distribution == "constant":
            if min_steps < unroll or min_steps % unroll:
                raise ValueError(
                    f"the run length min_steps={min_steps} must be a positive multiple of "
                    f"unroll={unroll}"
                )
            self.lo = self.hi = min_steps
        else:
            if max_steps is None or not 0 < min_steps <= max_steps:
                raise ValueError(
                    f"log_uniform needs 0 < min_steps <= max_steps, got {min_steps}, {max_steps}"
                )
            lo, hi = math.ceil(min_steps / unroll) * unroll, max_steps // unroll * unroll
            if lo > hi:
                raise ValueError(
                    f"no multiple of unroll={unroll} lies in [min_steps={min_steps}, "
                    f"max_steps={max_steps}]: widen the bounds"
                )
            self.lo, self.hi = lo, hi
        self.members, self.unroll = members, unroll
        self.min_steps, self.max_steps = min_steps, max_steps
        self.distribution, self.desync, self.seed = distribution, desync, seed
        self.steps = torch.zeros(members, dtype=torch.long)  # steps done in the current run
        self.lengths = torch.zeros(members, dtype=torch.long)  # 0: no run started yet
        self.runs = torch.zeros(members, dtype=torch.long)  # runs started so far

    # ------------------------------------------------------------------ draws
    def _generator(self, member: int, run: int, salt: int) -> torch.Generator:
        return seeded_generator(self.seed, member, run, salt)

    def draw_length(self, member: int, run: int) -> int:
        """The length of ``member``'s ``run``-th run (a pure function of seed, member, run)."""
        if self.distribution == "constant":
            return self.lo
        raw = log_uniform(
            self._generator(member, run, _LENGTH), 1, self.min_steps, self.max_steps
        ).item()
        return int(min(max(round(raw / self.unroll) * self.unroll, self.lo), self.hi))

    def draw_offset(self, member: int, length: int) -> int:
        """Where ``member``'s first run starts: a uniform truncation boundary in [0, length)."""
        if not self.desync:
            return 0
        slots = length // self.unroll
        gen = self._generator(member, 0, _OFFSET)
        return int(torch.randint(slots, (1,), generator=gen).item()) * self.unroll

    # ------------------------------------------------------------------ stepping
    def next_truncation(self) -> Truncation:
        """Start the next truncation: restart the members whose run is over (or that never
        started), and count the truncation's ``unroll`` steps."""
        restart = self.steps >= self.lengths  # also the never-started members (length 0)
        for m in torch.nonzero(restart).flatten().tolist():
            run = int(self.runs[m])
            length = self.draw_length(m, run)
            self.lengths[m] = length
            self.steps[m] = self.draw_offset(m, length) if run == 0 else 0
            self.runs[m] = run + 1
        out = Truncation(restart.clone(), self.steps.clone(), self.runs - 1)
        self.steps += self.unroll
        return out

    def force_restart(self, mask: Tensor | None = None) -> None:
        """Make the members in ``mask`` (all when None) restart at the next truncation, e.g.
        after a non-finite meta-loss."""
        mask = torch.ones(self.members, dtype=torch.bool) if mask is None else mask.cpu().bool()
        self.steps = torch.where(mask, self.lengths.clamp_min(1), self.steps)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Tensor]:
        return {"steps": self.steps.clone(), "lengths": self.lengths.clone(), "runs": self.runs}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key in ("steps", "lengths", "runs"):
            t = torch.as_tensor(state[key], dtype=torch.long).cpu()
            if t.shape != (self.members,):
                raise ValueError(
                    f"the saved schedule has {tuple(t.shape)} {key}, this one {self.members} "
                    "members: resume with the same population / pairs"
                )
            setattr(self, key, t.clone())


# --------------------------------------------------------------------------- restarts
def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(like.device).view(-1, *([1] * (like.dim() - 1)))


def restart_members(mask: Tensor, fresh: Any, old: Any) -> Any:
    """Per tensor leaf of two same-structured pytrees whose tensors have a leading member dim:
    the rows of ``fresh`` where ``mask`` (M,) is set, the rows of ``old`` elsewhere. Non-tensor
    leaves must be equal in both (e.g. the LSTM's ``shapes``). For params, PES carries, and
    states made of per-member tensors."""

    def pick(new: Any, cur: Any) -> Any:
        if not isinstance(cur, Tensor):
            if new != cur:  # e.g. a step count shared by the whole population
                raise ValueError(
                    f"the state holds a shared entry ({cur!r}, fresh: {new!r}) that cannot be "
                    "restarted per member: give it a leading member dim"
                )
            return cur
        if cur.dim() == 0 or cur.shape[0] != mask.shape[0]:
            raise ValueError(
                f"a tensor of shape {tuple(cur.shape)} has no leading member dim of "
                f"{mask.shape[0]}: this state needs its own restart rule"
            )
        return torch.where(_rows(mask, cur), new.to(cur.dtype), cur)

    return tree_map(pick, fresh, old)


def lstm_member_rows(shapes: Sequence[Sequence[int]], mask: Tensor) -> Tensor:
    """Coordinate rows of the LSTM state that belong to the members in ``mask`` (P,).

    ``LSTMOptimizer`` keeps ``h, c: (layers, n, hidden)`` with n = all coordinates of all
    members: tensor j (shape ``shapes[j] = (P, *s_j)``) flattened P-major, then the tensors
    concatenated. Member m thus owns, in tensor j's block, the prod(s_j) rows starting at
    m * prod(s_j). Returns an (n,) bool mask.
    """
    parts = []
    for shape in shapes:
        if shape[0] != mask.shape[0]:
            raise ValueError(f"state of population {shape[0]}, mask of {mask.shape[0]} members")
        parts.append(mask.bool().repeat_interleave(math.prod(shape[1:])))
    return torch.cat(parts)


def restart_state(learned_optimizer: Any, state: State, fresh: State, mask: Tensor) -> State:
    """The learned optimizer's state with the members in ``mask`` (P,) taken from ``fresh``.

    Uses the optimizer's own ``restart_members(state, fresh, mask)`` when it has one; the LSTM's
    coordinate-concatenated layout through :func:`lstm_member_rows`; otherwise every tensor of
    the state must have a leading member dim (:func:`restart_members`).
    """
    from l2o.lstm import LSTMOptimizer

    own = getattr(learned_optimizer, "restart_members", None)
    if callable(own):
        return own(state, fresh, mask)
    if isinstance(learned_optimizer, LSTMOptimizer):
        rows = lstm_member_rows(state["shapes"], mask).to(state["h"].device)
        keep = rows.view(1, -1, 1)
        return {
            **state,
            "h": torch.where(keep, fresh["h"], state["h"]),
            "c": torch.where(keep, fresh["c"], state["c"]),
        }
    return restart_members(mask, fresh, state)
