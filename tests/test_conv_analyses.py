"""The CNN optimizee family through the optimizers and the analyses, against references.

Every learned optimizer and baseline steps a CNN through ``l2o.inner.inner_step`` (baselines
equal torch.optim / their formula on an nn.Sequential CNN; the LSTM is coordinatewise, MLPLOpt
per tensor); the meta-gradient through a CNN step equals a finite difference; per-sample and
per-minibatch gradients equal one autograd call per sample / minibatch (BatchNorm included);
the covariance spectrum equals a dense eigendecomposition; the Hessian's top eigenvalue equals a
dense Hessian's; the step length's directional derivatives equal autograd's.
"""

from __future__ import annotations

import pytest
import torch

from callbacks.tail_index import minibatch_grads
from l2o.covariance import covariance_analysis, flatten, per_sample_grads
from l2o.curvature import HessianOperator, top_eigenvalue
from l2o.inner import inner_step
from l2o.lstm import LSTMOptimizer
from l2o.mlp_lopt import MLPLOpt
from l2o.optimizees import ConvOptimizee, grads_of
from l2o.optimizers import SGD, chunked_replay, make_baseline, replay
from l2o.step_length import step_length
from l2o.symmetry import constraints_of, symmetry_metrics
from l2o.tail_index import noise_alphas
from tests.test_conv_optimizee import _sequential

F64 = torch.float64
# 8x8 -> 4x4 -> 2x2, 3 * 2 * 2 = 12 features: 20 + 57 + 130 = 207 parameters (dense references)
TINY = dict(channels=(2, 3), image=(1, 8, 8))


def tiny(batchnorm=False, **kw):
    opt = ConvOptimizee(**TINY, batchnorm=batchnorm, **kw)
    params = opt.init(1, generator=torch.Generator().manual_seed(0), dtype=F64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 12, opt.num_features, generator=gen, dtype=F64)
    y = torch.randint(0, opt.num_classes, (1, 12), generator=gen)
    return opt, params, x, y


def _close(a, b, tol):
    for s, t in zip(a, b, strict=True):
        assert s.shape == t.shape
        torch.testing.assert_close(s, t, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("batchnorm", [False, True])
def test_baselines_step_a_cnn_like_torch_optim(batchnorm):
    """Two inner steps of SGD (momentum) and Adam equal torch.optim's on the nn.Sequential CNN."""
    opt, params, x, y = tiny(batchnorm, activation="relu")
    for name, kwargs, torch_cls in [
        ("sgd", dict(momentum=0.9, nesterov=True), torch.optim.SGD),
        ("adam", dict(betas=(0.8, 0.99)), torch.optim.Adam),
    ]:
        ours = make_baseline(name, 0.05, **kwargs)
        seq = _sequential(opt, params, 0)
        ref = torch_cls(seq.parameters(), lr=0.05, **kwargs)
        ps, state = params, ours.init_state(params)
        for _ in range(2):
            step = inner_step(opt, ours, ps, state, x, y)
            ps, state = step.params, step.state
            ref.zero_grad()
            torch.nn.functional.cross_entropy(seq(x[0]), y[0]).backward()
            ref.step()
        mods = [m for m in seq if hasattr(m, "weight")]
        expected = tuple(t.detach() for m in mods for t in (m.weight, m.bias))
        # A conv bias feeding BatchNorm has a zero gradient up to rounding (~1e-17), which
        # Adam's g / (sqrt(v) + 1e-8) turns into ~1e-9 steps of arbitrary sign: compare those
        # to 1e-8, everything else to 1e-10.
        feeds_bn = {h.bias for h in opt.hidden} if batchnorm else set()
        for i, (p, t) in enumerate(zip(ps, expected, strict=True)):
            tol = 1e-8 if i in feeds_bn else 1e-10
            torch.testing.assert_close(p[0], t, rtol=1e-10, atol=tol)


def test_lion_and_lion_sgd_first_step_formula():
    opt, params, x, y = tiny()
    _, grads = grads_of(opt.loss, params, x, y)
    lion = make_baseline("lion", 1e-3)
    step = inner_step(opt, lion, params, lion.init_state(params), x, y)
    _close(step.updates, tuple(-1e-3 * torch.sign(g) for g in grads), 0)  # zero momentum
    mix = make_baseline("lion_sgd", 0.1, momentum=0.0, lion_lr=1e-3, lion_weight=0.25)
    step = inner_step(opt, mix, params, mix.init_state(params), x, y)
    expected = tuple(0.25 * -1e-3 * torch.sign(g) + 0.75 * -0.1 * g for g in grads)
    _close(step.updates, expected, 1e-12)


def test_lstm_steps_a_cnn_coordinatewise():
    """The LSTM is coordinatewise: its CNN update equals its update of the flattened vector."""
    opt, params, x, y = tiny()
    lstm = LSTMOptimizer().double()
    step = inner_step(opt, lstm, params, lstm.init_state(params), x, y)
    assert [u.shape for u in step.updates] == [p.shape for p in params]
    flat = (torch.cat([p.reshape(1, -1) for p in params], 1),)
    flat_grads = (torch.cat([g.reshape(1, -1) for g in step.grads], 1),)
    (ref,), _ = lstm.update(flat_grads, lstm.init_state(flat), flat)
    torch.testing.assert_close(flatten(step.updates), ref, rtol=1e-12, atol=1e-15)
    assert ref.abs().max() > 0


def test_mlp_lopt_steps_a_cnn_per_tensor():
    """MLPLOpt normalises per tensor: a conv kernel's update depends on that tensor only."""
    opt, params, x, y = tiny(batchnorm=True)
    lopt = MLPLOpt().double()
    step = inner_step(opt, lopt, params, lopt.init_state(params), x, y)
    for k, (p, g) in enumerate(zip(params, step.grads)):
        (alone,), _ = lopt.update((g,), lopt.init_state((p,)), (p,))
        torch.testing.assert_close(step.updates[k], alone, rtol=1e-12, atol=1e-15)
    assert all(u.abs().max() > 0 for u in step.updates)


@pytest.mark.parametrize("learned", [LSTMOptimizer, MLPLOpt])
def test_meta_gradient_through_a_cnn_step_matches_finite_difference(learned):
    """meta=True: the loss after one learned step, d/dphi, equals a central difference (the
    first step's gradient does not depend on phi, so detaching it changes nothing here)."""
    opt, params, x, y = tiny(batchnorm=True, activation="relu")
    torch.manual_seed(0)
    net = learned().double()

    def second_loss(meta: bool) -> torch.Tensor:
        first = inner_step(opt, net, params, net.init_state(params), x, y, meta=meta)
        return inner_step(opt, net, first.params, first.state, x, y, meta=meta).loss.sum()

    loss = second_loss(meta=True)
    weights = list(net.parameters())
    grads = torch.autograd.grad(loss, weights)
    direction = [torch.randn_like(w) for w in weights]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    eps = 1e-5
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            for w, d in zip(weights, direction):
                w.add_(sign * eps * d)
            values.append(second_loss(meta=False))
            for w, d in zip(weights, direction):
                w.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert analytic.abs() > 1e-8
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(loss, second_loss(meta=False))  # same forward either way


# --------------------------------------------------------------------------- gradients
def _loop(fn, n):
    parts = [fn(i) for i in range(n)]
    return tuple(torch.stack(ts) for ts in zip(*parts))


@pytest.mark.parametrize("batchnorm", [False, True])
def test_per_sample_and_minibatch_grads_match_loops(batchnorm):
    opt, _, _, _ = tiny(batchnorm)
    params = opt.init(2, generator=torch.Generator().manual_seed(0), dtype=F64)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, opt.num_features, generator=gen, dtype=F64)
    y = torch.randint(0, 10, (2, 6), generator=gen)
    got = per_sample_grads(opt, params, x, y)  # vmap of grad, or jacrev inside the batch (BN)
    if batchnorm:  # sample i's loss inside the full batch
        ref = _loop(lambda i: grads_of(lambda ps: opt.losses(ps, x, y)[:, i], params)[1], 6)
    else:  # a batch of one
        ref = _loop(lambda i: grads_of(opt.loss, params, x[:, i : i + 1], y[:, i : i + 1])[1], 6)
    _close(got, ref, 1e-12)
    # the tail index's minibatch gradients: one vmapped call over minibatches, P = 1
    one = tuple(p[:1] for p in params)
    xb = torch.randn(4, 5, opt.num_features, generator=gen, dtype=F64)
    yb = torch.randint(0, 10, (4, 5), generator=gen)
    got = minibatch_grads(opt, one, xb, yb)
    ref = _loop(lambda i: grads_of(opt.loss, one, xb[i : i + 1], yb[i : i + 1])[1], 4)
    _close(got, ref, 1e-12)


def test_lstm_fast_replay_matches_protocol_on_conv_shapes():
    opt, params, x, y = tiny()
    g = per_sample_grads(opt, params, x[0], y[0])
    lstm = LSTMOptimizer().double()
    state = lstm.init_state(params)
    _, state = lstm.update(grads_of(opt.loss, params, x, y)[1], state, params)  # nonzero state
    fast = replay(lstm, g, state, params)
    slow = chunked_replay(lstm, g, state, params)
    _close(fast, slow, 1e-12)


# --------------------------------------------------------------------------- analyses
@pytest.mark.parametrize("batchnorm", [False, True])
def test_covariance_analysis_matches_dense_reference(batchnorm):
    opt, params, x, y = tiny(batchnorm)
    lr = 0.3
    sgd = SGD(lr=lr, momentum=0.0)
    got = covariance_analysis(opt, sgd, sgd.init_state(params), params, x[0], y[0])
    g = flatten(per_sample_grads(opt, params, x, y))  # (N, D), checked against loops above
    centred = g - g.mean(0)  # the full-batch gradient is the mean per-sample gradient
    cov = centred.T @ centred / g.shape[0]
    eig = torch.linalg.eigvalsh(cov)
    assert got["dim"] == opt.num_params == 207 + 10 * batchnorm and got["num_samples"] == 12
    assert got["grad_top_eig"] == pytest.approx(eig[-1].item(), rel=1e-9)
    assert got["grad_trace"] == pytest.approx(cov.trace().item(), rel=1e-9)
    # plain SGD's per-sample updates are -lr g_i: the update covariance is lr^2 K_grad
    assert got["update_top_eig"] == pytest.approx(lr**2 * eig[-1].item(), rel=1e-9)
    assert got["update_trace"] == pytest.approx(lr**2 * cov.trace().item(), rel=1e-9)


@pytest.mark.parametrize("learned", [LSTMOptimizer, MLPLOpt])
def test_analyses_of_learned_steps_on_a_cnn_are_finite(learned):
    opt, params, x, y = tiny(batchnorm=True, activation="relu")
    torch.manual_seed(0)
    net = learned().double()
    step = inner_step(opt, net, params, net.init_state(params), x, y)
    cov = covariance_analysis(opt, net, step.state, step.params, x[0], y[0])
    for key in ("update_top_eig", "update_trace", "grad_top_eig", "grad_trace"):
        assert torch.isfinite(torch.tensor(cov[key])) and cov[key] > 0
    delta = tuple(-u for u in step.updates)
    metrics = symmetry_metrics(opt, params, delta)  # the params the step was taken from
    assert {k.split("/")[0] for k in metrics} == set(constraints_of(opt))
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert metrics["rescale/normalized"].item() > 1e-6  # a learned step breaks the symmetry
    grad_metrics = symmetry_metrics(opt, params, step.grads)
    assert grad_metrics["rescale/normalized"].item() < 1e-10  # the gradient does not
    noise = flatten(minibatch_grads(opt, params, x.view(3, 4, -1), y.view(3, 4)))
    alphas = noise_alphas(noise - noise.mean(0))
    assert all(torch.isfinite(torch.tensor(alphas[k])) for k in ("pooled", "robust"))


def test_hessian_top_eigenvalue_matches_dense_hessian():
    opt, params, x, y = tiny(batchnorm=True)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def flat_loss(v):
        ps = tuple(t.reshape(s) for t, s in zip(v.split(sizes), shapes))
        return opt.loss(ps, x, y).sum()

    dense = torch.autograd.functional.hessian(flat_loss, flatten(params)[0])
    op = HessianOperator(lambda ps: opt.loss(ps, x, y), params)
    got = top_eigenvalue(op, max_iter=207, tol=1e-10, generator=torch.Generator().manual_seed(0))
    expected = torch.linalg.eigvalsh(dense)[-1]
    torch.testing.assert_close(got.value[0], expected, rtol=1e-8, atol=0)


def test_step_length_slopes_match_autograd():
    """Forward-mode AD through conv, BatchNorm and max-pooling: g = <grad, d> at both ends."""
    opt, params, x, y = tiny(batchnorm=True)
    _, g0 = grads_of(opt.loss, params, x, y)
    after = tuple(p - 0.5 * g for p, g in zip(params, g0))
    _, g1 = grads_of(opt.loss, after, x, y)
    d = tuple(a - b for a, b in zip(after, params))
    out = step_length(lambda ps: opt.losses(ps, x, y), params, after)
    slopes = [sum((g * t).sum() for g, t in zip(gs, d)) for gs in (g0, g1)]
    torch.testing.assert_close(out.observations[0, 2], slopes[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(out.observations[0, 3], slopes[1], rtol=1e-10, atol=0)
    torch.testing.assert_close(out.observations[0, 1], opt.loss(after, x, y)[0])
