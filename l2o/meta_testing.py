"""Meta-testing: train one optimizee with one optimizer, one ``test_step`` per optimizee step.

Run by ``Trainer.test`` with ``inference_mode=False`` (optimizee gradients need autograd). Every
optimizer (learned or baseline) goes through the same protocol, the same seeded initialisation
(:func:`init_optimizee`) and the same minibatch order (``l2o.streams.MetaTestData``).

``test_step`` returns the step's :class:`Snapshot`, what the step saw *before* it advanced
anything; Lightning hands it to every callback's ``on_test_batch_end`` as ``outputs``, which is
how the analyses of ``callbacks/`` replay the optimizer with the state of that step. Everything
is logged straight to ``trainer.loggers`` (:func:`log_metrics`); the module keeps no copy.

A run whose loss or update stops being finite has *diverged*: that is a result, not an error.
The step is logged as ``meta_test/diverged_at_step``, the run does no more work (the rest of
its minibatch stream passes through without computation), and the summary counts its loss as
inf from that step on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from l2o.data import seeded_generator
from l2o.inner import inner_step
from l2o.optimizees import Optimizee, Params
from l2o.optimizers import Optimizer, State
from l2o.seeds import TEST_INIT

DIVERGED_TAG = "meta_test/diverged_at_step"


@dataclass(frozen=True)
class Snapshot:
    """One optimizee step as the optimizer saw it (before the update was applied), with what
    an analysis needs to replay it: the optimizee family and the optimizer."""

    step: int  # 1-based optimizee step
    params: Params  # (1, ...) each, before this step's update
    state: State  # optimizer state before this step's update
    grads: Params  # the minibatch gradient the optimizer saw
    updates: Params  # its update (params + updates = the next params)
    x: Tensor  # (1, B, D): the minibatch's inputs
    y: Tensor  # (1, B): its labels (curvature, step length)
    optimizee: Optimizee
    optimizer: Optimizer
    # Work that several analyses of this step share (e.g. per-sample gradients of the covariance
    # analysis, reused by the gradient signal-to-noise one), keyed by what it depends on.
    cache: dict = field(default_factory=dict, compare=False, repr=False)


def log_metrics(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Log scalars to every logger of the trainer (TensorBoard, the run's record), rank zero."""
    if not metrics or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def log_distribution(
    trainer: L.Trainer, tag: str, values: np.ndarray, step: int, sample: np.ndarray | None = None
) -> None:
    """Log a distribution, rank zero: a histogram of ``values`` to every logger whose
    ``experiment`` has ``add_histogram`` (TensorBoard), and the raw ``sample`` (default: all
    ``values``) to every logger with ``log_array`` (the run's record, which figures re-bin)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        log_array = getattr(logger, "log_array", None)
        if log_array is not None:
            log_array(tag, values if sample is None else sample, step)
            continue
        add_histogram = getattr(logger.experiment, "add_histogram", None)
        if add_histogram is not None and len(values):
            add_histogram(tag, values, step)


def init_optimizee(optimizee: Optimizee, seed: int, device=None) -> Params:
    """The meta-test initialisation of run ``seed``: identical for every optimizer."""
    return optimizee.init(1, seeded_generator(TEST_INIT, seed), device=device)


def eval_point(optimizer: Optimizer, params: Params, state: State) -> Params:
    """Where the held-out test loss and accuracy are taken: ``optimizer.eval_params(params,
    state)`` for an optimizer that has it (schedule-free ones: x, the averaged point their
    ``.eval()`` puts in the model, not y where the gradients are taken), else ``params``.
    Training loss, accuracy and the analyses stay at ``params``, the training point."""
    eval_params = getattr(optimizer, "eval_params", None)
    return params if eval_params is None else tuple(eval_params(params, state))


def _finite(tensors: Params) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class MetaTestSystem(L.LightningModule):
    """Trains one optimizee of ``optimizee`` with ``optimizer`` for as many steps as batches.

    Logged (every logger, rank zero): ``meta_test/train_loss`` and ``meta_test/train_acc``
    every step, ``meta_test/test_loss`` and ``meta_test/test_acc`` every ``eval_every`` steps
    and at the last (at :func:`eval_point`), ``meta_test/lr`` at step 0 for optimizers with a
    learning rate,
    ``meta_test/diverged_at_step`` if the run diverges, and at the end ``run_info`` as the
    run's hyperparameters with its final loss and accuracy (TensorBoard's HParams tab).

    Args:
        optimizer: any object of the optimizer protocol (``LSTMOptimizer``, ``SGD``, ...).
        optimizee: the optimizee family.
        seed: run seed: the optimizee's initialisation (the minibatch order is the data's).
        eval_every: held-out test loss and accuracy every this many steps (and at the end).
        steps: total steps (to evaluate at the last one).
        run_info: what identifies the run (optimizer, lr, seed, checkpoint, optimizee, ...),
            logged as hyperparameters.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        optimizee: Optimizee,
        seed: int = 0,
        eval_every: int = 10,
        steps: int = 1000,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if eval_every < 1 or steps < 1:
            raise ValueError(f"eval_every and steps must be >= 1, got {eval_every}, {steps}")
        self.optimizer = optimizer
        self.optimizee = optimizee
        self.seed, self.eval_every, self.steps = seed, eval_every, steps
        self.run_info = dict(run_info or {})
        self.test_accuracy = MulticlassAccuracy(optimizee.num_classes, average="micro")
        self.params: Params | None = None
        self.opt_state: State | None = None
        self.diverged_at: int | None = None
        self._final: dict[str, float] = {}

    def on_test_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "meta-testing needs autograd: build the Trainer with inference_mode=False"
            )
        self.params = init_optimizee(self.optimizee, self.seed, self.device)
        self.opt_state = self.optimizer.init_state(self.params)
        self.diverged_at, self._final = None, {}
        lr = getattr(self.optimizer, "lr", None)  # baselines; a learned optimizer has none
        if lr is not None:
            log_metrics(self.trainer, {"meta_test/lr": float(lr)}, 0)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Snapshot | None:
        if self.diverged_at is not None:
            return None  # the run has ended; the rest of the stream passes without work
        x, y = batch
        step = batch_idx + 1
        self.optimizee.check_input(x.shape[-1])
        inner = inner_step(self.optimizee, self.optimizer, self.params, self.opt_state, x, y)
        if not (_finite((inner.loss,)) and _finite(inner.updates)):
            self._diverge(step, inner.loss)
            return None
        with torch.no_grad():
            acc = self.optimizee.accuracy(self.params, x, y)
        snapshot = Snapshot(
            step,
            self.params,
            self.opt_state,
            inner.grads,
            inner.updates,
            x,
            y,
            self.optimizee,
            self.optimizer,
        )
        metrics = {"meta_test/train_loss": inner.loss.item(), "meta_test/train_acc": acc.item()}
        self.params, self.opt_state = inner.params, inner.state
        if step % self.eval_every == 0 or step == self.steps:
            metrics.update(self.evaluate())
        self._final.update(metrics)
        log_metrics(self.trainer, metrics, step)
        return snapshot

    def _diverge(self, step: int, loss: Tensor) -> None:
        self.diverged_at = step
        log_metrics(self.trainer, {DIVERGED_TAG: float(step)}, step)
        name = self.run_info.get("optimizer", getattr(self.optimizer, "name", "optimizer"))
        print(
            f"{name} seed {self.seed}: diverged at step {step} (loss {loss.item():.4g} or a "
            "non-finite update); kept as a result, with loss = inf from this step on"
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on the held-out test split (after this step's update), at the
        optimizer's evaluation point (:func:`eval_point`)."""
        dm = self.trainer.datamodule
        x, y = dm.test_x.to(self.device), dm.test_y.to(self.device)
        params = eval_point(self.optimizer, self.params, self.opt_state)
        logits = self.optimizee.logits(params, x[None])[0]
        self.test_accuracy.reset()
        self.test_accuracy.update(logits, y)
        loss = torch.nn.functional.cross_entropy(logits, y)
        return {
            "meta_test/test_loss": loss.item(),
            "meta_test/test_acc": self.test_accuracy.compute().item(),
        }

    def on_test_end(self) -> None:
        # The HParams tab: the run's identity with its final numbers (a diverged run: inf, nan).
        diverged = self.diverged_at is not None
        final = {
            "hparams/final_train_loss": (
                float("inf") if diverged else self._final.get("meta_test/train_loss", float("nan"))
            ),
            "hparams/final_test_acc": (
                float("nan") if diverged else self._final.get("meta_test/test_acc", float("nan"))
            ),
        }
        if self.trainer.is_global_zero and self.run_info:
            for logger in self.trainer.loggers:
                logger.log_hyperparams(self.run_info, final)

    def configure_optimizers(self) -> Any:
        return None
