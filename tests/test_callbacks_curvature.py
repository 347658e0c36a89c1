"""The curvature analysis (callbacks/curvature.py) against a dense Hessian of the step's
minibatch loss, computed here in float64 with torch.autograd.functional.hessian."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch

from callbacks.curvature import EDGE, LAMBDA_MAX, TRACE, TRACE_STDERR, Curvature
from l2o.meta_testing import MetaTestSystem
from l2o.optimizers import SGD
from tests.test_callbacks import BN, LEAKY, LR, Run, make_optimizer

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__`.*"),
]


def dense_hessian(optimizee, snapshot) -> torch.Tensor:
    """The (D, D) Hessian of the minibatch's mean loss at the snapshot's params, float64."""
    shapes = [p.shape for p in snapshot.params]
    sizes = [p.numel() for p in snapshot.params]
    x, y = snapshot.x.double(), snapshot.y

    def loss(flat):
        ps = tuple(t.reshape(s) for t, s in zip(flat.split(sizes), shapes))
        return optimizee.loss(ps, x, y).sum()

    flat = torch.cat([p.double().reshape(-1) for p in snapshot.params])
    return torch.autograd.functional.hessian(loss, flat)


@pytest.mark.parametrize("optimizee", [LEAKY, BN], ids=["leaky", "batchnorm"])
@pytest.mark.parametrize("opt_name", ["sgd", "lstm"])
def test_lambda_max_and_trace_match_the_dense_hessian(tmp_path, optimizee, opt_name):
    run = Run(tmp_path, make_optimizer(opt_name), [Curvature(every_n_steps=2)], optimizee)
    lam, tr, se = run.recorded(LAMBDA_MAX), run.recorded(TRACE), run.recorded(TRACE_STDERR)
    assert sorted(lam) == [1, 2, 4]
    for snap in run.keep.snapshots:
        if snap.step not in lam:
            continue
        evals = torch.linalg.eigvalsh(dense_hessian(optimizee, snap))
        # Lanczos in float32 against float64 eigvalsh: the float32 HVPs limit it to ~1e-6
        assert lam[snap.step] == pytest.approx(float(evals[-1]), rel=2e-5), snap.step
        exact = float(evals.sum())
        assert abs(tr[snap.step] - exact) <= 4 * se[snap.step], (snap.step, tr, exact)
        assert se[snap.step] > 0
    edge = run.recorded(EDGE) if EDGE in run.record.scalars else {}
    if opt_name == "sgd":
        assert edge == {1: 2 / LR, 2: 2 / LR, 4: 2 / LR}
    else:  # a learned optimizer has no learning rate: no edge-of-stability line
        assert edge == {}


def test_edge_of_stability_shares_the_lambda_max_chart():
    cb = Curvature()
    charts = cb.charts(LEAKY)
    assert [LAMBDA_MAX, EDGE] in charts.values()
    assert sorted(t for c in charts.values() for t in c) == sorted(cb.scalar_tags(LEAKY))
    assert [c.tag for c in cb.summary_columns(LEAKY)] == [LAMBDA_MAX, TRACE]
    no_trace = Curvature(num_probes=0)
    assert no_trace.scalar_tags(LEAKY) == [LAMBDA_MAX, EDGE]
    with pytest.raises(ValueError, match="num_probes"):
        Curvature(num_probes=1)


def test_step_one_is_the_initialisations_curvature_for_any_optimizer(tmp_path):
    """Step 1 sees the seeded initialisation and the first minibatch, whatever the optimizer:
    the same lambda_max (the analysis reads the params before the step, not after)."""
    a = Run(tmp_path / "a", SGD(lr=1e-6), [Curvature(every_n_steps=1, num_probes=0)], steps=1)
    b = Run(tmp_path / "b", make_optimizer("lstm"), [Curvature(1, num_probes=0)], steps=1)
    assert a.recorded(LAMBDA_MAX)[1] == pytest.approx(b.recorded(LAMBDA_MAX)[1], rel=1e-5)


@pytest.mark.slow
def test_the_new_analyses_on_a_batchnorm_cnn(tmp_path):
    """A conv optimizee with BatchNorm2d (8x8 images, 207 parameters): lambda_max against the
    dense Hessian, the step length against the fit from scratch, the norm test against a loop
    of per-sample gradients."""
    from callbacks.gsnr import GradientNoise
    from callbacks.step_length import VALUE, StepLength
    from l2o.optimizees import ConvOptimizee
    from l2o.records import RecordLogger, read_record
    from l2o.streams import MetaTestData
    from tests.test_callbacks import Keep
    from tests.test_callbacks_gsnr import loop_grads
    from tests.test_callbacks_step_length import reference

    cnn = ConvOptimizee(channels=(2, 3), image=(1, 8, 8), activation="relu", batchnorm=True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 64, generator=g), torch.randint(0, 10, (96,), generator=g)
    data = MetaTestData(x[:64], y[:64], x[64:], y[64:], 16, 2, seed=0)
    keep = Keep()
    cbs = [Curvature(1, num_probes=0), StepLength(1), GradientNoise(1)]
    trainer = L.Trainer(
        accelerator="cpu",
        logger=RecordLogger(tmp_path / "record"),
        callbacks=[*cbs, keep],
        inference_mode=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.test(MetaTestSystem(SGD(lr=0.05), cnn, steps=2), datamodule=data, verbose=False)
    rec = {
        t: dict(zip(s.tolist(), v.tolist()))
        for t, (s, v) in read_record(tmp_path / "record").scalars.items()
    }
    for snap in keep.snapshots:
        evals = torch.linalg.eigvalsh(dense_hessian(cnn, snap))
        assert rec[LAMBDA_MAX][snap.step] == pytest.approx(float(evals[-1]), rel=2e-5)
        want, _ = reference(cnn, snap)
        assert rec[VALUE][snap.step] == pytest.approx(want, rel=1e-4, abs=1e-5)
        gs = loop_grads(cnn, snap)
        theta = math.sqrt(gs.var(0, ddof=1).sum() / len(gs)) / np.linalg.norm(gs.mean(0))
        assert rec["gsnr/norm_test"][snap.step] == pytest.approx(theta, rel=1e-4)


def test_the_new_analyses_read_the_same_through_the_torch_adapter(tmp_path):
    """torch.optim.SGD through l2o.torch_adapter makes the project's SGD updates: every value of
    the three new analyses agrees to 1e-6, and the adapter's lr gives the edge of stability."""
    from callbacks.gsnr import GradientNoise
    from callbacks.step_length import StepLength
    from l2o.torch_adapter import make_torch_optimizer

    def analyses():
        return [Curvature(1), StepLength(1), GradientNoise(1)]

    ours = Run(tmp_path / "a", SGD(lr=LR, momentum=0.0), analyses(), steps=3)
    torch_sgd = make_torch_optimizer("torch.optim.SGD", lr=LR)
    theirs = Run(tmp_path / "b", torch_sgd, analyses(), steps=3)
    tags = [t for cb in analyses() for t in cb.scalar_tags(LEAKY)]
    for tag in tags:
        a, b = ours.recorded(tag), theirs.recorded(tag)
        assert sorted(a) == sorted(b) == [1, 2, 3], tag
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-9), (tag, step)
    assert theirs.recorded(EDGE) == {1: 2 / LR, 2: 2 / LR, 3: 2 / LR}
