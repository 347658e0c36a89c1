"""The step-length analysis (callbacks/step_length.py) against the fit done from scratch here:
the four observations by reverse-mode autograd and a sample loop, the weighted least squares by
numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from callbacks.step_length import CONVEX, DISTANCE, VALUE, StepLength
from l2o.optimizers import SGD
from tests.test_callbacks import BN, LEAKY, Run, make_optimizer

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__`.*"),
]


def reference(optimizee, snapshot) -> tuple[float, float]:
    """(step length, distance) of the snapshot's step on its own minibatch, float64."""
    before = tuple(p.double() for p in snapshot.params)
    d = tuple(u.double() for u in snapshot.updates)
    x, y = snapshot.x.double(), snapshot.y
    n = y.shape[-1]
    f, g = [], []
    for theta in (before, tuple(p + u for p, u in zip(before, d))):
        fs, gs = [], []
        for i in range(n):  # per-sample loss and its slope along d, one backward each
            ps = tuple(t.clone().requires_grad_(True) for t in theta)
            loss = optimizee.losses(ps, x, y)[0, i]
            grads = torch.autograd.grad(loss, ps)
            fs.append(float(loss.detach()))
            gs.append(sum(float((gr * di).sum()) for gr, di in zip(grads, d)))
        f.append(np.array(fs))
        g.append(np.array(gs))
    obs = np.array([f[0].mean(), f[1].mean(), g[0].mean(), g[1].mean()])
    var = np.array([a.var(ddof=1) / n for a in (f[0], f[1], g[0], g[1])])
    design = np.array([[1, 0, 0], [1, 1, 1], [0, 1, 0], [0, 1, 2]], dtype=float)
    w = 1 / np.sqrt(var)
    c, b, a = np.linalg.lstsq(design * w[:, None], obs * w, rcond=None)[0]
    dist = math.sqrt(sum(float(u.square().sum()) for u in d))
    return (-2 * a / b - 1 if a > 0 else math.nan), dist


@pytest.mark.parametrize("optimizee", [LEAKY, BN], ids=["leaky", "batchnorm"])
@pytest.mark.parametrize("opt_name", ["sgd", "lstm"])
def test_step_length_matches_a_fit_from_scratch(tmp_path, optimizee, opt_name):
    run = Run(tmp_path, make_optimizer(opt_name), [StepLength(every_n_steps=1)], optimizee)
    value, convex, dist = run.recorded(VALUE), run.recorded(CONVEX), run.recorded(DISTANCE)
    assert sorted(value) == [1, 2, 3, 4]
    for snap in run.keep.snapshots:
        want, want_dist = reference(optimizee, snap)
        assert dist[snap.step] == pytest.approx(want_dist, rel=1e-5)
        if math.isnan(want):
            assert math.isnan(value[snap.step]) and convex[snap.step] == 0.0
        else:
            assert value[snap.step] == pytest.approx(want, rel=1e-4, abs=1e-5), snap.step
            assert convex[snap.step] == 1.0


def test_a_tiny_step_lands_near_its_start_and_a_huge_one_past_the_wall(tmp_path):
    """SGD at a tiny rate barely moves down the valley: ~-1 (the start). At a rate far past
    the valley's width the end point climbs above the start: > 1."""
    tiny = Run(tmp_path / "a", SGD(lr=1e-4), [StepLength(every_n_steps=1)], steps=1)
    assert tiny.recorded(VALUE)[1] == pytest.approx(-1, abs=1e-3)
    huge = Run(tmp_path / "b", SGD(lr=30.0), [StepLength(every_n_steps=1)], steps=1)
    assert huge.recorded(VALUE)[1] > 1


def test_its_tags_never_say_alpha():
    cb = StepLength()
    tags = cb.scalar_tags(LEAKY)
    assert all(t.startswith("step_length/") and "alpha" not in t for t in tags)
    assert sorted(t for c in cb.charts(LEAKY).values() for t in c) == sorted(tags)
    fig = cb.figure(LEAKY)
    assert [p.sanity for p in fig.panels] == [False, False, True]
