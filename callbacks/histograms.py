"""Distribution of update magnitudes |update|, logged under ``update_hist/``."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from callbacks.base import Analysis, flatten_params
from l2o.analysis import FigureSpec, Panel
from l2o.meta_testing import Snapshot, log_distribution
from l2o.optimizees import Optimizee

DISTRIBUTION = "update_hist/log10_abs_update"


class UpdateHistograms(Analysis):
    """The distribution of ``log10 |update|`` over all coordinates (the study's Fig. 9).

    Logs, on the analysed steps:

    * ``update_hist/log10_abs_update``: a TensorBoard histogram of ``log10 |u|`` over every
      coordinate with ``u != 0`` (magnitudes span many decades: on a linear axis every value
      would land in the first bin), and for the figures a sample of at most ``max_samples`` of
      those values (a fixed-seed subsample of the coordinates, zeros then dropped);
    * ``update_hist/mean_abs_update``: the mean of ``|u|`` (zeros included);
    * ``update_hist/zero_fraction``: the fraction of coordinates with ``u == 0`` exactly.

    Args:
        every_n_steps: analyse every this many optimizee steps (and always step 1).
        max_samples: most coordinates sampled per step for the figures (the TensorBoard
            histogram always uses all).
        seed: seed of the subsampling.
        schedule: ``linear`` or ``log`` (``callbacks.base.schedule_steps``).
    """

    name = "update_hist"
    title = "Update magnitudes"

    def __init__(
        self,
        every_n_steps: int = 50,
        max_samples: int = 20_000,
        seed: int = 0,
        schedule: str = "linear",
    ) -> None:
        super().__init__(every_n_steps, schedule)
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.max_samples, self.seed = int(max_samples), int(seed)

    def scalar_tags(self, optimizee: Optimizee) -> list[str]:
        return ["update_hist/mean_abs_update", "update_hist/zero_fraction"]

    def compute(self, snapshot: Snapshot, trainer: L.Trainer) -> dict[str, float]:
        mags = flatten_params(snapshot.updates).abs().float()
        keep = mags
        if mags.numel() > self.max_samples:
            gen = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(mags.numel(), generator=gen)[: self.max_samples]
            keep = mags[idx.to(mags.device)]
        log_distribution(
            trainer, DISTRIBUTION, _log10_nonzero(mags), snapshot.step, _log10_nonzero(keep)
        )
        return {
            "update_hist/mean_abs_update": float(mags.mean()),
            "update_hist/zero_fraction": float((mags == 0).double().mean()),
        }

    def charts(self, optimizee: Optimizee) -> dict[str, list[str]]:
        return {
            "mean |update|": ["update_hist/mean_abs_update"],
            "fraction of updates exactly 0": ["update_hist/zero_fraction"],
        }

    def figure(self, optimizee: Optimizee) -> FigureSpec:
        return FigureSpec(
            "update_histograms",
            "Distribution of update magnitudes |u|",
            (
                Panel(
                    DISTRIBUTION,
                    "|update|",
                    "fraction of coordinates",
                    kind="distribution",
                    xlabel="log10 |update| (nonzero coordinates)",
                ),
            ),
        )


def _log10_nonzero(mags: torch.Tensor) -> np.ndarray:
    values = mags.cpu().double().numpy()
    return np.log10(values[values > 0])
