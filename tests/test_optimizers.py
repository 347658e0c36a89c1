"""Baselines of l2o.optimizers against torch.optim and against independent references.

Every trajectory test drives the functional protocol exactly as meta-training does::

    state = opt.init_state(params)
    updates, state = opt.update(grads, state, params)
    params = params + updates
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from l2o.optimizees import MLPOptimizee, grads_of
from l2o.optimizers import (
    SGD,
    Adam,
    Lion,
    LionSGD,
    Optimizer,
    apply_updates,
    make_baseline,
    replay,
)

STEPS = 50
DTYPE = torch.float64


# --------------------------------------------------------------------------- helpers
def _problem(population: int = 1, batchnorm: bool = False, seed: int = 0):
    """A small MLP classification problem in float64: (optimizee, params, loss_fn)."""
    opt = MLPOptimizee(sizes=(6, 5, 4, 3), activation="tanh", batchnorm=batchnorm)
    gen = torch.Generator().manual_seed(seed)
    params = opt.init(population, generator=gen, dtype=DTYPE)
    x = torch.randn(population, 16, 6, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (population, 16), generator=gen)
    return opt, params, lambda ps: opt.loss(ps, x, y)


def _grads(loss_fn, params):
    return grads_of(loss_fn, params)[1]


def _run_functional(opt: Optimizer, params, loss_fn, steps: int = STEPS):
    """Trajectory of params (including the start) under the functional protocol."""
    state = opt.init_state(params)
    traj = [params]
    for _ in range(steps):
        grads = _grads(loss_fn, params)
        updates, state = opt.update(grads, state, params)
        params = apply_updates(params, updates)
        traj.append(params)
    return traj


def _run_torch(make_opt, params, loss_fn, steps: int = STEPS):
    """Trajectory of params under a torch.optim optimizer acting on leaf tensors."""
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    optim = make_opt(leaves)
    traj = [tuple(p.detach().clone() for p in leaves)]
    for _ in range(steps):
        optim.zero_grad()
        loss_fn(tuple(leaves)).sum().backward()
        optim.step()
        traj.append(tuple(p.detach().clone() for p in leaves))
    return traj


def _assert_traj_close(a, b, atol=1e-6, rtol=1e-6):
    assert len(a) == len(b)
    for t, (pa, pb) in enumerate(zip(a, b)):
        for i, (x, y) in enumerate(zip(pa, pb)):
            assert x.shape == y.shape
            torch.testing.assert_close(
                x, y, atol=atol, rtol=rtol, msg=lambda m, t=t, i=i: f"step {t}, param {i}: {m}"
            )


def _moved(traj) -> float:
    """How far the trajectory moved: guards against vacuous comparisons."""
    return max((a - b).abs().max().item() for a, b in zip(traj[-1], traj[0]))


def _tree_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_tree_equal(x, y) for x, y in zip(a, b))
    return a == b


# --------------------------------------------------------------------------- SGD
SGD_CONFIGS = [
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.5),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, weight_decay=0.05),
    dict(momentum=0.9, nesterov=True, weight_decay=0.05),
    dict(momentum=0.8, dampening=0.3, weight_decay=0.01),
    dict(momentum=0.0),
    dict(momentum=0.0, weight_decay=0.05),
]


@pytest.mark.parametrize(
    "cfg", SGD_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_sgd_matches_torch(cfg):
    _, params, loss_fn = _problem()
    ours = _run_functional(SGD(lr=0.1, **cfg), params, loss_fn)
    ref = _run_torch(lambda ps: torch.optim.SGD(ps, lr=0.1, **cfg), params, loss_fn)
    assert _moved(ref) > 1e-2
    _assert_traj_close(ours, ref)


def test_sgd_matches_torch_on_population_with_batchnorm():
    _, params, loss_fn = _problem(population=3, batchnorm=True)
    cfg = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    ours = _run_functional(SGD(lr=0.05, **cfg), params, loss_fn)
    ref = _run_torch(lambda ps: torch.optim.SGD(ps, lr=0.05, **cfg), params, loss_fn)
    assert _moved(ref) > 1e-2
    _assert_traj_close(ours, ref)


def test_sgd_float32_matches_torch_relative():
    _, params, loss_fn = _problem()
    params = tuple(p.float() for p in params)
    f32_loss = lambda ps: loss_fn(tuple(p.double() for p in ps)).float()
    ours = _run_functional(SGD(lr=0.1, momentum=0.9), params, f32_loss)
    ref = _run_torch(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), params, f32_loss)
    _assert_traj_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_sgd_without_momentum_is_minus_lr_grad():
    g = (torch.tensor([1.0, -2.0]), torch.tensor([[0.5]]))
    p = (torch.tensor([3.0, 4.0]), torch.tensor([[-1.0]]))
    opt = SGD(lr=0.1, momentum=0.0, weight_decay=0.5)
    updates, state = opt.update(g, opt.init_state(p), p)
    torch.testing.assert_close(updates[0], -0.1 * (g[0] + 0.5 * p[0]))
    torch.testing.assert_close(updates[1], -0.1 * (g[1] + 0.5 * p[1]))
    assert state["step"] == 1


# --------------------------------------------------------------------------- Adam
ADAM_CONFIGS = [
    dict(),
    dict(weight_decay=0.05),
    dict(betas=(0.8, 0.95), eps=1e-6),
    dict(betas=(0.5, 0.9), weight_decay=0.1),
]


@pytest.mark.parametrize(
    "cfg", ADAM_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_adam_matches_torch(cfg):
    _, params, loss_fn = _problem()
    ours = _run_functional(Adam(lr=1e-2, **cfg), params, loss_fn)
    ref = _run_torch(lambda ps: torch.optim.Adam(ps, lr=1e-2, **cfg), params, loss_fn)
    assert _moved(ref) > 1e-2
    _assert_traj_close(ours, ref)


def test_adam_float32_matches_torch_relative():
    _, params, loss_fn = _problem(population=2, batchnorm=True)
    params = tuple(p.float() for p in params)
    f32_loss = lambda ps: loss_fn(tuple(p.double() for p in ps)).float()
    ours = _run_functional(Adam(lr=1e-2, weight_decay=0.01), params, f32_loss)
    ref = _run_torch(lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.01), params, f32_loss)
    _assert_traj_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_adam_first_step_is_lr_times_sign():
    """Bias correction: the first Adam step is -lr * g / (|g| + eps') ~ -lr * sign(g)."""
    g = (torch.tensor([3.0, -1e-2, 0.0], dtype=DTYPE),)
    p = (torch.zeros(3, dtype=DTYPE),)
    opt = Adam(lr=0.1, eps=1e-12)
    updates, state = opt.update(g, opt.init_state(p), p)
    torch.testing.assert_close(updates[0], torch.tensor([-0.1, 0.1, 0.0], dtype=DTYPE))
    assert state["step"] == 1


# --------------------------------------------------------------------------- Lion
def _lion_reference(params, loss_fn, lr, betas, wd, steps=STEPS):
    """Chen et al. (2023), Algorithm 2, written independently on plain tensors."""
    b1, b2 = betas
    theta = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    traj = [tuple(t.clone() for t in theta)]
    for _ in range(steps):
        leaves = [t.clone().requires_grad_(True) for t in theta]
        g = torch.autograd.grad(loss_fn(tuple(leaves)).sum(), leaves)
        for i in range(len(theta)):
            c = b1 * m[i] + (1 - b1) * g[i]
            theta[i] = theta[i] - lr * (torch.sign(c) + wd * theta[i])
            m[i] = b2 * m[i] + (1 - b2) * g[i]
        traj.append(tuple(t.clone() for t in theta))
    return traj


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lion_matches_reference(wd):
    _, params, loss_fn = _problem(population=2)
    ours = _run_functional(Lion(lr=1e-3, betas=(0.9, 0.99), weight_decay=wd), params, loss_fn)
    ref = _lion_reference(params, loss_fn, lr=1e-3, betas=(0.9, 0.99), wd=wd)
    assert _moved(ref) > 1e-2
    _assert_traj_close(ours, ref, atol=1e-9, rtol=1e-9)


def test_lion_update_is_sign_sized():
    """Without weight decay every Lion update coordinate is exactly +-lr (or 0 where c=0)."""
    g = (torch.tensor([2.0, -1e-6, 0.0]),)
    opt = Lion(lr=0.01)
    updates, _ = opt.update(g, opt.init_state(g))
    torch.testing.assert_close(updates[0], torch.tensor([-0.01, 0.01, 0.0]))


# --------------------------------------------------------------------------- LionSGD
def _parts():
    return Lion(lr=1e-3, weight_decay=0.1), SGD(lr=0.05, momentum=0.9, weight_decay=0.01)


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_lion_sgd_is_convex_combination_with_separate_states(w):
    lion, sgd = _parts()
    mix = LionSGD(lion, sgd, lion_weight=w)
    _, params, loss_fn = _problem()
    s_mix = mix.init_state(params)
    s_lion, s_sgd = lion.init_state(params), sgd.init_state(params)
    for _ in range(20):
        grads = _grads(loss_fn, params)
        u_mix, s_mix = mix.update(grads, s_mix, params)
        u_lion, s_lion = lion.update(grads, s_lion, params)
        u_sgd, s_sgd = sgd.update(grads, s_sgd, params)
        for um, ul, us in zip(u_mix, u_lion, u_sgd):
            torch.testing.assert_close(um, w * ul + (1 - w) * us, atol=1e-12, rtol=0)
        if w == 1.0:
            assert all(torch.equal(a, b) for a, b in zip(u_mix, u_lion))
        if w == 0.0:
            assert all(torch.equal(a, b) for a, b in zip(u_mix, u_sgd))
        assert _tree_equal(s_mix["lion"], s_lion)
        assert _tree_equal(s_mix["sgd"], s_sgd)
        params = apply_updates(params, u_mix)


def test_lion_sgd_trajectory_endpoints():
    """lion_weight 1 / 0 follow exactly Lion's / SGD's trajectories."""
    lion, sgd = _parts()
    _, params, loss_fn = _problem()
    _assert_traj_close(
        _run_functional(LionSGD(lion, sgd, 1.0), params, loss_fn, 20),
        _run_functional(lion, params, loss_fn, 20),
        atol=0,
        rtol=0,
    )
    _assert_traj_close(
        _run_functional(LionSGD(lion, sgd, 0.0), params, loss_fn, 20),
        _run_functional(sgd, params, loss_fn, 20),
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize("w", [-0.1, 1.0001, 2.0, float("nan")])
def test_lion_sgd_invalid_weight_raises(w):
    with pytest.raises(ValueError, match="lion_weight"):
        LionSGD(lion_weight=w)


# --------------------------------------------------------------------------- purity / replay
def _all_baselines():
    return [
        SGD(lr=0.1, momentum=0.9, weight_decay=0.01),
        SGD(lr=0.1, momentum=0.9, nesterov=True),
        SGD(lr=0.1, momentum=0.0),
        Adam(lr=1e-2, weight_decay=0.01),
        Lion(lr=1e-3, weight_decay=0.1),
        LionSGD(Lion(lr=1e-3), SGD(lr=0.05), lion_weight=0.4),
    ]


def _advance(opt, params, loss_fn, steps):
    state = opt.init_state(params)
    for _ in range(steps):
        updates, state = opt.update(_grads(loss_fn, params), state, params)
        params = apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("opt", _all_baselines(), ids=lambda o: repr(o)[:60])
@pytest.mark.parametrize("warm_steps", [0, 3])
def test_update_does_not_mutate_inputs(opt, warm_steps):
    _, params, loss_fn = _problem()
    params, state = _advance(opt, params, loss_fn, warm_steps)
    grads = _grads(loss_fn, params)
    state0, grads0, params0 = copy.deepcopy(state), copy.deepcopy(grads), copy.deepcopy(params)
    updates, new_state = opt.update(grads, state, params)
    assert _tree_equal(state, state0)
    assert _tree_equal(grads, grads0)
    assert _tree_equal(params, params0)
    # calling again from the same state gives the same result: nothing was advanced
    updates2, new_state2 = opt.update(grads, state, params)
    assert _tree_equal(updates, updates2)
    assert _tree_equal(new_state, new_state2)


@pytest.mark.parametrize("opt", _all_baselines(), ids=lambda o: repr(o)[:60])
@pytest.mark.parametrize("warm_steps", [0, 3])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 100])
def test_replay_equals_loop_of_single_updates(opt, warm_steps, chunk_size):
    _, params, loss_fn = _problem(population=2)
    params, state = _advance(opt, params, loss_fn, warm_steps)
    state0 = copy.deepcopy(state)
    n = 7
    gen = torch.Generator().manual_seed(1)
    batch = tuple(torch.randn(n, *p.shape, generator=gen, dtype=DTYPE) for p in params)
    out = replay(opt, batch, state, params, chunk_size=chunk_size)
    assert len(out) == len(params)
    for u, p in zip(out, params):
        assert u.shape == (n, *p.shape)
    for i in range(n):
        single, _ = opt.update(tuple(g[i] for g in batch), state, params)
        for u, s in zip(out, single):
            torch.testing.assert_close(u[i], s, atol=1e-12, rtol=1e-12)
    assert _tree_equal(state, state0)  # replay does not advance the state


def test_weight_decay_without_params_raises_clearly():
    for opt in (SGD(weight_decay=0.1), Adam(weight_decay=0.1), Lion(weight_decay=0.1)):
        p = (torch.ones(2),)
        with pytest.raises(ValueError, match="weight decay needs the current params"):
            opt.update(p, opt.init_state(p))


# --------------------------------------------------------------------------- make_baseline
def test_make_baseline_unknown_name():
    with pytest.raises(ValueError, match=r"unknown optimizer 'rmsprop'.*adam.*lion.*sgd"):
        make_baseline("rmsprop", lr=0.1)


@pytest.mark.parametrize("name", ["sgd", "adam", "lion", "lion_sgd"])
@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan")])
def test_make_baseline_rejects_nonpositive_lr(name, lr):
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        make_baseline(name, lr=lr)


def test_lion_sgd_rejects_nonpositive_lion_lr():
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        make_baseline("lion_sgd", lr=0.1, lion_lr=0.0)


def test_make_baseline_builds_configured_instances():
    sgd = make_baseline("sgd", lr=0.2, momentum=0.5, nesterov=True)
    assert isinstance(sgd, SGD) and sgd.lr == 0.2 and sgd.momentum == 0.5 and sgd.nesterov
    adam = make_baseline("adam", lr=3e-4, weight_decay=0.1)
    assert isinstance(adam, Adam) and adam.lr == 3e-4 and adam.weight_decay == 0.1
    lion = make_baseline("lion", lr=1e-4)
    assert isinstance(lion, Lion) and lion.lr == 1e-4
    mix = make_baseline("lion_sgd", lr=0.05, lion_lr=2e-4, lion_weight=0.25)
    assert isinstance(mix, LionSGD)
    assert mix.sgd.lr == 0.05 and mix.lion.lr == 2e-4 and mix.lion_weight == 0.25
    for opt in (sgd, adam, lion, mix):
        assert isinstance(opt, Optimizer)
        assert opt.name in ("sgd", "adam", "lion", "lion_sgd")


def test_baselines_are_immutable_configs():
    opt = SGD(lr=0.1)
    with pytest.raises(AttributeError):
        opt.lr = 1.0  # type: ignore[misc]
    assert math.isclose(opt.lr, 0.1)
