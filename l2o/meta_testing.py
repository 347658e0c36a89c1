"""Meta-testing: train one optimizee with one optimizer, one ``test_step`` per optimizee step.

Run by ``Trainer.test`` with ``inference_mode=False`` (optimizee gradients need autograd). Every
optimizer (the learned one and the baselines) goes through the same protocol, the same seeded
initialisation and the same minibatch order. After each step, ``snapshot`` holds what the step
saw *before* it advanced anything (params, optimizer state, gradient, update, minibatch), so
callbacks can replay the optimizer on other gradients with the state of that step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import IterableDataset
from torchmetrics.classification import MulticlassAccuracy

from l2o.data import MinibatchSampler, seeded_generator
from l2o.inner import inner_step
from l2o.optimizees import MLPOptimizee, Params
from l2o.optimizers import Optimizer, State
from l2o.seeds import TEST_INIT


@dataclass(frozen=True)
class Snapshot:
    """One optimizee step, as the optimizer saw it (before the update was applied)."""

    step: int  # 1-based optimizee step
    params: Params  # (1, ...) each
    state: State  # optimizer state before this step's update
    grads: Params
    updates: Params
    loss: float
    x: Tensor  # (1, B, D)
    y: Tensor  # (1, B)


class MinibatchStream(IterableDataset):
    """``steps`` minibatches (1, B, D), (1, B), seeded by the run's seed alone."""

    def __init__(self, x: Tensor, y: Tensor, steps: int, batch_size: int, seed: int):
        super().__init__()
        self.x, self.y, self.steps, self.batch_size, self.seed = x, y, steps, batch_size, seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        sampler = MinibatchSampler(len(self.x), 1, self.batch_size, seeded_generator(self.seed))
        for _ in range(self.steps):
            idx = sampler.next(1)[0]
            yield self.x[idx], self.y[idx]


def init_optimizee(optimizee: MLPOptimizee, seed: int, device=None) -> Params:
    """The meta-test initialisation of run ``seed``: identical for every optimizer."""
    return optimizee.init(1, seeded_generator(TEST_INIT, seed), device=device)


class MetaTestSystem(L.LightningModule):
    """Trains one optimizee of ``optimizee`` with ``optimizer`` for as many steps as batches.

    Args:
        optimizer: any object of the optimizer protocol (``LSTMOptimizer``, ``SGD``, ...).
        optimizee: the optimizee family.
        seed: run seed: the optimizee's initialisation (the minibatch order is the data's).
        name: the optimizer's label in logs and summaries.
        eval_every: held-out test loss and accuracy every this many steps (and at the end).
        steps: total steps (to evaluate at the last one).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        optimizee: MLPOptimizee,
        seed: int = 0,
        name: str | None = None,
        eval_every: int = 10,
        steps: int = 1000,
    ) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.optimizee = optimizee
        self.seed, self.eval_every, self.steps = seed, eval_every, steps
        self.name = name or getattr(optimizer, "name", type(optimizer).__name__.lower())
        self.test_accuracy = MulticlassAccuracy(optimizee.sizes[-1], average="micro")
        self.params: Params | None = None
        self.opt_state: State | None = None
        self.snapshot: Snapshot | None = None
        self.history: dict[str, list[tuple[int, float]]] = {}

    def on_test_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "meta-testing needs autograd: build the Trainer with inference_mode=False"
            )
        self.params = init_optimizee(self.optimizee, self.seed, self.device)
        self.opt_state = self.optimizer.init_state(self.params)
        lr = getattr(self.optimizer, "lr", None)  # baselines; the learned optimizer has none
        if lr is not None:
            self.log_scalars({"meta_test/lr": float(lr)}, 0)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.optimizee.check_input(x.shape[-1])
        inner = inner_step(self.optimizee, self.optimizer, self.params, self.opt_state, x, y)
        loss, grads, updates = inner.loss, inner.grads, inner.updates
        with torch.no_grad():
            acc = self.optimizee.accuracy(self.params, x, y)
        step = batch_idx + 1
        self.snapshot = Snapshot(
            step, self.params, self.opt_state, grads, updates, loss.item(), x, y
        )
        metrics = {"meta_test/train_loss": loss.item(), "meta_test/train_acc": acc.item()}
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"{self.name}: optimizee loss is {loss.item()} at step {step} (diverged)"
            )
        self.params, self.opt_state = inner.params, inner.state
        if step % self.eval_every == 0 or step == self.steps:
            metrics.update(self.evaluate())
        self.log_scalars(metrics, step)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on the held-out test split (after this step's update)."""
        dm = self.trainer.datamodule
        x, y = dm.test_x.to(self.device), dm.test_y.to(self.device)
        logits = self.optimizee.logits(self.params, x[None])[0]
        self.test_accuracy.reset()
        self.test_accuracy.update(logits, y)
        loss = torch.nn.functional.cross_entropy(logits, y)
        return {
            "meta_test/test_loss": loss.item(),
            "meta_test/test_acc": self.test_accuracy.compute().item(),
        }

    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        """Stream to the logger (rank zero) and keep a copy for the run's summary."""
        for tag, value in metrics.items():
            self.history.setdefault(tag, []).append((step, float(value)))
        if self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics(metrics, step=step)

    def configure_optimizers(self) -> Any:
        return None
