"""Symmetry breaking of each optimizer step, logged under ``symmetry/``."""

from __future__ import annotations

from typing import Any

import lightning as L

from callbacks.base import MetaTestCallback
from l2o.optimizees import MLPOptimizee
from l2o.symmetry import CONSTRAINTS, constraints_of, symmetry_metrics

STATISTICS = ("abs_sum", "signed_sum", "normalized")


class SymmetryBreaking(MetaTestCallback):
    """Deviation of the step ``Delta = -update`` from the optimizee's symmetry constraints.

    For every constraint of ``l2o.symmetry.constraints_of(optimizee)`` (``rescale`` for
    (Leaky) ReLU networks, ``scale`` with BatchNorm, ``translation`` always) it logs the statistics
    of ``l2o.symmetry.summarize``::

        symmetry/update/<constraint>/<abs_sum|signed_sum|normalized>   for Delta = -update
        symmetry/grad/<constraint>/<abs_sum|signed_sum|normalized>     for Delta = grad

    The gradient line is the sanity check: gradients obey every constraint, so it sits at ~0
    (float rounding, plus O(eps) for BatchNorm's ``scale``). Plain SGD steps ``Delta = lr * grad``
    and so logs exactly ``lr`` times the gradient line; an optimizer that breaks the symmetry
    logs far more. Works for every optimizer of the protocol: it only reads the snapshot.

    Args:
        every_n_steps: analyse every this many optimizee steps (and always step 1). Cheap: a
            few inner products per neuron.
    """

    tag_prefix = "symmetry/"

    def __init__(self, every_n_steps: int = 1) -> None:
        super().__init__(every_n_steps)

    def tags(self, optimizee: MLPOptimizee | None = None) -> list[str]:
        """The tags for ``optimizee``'s constraints (``None``: every constraint)."""
        constraints = CONSTRAINTS if optimizee is None else constraints_of(optimizee)
        return [
            f"{self.tag_prefix}{kind}/{c}/{s}"
            for kind in ("update", "grad")
            for c in constraints
            for s in STATISTICS
        ]

    def analyse(self, trainer: L.Trainer, pl_module: Any, snapshot: Any) -> dict[str, float]:
        optimizee = pl_module.optimizee
        delta = tuple(-u for u in snapshot.updates)
        out: dict[str, float] = {}
        for kind, step in (("update", delta), ("grad", snapshot.grads)):
            for key, value in symmetry_metrics(optimizee, snapshot.params, step).items():
                # value: (P,) with P = 1 at meta-test; the mean covers populations too
                out[f"{self.tag_prefix}{kind}/{key}"] = float(value.mean())
        return out
