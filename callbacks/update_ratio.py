"""Per-layer update-to-weight norm ratio ||Delta theta|| / ||theta||, logged under
``update_ratio/``."""

from __future__ import annotations

import lightning as L
import torch

from callbacks.base import Analysis
from l2o.analysis import Column, FigureSpec, Panel
from l2o.meta_testing import Snapshot
from l2o.optimizees import Optimizee


def tensor_names(optimizee: Optimizee) -> list[str]:
    """``layer<l>/<role>`` for each parameter tensor, in the optimizee's order (``layer1/weight``,
    ``layer1/bias``, ``layer1/gamma``, ...; the output layer is the last)."""
    names, layer = [], 0
    for role, _, _ in optimizee.roles:
        layer += role == "weight"
        names.append(f"layer{layer}/{role}")
    return names


class UpdateRatio(Analysis):
    """How large each step is relative to the weights it moves, per parameter tensor::

        update_ratio/layer<l>/<weight|bias|gamma|beta> = ||u_k|| / ||theta_k||

    with ``u_k`` the step's update of tensor ``k`` and ``theta_k`` the tensor before the step
    (Frobenius norms, in float64). A rule of thumb for SGD-trained networks puts it near 1e-3;
    for plain SGD it is ``lr ||g_k|| / ||theta_k||``. NaN where ``theta_k = 0`` (BatchNorm's
    beta at initialisation).

    Args:
        every_n_steps: analyse every this many optimizee steps (and always step 1). Cheap: one
            norm per tensor.
        schedule: ``linear`` or ``log`` (``callbacks.base.schedule_steps``).
    """

    name = "update_ratio"
    title = "Update-to-weight norm ratio"

    def __init__(self, every_n_steps: int = 10, schedule: str = "linear") -> None:
        super().__init__(every_n_steps, schedule)

    def scalar_tags(self, optimizee: Optimizee) -> list[str]:
        return [f"update_ratio/{n}" for n in tensor_names(optimizee)]

    def compute(self, snapshot: Snapshot, trainer: L.Trainer) -> dict[str, float]:
        out = {}
        for name, u, p in zip(tensor_names(snapshot.optimizee), snapshot.updates, snapshot.params):
            # per population member (P = 1 at meta-test), then the mean over members
            un = torch.linalg.vector_norm(u.double().reshape(u.shape[0], -1), dim=1)
            pn = torch.linalg.vector_norm(p.double().reshape(p.shape[0], -1), dim=1)
            ratio = torch.where(pn > 0, un / pn, torch.nan)
            out[f"update_ratio/{name}"] = float(ratio.mean())
        return out

    def summary_columns(self, optimizee: Optimizee) -> list[Column]:
        return [
            Column(f"update_ratio/{n}", f"‖Δθ‖/‖θ‖ {n}")
            for n in tensor_names(optimizee)
            if n.endswith("/weight")
        ]

    def figure(self, optimizee: Optimizee) -> FigureSpec:
        names = tensor_names(optimizee)
        return FigureSpec(
            "update_ratio",
            self.title,
            tuple(
                Panel(
                    f"update_ratio/{n}",
                    f"{n.replace('layer', 'Layer ').replace('/', ', ')}: ‖Δθ‖ / ‖θ‖",
                    "‖update‖ / ‖parameters‖ (ratio)",
                    yscale="log",
                )
                for n in names
            ),
            ncols=4 if optimizee.batchnorm else 2,
        )
