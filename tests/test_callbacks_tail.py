"""The study's definitions as options of the tail-index and covariance callbacks, and the
per-tensor tail indices: each against a dense recomputation from the run's own snapshots."""

from __future__ import annotations

import math

import pytest
import torch

from callbacks import TailIndex, UpdateCovariance
from callbacks.tail_index import LAYER_STATISTICS, tensor_names
from l2o.optimizees import MLPOptimizee, grads_of
from l2o.optimizers import SGD, Adam
from l2o.tail_index import layer_alphas, noise_alphas
from tests.test_callbacks import BATCH, BN, D_IN, LEAKY, LR, Run, make_optimizer, tiny_data

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__`.*"),
]


def flat(ps):
    return torch.cat([p.reshape(-1) for p in ps])


def dense_noise(snap, optimizer, n):
    """(grad noise, update noise about U(mean grad), update noise about the mean update),
    one autograd call and one opt.update per minibatch of the analysis set."""
    data = tiny_data()
    xb = data.train_x[: n * BATCH].view(n, 1, BATCH, D_IN)
    yb = data.train_y[: n * BATCH].view(n, 1, BATCH)
    grads = [grads_of(snap.optimizee.loss, snap.params, x, y)[1] for x, y in zip(xb, yb)]
    full = tuple(torch.stack(gs).mean(0) for gs in zip(*grads))
    with torch.no_grad():
        ups = torch.stack([flat(optimizer.update(g, snap.state, snap.params)[0]) for g in grads])
        full_update = flat(optimizer.update(full, snap.state, snap.params)[0])
    g = torch.stack([flat(r) for r in grads]) - flat(full)
    return g, ups - full_update, ups - ups.mean(0)


def test_tensor_names():
    assert tensor_names(LEAKY) == ["layer0.weight", "layer0.bias", "layer1.weight", "layer1.bias"]
    assert tensor_names(BN)[:4] == ["layer0.weight", "layer0.bias", "layer0.gamma", "layer0.beta"]
    assert len(tensor_names(MLPOptimizee((784, 100, 100, 10)))) == 6


@pytest.mark.parametrize("center", ["full_batch_update", "mean_update"])
def test_noise_centres_match_a_dense_recomputation(tmp_path, center):
    """Adam is nonlinear: the mean minibatch update is not the update of the mean gradient, so
    pooled and robust depend on the centre, and each must equal its dense recomputation;
    standardized works on row differences, where the centre cancels."""
    opt = Adam(lr=1e-2)
    run = Run(tmp_path, opt, [TailIndex(1, analysis_batches=8, noise_center=center)], steps=3)
    for snap in run.keep.snapshots[1:]:  # step 1 is Adam's sign step
        grad, about_full, about_mean = dense_noise(snap, opt, 8)
        rows = about_full if center == "full_batch_update" else about_mean
        other = about_mean if center == "full_batch_update" else about_full
        want, wrong = noise_alphas(rows), noise_alphas(other)
        for stat in ("pooled", "robust", "standardized", "zero_fraction"):
            got = run.recorded(f"tail_index/update/{stat}")[snap.step]
            assert got == pytest.approx(want[stat], rel=1e-4, abs=1e-9), (stat, snap.step)
        for stat in ("pooled", "robust"):  # the test can tell the centres apart
            assert abs(want[stat] - wrong[stat]) > 1e-3
        # (float32 noise: the centre cancels up to rounding)
        assert want["standardized"] == pytest.approx(wrong["standardized"], rel=1e-5)
        got = run.recorded("tail_index/grad/robust")[snap.step]
        assert got == pytest.approx(noise_alphas(grad)["robust"], rel=1e-4)


@pytest.mark.parametrize("opt_name", ["sgd", "lstm"])
def test_per_tensor_alphas_match_layer_alphas_of_the_dense_noise(tmp_path, opt_name):
    opt = make_optimizer(opt_name)
    run = Run(tmp_path, opt, [TailIndex(1, analysis_batches=10)], steps=2)
    names = tensor_names(LEAKY)
    sizes = [math.prod(s) for s in LEAKY.shapes]
    for snap in run.keep.snapshots:
        grad, update, _ = dense_noise(snap, opt, 10)
        for kind, rows in (("grad", grad), ("update", update)):
            layers = layer_alphas(rows, sizes)
            for name, want in zip(names, layers):
                for stat in LAYER_STATISTICS:
                    got = run.recorded(f"tail_index/{kind}/{stat}/{name}")[snap.step]
                    assert math.isfinite(got), (kind, stat, name)
                    rel = 1e-3 if stat == "standardized" else 1e-4
                    if opt_name == "lstm" and stat == "standardized":
                        # The LSTM's fast replay and its per-minibatch updates round
                        # differently (~1e-7 of |u|), and at step 1 some noise entries are that
                        # small (3.7e-9 beside a median 1.5e-4): the standardized estimate
                        # reads them, 0.6% apart on an Intel Xeon (< 0.1% on an AMD EPYC).
                        rel = 1e-2
                    assert got == pytest.approx(want[stat], rel=rel), (kind, stat, name)
    # SGD's update noise is -lr x its gradient noise: every tensor's alpha is the gradient's
    if opt_name == "sgd":
        for name in names:
            for stat in LAYER_STATISTICS:
                g = run.recorded(f"tail_index/grad/{stat}/{name}")
                u = run.recorded(f"tail_index/update/{stat}/{name}")
                assert all(u[s] == pytest.approx(g[s], rel=1e-5) for s in g), (stat, name)


def test_tail_index_options_in_tags_columns_and_figure():
    cb = TailIndex(noise_center="mean_update")
    tags = cb.scalar_tags(LEAKY)
    assert "tail_index/update/standardized/layer0.weight" in tags
    assert "tail_index/grad/robust/layer1.bias" in tags
    assert len(tags) == 2 * 5 + 2 * 3 * 4
    headers = {c.tag: c.header for c in cb.summary_columns(LEAKY)}
    assert headers["tail_index/update/standardized"] == "α update/standardized (mean_update)"
    assert headers["tail_index/grad/standardized"] == "α grad/standardized"
    fig = cb.figure(LEAKY)
    per_tensor = [p.tag for p in fig.panels if p.tag.count("/") == 3]
    assert per_tensor == [
        f"tail_index/{k}/standardized/{n}" for n in tensor_names(LEAKY) for k in ("update", "grad")
    ]
    assert "mean update" in fig.title
    assert TailIndex(per_layer=False).scalar_tags(LEAKY) == tags[:10]
    with pytest.raises(ValueError, match="noise_center"):
        TailIndex(noise_center="mean")


def test_covariance_minibatch_mode_matches_dense_minibatch_covariances(tmp_path):
    """SGD: the minibatch-mode update covariance is lr^2 x the covariance of minibatch
    gradients computed densely (one autograd call per minibatch of the run's B, D x D)."""
    cb = UpdateCovariance(every_n_steps=1, num_samples=None, covariance_mode="minibatch")
    run = Run(tmp_path, SGD(lr=LR, momentum=0.0), [cb], steps=2)
    data = tiny_data()
    n = len(data.train_x) // BATCH
    for snap in run.keep.snapshots:
        xb = data.train_x[: n * BATCH].view(n, 1, BATCH, D_IN)
        yb = data.train_y[: n * BATCH].view(n, 1, BATCH)
        g = torch.stack([flat(grads_of(LEAKY.loss, snap.params, x, y)[1]) for x, y in zip(xb, yb)])
        a = (g - g.mean(0)).double()
        k = a.t() @ a / n
        top, trace = float(torch.linalg.eigvalsh(k)[-1]), float(torch.trace(k))
        step = snap.step
        assert run.recorded("covariance/grad/top_eig")[step] == pytest.approx(top, rel=1e-4)
        assert run.recorded("covariance/grad/trace")[step] == pytest.approx(trace, rel=1e-4)
        upd = run.recorded("covariance/update/top_eig")[step]
        assert upd == pytest.approx(LR**2 * top, rel=1e-4)
    header = cb.summary_columns(LEAKY)[0].header
    assert header == "update/top_eig (minibatch)"
    assert "minibatch updates" in cb.figure(LEAKY).panels[0].title


def test_covariance_mode_errors():
    with pytest.raises(ValueError, match="covariance_mode"):
        UpdateCovariance(covariance_mode="batch")
    cb = UpdateCovariance(num_samples=BATCH + 1, covariance_mode="minibatch")
    with pytest.raises(ValueError, match="fewer than 2 minibatches"):
        cb.check(tiny_data())
    UpdateCovariance(num_samples=2 * BATCH, covariance_mode="minibatch").check(tiny_data())
    assert UpdateCovariance().summary_columns(LEAKY)[0].header == "update/top_eig (per_sample)"


def test_evaluate_sets_the_options_through_analyses():
    import evaluate

    parser = evaluate.build_parser()
    cfg = parser.parse_args(
        [
            "--analyses",
            "[{class_path: callbacks.TailIndex, init_args: {noise_center: mean_update}},"
            " {class_path: callbacks.UpdateCovariance,"
            " init_args: {covariance_mode: minibatch, num_samples: null}}]",
            "--every",
            "{tail_index: 5}",
        ]
    )
    cfg.analyses = evaluate.select_analyses(cfg)
    tail, cov = parser.instantiate_classes(cfg).analyses
    assert (tail.noise_center, tail.every_n_steps) == ("mean_update", 5)
    assert (cov.covariance_mode, cov.num_samples) == ("minibatch", None)


@pytest.mark.parametrize(
    "opt", [SGD(lr=LR, momentum=0.9), SGD(lr=LR, momentum=0.9, nesterov=True, weight_decay=0.1)]
)
def test_sgd_update_alphas_are_the_replayed_ones(tmp_path, opt):
    """SGD's update is linear in the gradient (``linear_gain``): the callback takes the update's
    alphas from the gradient noise instead of replaying. They must be what the dense replay of
    every minibatch through ``opt.update`` gives, at the first step (momentum buffer = the
    gradient) and later ones."""
    run = Run(tmp_path, opt, [TailIndex(1, analysis_batches=8)], steps=3)
    for snap in run.keep.snapshots:
        _, update, _ = dense_noise(snap, opt, 8)
        want = noise_alphas(update)
        for stat in ("pooled", "robust", "standardized", "zero_fraction", "atom_fraction"):
            got = run.recorded(f"tail_index/update/{stat}")[snap.step]
            assert got == pytest.approx(want[stat], rel=1e-4, abs=1e-9), (stat, snap.step)
