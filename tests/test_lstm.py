"""The coordinatewise LSTM optimizer of Andrychowicz et al. (2016)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import l2o.lstm as lstm_mod
from l2o.lstm import LSTMOptimizer, detach_state, preprocess
from l2o.optimizees import MLPOptimizee, grads_of
from l2o.optimizers import Optimizer, apply_updates, replay


def _lstm(seed: int = 0, **kw) -> LSTMOptimizer:
    torch.manual_seed(seed)
    return LSTMOptimizer(**kw)


def _problem(population: int = 1, batchnorm: bool = False, sizes=(6, 5, 3), seed: int = 0):
    opt = MLPOptimizee(sizes=sizes, batchnorm=batchnorm)
    gen = torch.Generator().manual_seed(seed)
    params = opt.init(population, generator=gen)
    x = torch.randn(population, 16, sizes[0], generator=gen)
    y = torch.randint(0, sizes[-1], (population, 16), generator=gen)
    return opt, params, x, y


def _grads(opt, params, x, y):
    return grads_of(opt.loss, params, x, y)[1]


def _reference_coordinate(lstm: LSTMOptimizer, g: float, h=None, c=None):
    """The LSTM applied to one coordinate with nn.LSTMCell modules, from the paper's formula."""
    p = lstm.preprocess_p
    if abs(g) >= math.exp(-p):
        x = torch.tensor([[math.log(abs(g)) / p, math.copysign(1.0, g)]])
    else:
        x = torch.tensor([[-1.0, math.exp(p) * g]])
    hs, cs = [], []
    for layer, cell in enumerate(lstm.cells):
        hl = torch.zeros(1, lstm.hidden_size) if h is None else h[layer]
        cl = torch.zeros(1, lstm.hidden_size) if c is None else c[layer]
        x, cl = cell(x, (hl, cl))
        hs.append(x)
        cs.append(cl)
    return lstm.output_scale * lstm.head(x).squeeze(), hs, cs


# --------------------------------------------------------------------------- construction
def test_protocol_and_validation():
    lstm = _lstm()
    assert isinstance(lstm, Optimizer)
    assert lstm.name == "l2o"
    assert lstm.config() == {
        "hidden_size": 20,
        "num_layers": 2,
        "preprocess_p": 10.0,
        "output_scale": 0.1,
    }
    with pytest.raises(ValueError, match="hidden_size and num_layers"):
        LSTMOptimizer(hidden_size=0)
    with pytest.raises(ValueError, match="hidden_size and num_layers"):
        LSTMOptimizer(num_layers=0)
    with pytest.raises(ValueError, match="preprocess_p must be > 0"):
        LSTMOptimizer(preprocess_p=0.0)


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    "population, batchnorm, sizes",
    [(1, False, (6, 5, 3)), (3, False, (6, 5, 3)), (3, True, (6, 5, 4, 3)), (1, True, (6, 5, 3))],
)
def test_update_and_state_shapes(population, batchnorm, sizes):
    opt, params, x, y = _problem(population, batchnorm, sizes)
    lstm = _lstm(hidden_size=7, num_layers=3)
    state = lstm.init_state(params)
    n = sum(p.numel() for p in params)
    assert n == population * opt.num_params
    assert state["h"].shape == (3, n, 7) and state["c"].shape == (3, n, 7)
    assert state["shapes"] == tuple(tuple(p.shape) for p in params)
    for _ in range(2):
        updates, state = lstm.update(_grads(opt, params, x, y), state, params)
        assert len(updates) == len(params)
        for u, p in zip(updates, params):
            assert u.shape == p.shape and u.dtype == p.dtype
            assert torch.isfinite(u).all()
        assert state["h"].shape == (3, n, 7) and state["c"].shape == (3, n, 7)
        assert state["shapes"] == tuple(tuple(p.shape) for p in params)
        params = apply_updates(params, updates)
    assert not torch.equal(state["h"], torch.zeros_like(state["h"]))


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_weights_same_updates():
    a, b, c = _lstm(seed=5), _lstm(seed=5), _lstm(seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    opt, params, x, y = _problem(population=2)
    grads = _grads(opt, params, x, y)
    ua, _ = a.update(grads, a.init_state(params), params)
    ub, _ = b.update(grads, b.init_state(params), params)
    uc, _ = c.update(grads, c.init_state(params), params)
    assert all(torch.equal(u, v) for u, v in zip(ua, ub))
    assert any(not torch.equal(u, v) for u, v in zip(ua, uc))
    # and the same call twice gives the same result
    ua2, _ = a.update(grads, a.init_state(params), params)
    assert all(torch.equal(u, v) for u, v in zip(ua, ua2))


# --------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("p", [10.0, 3.0])
def test_preprocess_matches_formula(p):
    t = math.exp(-p)
    values = [0.0, -0.0, 1e-30, -1e-30, 0.5 * t, -0.5 * t, 0.999 * t, 1.001 * t, -1.001 * t]
    values += [1e-3, -1e-3, 0.1, -0.7, 1.0, -1.0, 5.0, -123.0, 1e6]
    g = torch.tensor(values, dtype=torch.float64)
    out = preprocess(g, p)
    assert out.shape == (len(values), 2)
    for v, (a, b) in zip(values, out.tolist()):
        if abs(v) >= t:
            ref = (math.log(abs(v)) / p, math.copysign(1.0, v))
        else:
            ref = (-1.0, math.exp(p) * v)
        assert a == pytest.approx(ref[0], rel=1e-12, abs=1e-12), v
        assert b == pytest.approx(ref[1], rel=1e-12, abs=1e-12), v
    # at g = 0 exactly: (-1, 0), finite
    assert out[0].tolist() == [-1.0, 0.0]
    # continuous at the threshold: both branches give (-1, +-1) there
    torch.testing.assert_close(out[6], torch.tensor([-1.0, 0.999], dtype=torch.float64))
    torch.testing.assert_close(
        out[7], torch.tensor([math.log(1.001) / p - 1, 1.0], dtype=torch.float64)
    )


def test_preprocess_batched_shape_and_gradient_finite_at_zero():
    g = torch.tensor([[0.0, 1e-8], [2.0, -3.0]], requires_grad=True)
    out = preprocess(g, 10.0)
    assert out.shape == (2, 2, 2)
    out.sum().backward()
    assert torch.isfinite(g.grad).all()


# --------------------------------------------------------------------------- coordinatewise
def test_each_coordinate_is_an_independent_lstm_row():
    """The batched call equals the LSTM run on each coordinate alone (with its own state)."""
    lstm = _lstm(seed=1, hidden_size=6)
    g1 = (torch.tensor([[0.3, -1e-6], [0.0, 2.5]]), torch.tensor([-4e-3, 7.0, 1e-5]))
    g2 = (torch.tensor([[-0.2, 1e-3], [1e-7, -2.5]]), torch.tensor([4e-3, 0.0, -1.0]))
    state = lstm.init_state(g1)
    with torch.no_grad():
        u1, state = lstm.update(g1, state)
        u2, state = lstm.update(g2, state)
        flat1 = torch.cat([u.reshape(-1) for u in u1])
        flat2 = torch.cat([u.reshape(-1) for u in u2])
        f1 = torch.cat([g.reshape(-1) for g in g1]).tolist()
        f2 = torch.cat([g.reshape(-1) for g in g2]).tolist()
        for i, (a, b) in enumerate(zip(f1, f2)):
            r1, h, c = _reference_coordinate(lstm, a)
            r2, h, c = _reference_coordinate(lstm, b, h, c)
            torch.testing.assert_close(flat1[i], r1, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(flat2[i], r2, atol=1e-6, rtol=1e-5)
            for layer in range(lstm.num_layers):
                torch.testing.assert_close(state["h"][layer, i], h[layer][0])
                torch.testing.assert_close(state["c"][layer, i], c[layer][0])


def test_permuting_coordinates_permutes_updates():
    lstm = _lstm(seed=2)
    g = torch.randn(50) * torch.logspace(-6, 1, 50)
    perm = torch.randperm(50)
    with torch.no_grad():
        (u,), s = lstm.update((g,), lstm.init_state((g,)))
        (up,), sp = lstm.update((g[perm],), lstm.init_state((g,)))
    torch.testing.assert_close(up, u[perm])
    torch.testing.assert_close(sp["h"], s["h"][:, perm])


def test_zero_state_zero_gradient_gives_constant_output():
    lstm = _lstm(seed=3, output_scale=0.37)
    opt, params, _, _ = _problem(population=2, batchnorm=True, sizes=(6, 5, 4, 3))
    zeros = tuple(torch.zeros_like(p) for p in params)
    with torch.no_grad():
        updates, _ = lstm.update(zeros, lstm.init_state(params), params)
        # independent: nn.LSTMCell modules on prep(0) = (-1, 0)
        x = torch.tensor([[-1.0, 0.0]])
        for cell in lstm.cells:
            x, _ = cell(x)
        expected = 0.37 * lstm.head(x).squeeze()
    assert expected.abs() > 0
    for u in updates:
        torch.testing.assert_close(u, torch.full_like(u, expected.item()), atol=1e-7, rtol=1e-6)


def test_output_scale_multiplies_head():
    a = _lstm(seed=4, output_scale=0.1)
    b = _lstm(seed=4, output_scale=2.0)
    g = (torch.randn(3, 4),)
    with torch.no_grad():
        (ua,), _ = a.update(g, a.init_state(g))
        (ub,), _ = b.update(g, b.init_state(g))
    torch.testing.assert_close(ub, 20 * ua)


def test_large_problem_is_one_batched_call(monkeypatch):
    """D ~ 16k coordinates (the study's 784-20-10 MLP) in num_layers lstm_cell calls with a
    graph (meta-training); without one (meta-testing), in num_layers calls per block of
    NO_GRAD_BLOCK coordinates: never a loop over tensors or coordinates."""
    calls: list[tuple[int, ...]] = []
    real = torch.lstm_cell

    def counting(x, hx, *args):
        calls.append(tuple(x.shape))
        return real(x, hx, *args)

    monkeypatch.setattr(torch, "lstm_cell", counting)
    opt = MLPOptimizee()  # 784-20-10
    params = opt.init(1, generator=torch.Generator().manual_seed(0))
    d = opt.num_params
    assert d == 15910
    lstm = _lstm()
    grads = tuple(torch.randn_like(p) * 1e-2 for p in params)
    state = lstm.init_state(params)
    updates, _ = lstm.update(grads, state, params)
    assert calls == [(d, 2), (d, 20)]
    calls.clear()
    with torch.no_grad():
        updates, state = lstm.update(grads, state, params)
    half = d // 2  # two blocks of 7,955 (NO_GRAD_BLOCK = 8,192)
    assert lstm_mod.NO_GRAD_BLOCK == 8192
    assert calls == [(half, 2), (half, 20), (half, 2), (half, 20)]
    assert [u.shape for u in updates] == [p.shape for p in params]


# --------------------------------------------------------------------------- purity / replay
def test_update_does_not_mutate_inputs():
    lstm = _lstm()
    opt, params, x, y = _problem(population=2)
    state = lstm.init_state(params)
    with torch.no_grad():
        _, state = lstm.update(_grads(opt, params, x, y), state, params)
        grads = _grads(opt, params, x, y)
        state0, grads0 = copy.deepcopy(state), copy.deepcopy(grads)
        u1, s1 = lstm.update(grads, state, params)
        u2, s2 = lstm.update(grads, state, params)
    assert torch.equal(state["h"], state0["h"]) and torch.equal(state["c"], state0["c"])
    assert all(torch.equal(a, b) for a, b in zip(grads, grads0))
    assert all(torch.equal(a, b) for a, b in zip(u1, u2))
    assert torch.equal(s1["h"], s2["h"]) and torch.equal(s1["c"], s2["c"])


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 4, 64])
@pytest.mark.parametrize("population", [1, 3])
def test_replay_equals_loop_of_single_updates(chunk_size, population):
    lstm = _lstm(seed=7)
    opt, params, x, y = _problem(population=population, batchnorm=True, sizes=(6, 5, 4, 3))
    state = lstm.init_state(params)
    with torch.no_grad():
        for _ in range(2):  # a non-trivial state
            u, state = lstm.update(_grads(opt, params, x, y), state, params)
            params = apply_updates(params, u)
        h0, c0 = state["h"].clone(), state["c"].clone()
        n = 5
        batch = tuple(torch.randn(n, *p.shape) * 1e-2 for p in params)
        out = replay(lstm, batch, state, params, chunk_size=chunk_size)
        for u, p in zip(out, params):
            assert u.shape == (n, *p.shape)
        for i in range(n):
            single, _ = lstm.update(tuple(g[i] for g in batch), state, params)
            for u, s in zip(out, single):
                torch.testing.assert_close(u[i], s, atol=1e-6, rtol=1e-5)
    assert torch.equal(state["h"], h0) and torch.equal(state["c"], c0)


def test_batched_update_returns_the_unadvanced_state():
    lstm = _lstm()
    g = (torch.randn(4, 3, 2),)  # 4 gradients of a (3, 2) parameter
    state = lstm.init_state((g[0][0],))
    with torch.no_grad():
        (u,), new_state = lstm.update(g, state)
    assert u.shape == (4, 3, 2)
    assert new_state is state


# --------------------------------------------------------------------------- meta-gradients
def test_meta_gradients_reach_every_lstm_parameter():
    lstm = _lstm(seed=11)
    opt, params, x, y = _problem(population=1, sizes=(4, 3, 2))
    params = tuple(p.clone().requires_grad_(True) for p in params)
    state = lstm.init_state(params)
    losses = []
    for _ in range(5):
        loss = opt.loss(params, x, y).sum()
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        grads = tuple(g.detach() for g in grads)
        updates, state = lstm.update(grads, state, params)
        params = apply_updates(params, updates)
        losses.append(loss)
    meta_loss = torch.log(torch.stack(losses).sum())
    meta_loss.backward()
    named = dict(lstm.named_parameters())
    assert len(named) == 4 * lstm.num_layers + 2
    for name, p in named.items():
        assert p.grad is not None, f"{name} got no meta-gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite meta-gradient"
        assert p.grad.abs().sum() > 0, f"{name} has a zero meta-gradient"


def test_meta_gradient_matches_finite_difference():
    """The meta-gradient w.r.t. the head bias is the true derivative of the unrolled loss."""
    lstm = _lstm(seed=12).double()
    opt, params, x, y = _problem(population=1, sizes=(4, 3, 2))
    params = tuple(p.double() for p in params)
    x = x.double()

    def unrolled(model):
        ps = tuple(p.clone().requires_grad_(True) for p in params)
        state = model.init_state(ps)
        total = 0.0
        for _ in range(4):
            loss = opt.loss(ps, x, y).sum()
            g = torch.autograd.grad(loss, ps, retain_graph=True)
            u, state = model.update(tuple(t.detach() for t in g), state, ps)
            ps = apply_updates(ps, u)
            total = total + loss
        return total + opt.loss(ps, x, y).sum()

    unrolled(lstm).backward()
    analytic = lstm.head.bias.grad.item()
    assert analytic != 0
    eps = 1e-6
    values = []
    for shift in (eps, -eps):
        with torch.no_grad():
            lstm.head.bias += shift
        values.append(unrolled(lstm).item())
        with torch.no_grad():
            lstm.head.bias -= shift
    up, down = values
    assert analytic == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-8)


def test_detach_state_cuts_the_graph():
    lstm = _lstm()
    g = (torch.randn(3, 2),)
    _, state = lstm.update(g, lstm.init_state(g))
    assert state["h"].requires_grad
    detached = detach_state(state)
    assert not detached["h"].requires_grad and not detached["c"].requires_grad
    assert torch.equal(detached["h"], state["h"])
    assert detached["shapes"] == state["shapes"]


# --------------------------------------------------------------------------- compile path
def test_spelled_out_cell_matches_torch_lstm_cell():
    """The arithmetic torch.compile fuses (lstm_cell) equals the eager torch.lstm_cell path."""
    lstm = _lstm(seed=13, num_layers=3, hidden_size=9)
    flat = torch.randn(40) * torch.logspace(-8, 1, 40)
    h = torch.randn(3, 40, 9)
    c = torch.randn(3, 40, 9)
    with torch.no_grad():
        a = lstm_mod.lstm_forward(torch.lstm_cell, flat, h, c, 10.0, *lstm._weights())
        b = lstm_mod.lstm_forward(lstm_mod.lstm_cell, flat, h, c, 10.0, *lstm._weights())
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_replay_rows_variant_matches_the_cell(num_layers):
    """l2o.lstm_replay._lstm_rows (feature-major, tanh through sigmoid, c stored as 2c) is the
    same function as lstm_forward with either cell: k gradients per coordinate, each
    coordinate with its own state."""
    from l2o.lstm import preprocess_parts
    from l2o.lstm_replay import _lstm_rows

    lstm = _lstm(seed=21, num_layers=num_layers, hidden_size=7)
    k, m, hidden = 5, 33, 7
    g = torch.randn(k, m) * torch.logspace(-7, 0, m)  # both branches of the preprocessing
    h = torch.randn(num_layers, m, hidden) * 0.5
    c = torch.randn(num_layers, m, hidden)
    with torch.no_grad():
        double_g = torch.ones(4 * hidden, 1)
        double_g[2 * hidden : 3 * hidden] = 2.0
        hw, cs, w_ih = [], [], []
        for layer, cell in enumerate(lstm.cells):
            rec = torch.addmm((cell.bias_ih + cell.bias_hh)[:, None], cell.weight_hh, h[layer].t())
            hw.append(rec * double_g)
            cs.append((2 * c[layer]).t().contiguous())
            w_ih.append(cell.weight_ih * double_g)
        rows = _lstm_rows(
            g.clone(),
            hw,
            cs,
            w_ih,
            (lstm.head.weight, lstm.head.bias),
            lstm.preprocess_p,
            lstm.output_scale,
            preprocess_parts,
        )
        # the reference: every (row, coordinate) pair as one row of the row-major LSTM
        hr = h.unsqueeze(1).expand(-1, k, -1, -1).reshape(num_layers, k * m, hidden)
        cr = c.unsqueeze(1).expand(-1, k, -1, -1).reshape(num_layers, k * m, hidden)
        for cell_fn in (torch.lstm_cell, lstm_mod.lstm_cell):
            out, _, _ = lstm_mod.lstm_forward(
                cell_fn, g.reshape(-1), hr, cr, lstm.preprocess_p, *lstm._weights()
            )
            torch.testing.assert_close(
                rows, out.view(k, m) * lstm.output_scale, atol=1e-6, rtol=1e-5
            )


def test_deepcopy_drops_compiled_function():
    lstm = _lstm(torch_compile=True)
    lstm._compiled = lambda *a: None  # stands for a compiled function
    clone = copy.deepcopy(lstm)
    assert clone._compiled is None and clone.torch_compile
    sd, sc = lstm.state_dict(), clone.state_dict()
    assert all(torch.equal(sd[k], sc[k]) for k in sd)


@pytest.mark.slow
def test_compile_gives_same_updates():
    """Both paths see the same gradients: recomputing the gradients along each path's own
    trajectory would compare float noise, since coordinates with |g| < e^-p (e.g. the biases
    feeding BatchNorm, whose true gradient is 0) are multiplied by e^p ~ 2e4."""
    eager = _lstm(seed=14)
    compiled = _lstm(seed=14, torch_compile=True)
    opt, params, x, y = _problem(population=2, batchnorm=True, sizes=(6, 5, 4, 3))
    se, sc = eager.init_state(params), compiled.init_state(params)
    for _ in range(3):
        grads = _grads(opt, params, x, y)
        ue, se = eager.update(grads, se, params)
        uc, sc = compiled.update(grads, sc, params)
        for a, b in zip(ue, uc):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sc["h"], se["h"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sc["c"], se["c"], atol=1e-5, rtol=1e-5)
        params = apply_updates(params, ue)
    assert compiled._compiled is not None
    # gradients flow through the compiled path too
    ge = torch.autograd.grad(sum(u.sum() for u in ue), eager.head.weight)[0]
    gc = torch.autograd.grad(sum(u.sum() for u in uc), compiled.head.weight)[0]
    torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-4)


def test_compile_options_drop_what_this_torch_does_not_know(monkeypatch):
    from torch._inductor import config

    import l2o.lstm as lstm_module

    monkeypatch.setattr(
        lstm_module,
        "COMPILE_OPTIONS",
        {"cpp.use_decompose_tanh": True, "cpp.no_such_option": 1, "no_such_group.x": 2},
    )
    known = {"cpp.use_decompose_tanh": True} if hasattr(config.cpp, "use_decompose_tanh") else {}
    assert lstm_module.compile_options() == known


def test_no_grad_update_in_blocks_equals_one_call(monkeypatch):
    """Without a graph (meta-testing) the cell runs over blocks of coordinates; the updates and
    the next state are those of one call over all coordinates (the graph-mode path)."""
    lstm = _lstm(seed=22)
    opt, params, x, y = _problem(population=3, sizes=(9, 7, 4))  # 3 x 102 = 306 coordinates
    state = lstm.init_state(params)
    state = {**state, "h": torch.randn_like(state["h"]), "c": torch.randn_like(state["c"])}
    grads = _grads(opt, params, x, y)
    ref_updates, ref_state = lstm.update(grads, state, params)  # graph mode: one call
    assert ref_updates[0].requires_grad
    calls = []
    forward = lstm_mod.lstm_forward

    def counting(cell, flat, *rest):
        calls.append(flat.numel())
        return forward(cell, flat, *rest)

    monkeypatch.setattr(lstm_mod, "NO_GRAD_BLOCK", 100)
    monkeypatch.setattr(lstm_mod, "lstm_forward", counting)
    with torch.no_grad():
        updates, new_state = lstm.update(grads, state, params)
    assert calls == [77, 77, 77, 75]  # four blocks: equal but the last
    for a, b in zip(updates, ref_updates, strict=True):
        torch.testing.assert_close(a, b.detach(), atol=1e-7, rtol=1e-6)
    for key in ("h", "c"):
        torch.testing.assert_close(new_state[key], ref_state[key].detach(), atol=0, rtol=0)
    assert new_state["shapes"] == ref_state["shapes"]
