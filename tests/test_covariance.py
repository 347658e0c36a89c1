"""Per-sample gradients/updates and the covariance spectrum against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

from l2o.covariance import covariance_analysis, flatten, per_sample_grads, update_covariance
from l2o.lstm import LSTMOptimizer
from l2o.optimizees import MLPOptimizee, grads_of
from l2o.optimizers import SGD, Adam, chunked_replay, replay


def _data(n, features, classes=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def _loop_grads(optimizee, params, x, y):
    """Reference: one autograd call per sample (a batch of one); x (P, N, in), y (P, N)."""
    out = []
    for i in range(x.shape[1]):
        _, g = grads_of(optimizee.loss, params, x[:, i : i + 1], y[:, i : i + 1])
        out.append(g)
    return tuple(torch.stack(parts) for parts in zip(*out))


def _close(a, b, tol):
    for s, t in zip(a, b, strict=True):
        assert s.shape == t.shape
        torch.testing.assert_close(s, t, rtol=tol, atol=tol)


@pytest.mark.parametrize("population", [1, 2])
def test_per_sample_grads_match_loop_and_average_to_batch_grad(population):
    opt = MLPOptimizee((6, 5, 4, 3), activation="leaky_relu", negative_slope=0.1)
    params = opt.init(population, torch.Generator().manual_seed(1), dtype=torch.float64)
    x, y = _data(12, 6)
    got = per_sample_grads(opt, params, x, y, chunk_size=5)
    assert [g.shape for g in got] == [(12, population, *s) for s in opt.shapes]
    xp, yp = x.expand(population, -1, -1), y.expand(population, -1)
    _close(got, _loop_grads(opt, params, xp, yp), 1e-6)
    _, batch = grads_of(opt.loss, params, xp, yp)
    _close(tuple(g.mean(0) for g in got), batch, 1e-6)


def test_per_sample_grads_per_member_data():
    """x of shape (P, N, in): each member sees its own batch."""
    opt = MLPOptimizee((4, 3, 3))
    params = opt.init(2, torch.Generator().manual_seed(2), dtype=torch.float64)
    x, y = _data(10, 4)
    x2, y2 = torch.stack([x, -x]), torch.stack([y, y.flip(0)])
    got = per_sample_grads(opt, params, x2, y2)
    _, batch = grads_of(opt.loss, params, x2, y2)
    _close(tuple(g.mean(0) for g in got), batch, 1e-10)


def test_batchnorm_per_sample_grads_inside_the_full_batch():
    opt = MLPOptimizee((5, 4, 3), activation="relu", batchnorm=True)
    params = opt.init(1, torch.Generator().manual_seed(3), dtype=torch.float64)
    params = (*params[:2], params[2] + 0.3, params[3] - 0.2, *params[4:])  # non-trivial affine
    x, y = _data(9, 5)
    got = per_sample_grads(opt, params, x, y, chunk_size=4)
    leaves = tuple(p.detach().requires_grad_(True) for p in params)
    with torch.enable_grad():
        losses = opt.losses(leaves, x[None], y[None])[0]
        loop = [torch.autograd.grad(losses[i], leaves, retain_graph=True) for i in range(9)]
    _close(got, tuple(torch.stack(parts) for parts in zip(*loop)), 1e-6)
    _, batch = grads_of(opt.loss, params, x[None], y[None])
    _close(tuple(g.mean(0) for g in got), batch, 1e-10)
    # A batch of one would differ: the samples are coupled through the batch statistics.
    single = per_sample_grads(
        MLPOptimizee((5, 4, 3), activation="relu"), params[:2] + params[4:], x, y
    )
    assert not torch.allclose(got[0], single[0])


def _dense_reference(updates, center):
    a = updates - (updates.mean(0) if center is None else center)
    k = a.t() @ a / a.shape[0]  # the explicit D x D matrix, fine for a tiny model
    return float(torch.linalg.eigvalsh(k)[-1]), float(torch.trace(k))


@pytest.mark.parametrize("method", ["gram", "lanczos"])
@pytest.mark.parametrize("n", [15, 80])  # N < D and N > D: both sides of the operator
def test_spectrum_matches_dense_eigendecomposition(method, n):
    opt = MLPOptimizee((6, 5, 3))  # D = 53
    params = opt.init(1, torch.Generator().manual_seed(4), dtype=torch.float64)
    x, y = _data(n, 6)
    grads = flatten(per_sample_grads(opt, params, x, y))
    center = grads[0] * 0.3  # an arbitrary center, not the mean
    for c in (center, None):
        top, trace = _dense_reference(grads, c)
        got = update_covariance(grads, c, method=method)
        assert got["method"] == method and got["dim"] == 53 and got["num_samples"] == n
        assert got["top_eig"] == pytest.approx(top, rel=1e-6)
        assert got["trace"] == pytest.approx(trace, rel=1e-6)


@pytest.mark.parametrize("n", [15, 80])
def test_lanczos_over_blocks_of_rows_matches_dense(monkeypatch, n):
    """The one-pass product A^T (A u) taken block by block of rows (here 7 rows per block, the
    last one short) is the dense eigenvalue's operator: every row counted once."""
    import l2o.covariance as cov

    opt = MLPOptimizee((6, 5, 3))  # D = 53
    params = opt.init(1, torch.Generator().manual_seed(6), dtype=torch.float64)
    x, y = _data(n, 6)
    grads = flatten(per_sample_grads(opt, params, x, y))
    monkeypatch.setattr(cov, "LANCZOS_BLOCK_BYTES", 7 * 53 * 8)
    top, _ = _dense_reference(grads, None)
    assert update_covariance(grads, method="lanczos")["top_eig"] == pytest.approx(top, rel=1e-6)


def test_auto_method_switches_at_gram_max_n():
    a = torch.randn(40, 7, dtype=torch.float64)
    assert update_covariance(a, gram_max_n=40)["method"] == "gram"
    assert update_covariance(a, gram_max_n=39)["method"] == "lanczos"
    assert update_covariance(torch.ones(5, 3))["top_eig"] == 0.0  # no spread at all


def test_sgd_update_covariance_is_lr_squared_times_gradient_covariance():
    opt = MLPOptimizee((6, 5, 3))
    params = opt.init(1, torch.Generator().manual_seed(5), dtype=torch.float64)
    x, y = _data(30, 6)
    sgd = SGD(lr=0.05, momentum=0.0)
    for method in ("gram", "lanczos"):
        got = covariance_analysis(opt, sgd, sgd.init_state(params), params, x, y, method=method)
        assert got["update_top_eig"] == pytest.approx(0.05**2 * got["grad_top_eig"], rel=1e-6)
        assert got["update_trace"] == pytest.approx(0.05**2 * got["grad_trace"], rel=1e-6)


def test_update_covariance_is_centred_on_the_full_batch_update():
    """Adam is nonlinear: the mean per-sample update is not the full-batch update."""
    opt = MLPOptimizee((6, 5, 3))
    params = opt.init(1, torch.Generator().manual_seed(6), dtype=torch.float64)
    x, y = _data(20, 6)
    adam = Adam(lr=0.01)
    state = adam.init_state(params)
    got = covariance_analysis(opt, adam, state, params, x, y)
    u = flatten(replay(adam, per_sample_grads(opt, params, x, y), state, params))
    _, g = grads_of(opt.loss, params, x[None], y[None])
    center = flatten(adam.update(g, state, params)[0])[0]
    top, trace = _dense_reference(u, center)
    assert got["update_top_eig"] == pytest.approx(top, rel=1e-6)
    assert got["update_trace"] == pytest.approx(trace, rel=1e-6)
    assert got["update_trace"] > update_covariance(u)["trace"] * (1 + 1e-3)


# One block / many ragged blocks of columns of different heights, cut into row chunks, and
# samples packed a few at a time.
@pytest.mark.parametrize(
    ("block_rows", "min_width", "sample_chunk"), [(2**13, 256, 2048), (50, 1, 5)]
)
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 1.0])  # no, some, all zero pixels
def test_lstm_replay_matches_a_loop_of_single_updates(
    sparsity, block_rows, min_width, sample_chunk, monkeypatch
):
    monkeypatch.setattr("l2o.lstm_replay.BLOCK_ROWS", block_rows)
    monkeypatch.setattr("l2o.lstm_replay.MIN_WIDTH", min_width)
    monkeypatch.setattr("l2o.lstm_replay.SAMPLE_CHUNK", sample_chunk)
    torch.manual_seed(7)
    opt = MLPOptimizee((30, 8, 4))
    params = opt.init(1)
    lstm = LSTMOptimizer(hidden_size=6)
    state = lstm.init_state(params)
    # A state that is not all zeros, as after a few steps of training.
    state = {**state, "h": torch.randn_like(state["h"]) * 0.5, "c": torch.randn_like(state["c"])}
    x = torch.rand(16, 30) * (torch.rand(16, 30) >= sparsity)
    y = torch.randint(0, 4, (16,))
    grads = per_sample_grads(opt, params, x, y)
    grads = (grads[0] * 1e-3, *grads[1:])  # reach the small-|g| branch of the preprocessing
    with torch.no_grad():
        loop = [lstm.update(tuple(g[i] for g in grads), state, params)[0] for i in range(16)]
        loop = tuple(torch.stack(parts) for parts in zip(*loop))
        protocol = chunked_replay(lstm, grads, state, params, chunk_size=5)
        fast = replay(lstm, grads, state, params)  # LSTMOptimizer.replay, l2o.lstm_replay
        one_call = lstm.update(grads, state, params)[0]
    _close(protocol, loop, 1e-6)
    _close(one_call, loop, 1e-6)
    _close(fast, loop, 1e-6)
    # The replay does not advance the state.
    again = lstm.update(tuple(g[0] for g in grads), state, params)[0]
    _close(again, tuple(u[0] for u in loop), 0.0)


def test_covariance_analysis_with_lstm_and_batchnorm_runs():
    torch.manual_seed(8)
    opt = MLPOptimizee((10, 6, 3), batchnorm=True)
    params = opt.init(1)
    lstm = LSTMOptimizer(hidden_size=4)
    x, y = torch.rand(12, 10), torch.randint(0, 3, (12,))
    got = covariance_analysis(opt, lstm, lstm.init_state(params), params, x, y, chunk_size=4)
    assert got["dim"] == opt.num_params and got["num_samples"] == 12
    assert 0 < got["update_top_eig"] <= got["update_trace"]
    assert 0 < got["grad_top_eig"] <= got["grad_trace"]
    with pytest.raises(ValueError, match="P = 1"):
        covariance_analysis(opt, lstm, lstm.init_state(params), opt.init(2), x, y)


# --------------------------------------------------------------------------- minibatch mode
def _dense_minibatch(opt_fn, optimizee, params, x, y, b):
    """Reference for mode="minibatch": one autograd call and one opt.update per minibatch,
    D x D matrices; returns (grad K, update K) centred on the mean gradient / its update."""
    n = x.shape[0] // b
    grads = [
        grads_of(
            optimizee.loss, params, x[None, i * b : (i + 1) * b], y[None, i * b : (i + 1) * b]
        )[1]
        for i in range(n)
    ]
    g = torch.stack([flatten(gr)[0] for gr in grads])
    mean = tuple(torch.stack(parts).mean(0) for parts in zip(*grads))
    u = torch.stack([flatten(opt_fn(gr))[0] for gr in grads])
    center = flatten(opt_fn(mean))[0]
    a, c = g - g.mean(0), u - center
    return a.t() @ a / n, c.t() @ c / n


def _top_trace(k):
    return float(torch.linalg.eigvalsh(k)[-1]), float(torch.trace(k))


@pytest.mark.parametrize("method", ["gram", "lanczos"])
def test_minibatch_mode_sgd_is_lr_squared_times_dense_minibatch_gradient_covariance(method):
    opt = MLPOptimizee((6, 5, 3))  # D = 53
    params = opt.init(1, torch.Generator().manual_seed(9), dtype=torch.float64)
    x, y = _data(100, 6)  # 12 minibatches of 8, 4 samples left over
    sgd = SGD(lr=0.05, momentum=0.0)
    got = covariance_analysis(
        opt,
        sgd,
        sgd.init_state(params),
        params,
        x,
        y,
        method=method,
        mode="minibatch",
        batch_size=8,
    )
    k_grad, _ = _dense_minibatch(lambda g: g, opt, params, x, y, 8)
    top, trace = _top_trace(k_grad)
    assert got["mode"] == "minibatch" and got["num_samples"] == 12 and got["dim"] == 53
    assert got["grad_top_eig"] == pytest.approx(top, rel=1e-6)
    assert got["grad_trace"] == pytest.approx(trace, rel=1e-6)
    assert got["update_top_eig"] == pytest.approx(0.05**2 * top, rel=1e-6)
    assert got["update_trace"] == pytest.approx(0.05**2 * trace, rel=1e-6)
    # averaging B samples shrinks the gradient covariance, roughly by B (not exactly: the
    # per-sample covariance is of other samples' spread) -- the two modes are not comparable
    per_sample = covariance_analysis(opt, sgd, sgd.init_state(params), params, x[:96], y[:96])
    assert 2 < per_sample["grad_trace"] / got["grad_trace"] < 32


def test_minibatch_mode_adam_matches_a_dense_loop_of_updates():
    opt = MLPOptimizee((6, 5, 3))
    params = opt.init(1, torch.Generator().manual_seed(10), dtype=torch.float64)
    x, y = _data(60, 6)
    adam = Adam(lr=0.01)
    state = adam.init_state(params)
    # a state that is not the initial one (Adam's first step is a sign step)
    _, g0 = grads_of(opt.loss, params, x[None, :10], y[None, :10])
    _, state = adam.update(g0, state, params)
    got = covariance_analysis(opt, adam, state, params, x, y, mode="minibatch", batch_size=6)

    def update(g):
        return adam.update(g, state, params)[0]

    _, k_update = _dense_minibatch(update, opt, params, x, y, 6)
    top, trace = _top_trace(k_update)
    assert got["update_top_eig"] == pytest.approx(top, rel=1e-6)
    assert got["update_trace"] == pytest.approx(trace, rel=1e-6)


def test_minibatches_of_one_are_the_per_sample_mode():
    """An exact identity without BatchNorm: B = 1 minibatch gradients are per-sample ones."""
    opt = MLPOptimizee((6, 5, 3))
    params = opt.init(1, torch.Generator().manual_seed(11), dtype=torch.float64)
    x, y = _data(20, 6)
    adam = Adam(lr=0.01)
    state = adam.init_state(params)
    a = covariance_analysis(opt, adam, state, params, x, y, method="gram")
    b = covariance_analysis(
        opt, adam, state, params, x, y, method="gram", mode="minibatch", batch_size=1
    )
    for key in ("update_top_eig", "update_trace", "grad_top_eig", "grad_trace", "num_samples"):
        assert b[key] == pytest.approx(a[key], rel=1e-9), key
    assert (a["mode"], b["mode"]) == ("per_sample", "minibatch")


def test_minibatch_mode_errors():
    opt = MLPOptimizee((6, 5, 3))
    params = opt.init(1, torch.Generator().manual_seed(12), dtype=torch.float64)
    x, y = _data(15, 6)
    sgd = SGD(lr=0.1)
    state = sgd.init_state(params)
    with pytest.raises(ValueError, match="batch_size"):
        covariance_analysis(opt, sgd, state, params, x, y, mode="minibatch")
    with pytest.raises(ValueError, match="at least 2"):
        covariance_analysis(opt, sgd, state, params, x, y, mode="minibatch", batch_size=8)
    with pytest.raises(ValueError, match="mode must be one of"):
        covariance_analysis(opt, sgd, state, params, x, y, mode="per_minibatch")


# ------------------------------------------------------------------ the exact shortcuts of auto
@pytest.mark.parametrize(
    ("sizes", "activation"), [((6, 5, 3), "leaky_relu"), ((6, 5, 4, 3), "tanh")]
)
@pytest.mark.parametrize("population", [1, 2])
def test_per_sample_gram_is_the_gram_of_the_per_sample_gradients(sizes, activation, population):
    opt = MLPOptimizee(sizes, activation)
    params = opt.init(population, torch.Generator().manual_seed(11), dtype=torch.float64)
    x, y = _data(25, sizes[0], classes=sizes[-1])
    x, y = x.expand(population, -1, -1), y.expand(population, -1)
    grads = per_sample_grads(opt, params, x, y)  # (N, P, *shape)
    rows = torch.cat([g.transpose(0, 1).flatten(2) for g in grads], dim=2)  # (P, N, D)
    dense = rows @ rows.transpose(1, 2)
    torch.testing.assert_close(opt.per_sample_gram(params, x, y), dense, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="BatchNorm"):
        MLPOptimizee(sizes, batchnorm=True).per_sample_gram(params, x, y)


@pytest.mark.parametrize("n", [40, 300])  # eigvalsh below GRAM_EIGVALSH_N, ARPACK above
def test_gram_spectrum_is_the_spectrum_of_the_centred_rows(n):
    from l2o.covariance import GRAM_EIGVALSH_N, gram_spectrum

    assert 40 < GRAM_EIGVALSH_N < 300
    gen = torch.Generator().manual_seed(12)
    # rows with a large common mean (the centring must remove it) and a spread spectrum
    rows = torch.randn(n, 60, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, 60)
    rows = rows + 5.0
    top, trace = _dense_reference(rows, None)
    got = gram_spectrum(rows @ rows.t())
    assert got["top_eig"] == pytest.approx(top, rel=1e-9)
    assert got["trace"] == pytest.approx(trace, rel=1e-9)
    assert gram_spectrum(torch.ones(n, n))["top_eig"] == 0.0  # identical rows: no spread


def _stepped(opt, params, steps=2, seed=13):
    """The optimizer's state after ``steps`` updates of random gradients (past its zeros)."""
    gen = torch.Generator().manual_seed(seed)
    state = opt.init_state(params)
    for _ in range(steps):
        fake = tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1 for p in params)
        _, state = opt.update(fake, state, params)
    return state


@pytest.mark.parametrize(
    "sgd",
    [
        SGD(lr=0.1, momentum=0.0),
        SGD(lr=0.05, momentum=0.9),
        SGD(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
        SGD(lr=0.05, momentum=0.8, nesterov=True),
    ],
)
@pytest.mark.parametrize("steps", [0, 2])  # the first step's buffer is the gradient itself
def test_sgd_linear_gain_is_the_slope_of_its_update(sgd, steps):
    from l2o.optimizers import linear_gain

    opt = MLPOptimizee((6, 5, 3))
    params = opt.init(1, torch.Generator().manual_seed(14), dtype=torch.float64)
    state = _stepped(sgd, params, steps)
    gen = torch.Generator().manual_seed(15)
    g1, g2 = (
        tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params) for _ in "ab"
    )
    u1, u2 = sgd.update(g1, state, params)[0], sgd.update(g2, state, params)[0]
    c = linear_gain(sgd, state)
    for a, b, s, t in zip(u1, u2, g1, g2, strict=True):
        torch.testing.assert_close(a - b, c * (s - t), rtol=1e-12, atol=1e-14)
    assert linear_gain(Adam(), state) is None  # nonlinear optimizers declare none


@pytest.mark.parametrize("opt_name", ["sgd", "sgd-m", "sgd-nesterov", "adam", "lstm"])
@pytest.mark.parametrize("sizes", [(6, 5, 3), (6, 5, 4, 3)])
def test_auto_shortcuts_equal_the_dense_reference(opt_name, sizes):
    """method="auto" (Kronecker Gram for the gradients; gain^2 for SGD's updates) against
    "lanczos" (every (N, D) row formed): the same spectra. SGD forms no per-sample gradient."""
    opt = MLPOptimizee(sizes)
    params = opt.init(1, torch.Generator().manual_seed(16), dtype=torch.float64)
    x, y = _data(200, sizes[0], classes=sizes[-1], seed=3)
    optimizer = {
        "sgd": SGD(lr=0.1, momentum=0.0),
        "sgd-m": SGD(lr=0.05, momentum=0.9, dampening=0.2),
        "sgd-nesterov": SGD(lr=0.05, momentum=0.9, nesterov=True),
        "adam": Adam(lr=1e-3),
        "lstm": LSTMOptimizer(hidden_size=6),
    }[opt_name]
    if opt_name == "lstm":  # a float32 module
        params, x = tuple(p.float() for p in params), x.float()
    state = _stepped(optimizer, params)
    want = covariance_analysis(opt, optimizer, state, params, x, y, method="lanczos")
    asked = []

    def per_sample():
        asked.append(True)
        return per_sample_grads(opt, params, x, y)

    got = covariance_analysis(opt, optimizer, state, params, x, y, per_sample=per_sample)
    rel = 1e-4 if opt_name == "lstm" else 1e-9  # float32 LSTM: rounding of the two routes
    for key in ("update_top_eig", "update_trace", "grad_top_eig", "grad_trace"):
        assert got[key] == pytest.approx(want[key], rel=rel), key
    assert got["dim"] == want["dim"] == opt.num_params and got["num_samples"] == 200
    assert bool(asked) == (not opt_name.startswith("sgd"))


def test_auto_takes_the_rows_route_past_kronecker_max_n(monkeypatch):
    """Past KRONECKER_MAX_N samples the N x N Gram costs more than the (N, D) rows: auto forms
    the rows (and still takes SGD's gain), with the same numbers."""
    import l2o.covariance as cov

    opt = MLPOptimizee((6, 5, 3))
    params = opt.init(1, torch.Generator().manual_seed(17), dtype=torch.float64)
    x, y = _data(60, 6)
    sgd = SGD(lr=0.1, momentum=0.0)
    small = covariance_analysis(opt, sgd, sgd.init_state(params), params, x, y)
    monkeypatch.setattr(cov, "KRONECKER_MAX_N", 59)
    big = covariance_analysis(opt, sgd, sgd.init_state(params), params, x, y)
    assert small["method"] == "kronecker" and big["method"] == "gram"  # N = 60 <= GRAM_MAX_N
    for key in ("update_top_eig", "update_trace", "grad_top_eig", "grad_trace"):
        assert big[key] == pytest.approx(small[key], rel=1e-9), key


@pytest.mark.parametrize("method", ["auto", "lanczos", "gram"])
def test_non_finite_gradients_give_nan_not_an_arpack_error(method):
    """An optimizee that overflows on the analysis set (a diverging run) has no spectrum: NaN,
    where ARPACK used to raise and end the whole experiment."""
    opt = MLPOptimizee((6, 5, 3))
    params = opt.init(1, torch.Generator().manual_seed(18))
    x, y = _data(200, 6, dtype=torch.float32)
    for scale in (1e30, math.nan):  # gradients that overflow when squared; NaN ones
        at = (params[0] * scale, *params[1:])
        for optimizer in (SGD(lr=0.1, momentum=0.0), Adam()):
            got = covariance_analysis(
                opt, optimizer, optimizer.init_state(at), at, x, y, method=method
            )
            assert math.isnan(got["grad_top_eig"])
            if optimizer.name == "sgd" or math.isnan(scale):
                assert math.isnan(got["update_top_eig"])
            else:  # Adam's updates of huge gradients are bounded: a spectrum of their own
                assert math.isfinite(got["update_top_eig"]) and got["update_top_eig"] > 0
