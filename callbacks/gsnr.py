"""Gradient signal-to-noise (mean GSNR and the norm, inner-product and orthogonality tests),
under ``gsnr/``."""

from __future__ import annotations

import lightning as L
import torch

from callbacks.base import Analysis, per_sample_grads_cached
from l2o.analysis import Column, FigureSpec, Panel
from l2o.gsnr import gradient_noise
from l2o.meta_testing import Snapshot
from l2o.optimizees import Optimizee

STATISTICS = {
    "mean_gsnr": ("Mean gradient signal-to-noise ratio", "mean_j gbar_j^2 / sigma_j^2", "log"),
    "norm_test": ("Norm test (Byrd et al. 2012)", "theta (relative error of gbar)", "log"),
    "inner_product_test": (
        "Inner-product test (Bollapragada et al. 2018)",
        "theta (dimensionless)",
        "log",
    ),
    "orthogonality_test": (
        "Orthogonality test (Bollapragada et al. 2018)",
        "nu (dimensionless)",
        "log",
    ),
    "constant_fraction": (
        "Coordinates with constant per-sample gradient (left out of the GSNR)",
        "share of coordinates",
        "linear",
    ),
}


class GradientNoise(Analysis):
    """Signal-to-noise of the step's minibatch gradient from its per-sample gradients
    (``l2o.gsnr.gradient_noise``)::

        gsnr/mean_gsnr            mean over coordinates of gbar_j^2 / sigma_j^2
        gsnr/norm_test            Byrd et al.'s theta: sqrt(sum_j s_j^2 / N) / ||gbar||
        gsnr/inner_product_test   Bollapragada et al.'s theta
        gsnr/orthogonality_test   Bollapragada et al.'s nu
        gsnr/constant_fraction    share of coordinates with sigma_j = 0 (e.g. blank pixels)

    The per-sample gradients come from the step's shared cache
    (``callbacks.base.per_sample_grads_cached``, ``Snapshot.cache``): an analysis of the same
    step that asks for the same sample set gets the same tensors, so they are computed once.
    The gradient noise does not depend on the optimizer: it works for every one. With
    BatchNorm each sample's gradient is taken inside its batch (``l2o.covariance``).

    Args:
        every_n_steps: analyse every this many optimizee steps (and always step 1).
        chunk_size: samples per vectorized call of the per-sample gradients.
        schedule: ``linear`` or ``log`` (``callbacks.base.schedule_steps``).
    """

    name = "gsnr"
    title = "Gradient signal-to-noise"

    def __init__(
        self, every_n_steps: int = 10, chunk_size: int | None = None, schedule: str = "linear"
    ) -> None:
        super().__init__(every_n_steps, schedule)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (or None), got {chunk_size}")
        self.chunk_size = chunk_size

    def check(self, data) -> None:
        super().check(data)
        batch = getattr(data, "batch_size", None)
        if batch is not None and batch < 2:
            raise ValueError("GradientNoise needs minibatches of at least 2 samples")

    def scalar_tags(self, optimizee: Optimizee) -> list[str]:
        return [f"gsnr/{s}" for s in STATISTICS]

    def compute(self, snapshot: Snapshot, trainer: L.Trainer) -> dict[str, float]:
        # the step's own minibatch: the gradient the optimizer saw is these samples' mean
        grads = per_sample_grads_cached(
            snapshot, ("minibatch",), snapshot.x, snapshot.y, self.chunk_size
        )
        res = gradient_noise(grads)
        return {
            f"gsnr/{s}": float(torch.as_tensor(getattr(res, s)).double().mean()) for s in STATISTICS
        }

    def charts(self, optimizee: Optimizee) -> dict[str, list[str]]:
        return {STATISTICS[s][0]: [f"gsnr/{s}"] for s in STATISTICS}

    def summary_columns(self, optimizee: Optimizee) -> list[Column]:
        return [Column("gsnr/mean_gsnr", "mean GSNR"), Column("gsnr/norm_test", "norm test")]

    def figure(self, optimizee: Optimizee) -> FigureSpec:
        panels = tuple(
            Panel(f"gsnr/{s}", title, ylabel, yscale=scale, sanity=s == "constant_fraction")
            for s, (title, ylabel, scale) in STATISTICS.items()
        )
        return FigureSpec("gsnr", self.title, panels, ncols=3)
