"""MLPOptimizee: validation, seeded init, loss, population independence, torch.nn equivalence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from l2o.optimizees import (
    HOMOGENEOUS,
    MLPOptimizee,
    build_optimizee,
    grads_of,
    spec_of,
)

DTYPE = torch.float64


def _data(opt: MLPOptimizee, population: int, batch: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(population, batch, opt.sizes[0], generator=gen, dtype=DTYPE)
    y = torch.randint(0, opt.sizes[-1], (population, batch), generator=gen)
    return x, y


def _init(opt: MLPOptimizee, population: int = 1, seed: int = 0):
    return opt.init(population, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# --------------------------------------------------------------------------- validation
def test_unknown_activation_raises():
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'.*leaky_relu.*relu"):
        MLPOptimizee(sizes=(4, 3, 2), activation="gelu")


@pytest.mark.parametrize(
    "sizes, match",
    [
        ((784, 10), "at least one hidden"),
        ((10,), "at least one hidden"),
        ((), "at least one hidden"),
        ((4, 0, 2), "widths must be >= 1"),
        ((4, -3, 2), "widths must be >= 1"),
        ((0, 3, 2), "widths must be >= 1"),
        ((4, 3, 1), "classes >= 2"),
    ],
)
def test_invalid_sizes_raise(sizes, match):
    with pytest.raises(ValueError, match=match):
        MLPOptimizee(sizes=sizes)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_invalid_bn_eps_raises(eps):
    with pytest.raises(ValueError, match="bn_eps must be > 0"):
        MLPOptimizee(sizes=(4, 3, 2), batchnorm=True, bn_eps=eps)


def test_check_input():
    opt = MLPOptimizee(sizes=(784, 20, 10))
    opt.check_input(784)
    with pytest.raises(ValueError, match="takes 784 inputs but the data has 100 features"):
        opt.check_input(100)


def test_build_optimizee_and_spec_roundtrip():
    opt = MLPOptimizee(sizes=(8, 5, 4, 3), activation="relu", batchnorm=True, bn_eps=1e-3)
    spec = spec_of(opt)
    assert spec == {
        "sizes": [8, 5, 4, 3],
        "activation": "relu",
        "batchnorm": True,
        "negative_slope": 0.01,
        "bn_eps": 1e-3,
    }
    assert build_optimizee(spec) == opt
    assert build_optimizee(opt) is opt
    with pytest.raises(ValueError, match=r"unknown optimizee option\(s\) \['width'\]"):
        build_optimizee({"sizes": [4, 3, 2], "width": 3})
    with pytest.raises(TypeError, match="an MLPOptimizee, a ConvOptimizee or a dict"):
        build_optimizee([4, 3, 2])


# --------------------------------------------------------------------------- structure
def test_default_is_study_network():
    opt = MLPOptimizee()
    assert opt.sizes == (784, 20, 10) and opt.activation == "leaky_relu"
    assert opt.shapes == [(20, 784), (20,), (10, 20), (10,)]
    assert opt.num_params == 784 * 20 + 20 + 20 * 10 + 10 == 15910
    assert opt.name == "mlp-784-20-10-leaky_relu"
    assert {"relu", "leaky_relu"} == HOMOGENEOUS
    assert opt.num_features == 784 and opt.num_classes == 10


@pytest.mark.parametrize("batchnorm", [False, True])
def test_layout_and_hidden_indices(batchnorm):
    opt = MLPOptimizee(sizes=(7, 5, 4, 3), batchnorm=batchnorm)
    params = opt.init(population=2)
    assert [tuple(p.shape) for p in params] == [(2, *s) for s in opt.shapes]
    assert sum(p[0].numel() for p in params) == opt.num_params
    expected_len = 2 * 3 + (4 if batchnorm else 0)
    assert len(params) == expected_len
    assert len(opt.hidden) == 2
    for layer in opt.hidden:
        w = params[layer.weight]
        assert params[layer.bias].shape == w.shape[:-1]
        if batchnorm:
            assert params[layer.bn_weight].shape == w.shape[:-1]
            assert params[layer.bn_bias].shape == w.shape[:-1]
        else:
            assert layer.bn_weight is None and layer.bn_bias is None
        # the next layer's weight reads this layer's neurons through its columns
        assert params[layer.out_weight].shape[-1] == w.shape[-2]
        assert params[layer.out_weight].dim() == 3
    assert opt.hidden[-1].out_weight == len(params) - 2
    roles = [r for r, _, _ in opt.roles]
    assert roles.count("gamma") == (2 if batchnorm else 0)


# --------------------------------------------------------------------------- init
@pytest.mark.parametrize("batchnorm", [False, True])
def test_init_is_seeded(batchnorm):
    opt = MLPOptimizee(sizes=(9, 6, 3), batchnorm=batchnorm)
    a = opt.init(3, generator=torch.Generator().manual_seed(123))
    b = opt.init(3, generator=torch.Generator().manual_seed(123))
    c = opt.init(3, generator=torch.Generator().manual_seed(124))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    random_idx = [i for i, (r, _, _) in enumerate(opt.roles) if r in ("weight", "bias")]
    for i in random_idx:
        assert not torch.equal(a[i], c[i])
    # population members are different draws
    assert not torch.equal(a[0][0], a[0][1])


def test_init_distribution_is_nn_linear_default():
    opt = MLPOptimizee(sizes=(400, 300, 10))
    params = opt.init(2, generator=torch.Generator().manual_seed(0))
    for p, (_, _, fan_in) in zip(params, opt.roles):
        bound = 1 / math.sqrt(fan_in)
        assert p.abs().max() <= bound
        assert p.abs().max() > 0.9 * bound  # uses the whole range
        # uniform on [-b, b]: variance b^2 / 3
        assert abs(p.var().item() / (bound**2 / 3) - 1) < 0.2
    assert params[0].dtype == torch.float32


def test_init_dtype():
    opt = MLPOptimizee(sizes=(4, 3, 2), batchnorm=True)
    params = opt.init(2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in params)


def test_batchnorm_affine_starts_at_identity():
    opt = MLPOptimizee(sizes=(6, 5, 4, 3), batchnorm=True)
    params = opt.init(4, generator=torch.Generator().manual_seed(0))
    for layer in opt.hidden:
        assert torch.equal(params[layer.bn_weight], torch.ones(4, params[layer.bias].shape[-1]))
        assert torch.equal(params[layer.bn_bias], torch.zeros(4, params[layer.bias].shape[-1]))


# --------------------------------------------------------------------------- loss
@pytest.mark.parametrize("classes", [2, 10])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_uniform_logits_give_log_c(classes, batchnorm):
    opt = MLPOptimizee(sizes=(5, 4, classes), batchnorm=batchnorm)
    params = list(_init(opt, population=3))
    params[-2] = torch.zeros_like(params[-2])
    params[-1] = torch.full_like(params[-1], 0.7)  # equal logits
    x, y = _data(opt, 3)
    loss = opt.loss(tuple(params), x, y)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, torch.full((3,), math.log(classes), dtype=DTYPE))
    losses = opt.losses(tuple(params), x, y)
    assert losses.shape == (3, 12)
    torch.testing.assert_close(losses, torch.full((3, 12), math.log(classes), dtype=DTYPE))


def test_loss_matches_manual_cross_entropy_and_accuracy():
    opt = MLPOptimizee(sizes=(5, 4, 3))
    params = _init(opt, population=2)
    x, y = _data(opt, 2)
    logits = opt.logits(params, x)
    logp = logits.log_softmax(-1)
    manual = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(opt.losses(params, x, y), manual)
    torch.testing.assert_close(opt.loss(params, x, y), manual.mean(-1))
    acc = (logits.argmax(-1) == y).float().mean(-1)
    torch.testing.assert_close(opt.accuracy(params, x, y), acc)


def test_grads_of_matches_autograd_and_is_detached():
    opt = MLPOptimizee(sizes=(5, 4, 3), batchnorm=True)
    params = _init(opt, population=2)
    x, y = _data(opt, 2)
    losses, grads = grads_of(opt.loss, params, x, y)
    assert not losses.requires_grad and not any(g.requires_grad for g in grads)
    leaves = [p.clone().requires_grad_(True) for p in params]
    opt.loss(tuple(leaves), x, y).sum().backward()
    for g, leaf in zip(grads, leaves):
        torch.testing.assert_close(g, leaf.grad)
    torch.testing.assert_close(losses, opt.loss(params, x, y))


# --------------------------------------------------------------------------- population
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("activation", ["leaky_relu", "sigmoid"])
def test_population_members_are_independent(batchnorm, activation):
    opt = MLPOptimizee(sizes=(6, 5, 4, 3), activation=activation, batchnorm=batchnorm)
    P = 3
    params = list(_init(opt, population=P))
    if batchnorm:  # non-trivial affine so that gamma / beta gradients are generic
        for layer in opt.hidden:
            params[layer.bn_weight] = params[layer.bn_weight] + 0.3 * torch.randn_like(
                params[layer.bn_weight]
            )
            params[layer.bn_bias] = 0.3 * torch.randn_like(params[layer.bn_bias])
    x, y = _data(opt, P)
    leaves = tuple(p.clone().requires_grad_(True) for p in params)
    loss = opt.loss(leaves, x, y)
    grads0 = torch.autograd.grad(loss[0], leaves, retain_graph=True)
    for g in grads0:
        assert g[0].abs().sum() > 0  # member 0 depends on its own params...
        assert torch.equal(g[1:], torch.zeros_like(g[1:]))  # ...and on nobody else's
    # and on nobody else's data
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(opt.loss(leaves, xg, y)[1], xg)
    assert gx[1].abs().sum() > 0
    assert torch.equal(gx[0], torch.zeros_like(gx[0]))
    assert torch.equal(gx[2], torch.zeros_like(gx[2]))
    # each member's loss equals that of a population of one with its own params and data
    for p in range(P):
        single = opt.loss(tuple(t[p : p + 1] for t in params), x[p : p + 1], y[p : p + 1])
        torch.testing.assert_close(single[0], loss[p].detach())


# --------------------------------------------------------------------------- torch.nn equivalence
def _sequential(opt: MLPOptimizee, params, member: int) -> nn.Sequential:
    act = {
        "leaky_relu": lambda: nn.LeakyReLU(opt.negative_slope),
        "relu": nn.ReLU,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
    }[opt.activation]
    modules: list[nn.Module] = []
    pairs = list(zip(opt.sizes[:-1], opt.sizes[1:]))
    for k, (fan_in, fan_out) in enumerate(pairs):
        lin = nn.Linear(fan_in, fan_out).to(DTYPE)
        modules.append(lin)
        if k < len(pairs) - 1:
            layer = opt.hidden[k]
            with torch.no_grad():
                lin.weight.copy_(params[layer.weight][member])
                lin.bias.copy_(params[layer.bias][member])
            if opt.batchnorm:
                bn = nn.BatchNorm1d(fan_out, eps=opt.bn_eps).to(DTYPE)
                with torch.no_grad():
                    bn.weight.copy_(params[layer.bn_weight][member])
                    bn.bias.copy_(params[layer.bn_bias][member])
                modules.append(bn)
            modules.append(act())
        else:
            with torch.no_grad():
                lin.weight.copy_(params[-2][member])
                lin.bias.copy_(params[-1][member])
    return nn.Sequential(*modules).train()


@pytest.mark.parametrize("activation", ["leaky_relu", "relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_logits_match_torch_nn_sequential(activation, batchnorm):
    opt = MLPOptimizee(
        sizes=(7, 6, 5, 4), activation=activation, batchnorm=batchnorm, negative_slope=0.2
    )
    P = 2
    params = list(_init(opt, population=P, seed=3))
    if batchnorm:
        gen = torch.Generator().manual_seed(9)
        for layer in opt.hidden:
            shape = params[layer.bn_weight].shape
            params[layer.bn_weight] = 1 + 0.5 * torch.randn(shape, generator=gen, dtype=DTYPE)
            params[layer.bn_bias] = 0.5 * torch.randn(shape, generator=gen, dtype=DTYPE)
    x, y = _data(opt, P, batch=16)
    logits = opt.logits(tuple(params), x)
    assert logits.shape == (P, 16, 4)
    for p in range(P):
        ref = _sequential(opt, params, p)(x[p])
        torch.testing.assert_close(logits[p], ref, atol=1e-10, rtol=1e-10)
        ref_loss = nn.functional.cross_entropy(ref, y[p])
        torch.testing.assert_close(opt.loss(tuple(params), x, y)[p], ref_loss)
    # and the gradients agree with torch.nn's (BatchNorm's included)
    if batchnorm:
        seq = _sequential(opt, params, 0)
        nn.functional.cross_entropy(seq(x[0]), y[0]).backward()
        _, grads = grads_of(opt.loss, tuple(params), x, y)
        bn = [m for m in seq if isinstance(m, nn.BatchNorm1d)]
        for layer, mod in zip(opt.hidden, bn):
            torch.testing.assert_close(grads[layer.bn_weight][0], mod.weight.grad)
            torch.testing.assert_close(grads[layer.bn_bias][0], mod.bias.grad)
        lins = [m for m in seq if isinstance(m, nn.Linear)]
        torch.testing.assert_close(grads[0][0], lins[0].weight.grad)
        torch.testing.assert_close(grads[-2][0], lins[-1].weight.grad)


def test_logits_broadcast_extra_leading_dims():
    opt = MLPOptimizee(sizes=(5, 4, 3), batchnorm=True)
    params = _init(opt, population=2)
    x = torch.randn(6, 2, 8, 5, dtype=DTYPE)  # 6 replays of a (P=2, B=8) batch
    out = opt.logits(params, x)
    assert out.shape == (6, 2, 8, 3)
    for k in range(6):
        torch.testing.assert_close(out[k], opt.logits(params, x[k]))
