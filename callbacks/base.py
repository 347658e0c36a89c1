"""The base class of the meta-test analyses: one analysis, one callback, one file.

An analysis subclasses :class:`Analysis`, sets ``name`` (its tag prefix) and ``title``, and
implements ``compute`` and ``scalar_tags``; ``charts``, ``summary_columns``, ``figure`` and
``check`` have defaults it may override (the API: ``l2o.analysis.AnalysisProtocol``). It works
in ``Trainer.test`` of an ``l2o.meta_testing.MetaTestSystem``: every ``test_step`` returns the
step's ``Snapshot`` (params, optimizer state, gradient and update *before* the step was
applied, the minibatch, the optimizee family and the optimizer), Lightning passes it to
``on_test_batch_end`` as ``outputs``, and on the steps that ``every_n_steps`` selects (step 1
always, so even short runs have a starting point) the scalars of ``compute`` go to every logger
of the trainer on rank zero. An analysis only ever *replays* the optimizer through the protocol
(``opt.update`` / ``l2o.optimizers.replay``), which advances nothing: the run it observes is
exactly the run without it (a test checks this).

Add one with one file here, one test file, and one line in ``configs/analyses.yaml``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from l2o.analysis import Column, FigureSpec, Panel
from l2o.meta_testing import Snapshot, log_metrics
from l2o.optimizees import Optimizee, Params


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


class Analysis(L.Callback):
    """Base class of the meta-test analyses (see the module docstring).

    Args:
        every_n_steps: analyse every this many optimizee steps (and always step 1).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    needs_training_split: ClassVar[bool] = False

    def __init__(self, every_n_steps: int) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(
                f"{type(self).__name__}: every_n_steps must be >= 1, got {every_n_steps} "
                "(to turn an analysis off, leave it out of --analyses)"
            )
        self.every_n_steps = int(every_n_steps)

    # ------------------------------------------------------------------ to implement
    def compute(self, snapshot: Snapshot, trainer: L.Trainer) -> dict[str, float]:
        """``{tag: value}`` for one analysed step (run under ``torch.no_grad``; use
        ``torch.enable_grad`` where gradients are taken)."""
        raise NotImplementedError

    def scalar_tags(self, optimizee: Optimizee) -> list[str]:
        """Every scalar tag ``compute`` returns for this optimizee family."""
        raise NotImplementedError

    # ------------------------------------------------------------------ defaults
    def check(self, data: Any) -> None:
        """Raise ``ValueError`` if ``data`` cannot be analysed (called before any run)."""
        if not self.needs_training_split:
            return
        if data is None or getattr(data, "train_x", None) is None:
            raise MisconfigurationException(
                f"`{type(self).__name__}` needs the training split: call `Trainer.test(module, "
                "datamodule=dm)` with a datamodule that has `train_x` and `train_y` after "
                "setup (e.g. l2o.streams.MetaTestData), not bare dataloaders."
            )

    def charts(self, optimizee: Optimizee) -> dict[str, list[str]]:
        """One custom-scalars chart per tag."""
        return {t.removeprefix(f"{self.name}/"): [t] for t in self.scalar_tags(optimizee)}

    def summary_columns(self, optimizee: Optimizee) -> list[Column]:
        return []

    def figure(self, optimizee: Optimizee) -> FigureSpec | None:
        """One panel per scalar tag."""
        panels = tuple(
            Panel(t, t.removeprefix(f"{self.name}/"), "value") for t in self.scalar_tags(optimizee)
        )
        return FigureSpec(self.name, self.title or self.name, panels)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "test":
            stage = getattr(stage, "value", stage)
            raise MisconfigurationException(
                f"`{type(self).__name__}` analyses meta-test runs, `Trainer.test` of a "
                f"MetaTestSystem (one test_step per optimizee step), not stage {stage!r}: "
                "remove it from this Trainer's callbacks."
            )
        self.check(trainer.datamodule)

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
        if outputs is None:  # a diverged run's remaining steps
            return
        if not isinstance(outputs, Snapshot):
            raise MisconfigurationException(
                f"`{type(self).__name__}` reads the Snapshot that MetaTestSystem.test_step "
                f"returns; {type(pl_module).__name__}.test_step returned "
                f"{type(outputs).__name__}."
            )
        if should_run(outputs.step, self.every_n_steps):
            log_metrics(trainer, self.compute(outputs, trainer), outputs.step)
