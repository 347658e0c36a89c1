"""The gradient signal-to-noise analysis (callbacks/gsnr.py) against per-sample gradients taken
one sample at a time here, and its use of the step's shared cache (no second pass)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import callbacks.base
from callbacks.gsnr import GradientNoise
from l2o.optimizees import grads_of
from tests.test_callbacks import BN, LEAKY, Run, make_optimizer

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__`.*"),
]


def loop_grads(optimizee, snapshot) -> np.ndarray:
    """(N, D) per-sample gradients, float64. Without BatchNorm each sample alone; with it
    each sample's loss inside the whole minibatch (the statistics couple the samples)."""
    params = tuple(p.double() for p in snapshot.params)
    x, y = snapshot.x.double(), snapshot.y
    rows = []
    for i in range(y.shape[-1]):
        if optimizee.batchnorm:
            ps = tuple(p.clone().requires_grad_(True) for p in params)
            g = torch.autograd.grad(optimizee.losses(ps, x, y)[0, i], ps)
        else:
            _, g = grads_of(optimizee.loss, params, x[:, i : i + 1], y[:, i : i + 1])
        rows.append(torch.cat([t.reshape(-1) for t in g]).numpy())
    return np.stack(rows)


@pytest.mark.parametrize("optimizee", [LEAKY, BN], ids=["leaky", "batchnorm"])
def test_gsnr_and_norm_test_match_per_sample_gradients_of_a_loop(tmp_path, optimizee):
    run = Run(tmp_path, make_optimizer("sgd"), [GradientNoise(every_n_steps=2)], optimizee)
    gsnr, norm = run.recorded("gsnr/mean_gsnr"), run.recorded("gsnr/norm_test")
    assert sorted(gsnr) == [1, 2, 4]
    for snap in run.keep.snapshots:
        if snap.step not in gsnr:
            continue
        g = loop_grads(optimizee, snap)
        n = len(g)
        mean, var = g.mean(0), g.var(0)  # sigma^2 with 1/N (Liu et al.)
        live = var > 1e-14 * (g**2).mean(0)
        # With BatchNorm the first layer's bias has a zero gradient in exact arithmetic (the
        # batch mean cancels it), but float32 rounding leaves sigma_j ~ 1e-9 > 0: those 8 of
        # 220 coordinates score noise / noise, in the run (float32) and here (float64) alike,
        # so the two agree to their share only (l2o.gsnr's constant test is relative to
        # float64 rounding; see the report). Without BatchNorm: 1e-4.
        rel = 0.05 if optimizee.batchnorm else 1e-4
        assert gsnr[snap.step] == pytest.approx((mean[live] ** 2 / var[live]).mean(), rel=rel)
        # the minibatch gradient the optimizer saw is the per-sample gradients' mean
        seen = torch.cat([t.reshape(-1) for t in snap.grads]).double().numpy()
        np.testing.assert_allclose(mean, seen, rtol=1e-4, atol=1e-7)
        theta = math.sqrt(g.var(0, ddof=1).sum() / n) / np.linalg.norm(mean)
        assert norm[snap.step] == pytest.approx(theta, rel=1e-4)


def test_blank_features_are_constant_coordinates(tmp_path):
    """Always-zero input features give first-layer weight gradients that are exactly 0 for
    every sample: that share of coordinates is reported, not scored."""
    run = Run(tmp_path, make_optimizer("sgd"), [GradientNoise(every_n_steps=1)], blank=5)
    hidden = LEAKY.shapes[0][0]
    total = sum(math.prod(s) for s in LEAKY.shapes)
    assert run.recorded("gsnr/constant_fraction")[1] == pytest.approx(5 * hidden / total)


def test_two_analyses_share_one_computation_of_per_sample_gradients(tmp_path, monkeypatch):
    calls = []
    real = callbacks.base.per_sample_grads

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(callbacks.base, "per_sample_grads", counting)
    a, b = GradientNoise(every_n_steps=1), GradientNoise(every_n_steps=1)
    b.name = "gsnr_again"  # only to tell them apart; the cache key is the sample set
    run = Run(tmp_path, make_optimizer("sgd"), [a, b], steps=3)
    assert len(calls) == 3  # once per step, not once per analysis
    assert sorted(run.recorded("gsnr/mean_gsnr")) == [1, 2, 3]


def test_it_owns_its_charts_columns_and_figure():
    cb = GradientNoise()
    tags = cb.scalar_tags(LEAKY)
    assert all(t.startswith("gsnr/") for t in tags)
    assert sorted(t for c in cb.charts(LEAKY).values() for t in c) == sorted(tags)
    assert {c.tag for c in cb.summary_columns(LEAKY)} <= set(tags)
    panels = cb.figure(LEAKY).panels
    assert [p.tag for p in panels] == tags
    assert [p.sanity for p in panels] == sorted(p.sanity for p in panels)  # sanity last
    with pytest.raises(ValueError, match="chunk_size"):
        GradientNoise(chunk_size=0)
