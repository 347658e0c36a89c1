"""Schedule-free optimizers are evaluated where they mean to be: the held-out test loss of
meta-testing (MetaTestSystem and the population run) is the loss at x, the point that the
optimizer's own ``.eval()`` puts in the model, not at y, where the gradients are taken. The
reference is the schedule-free package itself, driven directly with autograd on a copy."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from l2o.meta_testing import MetaTestSystem, init_optimizee
from l2o.optimizees import MLPOptimizee
from l2o.population import run_seeds
from l2o.records import RecordLogger, read_record
from l2o.streams import MetaTestData, MinibatchStream
from l2o.torch_adapter import make_torch_optimizer

schedulefree = pytest.importorskip("schedulefree")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__`.*"),
]

D_IN, CLASSES, BATCH, STEPS, EVAL_EVERY = 20, 4, 16, 6, 3
OPTIMIZEE = MLPOptimizee((D_IN, 8, CLASSES))
CASES = [("SGDScheduleFree", 0.5, {"momentum": 0.9}), ("AdamWScheduleFree", 0.05, {})]


def tiny_data() -> MetaTestData:
    g = torch.Generator().manual_seed(0)
    return MetaTestData(
        torch.randn(160, D_IN, generator=g),
        torch.randint(0, CLASSES, (160,), generator=g),
        torch.randn(64, D_IN, generator=g),
        torch.randint(0, CLASSES, (64,), generator=g),
        BATCH,
        STEPS,
    )


def reference(cls_name: str, lr: float, options: dict, seed: int) -> dict[int, tuple]:
    """``{step: (test loss at x, test loss at y)}`` at the evaluated steps: the schedule-free
    optimizer on leaf tensors with autograd, x read by ``.eval()`` on a deep copy."""
    data = tiny_data()
    leaves = [p.clone().requires_grad_(True) for p in init_optimizee(OPTIMIZEE, seed)]
    opt = getattr(schedulefree, cls_name)(leaves, lr=lr, **options)
    opt.train()

    def test_loss(params) -> float:
        with torch.no_grad():
            logits = OPTIMIZEE.logits(tuple(params), data.test_x[None])[0]
            return F.cross_entropy(logits, data.test_y).item()

    out = {}
    stream = MinibatchStream(data.train_x, data.train_y, STEPS, BATCH, seed)
    for step, (x, y) in enumerate(stream, 1):
        opt.zero_grad()
        F.cross_entropy(OPTIMIZEE.logits(tuple(leaves), x)[0], y[0]).backward()  # x: (1, B, D)
        opt.step()
        if step % EVAL_EVERY == 0 or step == STEPS:
            copy_leaves, copy_opt = copy.deepcopy((leaves, opt))
            copy_opt.eval()  # the copy's leaves become x; the run's stay at y
            out[step] = (test_loss(copy_leaves), test_loss(leaves))
    return out


def one_seed_test_losses(tmp_path, optimizer, seed: int) -> dict[int, float]:
    data = tiny_data()
    data.seed = seed
    module = MetaTestSystem(optimizer, OPTIMIZEE, seed, EVAL_EVERY, STEPS)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        logger=[RecordLogger(tmp_path / f"seed_{seed}")],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.test(module, datamodule=data, verbose=False)
    steps, values = read_record(tmp_path / f"seed_{seed}").scalars["meta_test/test_loss"]
    return dict(zip(steps.tolist(), values.tolist()))


@pytest.mark.parametrize("cls_name, lr, options", CASES, ids=[c[0] for c in CASES])
def test_test_loss_is_taken_at_x(tmp_path, cls_name, lr, options):
    optimizer = make_torch_optimizer(f"schedulefree.{cls_name}", lr, **options)
    seeds = [0, 1]
    runs = run_seeds(optimizer, OPTIMIZEE, tiny_data(), seeds, eval_every=EVAL_EVERY)
    for run, seed in zip(runs, seeds):
        ref = reference(cls_name, lr, options, seed)
        logged = one_seed_test_losses(tmp_path, optimizer, seed)
        assert sorted(logged) == sorted(ref) == run.test_steps == [3, 6]
        for step, population_loss in zip(run.test_steps, run.test_loss):
            at_x, at_y = ref[step]
            # x and y differ by far more than the tolerance of the match below
            assert abs(at_x - at_y) > 1e-4 * abs(at_y), (step, at_x, at_y)
            assert logged[step] == pytest.approx(at_x, rel=1e-5, abs=1e-6), (step, at_y)
            assert population_loss == pytest.approx(at_x, rel=1e-5, abs=1e-6), (step, at_y)
