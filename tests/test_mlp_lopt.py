"""The per-parameter MLP learned optimizer (Metz et al. 2022's MLP family)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from l2o.inner import inner_step
from l2o.mlp_lopt import MLPLOpt
from l2o.optimizees import MLPOptimizee, grads_of
from l2o.optimizers import Optimizer, apply_updates, chunked_replay


def _net(seed: int = 0, **kw) -> MLPLOpt:
    torch.manual_seed(seed)
    return MLPLOpt(**kw)


def _problem(population=2, batchnorm=False, sizes=(6, 5, 3), seed=0, dtype=torch.float32):
    opt = MLPOptimizee(sizes=sizes, batchnorm=batchnorm)
    gen = torch.Generator().manual_seed(seed)
    params = opt.init(population, generator=gen, dtype=dtype)
    x = torch.randn(population, 16, sizes[0], generator=gen, dtype=dtype)
    y = torch.randint(0, sizes[-1], (population, 16), generator=gen)
    return opt, params, x, y


def _grads(opt, params, x, y):
    return grads_of(opt.loss, params, x, y)[1]


def _advance(net, opt, params, x, y, steps):
    """A few real steps, so that the accumulators and the step count are not trivial."""
    state = net.init_state(params)
    for _ in range(steps):
        updates, state = net.update(_grads(opt, params, x, y), state, params)
        params = apply_updates(params, updates)
    return params, state


# --------------------------------------------------------------------------- construction
def test_protocol_config_and_validation():
    net = _net()
    assert isinstance(net, Optimizer) and isinstance(net, nn.Module)
    assert net.name == "mlp_lopt"
    config = net.config()
    json.dumps(config)  # plain data: checkpoints load with weights_only=True
    assert MLPLOpt(**config).config() == config
    assert net.num_features == 4 + 2 * 4 + 9
    assert [tuple(layer.weight.shape) for layer in net.layers] == [(32, 21), (32, 32), (2, 32)]
    for kw, match in [
        ({"hidden_sizes": (32, 0)}, "hidden_sizes"),
        ({"momentum_decays": (0.5, 1.0)}, "momentum_decays"),
        ({"momentum_decays": ()}, "momentum_decays"),
        ({"rms_decay": 1.0}, "rms_decay"),
        ({"time_scales": (1.0, 0.0)}, "time_scales"),
        ({"eps": 0.0}, "eps"),
        ({"step_mult": 0.0}, "step_mult"),
    ]:
        with pytest.raises(ValueError, match=match):
            MLPLOpt(**kw)
    opt, params, x, y = _problem()
    with pytest.raises(ValueError, match="params"):
        net.update(_grads(opt, params, x, y), net.init_state(params))


def test_output_layer_starts_small():
    """An untrained optimizer takes small steps: |update| ~ step_mult * output_init_scale."""
    opt, params, x, y = _problem()
    small, big = _net(1), _net(1, output_init_scale=1.0)
    grads = _grads(opt, params, x, y)
    with torch.no_grad():
        u_small, _ = small.update(grads, small.init_state(params), params)
        u_big, _ = big.update(grads, big.init_state(params), params)
    mean_small = torch.cat([u.abs().flatten() for u in u_small]).mean()
    mean_big = torch.cat([u.abs().flatten() for u in u_big]).mean()
    assert 0 < mean_small < 1e-3 * 0.5
    torch.testing.assert_close(mean_small / mean_big, torch.tensor(0.1), rtol=0.05, atol=0)


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    "population, batchnorm, sizes",
    [(1, False, (6, 5, 3)), (3, False, (6, 5, 3)), (3, True, (6, 5, 4, 3))],
)
def test_update_and_state_shapes(population, batchnorm, sizes):
    opt, params, x, y = _problem(population, batchnorm, sizes)
    net = _net(momentum_decays=(0.5, 0.9, 0.99))
    state = net.init_state(params)
    n = sum(p.numel() for p in params)
    assert state["momentum"].shape == (n, 3) and state["rms"].shape == (n,)
    assert state["step"] == 0 and state["shapes"] == tuple(tuple(p.shape) for p in params)
    for step in range(1, 3):
        updates, state = net.update(_grads(opt, params, x, y), state, params)
        for u, p in zip(updates, params):
            assert u.shape == p.shape and u.dtype == p.dtype and torch.isfinite(u).all()
        assert state["step"] == step and state["momentum"].shape == (n, 3)
        params = apply_updates(params, updates)
    assert state["rms"].gt(0).any()


def test_pure_inputs_not_mutated():
    opt, params, x, y = _problem()
    net = _net()
    params, state = _advance(net, opt, params, x, y, 2)
    grads = _grads(opt, params, x, y)
    before = [t.clone() for t in (*params, *grads, state["momentum"], state["rms"])]
    net.update(grads, state, params)
    after = (*params, *grads, state["momentum"], state["rms"])
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and state["step"] == 2


# --------------------------------------------------------------------------- replay
@pytest.mark.parametrize("lead", [(4,), (2, 3)])
def test_replay_equals_a_loop_and_does_not_advance(lead):
    opt, params, x, y = _problem(population=2, batchnorm=True, sizes=(6, 5, 4, 3))
    net = _net(2)
    params, state = _advance(net, opt, params, x, y, 3)
    gen = torch.Generator().manual_seed(7)
    batch = tuple(torch.randn(*lead, *p.shape, generator=gen) * 0.1 for p in params)
    with torch.no_grad():
        replayed, same = net.update(batch, state, params)
        flat = tuple(g.reshape(-1, *p.shape) for g, p in zip(batch, params))
        for k in range(flat[0].shape[0]):
            single, _ = net.update(tuple(g[k] for g in flat), state, params)
            for r, s in zip(replayed, single):
                torch.testing.assert_close(r.reshape(-1, *s.shape)[k], s, atol=1e-6, rtol=1e-5)
    assert same is state and state["step"] == 3
    assert all(r.shape == (*lead, *p.shape) for r, p in zip(replayed, params))


def test_covariance_replay_path_matches_protocol():
    """The analyses' memory-bounded replay (chunks of gradients) gives the protocol's updates."""
    opt, params, x, y = _problem(population=1)
    net = _net(3)
    params, state = _advance(net, opt, params, x, y, 2)
    batch = tuple(torch.randn(5, *p.shape) * 0.1 for p in params)
    with torch.no_grad():
        whole, _ = net.update(batch, state, params)
        chunked = chunked_replay(net, batch, state, params, chunk_size=2)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


# --------------------------------------------------------------------------- normalisation
def test_permuting_tensors_or_members_permutes_updates():
    opt, params, x, y = _problem(population=3)
    net = _net(4)
    params, state = _advance(net, opt, params, x, y, 2)
    grads = _grads(opt, params, x, y)

    def run(gs, ps, st):
        with torch.no_grad():
            return net.update(gs, st, ps)[0]

    base = run(grads, params, state)
    # tensors in reverse order: the state's accumulators follow their tensors
    order = list(reversed(range(len(params))))
    sizes = [p.numel() for p in params]
    pieces = lambda t: t.split(sizes, dim=0)  # noqa: E731
    rev_state = {
        "momentum": torch.cat([pieces(state["momentum"])[i] for i in order]),
        "rms": torch.cat([pieces(state["rms"])[i] for i in order]),
        "step": state["step"],
        "shapes": tuple(state["shapes"][i] for i in order),
    }
    rev = run(tuple(grads[i] for i in order), tuple(params[i] for i in order), rev_state)
    for j, i in enumerate(order):
        torch.testing.assert_close(rev[j], base[i], atol=1e-7, rtol=1e-6)
    # population members permuted
    perm = torch.tensor([2, 0, 1])

    def member_view(flat_state_part):
        parts = pieces(flat_state_part)
        return torch.cat([q.reshape(3, -1, *q.shape[1:])[perm].reshape(q.shape) for q in parts])

    perm_state = {
        **state,
        "momentum": member_view(state["momentum"]),
        "rms": member_view(state["rms"]),
    }
    permuted = run(tuple(g[perm] for g in grads), tuple(p[perm] for p in params), perm_state)
    for a, b in zip(permuted, base):
        torch.testing.assert_close(a, b[perm], atol=1e-7, rtol=1e-6)


def test_statistics_are_per_tensor_per_member_per_replayed_gradient():
    """Changing one tensor / member / replayed gradient changes nothing else: no pooling."""
    opt, params, x, y = _problem(population=2)
    net = _net(5)
    params, state = _advance(net, opt, params, x, y, 2)
    grads = _grads(opt, params, x, y)
    with torch.no_grad():
        base, _ = net.update(grads, state, params)
        # scale every gradient of tensor 0, member 1 by 100
        g2 = list(grads)
        g2[0] = g2[0].clone()
        g2[0][1] *= 100.0
        changed, _ = net.update(tuple(g2), state, params)
        assert not torch.allclose(changed[0][1], base[0][1])
        torch.testing.assert_close(changed[0][0], base[0][0], atol=0, rtol=0)
        for a, b in zip(changed[1:], base[1:]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        # a batch of two replayed gradients, the second scaled by 100: the first is unaffected
        batch = tuple(torch.stack([g, 100 * g]) for g in grads)
        replayed, _ = net.update(batch, state, params)
        for r, b in zip(replayed, base):
            torch.testing.assert_close(r[0], b, atol=1e-7, rtol=1e-6)


def test_each_tensor_alone_gives_its_slice_of_the_joint_call():
    """Tensors are independent: one call on all = one call per tensor (the single-tensor path
    the drop-in takes), with the state split along the coordinates, for P = 3 members."""
    opt, params, x, y = _problem(population=3, batchnorm=True, sizes=(6, 5, 4, 3))
    net = _net(11)
    params, state = _advance(net, opt, params, x, y, 2)
    grads = _grads(opt, params, x, y)
    sizes = [p.numel() for p in params]
    with torch.no_grad():
        joint, joint_state = net.update(grads, state, params)
        parts = zip(state["momentum"].split(sizes), state["rms"].split(sizes))
        for i, (mom, rms) in enumerate(parts):
            alone = {"momentum": mom, "rms": rms, "step": 2, "shapes": (tuple(params[i].shape),)}
            (u,), s = net.update((grads[i],), alone, (params[i],))
            torch.testing.assert_close(u, joint[i], atol=1e-7, rtol=1e-5)
            torch.testing.assert_close(s["rms"], joint_state["rms"].split(sizes)[i])


def test_zero_tensors_give_finite_updates():
    """A fresh zero bias and an all-zero gradient: finite features (norm_eps), finite updates."""
    net = _net(6)
    params = (torch.zeros(2, 3), torch.randn(2, 4, 3))
    grads = (torch.zeros(2, 3), torch.zeros(2, 4, 3))
    feats, _, _ = net.features(grads, net.init_state(params), params)
    assert torch.isfinite(feats).all()
    # the zero tensor: every feature 0 but 1/sqrt(v + eps), constant, hence 1 after normalising
    k = net.num_normalized
    assert feats[:6, : k - 1].eq(0).all() and feats[:6, k - 1].eq(1).all()
    updates, _ = net.update(grads, net.init_state(params), params)
    assert all(torch.isfinite(u).all() for u in updates)


# --------------------------------------------------------------------------- by hand
def test_features_by_hand():
    """Two steps on a tiny example, every feature from the formulas in plain Python."""
    net = _net(7, momentum_decays=(0.5,), rms_decay=0.9, eps=1e-8, time_scales=(1.0, 10.0))
    params = (
        torch.tensor([[1.0, -1.0]], dtype=torch.float64),
        torch.tensor([[0.5]], dtype=torch.float64),
    )
    g_steps = [([0.3, -0.4], [2.0]), ([0.1, 0.2], [-0.6])]
    state = net.init_state(params)
    m = [0.0, 0.0, 0.0]
    v = [0.0, 0.0, 0.0]
    for t, (ga, gb) in enumerate(g_steps):
        grads = (torch.tensor([ga], dtype=torch.float64), torch.tensor([gb], dtype=torch.float64))
        feats, _, _ = net.features(grads, state, params)
        g = ga + gb
        p = [1.0, -1.0, 0.5]
        m = [0.5 * mi + 0.5 * gi for mi, gi in zip(m, g)]
        v = [0.9 * vi + 0.1 * gi * gi for vi, gi in zip(v, g)]
        v_hat = [vi / (1 - 0.9 ** (t + 1)) for vi in v]
        rs = [1 / math.sqrt(vh + 1e-8) for vh in v_hat]
        columns = [g, p, m, v_hat, [mi * r for mi, r in zip(m, rs)], rs]
        expected = []
        for i in range(3):
            seg = [0, 1] if i < 2 else [2]  # tensor A (two coordinates) or tensor B (one)
            row = []
            for col in columns:
                rms = math.sqrt(sum(col[j] ** 2 for j in seg) / len(seg))
                row.append(col[i] / rms)
            row += [math.tanh(t / 1.0 - 1.0), math.tanh(t / 10.0 - 1.0)]
            expected.append(row)
        torch.testing.assert_close(
            feats, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12
        )
        if t == 0:  # spot checks of the first step, written out
            assert feats[0, 0].item() == pytest.approx(0.3 / math.sqrt(0.125))
            assert feats[2].tolist()[:6] == pytest.approx([1.0] * 6)  # one coordinate: its sign
            assert feats[0, 6:].tolist() == pytest.approx([math.tanh(-1.0)] * 2)
        updates, state = net.update(grads, state, params)
        # the update from these features through the MLP (ReLU between layers), by hand
        with torch.no_grad():
            h = torch.tensor(expected, dtype=torch.float64)
            for i, layer in enumerate(net.layers):
                h = h @ layer.weight.double().T + layer.bias.double()
                h = h.clamp_min(0) if i < len(net.layers) - 1 else h
        ref = -1e-3 * h[:, 0] * torch.exp(1e-3 * h[:, 1])
        torch.testing.assert_close(torch.cat([u.flatten() for u in updates]).detach(), ref)
    assert state["step"] == 2
    torch.testing.assert_close(state["momentum"][:, 0], torch.tensor(m, dtype=torch.float64))
    torch.testing.assert_close(state["rms"], torch.tensor(v, dtype=torch.float64))


# --------------------------------------------------------------------------- dtype, grads
def test_float64_kept_and_close_to_float32():
    net = _net(8)
    opt, p64, x64, y = _problem(dtype=torch.float64)
    u64, s64 = net.update(_grads(opt, p64, x64, y), net.init_state(p64), p64)
    assert all(u.dtype == torch.float64 for u in u64)
    assert s64["momentum"].dtype == torch.float64 and s64["rms"].dtype == torch.float64
    p32 = tuple(p.float() for p in p64)
    u32, _ = net.update(_grads(opt, p32, x64.float(), y), net.init_state(p32), p32)
    for a, b in zip(u64, u32):
        torch.testing.assert_close(a.float(), b, rtol=1e-4, atol=1e-9)


def test_meta_gradient_reaches_every_weight():
    """Through a 3-step unroll (meta=True, as in meta-training) to every MLP weight and bias."""
    opt, params, x, y = _problem(population=2)
    net = _net(9)
    state = net.init_state(params)
    losses = []
    for _ in range(3):
        step = inner_step(opt, net, params, state, x, y, meta=True)
        params, state = step.params, step.state
        losses.append(step.loss)
    losses.append(opt.loss(params, x, y))
    torch.stack(losses).sum().backward()
    for name, w in net.named_parameters():
        assert w.grad is not None and torch.isfinite(w.grad).all(), name
        assert w.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- it learns
def _quadratic(seed: int, population: int = 4):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((6, 4), (5,))
    curv = tuple(torch.rand((population, *s), generator=gen) * 1.5 + 0.5 for s in shapes)
    start = tuple(torch.randn((population, *s), generator=gen) * 0.05 for s in shapes)
    return curv, start


def _unroll(net: MLPLOpt, seed: int, steps: int = 20, meta: bool = True) -> torch.Tensor:
    """log of the mean loss over the unroll, averaged over the population (the meta-loss)."""
    curv, x = _quadratic(seed)
    state = net.init_state(x)
    losses = []
    for _ in range(steps):
        with torch.enable_grad():
            if not (meta and x[0].requires_grad):
                x = tuple(xi.detach().requires_grad_(True) for xi in x)
            loss = sum(0.5 * (c * xi * xi).flatten(1).sum(1) for c, xi in zip(curv, x))
            grads = torch.autograd.grad(loss.sum(), x, retain_graph=meta)
        with torch.set_grad_enabled(meta):
            updates, state = net.update(grads, state, x)
            x = apply_updates(x, updates)
        losses.append(loss)
    return torch.stack(losses).mean(0).log().mean()


def test_meta_training_by_hand_lowers_the_meta_loss():
    """150 Adam steps on the meta-loss of random quadratics (full backprop through 20 steps)
    lower the held-out meta-loss by more than 1 (the mean loss by more than a factor e)."""
    net = _net(10)
    meta_opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def held_out() -> float:
        with torch.no_grad():
            return sum(_unroll(net, 1000 + s, meta=False).item() for s in range(3)) / 3

    before = held_out()
    for it in range(150):
        meta_opt.zero_grad()
        _unroll(net, it).backward()
        meta_opt.step()
    after = held_out()
    assert after < before - 1.0, (before, after)


def test_an_empty_tensor_gets_an_empty_update():
    """0 coordinates (alone, or beside others): empty update, the others as without it."""
    net = _net()
    empty, full = torch.zeros(1, 0, 3), torch.randn(1, 4)
    grad = torch.randn(1, 4)
    (u,), _ = net.update((empty,), net.init_state((empty,)), (empty,))
    assert u.shape == (1, 0, 3)
    (ue, uf), _ = net.update((empty, grad), net.init_state((empty, full)), (empty, full))
    (ref,), _ = net.update((grad,), net.init_state((full,)), (full,))
    assert ue.shape == (1, 0, 3) and torch.equal(uf, ref)
