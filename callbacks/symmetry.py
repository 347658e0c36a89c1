"""Symmetry breaking of each optimizer step, logged under ``symmetry/``."""

from __future__ import annotations

import lightning as L

from callbacks.base import Analysis
from l2o.analysis import Column, FigureSpec, Panel
from l2o.meta_testing import Snapshot
from l2o.optimizees import Optimizee
from l2o.symmetry import constraints_of, symmetry_metrics

STATISTICS = ("abs_sum", "signed_sum", "normalized")
NAMES = {"rescale": "Rescale", "scale": "Scale", "translation": "Translation"}
# What normalized means per constraint (l2o.symmetry.deviation_terms).
NORMALIZED = {
    "rescale": r"mean$_j$ $|d_j|\,/\,(|\langle\Delta_{in},\theta_{in}\rangle|"
    r"+|\langle\Delta_{out},\theta_{out}\rangle|)$",
    "scale": r"mean$_j$ $|\cos(\Delta_{in},\theta_{in})|$",
    "translation": r"mean$_i$ $|\sum_k \Delta_{ki}|\,/\,\sum_k|\Delta_{ki}|$",
}


class SymmetryBreaking(Analysis):
    """Deviation of the step ``Delta = -update`` from the optimizee's symmetry constraints.

    For every constraint of ``l2o.symmetry.constraints_of(optimizee)`` (``rescale`` for
    (Leaky) ReLU networks, ``scale`` with BatchNorm, ``translation`` always) it logs the statistics
    of ``l2o.symmetry.summarize``::

        symmetry/update/<constraint>/<abs_sum|signed_sum|normalized>   for Delta = -update
        symmetry/grad/<constraint>/<abs_sum|signed_sum|normalized>     for Delta = grad

    The gradient line is the sanity check: gradients obey every constraint, so it sits at ~0
    (float rounding, plus O(eps) for BatchNorm's ``scale``); it gets charts and panels of its
    own, never an axis shared with the update's. Plain SGD steps ``Delta = lr * grad`` and so
    logs exactly ``lr`` times the gradient line; an optimizer that breaks the symmetry logs far
    more. Works for every optimizer of the protocol: it only reads the snapshot.

    Args:
        every_n_steps: analyse every this many optimizee steps (and always step 1). Cheap: a
            few inner products per neuron.
        schedule: ``linear`` or ``log`` (``callbacks.base.schedule_steps``).
    """

    name = "symmetry"
    title = "Symmetry breaking"

    def __init__(self, every_n_steps: int = 1, schedule: str = "linear") -> None:
        super().__init__(every_n_steps, schedule)

    def scalar_tags(self, optimizee: Optimizee) -> list[str]:
        return [
            f"symmetry/{kind}/{c}/{s}"
            for kind in ("update", "grad")
            for c in constraints_of(optimizee)
            for s in STATISTICS
        ]

    def compute(self, snapshot: Snapshot, trainer: L.Trainer) -> dict[str, float]:
        delta = tuple(-u for u in snapshot.updates)
        out: dict[str, float] = {}
        for kind, step in (("update", delta), ("grad", snapshot.grads)):
            for key, value in symmetry_metrics(snapshot.optimizee, snapshot.params, step).items():
                # value: (P,) with P = 1 at meta-test; the mean covers populations too
                out[f"symmetry/{kind}/{key}"] = float(value.mean())
        return out

    def charts(self, optimizee: Optimizee) -> dict[str, list[str]]:
        # The update's charts first, then the gradient's sanity charts, never on one axis.
        return {
            f"{c}/{s}{suffix}": [f"symmetry/{kind}/{c}/{s}"]
            for kind, suffix in (("update", ""), ("grad", " (gradient: sanity, ~0)"))
            for c in constraints_of(optimizee)
            for s in STATISTICS
        }

    def summary_columns(self, optimizee: Optimizee) -> list[Column]:
        return [
            Column(f"symmetry/update/{c}/abs_sum", f"update/{c}/abs_sum")
            for c in constraints_of(optimizee)
        ]

    def figure(self, optimizee: Optimizee) -> FigureSpec:
        cs = constraints_of(optimizee)
        panels = [
            Panel(
                f"symmetry/update/{c}/abs_sum",
                f"{NAMES[c]} symmetry of the update",
                r"$\sum_j |d_j|$ (parameter$^2$)"
                if c != "translation"
                else r"$\sum_i |d_i|$ (parameter)",
                yscale="log",
            )
            for c in cs
        ]
        panels += [
            Panel(
                f"symmetry/update/{c}/normalized",
                f"{NAMES[c]} symmetry of the update, normalized (0 to 1)",
                NORMALIZED[c],
                yscale="log",
            )
            for c in cs
        ]
        panels += [
            Panel(
                f"symmetry/grad/{c}/abs_sum",
                f"{NAMES[c]} symmetry of the gradient (sanity check: ~0)",
                r"$\sum_j |d_j|$" if c != "translation" else r"$\sum_i |d_i|$",
                yscale="log",
                sanity=True,
            )
            for c in cs
        ]
        return FigureSpec("symmetry", self.title, tuple(panels), ncols=len(cs))
