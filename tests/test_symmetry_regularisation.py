"""The symmetry-breaking penalty of meta-training: beta * sum_t sum_j |d_j(-update_t)|."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from l2o.data import MNISTDataModule, seeded_generator
from l2o.meta_training import MetaTrainingSystem

TINY = {"sizes": [784, 8, 10], "activation": "leaky_relu"}


def system(beta: float, constraint: str = "rescale", optimizee=TINY) -> MetaTrainingSystem:
    torch.manual_seed(0)  # the same LSTM initialisation for every beta
    return MetaTrainingSystem(
        optimizee=optimizee,
        unroll=4,
        optimizee_steps=8,
        meta_lr=1e-2,
        symmetry_beta=beta,
        symmetry_constraint=constraint,
    )


def data(mnist_root: str, **kw) -> MNISTDataModule:
    dm = MNISTDataModule(
        root=mnist_root,
        download=False,
        batch_size=32,
        unroll=4,
        optimizee_steps=8,
        val_steps=0,
        **kw,
    )
    dm.setup()
    return dm


def held_out_deviation(model: MetaTrainingSystem, dm: MNISTDataModule) -> float:
    """Mean penalty over a fixed 8-step run on fresh optimizees (the same for every model)."""
    gen = seeded_generator(123)
    idx = torch.randint(0, len(dm.train_x), (8, 4, 32), generator=gen)
    params = model.fresh_optimizees(4, (99,))
    state = model.learned_optimizer.init_state(params)
    with torch.enable_grad():
        _, pen, _, _ = model.unroll(
            params, state, dm.train_x[idx], dm.train_y[idx], beta=1.0, meta=False
        )
    return pen.mean().item()


@pytest.mark.parametrize(
    ("constraint", "optimizee"),
    [
        ("rescale", TINY),
        ("scale", {"sizes": [784, 8, 10], "activation": "relu", "batchnorm": True}),
    ],
)
def test_penalty_gradient_reaches_every_lstm_parameter(mnist_root, constraint, optimizee):
    model, dm = system(1.0, constraint, optimizee), data(mnist_root)
    x, y = next(iter(dm.train_dataloader()))
    params = model.fresh_optimizees(1, (0,))
    with torch.enable_grad():
        _, pen, _, _ = model.unroll(
            params, model.learned_optimizer.init_state(params), x, y, beta=1.0
        )
        grads = torch.autograd.grad(pen.sum(), list(model.learned_optimizer.parameters()))
    assert pen.item() > 0
    for (name, _), g in zip(model.learned_optimizer.named_parameters(), grads):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name


@pytest.mark.slow
def test_penalty_lowers_symmetry_breaking_against_beta_zero(mnist_root):
    deviations = {}
    for beta in (0.0, 1.0):
        model, dm = system(beta), data(mnist_root, runs_per_epoch=8)
        start = held_out_deviation(model, dm)
        L.Trainer(
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            enable_progress_bar=False,
            inference_mode=False,
        ).fit(model, datamodule=dm)
        deviations[beta] = held_out_deviation(model, dm)
        assert model.trainer.global_step == 16
    assert start > 0
    # Same seeds, same data: only the penalty differs, and it cuts the breaking down.
    assert deviations[1.0] < 0.5 * deviations[0.0], deviations
