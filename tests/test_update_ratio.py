"""The update-to-weight norm ratio analysis (callbacks/update_ratio.py) against a ratio computed
from scratch, read back from TensorBoard's event files and from the run's record."""

from __future__ import annotations

import math

import pytest

from callbacks.update_ratio import UpdateRatio, tensor_names
from l2o.meta_testing import init_optimizee
from l2o.optimizees import grads_of
from l2o.optimizers import SGD, Adam
from tests.test_callbacks import BN, LEAKY, LR, STEPS, Run, tiny_data

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__`.*"),
]


def test_tensor_names_follow_the_parameter_tuple():
    assert tensor_names(LEAKY) == ["layer1/weight", "layer1/bias", "layer2/weight", "layer2/bias"]
    assert tensor_names(BN)[:4] == ["layer1/weight", "layer1/bias", "layer1/gamma", "layer1/beta"]
    assert len(tensor_names(BN)) == len(BN.shapes)


def test_sgd_ratio_is_lr_times_gradient_over_weight_norm(tmp_path):
    """Plain SGD's first update is -lr g at the seeded initialisation: the ratio of each tensor
    is lr ||g_k|| / ||theta_k||, with g recomputed here on the run's first minibatch."""
    run = Run(tmp_path, SGD(lr=LR, momentum=0.0), [UpdateRatio(every_n_steps=2)])
    params = init_optimizee(LEAKY, seed=0)
    x, y = next(iter(tiny_data().test_dataloader()))
    _, grads = grads_of(LEAKY.loss, params, x, y)
    for name, g, p in zip(tensor_names(LEAKY), grads, params):
        expected = LR * float(g.double().norm()) / float(p.double().norm())
        tag = f"update_ratio/{name}"
        assert run.recorded(tag)[1] == pytest.approx(expected, rel=1e-6), name
        assert run.logged(tag)[1] == pytest.approx(expected, rel=1e-6), name  # float32 there
        assert sorted(run.recorded(tag)) == [1, 2, 4]  # step 1, then every 2nd of STEPS
    assert STEPS == 4


def test_adam_first_step_ratio_counts_the_nonzero_gradients(tmp_path):
    """Adam's first update is lr g / (|g| + eps): |u| = lr on every coordinate with |g| >> eps,
    so ||u_k|| = lr sqrt(n_k) with n_k the nonzero gradient coordinates of tensor k."""
    run = Run(tmp_path, Adam(lr=1e-2), [UpdateRatio(every_n_steps=1)], steps=1, blank=5)
    params = init_optimizee(LEAKY, seed=0)
    x, y = next(iter(tiny_data(blank=5).test_dataloader()))
    _, grads = grads_of(LEAKY.loss, params, x, y)
    for name, g, p in zip(tensor_names(LEAKY), grads, params):
        n_k = int((g.abs() > 1e-6).sum())
        expected = 1e-2 * math.sqrt(n_k) / float(p.double().norm())
        assert run.recorded(f"update_ratio/{name}")[1] == pytest.approx(expected, rel=1e-3)


def test_batchnorm_beta_starts_at_zero_so_its_first_ratio_is_nan(tmp_path):
    run = Run(tmp_path, Adam(lr=1e-2), [UpdateRatio(every_n_steps=1)], optimizee=BN, steps=2)
    assert math.isnan(run.recorded("update_ratio/layer1/beta")[1])
    assert math.isfinite(run.recorded("update_ratio/layer1/beta")[2])  # beta moved
    assert set(UpdateRatio().scalar_tags(BN)) == {
        t for t in run.record.scalars if t.startswith("update_ratio/")
    }


def test_it_owns_its_charts_columns_and_figure():
    cb = UpdateRatio()
    tags = cb.scalar_tags(LEAKY)
    assert sorted(t for c in cb.charts(LEAKY).values() for t in c) == sorted(tags)
    assert [c.tag for c in cb.summary_columns(LEAKY)] == [
        "update_ratio/layer1/weight",
        "update_ratio/layer2/weight",
    ]
    assert [p.tag for p in cb.figure(LEAKY).panels] == tags
    with pytest.raises(ValueError, match="every_n_steps"):
        UpdateRatio(every_n_steps=0)
