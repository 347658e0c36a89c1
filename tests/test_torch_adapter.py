"""l2o.torch_adapter: torch.optim optimizers in the functional protocol.

Ground truths: the project's own SGD/Adam (l2o.optimizers), torch's optimizers run the ordinary
way (leaf tensors, backward, step) and the adapter's own per-member loop (for the stacked
paths). The optional extra's optimizers (schedulefree, prodigyopt, heavyball) are skipped with a
reason when not installed.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from l2o.covariance import covariance_analysis
from l2o.optimizees import MLPOptimizee, grads_of
from l2o.optimizers import SGD, Adam, apply_updates, chunked_replay
from l2o.torch_adapter import ELEMENTWISE, ByNdim, TorchOptimizer, make_torch_optimizer

DTYPE = torch.float64
STEPS = 50


def _problem(population=1, batchnorm=False, seed=0, dtype=DTYPE):
    optimizee = MLPOptimizee(sizes=(6, 5, 4, 3), activation="tanh", batchnorm=batchnorm)
    gen = torch.Generator().manual_seed(seed)
    params = optimizee.init(population, generator=gen, dtype=dtype)
    x = torch.randn(population, 16, 6, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (population, 16), generator=gen)
    return optimizee, params, lambda ps: optimizee.loss(ps, x, y), (x, y)


def _grads(loss_fn, params):
    return grads_of(loss_fn, params)[1]


def _run_protocol(opt, params, loss_fn, steps=STEPS):
    state = opt.init_state(params)
    traj = [params]
    for _ in range(steps):
        updates, state = opt.update(_grads(loss_fn, params), state, params)
        params = apply_updates(params, updates)
        traj.append(params)
    return traj, state


def _run_torch(make_opts, params, loss_fn, steps=STEPS, members=False):
    """torch optimizers the ordinary way. ``members``: each population member's tensors are
    their own leaves (what a non-elementwise optimizer must see); make_opts returns a list."""
    if members:
        leaves = [
            [p[m].clone().requires_grad_(True) for p in params] for m in range(len(params[0]))
        ]
        flat = [leaf for member in leaves for leaf in member]

        def current():
            return tuple(torch.stack([member[i] for member in leaves]) for i in range(len(params)))
    else:
        flat = [p.clone().requires_grad_(True) for p in params]

        def current():
            return tuple(flat)

    opts = make_opts(leaves if members else flat)
    traj = [tuple(p.detach().clone() for p in current())]
    for _ in range(steps):
        for o in opts:
            o.zero_grad()
        loss_fn(current()).sum().backward()
        for o in opts:
            o.step()
        traj.append(tuple(p.detach().clone() for p in current()))
    return traj, opts


def _close(a, b, atol=1e-6, rtol=1e-6):
    assert len(a) == len(b)
    for t, (pa, pb) in enumerate(zip(a, b)):
        for i, (x, y) in enumerate(zip(pa, pb)):
            torch.testing.assert_close(
                x, y, atol=atol, rtol=rtol, msg=lambda m, t=t, i=i: f"step {t}, tensor {i}: {m}"
            )


def _needs(module: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"{module} is not installed (optional extra: pip install -e '.[zoo]')",
    )


# --------------------------------------------------------------------------- ground truth
PROJECT_PAIRS = {
    "sgd": (dict(momentum=0.0), dict(momentum=0.0)),
    "sgd_momentum": (dict(momentum=0.9), dict(momentum=0.9)),
    "sgd_nesterov_wd": (
        dict(momentum=0.9, nesterov=True, weight_decay=0.01),
        dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    ),
    "adam": (dict(), dict()),
    "adam_wd": (
        dict(weight_decay=0.01, betas=(0.8, 0.99)),
        dict(weight_decay=0.01, betas=(0.8, 0.99)),
    ),
}


@pytest.mark.parametrize("case", list(PROJECT_PAIRS))
def test_torch_sgd_and_adam_match_the_project_baselines(case):
    """50 steps on a population of 2, then a per-sample replay: the adapter around
    torch.optim.SGD/Adam gives l2o.optimizers.SGD/Adam to 1e-6."""
    _, params, loss_fn, _ = _problem(population=2)
    torch_kw, ours_kw = PROJECT_PAIRS[case]
    if case.startswith("sgd"):
        lr = 0.1
        adapter = make_torch_optimizer("torch.optim.SGD", lr, **torch_kw)
        ours = SGD(lr=lr, **ours_kw)
    else:
        lr = 1e-2
        adapter = make_torch_optimizer("torch.optim.Adam", lr, **torch_kw)
        ours = Adam(lr=lr, **ours_kw)
    traj_a, state_a = _run_protocol(adapter, params, loss_fn)
    traj_o, state_o = _run_protocol(ours, params, loss_fn)
    _close(traj_a, traj_o)

    # The per-sample replay: N gradients against the final state, state not advanced.
    last = traj_a[-1]
    gen = torch.Generator().manual_seed(1)
    batch = tuple(torch.randn(9, *p.shape, generator=gen, dtype=DTYPE) for p in last)
    replay_a = chunked_replay(adapter, batch, state_a, last, chunk_size=4)
    replay_o = chunked_replay(ours, batch, state_o, last, chunk_size=4)
    _close([replay_a], [replay_o])
    # Not advanced: the next real step is still the same as the project's.
    g = _grads(loss_fn, last)
    _close([adapter.update(g, state_a, last)[0]], [ours.update(g, state_o, last)[0]])


def test_covariance_analysis_is_the_same_through_the_adapter():
    """Every number of the covariance analysis (per-sample updates of the protocol) agrees."""
    optimizee, params, loss_fn, (x, y) = _problem(population=1)
    adapter = make_torch_optimizer("torch.optim.Adam", 1e-2)
    ours = Adam(lr=1e-2)
    (traj, state_a), (_, state_o) = (
        _run_protocol(adapter, params, loss_fn, 5),
        _run_protocol(ours, params, loss_fn, 5),
    )
    a = covariance_analysis(optimizee, adapter, state_a, traj[-1], x[0], y[0])
    o = covariance_analysis(optimizee, ours, state_o, traj[-1], x[0], y[0])
    for key in ("update_top_eig", "update_trace", "grad_top_eig", "grad_trace"):
        assert a[key] == pytest.approx(o[key], rel=1e-6), key


TORCH_CLASSES = {
    "RAdam": dict(lr=1e-2),
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "NAdam": dict(lr=1e-2),
    "Adagrad": dict(lr=0.1),
    "RMSprop": dict(lr=1e-2, momentum=0.5, centered=True),
    "Adamax": dict(lr=1e-2),
    "Adadelta": dict(lr=1.0),
    "Rprop": dict(lr=1e-2),
    "ASGD": dict(lr=1e-2, t0=5),
    "Adafactor": dict(lr=1e-2),  # not elementwise: factored second moments, per member
}


@pytest.mark.parametrize("cls_name", list(TORCH_CLASSES))
def test_adapter_equals_an_ordinary_torch_training_loop(cls_name):
    """Through the adapter, the trajectory is torch's own (50 steps, to 1e-6)."""
    cls = getattr(torch.optim, cls_name)
    kwargs = dict(TORCH_CLASSES[cls_name])
    lr = kwargs.pop("lr")
    _, params, loss_fn, _ = _problem(population=2)
    adapter = TorchOptimizer(cls, lr, kwargs)
    members = not adapter.elementwise
    if members:
        make = lambda leaves: [cls(member, lr=lr, **kwargs) for member in leaves]
    else:
        make = lambda leaves: [cls(leaves, lr=lr, **kwargs)]
    _close(
        _run_protocol(adapter, params, loss_fn)[0],
        _run_torch(make, params, loss_fn, members=members)[0],
    )


@pytest.mark.parametrize(
    "path",
    [
        path if path.startswith("torch.") else pytest.param(path, marks=_needs(path.split(".")[0]))
        for path in sorted(ELEMENTWISE)
    ],
)
def test_stacked_paths_equal_the_per_member_loop(path):
    """Elementwise classes stack the population and the replay batch into one tensor; forcing
    elementwise=False runs each member and each replay separately. Same numbers."""
    _, params, loss_fn, _ = _problem(population=2)
    cls_name = path.rpartition(".")[2]
    kwargs = dict(TORCH_CLASSES.get(cls_name, {"lr": 1e-2}))
    lr = kwargs.pop("lr")
    fast = TorchOptimizer(path, lr, kwargs)
    slow = TorchOptimizer(path, lr, kwargs, elementwise=False)
    assert fast.elementwise and not slow.elementwise
    traj_f, state_f = _run_protocol(fast, params, loss_fn, 3)
    traj_s, state_s = _run_protocol(slow, params, loss_fn, 3)
    _close(traj_f, traj_s, atol=1e-12, rtol=1e-12)
    gen = torch.Generator().manual_seed(2)
    batch = tuple(torch.randn(3, 2, *p.shape, generator=gen, dtype=DTYPE) for p in traj_f[-1])
    out_f = fast.update(batch, state_f, traj_f[-1])[0]
    out_s = slow.update(batch, state_s, traj_s[-1])[0]
    assert out_f[0].shape == (3, 2, *params[0].shape)
    _close([out_f], [out_s], atol=1e-12, rtol=1e-12)


def _snapshot(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def _assert_identical(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_identical(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_identical(x, y)
    else:
        assert a == b


@pytest.mark.parametrize(
    "spec",
    [
        ("torch.optim.Adam", 1e-2, {}),
        ("torch.optim.Muon", 1e-2, {}),
        pytest.param(("schedulefree.AdamWScheduleFree", 1e-2, {}), marks=_needs("schedulefree")),
        pytest.param(("prodigyopt.Prodigy", 1.0, {}), marks=_needs("prodigyopt")),
    ],
    ids=lambda s: s[0],
)
def test_callers_tensors_are_bitwise_untouched(spec):
    """Params, grads and state, after a step and after a replay (schedule-free divides the
    grads in place inside its step: the adapter's copies take it)."""
    path, lr, kwargs = spec
    _, params, loss_fn, _ = _problem(population=2)
    opt = make_torch_optimizer(path, lr, **kwargs)
    state = opt.init_state(params)
    for _ in range(2):
        params = apply_updates(params, opt.update(_grads(loss_fn, params), state, params)[0])
        state = opt.update(_grads(loss_fn, params), state, params)[1]
    grads = _grads(loss_fn, params)
    batch = tuple(torch.stack([g, 2 * g]) for g in grads)
    before = _snapshot((params, grads, batch, state))
    opt.update(grads, state, params)
    opt.update(batch, state, params)
    _assert_identical((params, grads, batch, state), before)


def test_float32_updates_are_read_back_without_cancellation():
    """A tiny update on large float32 params: new - old in float32 would lose most of it
    (|param| ~ 1e3, update ~ 1e-5: float32's spacing at 1e3 is 6e-5); the upcast keeps it."""
    params = (torch.full((1, 4), 1000.0), torch.full((1, 3), -700.0))
    grads = (torch.tensor([[1.0, -2.0, 3.0, 0.5]]), torch.tensor([[0.3, 0.2, -0.1]]))
    lr = 1e-5
    expected = tuple(-lr * g for g in grads)
    up = make_torch_optimizer("torch.optim.SGD", lr)
    got = up.update(grads, up.init_state(params), params)[0]
    for u, e in zip(got, expected):
        assert u.dtype == torch.float32
        torch.testing.assert_close(u, e, rtol=1e-6, atol=0)
    plain = make_torch_optimizer("torch.optim.SGD", lr, upcast=False)
    lossy = plain.update(grads, plain.init_state(params), params)[0]
    assert max(float(((u - e) / e).abs().max()) for u, e in zip(lossy, expected)) > 0.1


# --------------------------------------------------------------------------- Muon
def test_muon_takes_the_matrices_and_adamw_the_rest():
    """make_torch_optimizer('torch.optim.Muon') = Muon on the 2-D weights + AdamW on biases (and
    BatchNorm's gamma, beta), exactly as in Muon's documentation: 30 steps to 1e-6."""
    _, params, loss_fn, _ = _problem(population=2, batchnorm=True)
    opt = make_torch_optimizer(
        "torch.optim.Muon",
        0.02,
        momentum=0.9,
        other={"class_path": "torch.optim.AdamW", "lr": 1e-3},
    )
    assert isinstance(opt, ByNdim) and opt.lr == 0.02

    def make(leaves):
        out = []
        for member in leaves:
            out.append(torch.optim.Muon([p for p in member if p.dim() == 2], lr=0.02, momentum=0.9))
            out.append(torch.optim.AdamW([p for p in member if p.dim() != 2], lr=1e-3))
        return out

    _close(
        _run_protocol(opt, params, loss_fn, 30)[0], _run_torch(make, params, loss_fn, 30, True)[0]
    )


def test_muon_alone_on_biases_is_a_clear_error():
    _, params, _, _ = _problem()
    opt = TorchOptimizer("torch.optim.Muon", 0.02)
    with pytest.raises(ValueError, match="torch.optim.Muon.*shapes"):
        opt.init_state(params)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "path, match",
    [
        ("torch.optim.LBFGS", "torch.optim.LBFGS cannot be replayed.*closure"),
        ("torch.optim.SparseAdam", "torch.optim.SparseAdam cannot be replayed.*sparse"),
        pytest.param(
            "schedulefree.AdamWScheduleFreeClosure",
            "AdamWScheduleFreeClosure cannot be replayed.*closure",
            marks=_needs("schedulefree"),
        ),
    ],
)
def test_unreplayable_optimizers_fail_at_construction(path, match):
    with pytest.raises(ValueError, match=match):
        make_torch_optimizer(path, 0.1)


def test_bad_specs_fail_at_construction():
    with pytest.raises(ValueError, match="torch.optim.Adam.*beta"):
        make_torch_optimizer("torch.optim.Adam", 1e-3, betas=(1.5, 0.9))
    with pytest.raises(ValueError, match="torch.optim.SGD.*momentum_typo"):
        make_torch_optimizer("torch.optim.SGD", 0.1, momentum_typo=0.9)
    with pytest.raises(ValueError, match="cannot import 'nosuchpackage'.*zoo"):
        make_torch_optimizer("nosuchpackage.Opt", 0.1)
    with pytest.raises(ValueError, match="has no optimizer 'Adamm'"):
        make_torch_optimizer("torch.optim.Adamm", 0.1)
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        make_torch_optimizer("torch.nn.Linear", 0.1)
    with pytest.raises(ValueError, match="learning rate must be > 0"):
        make_torch_optimizer("torch.optim.Adam", -1.0)


def test_lr_is_exposed_and_defaults_to_the_class():
    assert TorchOptimizer(torch.optim.Adam).lr == 1e-3
    assert make_torch_optimizer("torch.optim.RAdam", 0.05).lr == 0.05
    assert make_torch_optimizer("torch.optim.RAdam", 0.05).name == "radam"


def test_bad_calls_are_clear_errors():
    _, params, loss_fn, _ = _problem(population=2)
    opt = make_torch_optimizer("torch.optim.Adam", 1e-3)
    state = opt.init_state(params)
    grads = _grads(loss_fn, params)
    with pytest.raises(ValueError, match="needs the current params"):
        opt.update(grads, state)
    with pytest.raises(ValueError, match="gradient 1 has shape"):
        opt.update((grads[0], grads[1][:, :2]) + grads[2:], state, params)
    prodigy_like = TorchOptimizer(torch.optim.Adam, 1e-3, elementwise=False)
    with pytest.raises(ValueError, match="holds 1 member"):
        prodigy_like.update(grads, state, params)


# --------------------------------------------------------------------------- the zoo extra
@_needs("schedulefree")
def test_schedule_free_adamw_follows_its_training_loop_and_evaluates_at_x():
    """The protocol's params are y (train mode, where the gradient is taken); eval_params is
    what .eval() puts in the model: x, the average."""
    import schedulefree

    _, params, loss_fn, _ = _problem(population=2)
    opt = make_torch_optimizer("schedulefree.AdamWScheduleFree", 1e-2, warmup_steps=5)
    assert opt.elementwise

    def make(leaves):
        o = schedulefree.AdamWScheduleFree(leaves, lr=1e-2, warmup_steps=5)
        o.train()
        return [o]

    traj, state = _run_protocol(opt, params, loss_fn, 30)
    traj_t, (real,) = _run_torch(make, params, loss_fn, 30)
    _close(traj, traj_t)
    real.eval()
    x = tuple(p.detach() for p in real.param_groups[0]["params"])
    _close([opt.eval_params(traj[-1], state)], [x])
    assert not torch.allclose(x[0], traj[-1][0])  # x and y differ: the test can fail


@_needs("prodigyopt")
def test_prodigy_runs_per_member():
    """Prodigy's step size d pools statistics over all coordinates: it is not elementwise, so
    each population member must run alone. Member m of a population of 2 = a run of member m."""
    import prodigyopt

    _, params, loss_fn, _ = _problem(population=2)
    opt = make_torch_optimizer("prodigyopt.Prodigy", 1.0, weight_decay=0.01)
    assert not opt.elementwise
    traj, state = _run_protocol(opt, params, loss_fn, 30)
    make = lambda leaves: [prodigyopt.Prodigy(m, lr=1.0, weight_decay=0.01) for m in leaves]
    _close(traj, _run_torch(make, params, loss_fn, 30, members=True)[0])
    # Stacking the members would be wrong (d would pool both members): the test can fail.
    stacked = TorchOptimizer("prodigyopt.Prodigy", 1.0, {"weight_decay": 0.01}, elementwise=True)
    assert not torch.allclose(_run_protocol(stacked, params, loss_fn, 30)[0][-1][0], traj[-1][0])
    # A replay batch = the same replays one at a time.
    gen = torch.Generator().manual_seed(3)
    batch = tuple(torch.randn(3, *p.shape, generator=gen, dtype=DTYPE) for p in traj[-1])
    out = opt.update(batch, state, traj[-1])[0]
    for i in range(3):
        one = opt.update(tuple(b[i] for b in batch), state, traj[-1])[0]
        _close([tuple(o[i] for o in out)], [one], atol=1e-12, rtol=1e-12)


@_needs("heavyball")
def test_heavyball_soap_follows_its_training_loop(monkeypatch):
    """heavyball's SOAP (Shampoo-preconditioned Adam), float32 (its state is float32). Its
    kernels are torch.compile'd by default; eager here (compile_mode None) to keep CI fast."""
    import heavyball
    import heavyball.utils

    monkeypatch.setattr(heavyball.utils, "compile_mode", None)
    _, params, loss_fn, _ = _problem(population=2, dtype=torch.float32)
    kwargs = dict(precondition_frequency=1)
    opt = make_torch_optimizer("heavyball.SOAP", 3e-3, **kwargs)
    assert not opt.elementwise and not opt.upcast
    make = lambda leaves: [heavyball.SOAP(m, lr=3e-3, **kwargs) for m in leaves]
    _close(
        _run_protocol(opt, params, loss_fn, 20)[0],
        _run_torch(make, params, loss_fn, 20, members=True)[0],
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("elementwise", [True, False], ids=["stacked", "loop"])
def test_several_extra_leading_dims(elementwise):
    """Gradients shaped (2, 3, P, ...) replay as 6 gradients, returned in that shape."""
    _, params, loss_fn, _ = _problem(population=2)
    opt = TorchOptimizer("torch.optim.Adam", 1e-2, elementwise=elementwise)
    state = opt.update(_grads(loss_fn, params), opt.init_state(params), params)[1]
    gen = torch.Generator().manual_seed(4)
    batch = tuple(torch.randn(2, 3, *p.shape, generator=gen, dtype=DTYPE) for p in params)
    out = opt.update(batch, state, params)[0]
    flat = opt.update(tuple(b.reshape(6, *b.shape[2:]) for b in batch), state, params)[0]
    for o, f, p in zip(out, flat, params):
        assert o.shape == (2, 3, *p.shape)
        torch.testing.assert_close(o.reshape(6, *p.shape), f, atol=0, rtol=0)
    single = opt.update(tuple(b[1, 2] for b in batch), state, params)[0]
    _close([tuple(o[1, 2] for o in out)], [single], atol=1e-14, rtol=1e-14)


def test_the_adapters_lr_wins_over_the_states():
    """A state made under one rate, stepped by an adapter of another: the adapter's rate."""
    _, params, loss_fn, _ = _problem()
    grads = _grads(loss_fn, params)
    slow, fast = (make_torch_optimizer("torch.optim.SGD", lr) for lr in (0.1, 0.3))
    u_slow = slow.update(grads, slow.init_state(params), params)[0]
    u_fast = fast.update(grads, slow.init_state(params), params)[0]
    for a, b in zip(u_slow, u_fast):
        torch.testing.assert_close(3 * a, b)


# --------------------------------------------------------------------------- every analysis
class _ArrayLog:
    """A logger that keeps the raw samples of the distributions (the update histograms')."""

    def __init__(self) -> None:
        self.arrays: dict = {}

    def log_array(self, tag, values, step) -> None:
        self.arrays[(tag, step)] = values


def _analysis_values(opt, analyses, optimizee, params, data, steps):
    """Every analysis's every value at every step of a float64 run of ``opt`` (what the
    callbacks log), through their ``compute`` on the run's Snapshots."""
    from types import SimpleNamespace

    from l2o.meta_testing import Snapshot

    train_x, train_y, batches = data
    log = _ArrayLog()
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(train_x=train_x, train_y=train_y),
        is_global_zero=True,
        loggers=[log],
    )
    state = opt.init_state(params)
    values = {}
    for step in range(1, steps + 1):
        x, y = batches[step - 1]
        _, grads = grads_of(optimizee.loss, params, x, y)
        updates, new_state = opt.update(grads, state, params)
        snap = Snapshot(step, params, state, grads, updates, x, y, optimizee, opt)
        for a in analyses:
            with torch.no_grad():
                for tag, v in a.compute(snap, trainer).items():
                    values[(tag, step)] = v
        params, state = apply_updates(params, updates), new_state
    return values, log.arrays


@pytest.mark.parametrize("which", ["sgd", "sgd_momentum", "adam"])
def test_every_analysis_is_the_same_through_the_adapter(which):
    """Ground truth for the zoo: torch.optim.SGD / Adam through the adapter give every value of
    every analysis (symmetry breaking, tail index, update covariance with its per-sample
    replays, update ratio, update histograms) that the project's own SGD / Adam give, to 1e-6,
    at every step of a float64 run of the study's Leaky ReLU family (small, with blank input
    pixels as MNIST has, so that zero gradients and exact zeros of update noise occur)."""
    from callbacks import SymmetryBreaking, TailIndex, UpdateCovariance, UpdateHistograms
    from callbacks.update_ratio import UpdateRatio

    optimizee = MLPOptimizee(sizes=(10, 6, 4), activation="leaky_relu")
    gen = torch.Generator().manual_seed(3)
    params = optimizee.init(1, generator=gen, dtype=DTYPE)
    train_x = torch.randn(96, 10, generator=gen, dtype=DTYPE)
    train_x[:, :2] = 0.0  # blank pixels: their weights' gradients are exactly 0
    train_y = torch.randint(0, 4, (96,), generator=gen)
    steps, b = 4, 16
    batches = [
        (
            train_x[None, (s * b) % 96 : (s * b) % 96 + b],
            train_y[None, (s * b) % 96 : (s * b) % 96 + b],
        )
        for s in range(steps)
    ]
    ours, theirs = {
        "sgd": (SGD(lr=0.1, momentum=0.0), make_torch_optimizer("torch.optim.SGD", 0.1)),
        "sgd_momentum": (
            SGD(lr=0.1, momentum=0.9),
            make_torch_optimizer("torch.optim.SGD", 0.1, momentum=0.9),
        ),
        "adam": (Adam(lr=1e-2), make_torch_optimizer("torch.optim.Adam", 1e-2)),
    }[which]

    def analyses():
        return [
            SymmetryBreaking(every_n_steps=1),
            TailIndex(every_n_steps=1, analysis_batches=6),
            UpdateCovariance(every_n_steps=1, num_samples=48),
            UpdateRatio(every_n_steps=1),
            UpdateHistograms(every_n_steps=1),
        ]

    data = (train_x, train_y, batches)
    o, o_arrays = _analysis_values(ours, analyses(), optimizee, params, data, steps)
    a, a_arrays = _analysis_values(theirs, analyses(), optimizee, params, data, steps)
    assert o.keys() == a.keys()
    prefixes = {tag.split("/")[0] for tag, _ in o}
    assert prefixes == {"symmetry", "tail_index", "covariance", "update_ratio", "update_hist"}
    assert len(o) == steps * sum(len(x.scalar_tags(optimizee)) for x in analyses())
    for key, v in o.items():
        if math.isnan(v):
            assert math.isnan(a[key]), key
        elif key[0].startswith("tail_index/") and not 0 < v <= 2.5:
            # Not an alpha: the output layer's bias noise sums to 0 in every row, so the
            # estimator's blocks cancel down to rounding and its log amplifies float64 noise
            # (e.g. -0.0448 vs -0.0447); both must still read as no alpha.
            assert not 0 < a[key] <= 2.5, key
        else:
            # abs: values that are 0 up to float64 rounding (SGD keeps the symmetries exactly)
            assert a[key] == pytest.approx(v, rel=1e-6, abs=1e-12), key
    assert o_arrays.keys() == a_arrays.keys()
    for key in o_arrays:
        np.testing.assert_allclose(a_arrays[key], o_arrays[key], rtol=1e-6, atol=1e-12)
    # The comparison can fail: with lr 1e-4 relatively off, every replaying analysis moves
    # by more than its tolerance (symmetry too, except where SGD keeps it exactly).
    off = {
        "sgd": make_torch_optimizer("torch.optim.SGD", 0.1 * (1 + 1e-4)),
        "sgd_momentum": make_torch_optimizer("torch.optim.SGD", 0.1 * (1 + 1e-4), momentum=0.9),
        "adam": make_torch_optimizer("torch.optim.Adam", 1e-2 * (1 + 1e-4)),
    }[which]
    w, _ = _analysis_values(off, analyses(), optimizee, params, data, steps)
    moved = {
        tag.split("/")[0]
        for (tag, step), v in o.items()
        if math.isfinite(v) and w[(tag, step)] != pytest.approx(v, rel=1e-6, abs=1e-12)
    }
    assert {"tail_index", "covariance", "update_ratio", "update_hist"} <= moved, moved
    assert ("symmetry" in moved) == (which != "sgd")
    # Most values are numbers (NaN: per-tensor standardized alphas of tensors whose every
    # coordinate has an atom, which the estimator leaves out by design).
    finite = [v for v in o.values() if math.isfinite(v)]
    assert len(finite) > 0.75 * len(o)
