"""ConvOptimizee: validation, spec round trip, seeded init, torch.nn equivalence (logits, losses,
gradients, BatchNorm2d in train mode), population independence, extra leading dims."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from l2o.optimizees import (
    FAMILIES,
    ConvOptimizee,
    MLPOptimizee,
    build_optimizee,
    grads_of,
    spec_of,
)

DTYPE = torch.float64
SMALL = dict(channels=(3, 4), image=(1, 10, 10))  # 10x10 -> 5x5 -> 2x2: seconds-fast tests


def _data(opt: ConvOptimizee, population: int, batch: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(population, batch, opt.num_features, generator=gen, dtype=DTYPE)
    y = torch.randint(0, opt.num_classes, (population, batch), generator=gen)
    return x, y


def _init(opt: ConvOptimizee, population: int = 1, seed: int = 0, affine: bool = True):
    """float64 params; BatchNorm's (gamma, beta) moved off (1, 0) so that they matter."""
    gen = torch.Generator().manual_seed(seed)
    params = list(opt.init(population, generator=gen, dtype=DTYPE))
    if opt.batchnorm and affine:
        for layer in opt.hidden:
            shape = params[layer.bn_weight].shape
            params[layer.bn_weight] = 1 + 0.5 * torch.randn(shape, generator=gen, dtype=DTYPE)
            params[layer.bn_bias] = 0.5 * torch.randn(shape, generator=gen, dtype=DTYPE)
    return tuple(params)


def _sequential(opt: ConvOptimizee, params, member: int) -> nn.Sequential:
    """The same CNN as torch.nn modules, holding member ``member``'s weights."""
    act = {
        "leaky_relu": lambda: nn.LeakyReLU(opt.negative_slope),
        "relu": nn.ReLU,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
    }[opt.activation]
    pool = {
        "max": lambda: nn.MaxPool2d(opt.pool_size),
        "avg": lambda: nn.AvgPool2d(opt.pool_size),
        "none": nn.Identity,
    }[opt.pool]
    modules: list[nn.Module] = [nn.Unflatten(1, tuple(opt.image))]
    c_in = opt.image[0]
    for layer, c_out in zip(opt.hidden, opt.channels):
        conv = nn.Conv2d(c_in, c_out, opt.kernel_size, opt.stride, opt.padding).to(DTYPE)
        with torch.no_grad():
            conv.weight.copy_(params[layer.weight][member])
            conv.bias.copy_(params[layer.bias][member])
        modules.append(conv)
        if opt.batchnorm:
            bn = nn.BatchNorm2d(c_out, eps=opt.bn_eps).to(DTYPE)
            with torch.no_grad():
                bn.weight.copy_(params[layer.bn_weight][member])
                bn.bias.copy_(params[layer.bn_bias][member])
            modules.append(bn)
        modules += [act(), pool()]
        c_in = c_out
    lin = nn.Linear(math.prod(opt.maps[-1]), opt.num_classes).to(DTYPE)
    with torch.no_grad():
        lin.weight.copy_(params[-2][member])
        lin.bias.copy_(params[-1][member])
    modules += [nn.Flatten(), lin]
    return nn.Sequential(*modules).train()


# --------------------------------------------------------------------------- structure
def test_default_architecture():
    opt = ConvOptimizee()
    assert opt.channels == (8, 16) and opt.image == (1, 28, 28) and opt.num_classes == 10
    assert opt.padding == 1 and opt.pool == "max" and opt.activation == "leaky_relu"
    assert opt.maps == ((8, 14, 14), (16, 7, 7))
    assert opt.shapes == [(8, 1, 3, 3), (8,), (16, 8, 3, 3), (16,), (10, 784), (10,)]
    assert opt.num_params == 8 * 9 + 8 + 16 * 8 * 9 + 16 + 10 * 784 + 10 == 9098
    assert opt.num_features == 784
    assert opt.name == "cnn-1x28x28-8-16-10-k3-maxpool2-leaky_relu"
    bn = ConvOptimizee(batchnorm=True, activation="relu", pool="avg", stride=2, padding=0)
    assert bn.name == "cnn-1x28x28-8-16-10-k3s2p0-avgpool2-bn-relu"
    assert bn.maps == ((8, 6, 6), (16, 1, 1))  # 28 -> 13 -> 6, 6 -> 2 -> 1


@pytest.mark.parametrize("batchnorm", [False, True])
def test_layout_and_hidden_indices(batchnorm):
    opt = ConvOptimizee(channels=(3, 4, 5), image=(2, 12, 12), batchnorm=batchnorm)
    params = opt.init(population=2)
    assert [tuple(p.shape) for p in params] == [(2, *s) for s in opt.shapes]
    assert len(params) == 2 * 4 + (6 if batchnorm else 0)
    assert sum(p[0].numel() for p in params) == opt.num_params
    assert len(opt.hidden) == 3
    for layer, c in zip(opt.hidden, opt.channels):
        assert params[layer.weight].shape[1] == c and params[layer.bias].shape == (2, c)
        if batchnorm:
            assert params[layer.bn_weight].shape == params[layer.bn_bias].shape == (2, c)
        else:
            assert layer.bn_weight is None and layer.bn_bias is None
        out = params[layer.out_weight]
        assert out.dim() - 1 == layer.out_ndim
        # the dim that reads this layer's channels has channels x group entries
        assert out.shape[layer.out_unit_dim] == c * layer.out_group
    assert opt.hidden[-1].out_weight == len(params) - 2
    assert opt.hidden[-1].out_group == math.prod(opt.maps[-1][1:])  # H * W per channel
    assert [h.out_unit_dim for h in opt.hidden] == [-3, -3, -1]


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=()), "at least one convolutional layer"),
        (dict(channels=(8, 0)), "channel counts must be >= 1"),
        (dict(image=(28, 28)), r"must be \[channels, height, width\]"),
        (dict(image=(1, 0, 28)), r"must be \[channels, height, width\]"),
        (dict(num_classes=1), "need >= 2 classes"),
        (dict(kernel_size=0), "each must be >= 1"),
        (dict(stride=0), "each must be >= 1"),
        (dict(pool_size=0), "each must be >= 1"),
        (dict(padding=-1), "padding=-1 must be >= 0"),
        (dict(pool="min"), r"unknown pool 'min'; choose one of \['max', 'avg', 'none'\]"),
        (dict(activation="gelu"), r"unknown activation 'gelu'.*leaky_relu"),
        (dict(bn_eps=0.0), "bn_eps must be > 0"),
        (
            dict(image=(1, 4, 4), kernel_size=5, padding=0),
            "conv layer 1 gets a 4x4 map, smaller than its 5x5 kernel",
        ),
        (
            dict(channels=(2, 2, 2), image=(1, 4, 4)),  # 4 -> 2 -> 1: the third pooling fails
            "pooling after conv layer 3 gets a 1x1 map",
        ),
    ],
)
def test_invalid_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvOptimizee(**kwargs)


def test_check_input_and_bad_shapes():
    opt = ConvOptimizee()
    opt.check_input(784)
    with pytest.raises(ValueError, match=r"takes 784 inputs \(1x28x28 images\).*has 100 features"):
        opt.check_input(100)
    params = opt.init(2)
    with pytest.raises(ValueError, match=r"takes x of shape \(\.\.\., P, B, 784\).*\(2, 5, 100\)"):
        opt.logits(params, torch.zeros(2, 5, 100))
    with pytest.raises(ValueError, match=r"takes x of shape.*got \(5, 784\)"):
        opt.logits(params, torch.zeros(5, 784))
    with pytest.raises(ValueError, match="population dim of 3 but the params have 2"):
        opt.logits(params, torch.zeros(3, 5, 784))


def test_spec_roundtrip_and_family_dispatch():
    opt = ConvOptimizee(
        channels=(4, 6), image=(3, 24, 24), num_classes=5, kernel_size=5, stride=1, padding=1,
        pool="avg", pool_size=3, activation="relu", batchnorm=True, bn_eps=1e-3,
    )  # fmt: skip
    spec = spec_of(opt)
    assert spec == {
        "family": "cnn",
        "channels": [4, 6],
        "image": [3, 24, 24],
        "num_classes": 5,
        "kernel_size": 5,
        "stride": 1,
        "padding": 1,
        "pool": "avg",
        "pool_size": 3,
        "activation": "relu",
        "batchnorm": True,
        "negative_slope": 0.01,
        "bn_eps": 1e-3,
    }
    assert all(type(v) in (str, int, float, bool, list) for v in spec.values())  # plain data
    assert build_optimizee(spec) == opt
    assert build_optimizee(opt) is opt
    assert build_optimizee({"family": "cnn"}) == ConvOptimizee()
    # padding None resolves to kernel_size // 2, so equal architectures compare equal
    assert ConvOptimizee(kernel_size=5) == ConvOptimizee(kernel_size=5, padding=2)
    # specs without "family" are MLPs (checkpoints from before the CNN family)
    assert build_optimizee({"sizes": [4, 3, 2]}) == MLPOptimizee(sizes=(4, 3, 2))
    assert build_optimizee({"family": "mlp", "sizes": [4, 3, 2]}) == MLPOptimizee((4, 3, 2))
    assert set(FAMILIES) == {"mlp", "cnn"}
    with pytest.raises(ValueError, match=r"unknown optimizee family 'rnn'.*\['cnn', 'mlp'\]"):
        build_optimizee({"family": "rnn"})
    with pytest.raises(ValueError, match=r"option\(s\) \['sizes'\] for the cnn family.*channels"):
        build_optimizee({"family": "cnn", "sizes": [784, 10]})
    with pytest.raises(TypeError, match="spec_of takes an optimizee family, got dict"):
        spec_of(spec)


# --------------------------------------------------------------------------- init
def test_init_is_seeded_and_distributed_like_torch_defaults():
    opt = ConvOptimizee(batchnorm=True)
    a = opt.init(3, generator=torch.Generator().manual_seed(5))
    b = opt.init(3, generator=torch.Generator().manual_seed(5))
    c = opt.init(3, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert a[0].dtype == torch.float32
    for p, q, (role, shape, fan_in) in zip(a, c, opt.roles):
        if role in ("gamma", "beta"):
            assert torch.equal(p, torch.full_like(p, float(role == "gamma")))
            continue
        assert not torch.equal(p, q) and not torch.equal(p[0], p[1])
        # torch's default for Conv2d / Linear, weights and biases: U(+-1/sqrt(fan_in)) with
        # fan_in = in_channels * k * k (torch computes it from the weight's shape)
        weight_shape = opt.shapes[opt.shapes.index(shape) - (role == "bias")]
        torch_fan_in, _ = nn.init._calculate_fan_in_and_fan_out(torch.empty(weight_shape))
        assert fan_in == torch_fan_in
        bound = 1 / math.sqrt(fan_in)
        assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound
        if p.numel() >= 200:  # the max of >= 200 uniform draws is within 3% of the bound
            assert p.abs().max() > 0.97 * bound
        if p.numel() > 1000:  # uniform on [-b, b]: variance b^2 / 3
            assert abs(p.var().item() / (bound**2 / 3) - 1) < 0.1
    assert opt.init(2, dtype=DTYPE)[0].dtype == DTYPE


# --------------------------------------------------------------------------- torch.nn equivalence
CASES = [
    dict(activation="leaky_relu", negative_slope=0.2),
    dict(activation="relu", batchnorm=True),
    dict(activation="leaky_relu", batchnorm=True, pool="avg"),
    dict(activation="sigmoid", pool="none", stride=2),
    dict(channels=(3,), activation="tanh", kernel_size=5, padding=0, batchnorm=True, pool_size=3),
    dict(channels=(2, 3, 4), image=(2, 12, 12), activation="relu"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_torch_nn_cnn(case):
    """Logits, per-sample losses and every parameter's gradient equal an nn.Sequential CNN's
    (Conv2d, BatchNorm2d in train mode, pooling, Flatten, Linear) built with each member's
    weights."""
    opt = ConvOptimizee(**{**SMALL, **case})
    P, B = 3, 8
    params = _init(opt, P, seed=1)
    x, y = _data(opt, P, batch=B)
    logits = opt.logits(params, x)
    losses = opt.losses(params, x, y)
    assert logits.shape == (P, B, opt.num_classes) and losses.shape == (P, B)
    _, grads = grads_of(opt.loss, params, x, y)
    for p in range(P):
        seq = _sequential(opt, params, p)
        ref = seq(x[p])
        torch.testing.assert_close(logits[p], ref, atol=1e-10, rtol=1e-10)
        ref_losses = nn.functional.cross_entropy(ref, y[p], reduction="none")
        torch.testing.assert_close(losses[p], ref_losses, atol=1e-10, rtol=1e-10)
        ref_losses.mean().backward()
        ref_grads = []
        for m in seq:
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
                ref_grads += [m.weight.grad, m.bias.grad]
        assert len(ref_grads) == len(grads)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g[p], r, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(opt.loss(params, x, y), losses.mean(-1))
    acc = (logits.argmax(-1) == y).float().mean(-1)
    torch.testing.assert_close(opt.accuracy(params, x, y), acc)


def test_float32_matches_torch_nn_to_1e6():
    opt = ConvOptimizee(batchnorm=True)  # the study size, at the training dtype
    params = opt.init(2, generator=torch.Generator().manual_seed(0))
    x = torch.rand(2, 16, 784, generator=torch.Generator().manual_seed(1))
    logits = opt.logits(params, x)
    for p in range(2):
        seq = _sequential(opt, tuple(t.double() for t in params), p).float()
        torch.testing.assert_close(logits[p], seq(x[p]), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- population
@pytest.mark.parametrize("batchnorm", [False, True])
def test_population_members_are_independent(batchnorm):
    opt = ConvOptimizee(**SMALL, batchnorm=batchnorm)
    P = 3
    params = _init(opt, P)
    x, y = _data(opt, P)
    leaves = tuple(p.clone().requires_grad_(True) for p in params)
    loss = opt.loss(leaves, x, y)
    grads0 = torch.autograd.grad(loss[0], leaves, retain_graph=True)
    for g in grads0:
        assert g[0].abs().sum() > 0  # member 0 depends on its own params...
        assert torch.equal(g[1:], torch.zeros_like(g[1:]))  # ...and on nobody else's
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(opt.loss(leaves, xg, y)[1], xg)
    assert gx[1].abs().sum() > 0
    assert torch.equal(gx[0], torch.zeros_like(gx[0]))
    assert torch.equal(gx[2], torch.zeros_like(gx[2]))
    for p in range(P):  # a population of one with the member's params and data
        single = opt.loss(tuple(t[p : p + 1] for t in params), x[p : p + 1], y[p : p + 1])
        torch.testing.assert_close(single[0], loss[p].detach(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_extra_leading_dims_and_shared_data(batchnorm):
    """x (R, P, B, D): R replays, each its own minibatch (BatchNorm statistics per replay)."""
    opt = ConvOptimizee(**SMALL, batchnorm=batchnorm)
    params = _init(opt, 2)
    x = torch.randn(4, 2, 5, opt.num_features, dtype=DTYPE)
    out = opt.logits(params, x)
    assert out.shape == (4, 2, 5, opt.num_classes)
    for r in range(4):
        torch.testing.assert_close(out[r], opt.logits(params, x[r]), atol=1e-12, rtol=1e-12)
    # x with P = 1 is fed to every member
    shared = opt.logits(params, x[0, :1])
    torch.testing.assert_close(shared, opt.logits(params, x[0, :1].expand(2, -1, -1)))


def test_uniform_logits_give_log_c():
    opt = ConvOptimizee(**SMALL, batchnorm=True)
    params = list(_init(opt, 2))
    params[-2] = torch.zeros_like(params[-2])
    params[-1] = torch.full_like(params[-1], 0.3)
    x, y = _data(opt, 2)
    torch.testing.assert_close(
        opt.losses(tuple(params), x, y), torch.full((2, 6), math.log(10), dtype=DTYPE)
    )
