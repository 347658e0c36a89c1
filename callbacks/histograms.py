"""Distribution of update magnitudes |update|, logged under ``update_hist/``."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch

from callbacks.base import MetaTestCallback, flatten_params
from l2o.optimizees import MLPOptimizee


class UpdateHistograms(MetaTestCallback):
    """TensorBoard histogram of ``|update|`` over all coordinates, plus its mean.

    Logs the histogram ``update_hist/abs_update`` (``add_histogram`` on every logger whose
    ``experiment`` has one, e.g. ``TensorBoardLogger``, on rank zero) and the scalar
    ``update_hist/mean_abs_update`` (through ``pl_module.log_scalars``). The raw magnitudes of
    each analysed step are also kept, for figures drawn after the run (the study's Fig. 9)::

        callback.samples[step]  # float32 numpy array, at most ``max_samples`` values

    subsampled without replacement by a fixed seed when the optimizee has more coordinates.

    Args:
        every_n_steps: analyse every this many optimizee steps (and always step 1).
        max_samples: most |update| values kept per step in ``samples`` (the TensorBoard
            histogram always uses all coordinates).
        seed: seed of the subsampling.
    """

    tag_prefix = "update_hist/"

    def __init__(self, every_n_steps: int = 50, max_samples: int = 20_000, seed: int = 0) -> None:
        super().__init__(every_n_steps)
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.max_samples, self.seed = int(max_samples), int(seed)
        self.samples: dict[int, np.ndarray] = {}

    def tags(self, optimizee: MLPOptimizee | None = None) -> list[str]:
        return [f"{self.tag_prefix}mean_abs_update"]

    def histogram_tags(self, optimizee: MLPOptimizee | None = None) -> list[str]:
        return [f"{self.tag_prefix}abs_update"]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.samples = {}

    def analyse(self, trainer: L.Trainer, pl_module: Any, snapshot: Any) -> dict[str, float]:
        mags = flatten_params(snapshot.updates).abs().float()
        step = snapshot.step
        if trainer.is_global_zero:
            values = mags.cpu().numpy()
            for logger in trainer.loggers:
                add_histogram = getattr(logger.experiment, "add_histogram", None)
                if add_histogram is not None:
                    add_histogram(f"{self.tag_prefix}abs_update", values, step)
        keep = mags
        if mags.numel() > self.max_samples:
            gen = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(mags.numel(), generator=gen)[: self.max_samples]
            keep = mags[idx.to(mags.device)]
        self.samples[step] = keep.cpu().numpy().copy()
        return {f"{self.tag_prefix}mean_abs_update": float(mags.mean())}
