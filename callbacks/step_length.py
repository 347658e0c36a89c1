"""Cockpit's normalised step length, under ``step_length/`` (never ``alpha``: that name is the
tail index's)."""

from __future__ import annotations

import math

import lightning as L

from callbacks.base import Analysis
from l2o.analysis import Column, FigureSpec, Panel
from l2o.meta_testing import Snapshot
from l2o.optimizees import Optimizee
from l2o.step_length import step_length

VALUE = "step_length/normalized"
CONVEX = "step_length/convex"
DISTANCE = "step_length/distance"


class StepLength(Analysis):
    """Where the step lands in the loss's valley along the update (``l2o.step_length``)::

        step_length/normalized   -1 start, 0 valley floor, 1 opposite wall (NaN: fit not convex)
        step_length/convex       1 if the noise-weighted parabola fit is convex, else 0
        step_length/distance     ||theta_1 - theta_0||, the step's length in parameter space

    From the loss and the directional derivative along the update at both ends of the step,
    on the step's own minibatch, with their variances from the per-sample losses (two
    forward-mode products): for every optimizer of the protocol, since only the params
    before and after the step are needed. The mean of ``convex`` over steps is the share of
    steps with a defined value.

    Args:
        every_n_steps: analyse every this many optimizee steps (and always step 1).
        schedule: ``linear`` or ``log`` (``callbacks.base.schedule_steps``).
    """

    name = "step_length"
    title = "Normalised step length"

    def __init__(self, every_n_steps: int = 10, schedule: str = "linear") -> None:
        super().__init__(every_n_steps, schedule)

    def scalar_tags(self, optimizee: Optimizee) -> list[str]:
        return [VALUE, CONVEX, DISTANCE]

    def compute(self, snapshot: Snapshot, trainer: L.Trainer) -> dict[str, float]:
        x, y, optimizee = snapshot.x, snapshot.y, snapshot.optimizee
        after = tuple(p + u for p, u in zip(snapshot.params, snapshot.updates))
        res = step_length(lambda ps: optimizee.losses(ps, x, y), snapshot.params, after)
        # P = 1 at meta-test; over several members the mean of the convex ones
        convex = res.convex
        value = float(res.value[convex].double().mean()) if bool(convex.any()) else math.nan
        return {
            VALUE: value,
            CONVEX: float(convex.double().mean()),
            DISTANCE: float(res.distance.double().mean()),
        }

    def charts(self, optimizee: Optimizee) -> dict[str, list[str]]:
        return {
            "normalised step length (0: valley floor, 1: opposite wall)": [VALUE],
            "convex fit (1) or not (0)": [CONVEX],
            "step distance ||dtheta||": [DISTANCE],
        }

    def summary_columns(self, optimizee: Optimizee) -> list[Column]:
        return [Column(VALUE, "step length"), Column(CONVEX, "convex share")]

    def figure(self, optimizee: Optimizee) -> FigureSpec:
        return FigureSpec(
            "step_length",
            self.title,
            (
                Panel(
                    VALUE,
                    "Normalised step length (0: valley floor, 1: opposite wall)",
                    "step length (dimensionless)",
                    yscale="symlog",
                ),
                Panel(
                    DISTANCE,
                    "Length of the step",
                    "||theta_1 - theta_0|| (parameter)",
                    yscale="log",
                ),
                Panel(
                    CONVEX,
                    "Convex fit along the step (sanity: 1 = value defined)",
                    "share of convex fits",
                    ylim=(-0.05, 1.05),
                    sanity=True,
                ),
            ),
            ncols=3,
        )
