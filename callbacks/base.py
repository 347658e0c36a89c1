"""The base class of the meta-test analyses: one analysis, one callback, one file.

An analysis subclasses :class:`Analysis`, sets ``name`` (its tag prefix) and ``title``, and
implements ``compute`` and ``scalar_tags``; ``charts``, ``summary_columns``, ``figure`` and
``check`` have defaults it may override (the API: ``l2o.analysis.AnalysisProtocol``). It works
in ``Trainer.test`` of an ``l2o.meta_testing.MetaTestSystem``: every ``test_step`` returns the
step's ``Snapshot`` (params, optimizer state, gradient and update *before* the step was
applied, the minibatch, the optimizee family and the optimizer), Lightning passes it to
``on_test_batch_end`` as ``outputs``, and on the steps that the schedule selects (step 1
always, so even short runs have a starting point; see :func:`schedule_steps`) the scalars of
``compute`` go to every logger of the trainer on rank zero. An analysis only ever *replays*
the optimizer through the protocol (``opt.update`` / ``l2o.optimizers.replay``), which
advances nothing: the run it observes is exactly the run without it (a test checks this).

Add one with one file here, one test file, and one line in ``configs/analyses.yaml``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from l2o.analysis import Column, FigureSpec, Panel
from l2o.covariance import per_sample_grads
from l2o.meta_testing import Snapshot, log_metrics
from l2o.optimizees import Optimizee, Params

SCHEDULES = ("linear", "log")


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


def schedule_steps(total: int, every_n_steps: int, schedule: str = "linear") -> list[int]:
    """The analysed steps of a run of ``total`` steps (1-based), sorted.

    ``linear``: step 1, then every multiple of ``every_n_steps`` (:func:`should_run`).

    ``log``: the same budget placed evenly on a log axis, denser early where dynamics change
    fastest. With ``K = max(2, ceil(total / every_n_steps) + 1)`` points (the linear
    schedule's count, plus the last step), the steps are ``round(total ** (k / (K - 1)))`` for
    ``k = 0 .. K-1``: geometric from step 1 to step ``total`` (both always included). Rounding
    merges the first points into consecutive steps (1, 2, 3, ...), so a log schedule analyses
    at most as many steps as the linear one plus one, never more.
    """
    total, every = int(total), int(every_n_steps)
    if total < 1 or every < 1:
        raise ValueError(f"total and every_n_steps must be >= 1, got {total}, {every}")
    if schedule == "linear":
        return [s for s in range(1, total + 1) if should_run(s, every)]
    if schedule != "log":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    points = max(2, -(-total // every) + 1)
    if total == 1:
        return [1]
    steps = {round(total ** (k / (points - 1))) for k in range(points)}
    return sorted(steps | {1, total})


def per_sample_grads_cached(
    snapshot: Snapshot, key: tuple, x: Tensor, y: Tensor, chunk_size: int | None = None
) -> Params:
    """Per-sample gradients ``(N, 1, *shape)`` of the samples ``x``, ``y`` at the step's params,
    computed once per step and shared through ``snapshot.cache`` by every analysis that asks
    with the same ``key`` (which must identify the sample set: ``("minibatch",)`` for the
    step's own minibatch, ``("train", num_samples, seed)`` for a subset of the training split).
    """
    full_key = ("per_sample_grads", *key)
    if full_key not in snapshot.cache:
        with torch.no_grad():
            snapshot.cache[full_key] = per_sample_grads(
                snapshot.optimizee, snapshot.params, x, y, chunk_size=chunk_size
            )
    return snapshot.cache[full_key]


class Analysis(L.Callback):
    """Base class of the meta-test analyses (see the module docstring).

    Args:
        every_n_steps: analyse every this many optimizee steps (and always step 1).
        schedule: ``linear`` (every ``every_n_steps``) or ``log`` (as many analysed steps,
            log-spaced from step 1 to the run's last step; :func:`schedule_steps`).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    needs_training_split: ClassVar[bool] = False

    def __init__(self, every_n_steps: int, schedule: str = "linear") -> None:
        if int(every_n_steps) < 1:
            raise ValueError(
                f"{type(self).__name__}: every_n_steps must be >= 1, got {every_n_steps} "
                "(to turn an analysis off, leave it out of --analyses)"
            )
        if schedule not in SCHEDULES:
            raise ValueError(
                f"{type(self).__name__}: schedule must be one of {SCHEDULES}, got {schedule!r}"
            )
        self.every_n_steps = int(every_n_steps)
        self.schedule = schedule
        self._log_steps: frozenset[int] | None = None  # the log schedule of the current run

    def runs_at(self, step: int) -> bool:
        """Whether this analysis runs at optimizee step ``step`` of the current run."""
        if self.schedule == "linear":
            return should_run(step, self.every_n_steps)
        if self._log_steps is None:
            raise RuntimeError(f"{type(self).__name__}: the log schedule needs on_test_start")
        return step in self._log_steps

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

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule == "log":
            # The run's length: MetaTestSystem's ``steps``, else the number of test batches.
            total = getattr(pl_module, "steps", None)
            if total is None:
                total = int(trainer.num_test_batches[0])
            self._log_steps = frozenset(schedule_steps(total, self.every_n_steps, "log"))

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
        if self.runs_at(outputs.step):
            log_metrics(trainer, self.compute(outputs, trainer), outputs.step)
