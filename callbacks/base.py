"""Shared plumbing of the meta-test analysis callbacks.

Every analysis callback follows Lightning's ``DeviceStatsMonitor`` pattern: prerequisites are
checked once in ``setup`` (with an error that says what is wrong), and the work happens in
``on_test_batch_end`` on the steps the callback's own ``every_n_steps`` selects (step 1 is always
analysed, so even short runs have a starting point). The callbacks read what the step saw from
``pl_module.snapshot`` (a ``l2o.meta_testing.Snapshot``: params, optimizer state, gradient and
update *before* the step was applied) and only ever *replay* the optimizer through the protocol
(``opt.update`` / ``l2o.optimizers.replay``), which advances nothing: the module's params, optimizer
state and history other than the callback's own tags are never touched.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from l2o.optimizees import MLPOptimizee, Params

# What a module must offer to be analysed: MetaTestSystem's interface.
REQUIRED_MODULE_ATTRS = ("snapshot", "optimizee", "optimizer", "log_scalars")


def flatten_params(tensors: Params, lead: int = 0) -> Tensor:
    """Concatenate a parameter tuple into one vector per leading index.

    ``lead`` is the number of leading batch dims to keep (0: one ``(D,)`` vector, 1: ``(N, D)``).
    The population dimension (1 at meta-test) is part of ``D``.
    """
    if lead == 0:
        return torch.cat([t.reshape(-1) for t in tensors])
    shape = tensors[0].shape[:lead]
    return torch.cat([t.reshape(*shape, -1) for t in tensors], dim=-1)


def should_run(step: int, every_n_steps: int) -> bool:
    """Step 1 always, then every ``every_n_steps`` (1-based optimizee steps)."""
    return step == 1 or step % every_n_steps == 0


class MetaTestCallback(L.Callback):
    """Base class: prerequisite checks, step selection, logging under ``tag_prefix``.

    Subclasses implement ``analyse(trainer, pl_module, snapshot) -> {tag: float}`` (run under
    ``torch.no_grad``; use ``torch.enable_grad`` where gradients are computed) and ``tags``.

    Args:
        every_n_steps: analyse every this many optimizee steps (and always step 1).
    """

    tag_prefix: str = ""
    needs_training_split: bool = False

    def __init__(self, every_n_steps: int) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)

    # ------------------------------------------------------------------ interface
    def tags(self, optimizee: MLPOptimizee | None = None) -> list[str]:
        """Scalar tags this callback logs for ``optimizee`` (for dashboards and layouts)."""
        raise NotImplementedError

    def all_tags(self) -> list[str]:
        """Every scalar tag this callback can log, for any optimizee."""
        return self.tags(None)

    def histogram_tags(self, optimizee: MLPOptimizee | None = None) -> list[str]:
        """TensorBoard histogram tags this callback writes (none by default)."""
        return []

    def analyse(self, trainer: L.Trainer, pl_module: Any, snapshot: Any) -> dict[str, float]:
        raise NotImplementedError

    def layout(self, optimizee: MLPOptimizee) -> dict[str, list[str]]:
        """Charts of a TensorBoard custom-scalars layout: ``{chart title: [tags]}``.

        Tags that differ only in their ``update``/``grad`` segment share a chart, so each chart
        sets the optimizer's update against the gradient's baseline.
        """
        charts: dict[str, list[str]] = {}
        for tag in self.tags(optimizee):
            parts = tag[len(self.tag_prefix) :].split("/")
            title = "/".join(p for p in parts if p not in ("update", "grad")) or tag
            charts.setdefault(title, []).append(tag)
        return charts

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        name = type(self).__name__
        missing = [a for a in REQUIRED_MODULE_ATTRS if not hasattr(pl_module, a)]
        if missing:
            raise MisconfigurationException(
                f"`{name}` analyses meta-testing runs: it needs a MetaTestSystem-like module "
                f"(with {', '.join(REQUIRED_MODULE_ATTRS)}), but {type(pl_module).__name__} "
                f"lacks {missing}. Attach it to a `Trainer` that runs "
                "`trainer.test(MetaTestSystem(...), datamodule=...)`."
            )
        if stage != "test":
            raise MisconfigurationException(
                f"`{name}` runs in `Trainer.test` (one test_step per optimizee step), not in "
                f"stage {stage!r}: remove it from this Trainer's callbacks."
            )
        if self.needs_training_split:
            dm = trainer.datamodule
            if dm is None:
                raise MisconfigurationException(
                    f"`{name}` needs the training split: call `Trainer.test(module, "
                    "datamodule=dm)` with a datamodule that has `train_x` and `train_y`, not "
                    "bare dataloaders."
                )
            for attr in ("train_x", "train_y"):
                if getattr(dm, attr, None) is None:
                    raise MisconfigurationException(
                        f"`{name}` needs the training split, but the datamodule "
                        f"{type(dm).__name__} has no `{attr}` after setup."
                    )

    @torch.no_grad()
    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        snapshot = pl_module.snapshot
        if snapshot is None or not should_run(snapshot.step, self.every_n_steps):
            return
        metrics = self.analyse(trainer, pl_module, snapshot)
        if metrics:
            pl_module.log_scalars(metrics, snapshot.step)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def training_split(trainer: L.Trainer, device: torch.device) -> tuple[Tensor, Tensor]:
        dm = trainer.datamodule
        return dm.train_x.to(device), dm.train_y.to(device)
