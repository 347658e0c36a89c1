"""Symmetry constraints of MLPs and CNNs: gradients obey them, SGD keeps them, random steps break
them, and (CNNs) each is the generator of a group action that leaves the loss unchanged."""

import pytest
import torch

from l2o.optimizees import ConvOptimizee, MLPOptimizee, grads_of
from l2o.optimizers import SGD
from l2o.symmetry import (
    constraints_of,
    deviation_terms,
    deviations,
    penalty,
    symmetry_metrics,
)

SIZES = (12, 7, 5, 4)  # two hidden layers, so inner layers' rescale (W_2 as out weight) counts
P = 3
F64 = torch.float64


def setup(activation="leaky_relu", batchnorm=False, bn_eps=1e-5, seed=0):
    """Optimizee, float64 params, and the gradient on random data."""
    opt = MLPOptimizee(SIZES, activation, batchnorm=batchnorm, bn_eps=bn_eps)
    g = torch.Generator().manual_seed(seed)
    params = opt.init(P, generator=g, dtype=F64)
    if batchnorm:  # move gamma, beta off (1, 0) so the rescale check is not trivial
        params = tuple(
            p + 0.3 * torch.randn(p.shape, generator=g, dtype=F64) if i in bn_idx(opt) else p
            for i, p in enumerate(params)
        )
    x = torch.randn(P, 32, SIZES[0], generator=g, dtype=F64)
    y = torch.randint(0, SIZES[-1], (P, 32), generator=g)
    _, grads = grads_of(opt.loss, params, x, y)
    return opt, params, grads


def bn_idx(opt):
    return {i for h in opt.hidden for i in (h.bn_weight, h.bn_bias) if i is not None}


def max_relative(terms, constraint):
    d, norm = terms[constraint]
    return (d.abs() / (norm + 1e-300)).max().item()


def random_like(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params)


@pytest.mark.parametrize("activation", ["leaky_relu", "relu"])
def test_gradients_satisfy_rescale_and_translation(activation):
    opt, params, grads = setup(activation)
    terms = deviation_terms(opt, params, grads)
    assert set(terms) == {"rescale", "translation"}
    assert terms["rescale"][0].shape == (P, sum(SIZES[1:-1]))
    assert terms["translation"][0].shape == (P, SIZES[-2] + 1)
    assert max_relative(terms, "rescale") < 1e-10
    assert max_relative(terms, "translation") < 1e-10
    assert terms["rescale"][1].max() > 1e-3  # the normaliser is not trivially zero


def test_batchnorm_scale_broken_by_eps_only():
    rel = {}
    for eps in (1e-5, 1e-7):
        opt, params, grads = setup("relu", batchnorm=True, bn_eps=eps)
        terms = deviation_terms(opt, params, grads)
        assert set(terms) == {"rescale", "scale", "translation"}
        assert max_relative(terms, "rescale") < 1e-10  # (gamma, beta) in, W_{l+1}[:, j] out
        assert max_relative(terms, "translation") < 1e-10
        rel[eps] = max_relative(terms, "scale")
    assert 1e-9 < rel[1e-5] < 1e-3
    # the breaking is O(eps): 100x smaller eps, ~100x smaller deviation
    assert rel[1e-5] / rel[1e-7] == pytest.approx(100, rel=0.2)


def test_sgd_step_deviation_is_lr_times_gradient_deviation():
    opt, params, grads = setup()
    lr = 0.37
    sgd = SGD(lr=lr, momentum=0.0)
    updates, _ = sgd.update(grads, sgd.init_state(params), params)
    delta = tuple(-u for u in updates)  # Delta = -update = lr * g
    step, grad = deviation_terms(opt, params, delta), deviation_terms(opt, params, grads)
    for c, (d_grad, norm) in grad.items():
        # both are ~0 up to round-off, so compare at the scale of the terms that cancel
        torch.testing.assert_close(step[c][0], lr * d_grad, rtol=0, atol=1e-14 * norm.max().item())
        torch.testing.assert_close(step[c][1], lr * norm)
    m = symmetry_metrics(opt, params, delta)
    assert m["rescale/normalized"].max() < 1e-10
    assert m["translation/normalized"].max() < 1e-10


def test_random_step_breaks_symmetry_and_abs_bounds_signed():
    opt, params, _ = setup()
    m = symmetry_metrics(opt, params, random_like(params))
    for c in ("rescale", "translation"):
        assert m[f"{c}/normalized"].shape == (P,)
        assert (m[f"{c}/normalized"] > 0.05).all()
        assert (m[f"{c}/normalized"] <= 1 + 1e-12).all()
        assert (m[f"{c}/abs_sum"] >= m[f"{c}/signed_sum"].abs()).all()
        assert (m[f"{c}/abs_sum"] > 1e-2).all()


def test_constraints_follow_structure():
    for act in ("sigmoid", "tanh"):
        opt, params, grads = setup(act)
        assert constraints_of(opt) == ("translation",)
        assert set(deviations(opt, params, grads)) == {"translation"}
        with pytest.raises(ValueError, match="rescale"):
            penalty(opt, params, grads, "rescale")
        with pytest.raises(ValueError, match="scale"):
            penalty(opt, params, grads, "scale")
    opt, params, grads = setup("sigmoid", batchnorm=True)
    assert constraints_of(opt) == ("scale", "translation")
    # O(eps / var): larger than for ReLU since the sigmoid outputs feeding layer 2 vary little
    assert max_relative(deviation_terms(opt, params, grads), "scale") < 1e-2
    with pytest.raises(ValueError, match="unknown constraint"):
        penalty(opt, params, grads, "rotation")


@pytest.mark.parametrize("batchnorm", [False, True])
def test_batched_delta_matches_loop(batchnorm):
    opt, params, _ = setup("leaky_relu", batchnorm=batchnorm)
    steps = [random_like(params, seed=s) for s in range(4)]
    batched = tuple(torch.stack(ts) for ts in zip(*steps))  # (N, P, ...)
    m = symmetry_metrics(opt, params, batched)
    for key, value in m.items():
        assert value.shape == (4, P)
        looped = torch.stack([symmetry_metrics(opt, params, s)[key] for s in steps])
        torch.testing.assert_close(value, looped)


@pytest.mark.parametrize("constraint", ["rescale", "scale", "translation"])
def test_penalty_is_differentiable(constraint):
    opt = MLPOptimizee((5, 4, 3, 3), "relu", batchnorm=True)
    params = opt.init(2, generator=torch.Generator().manual_seed(0), dtype=F64)
    delta = tuple(d.requires_grad_(True) for d in random_like(params))
    pen = penalty(opt, params, delta, constraint)
    assert pen.shape == (2,)
    grads = torch.autograd.grad(pen.sum(), delta, allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
    assert torch.autograd.gradcheck(lambda *d: penalty(opt, params, d, constraint), delta)


def test_matches_neuron_by_neuron_reference():
    """Random step vs. an explicit per-neuron loop (catches indexing slips that gradients,
    being ~0 on every term, cannot, e.g. a dropped bias term)."""
    for batchnorm in (False, True):
        opt, params, _ = setup("leaky_relu", batchnorm=batchnorm)
        delta = random_like(params)
        got = deviations(opt, params, delta)
        ref = {"rescale": [], "scale": []}
        for h in opt.hidden:
            for j in range(params[h.weight].shape[1]):
                w_in = (params[h.weight][:, j], params[h.bias][:, j, None])
                d_in = (delta[h.weight][:, j], delta[h.bias][:, j, None])
                lin = sum((d * t).sum(-1) for d, t in zip(d_in, w_in))
                if batchnorm:
                    ref["scale"].append(lin)
                    bn = [(delta[i][:, j] * params[i][:, j]) for i in (h.bn_weight, h.bn_bias)]
                    lin = bn[0] + bn[1]
                out = (delta[h.out_weight][:, :, j] * params[h.out_weight][:, :, j]).sum(-1)
                ref["rescale"].append(lin - out)
        w_l, b_l = delta[-2], delta[-1]
        ref["translation"] = [w_l[:, :, i].sum(-1) for i in range(w_l.shape[2])]
        ref["translation"].append(b_l.sum(-1))
        for c, d in got.items():
            torch.testing.assert_close(d, torch.stack(ref[c], -1))


def test_scale_normalized_survives_tiny_float32_steps():
    """BatchNorm makes gradients tiny when weights grow; their squares underflow float32.
    The normalised scale figure is a |cos| and must stay in [0, 1] (it once read 1e7)."""
    opt = MLPOptimizee((12, 7, 4), activation="relu", batchnorm=True)
    params = opt.init(1, torch.Generator().manual_seed(0))
    delta = tuple(1e-25 * p for p in params)  # parallel to theta: |cos| = 1
    value = symmetry_metrics(opt, params, delta)["scale/normalized"]
    assert torch.allclose(value, torch.ones_like(value), atol=1e-5)


# --------------------------------------------------------------------------- CNNs
# Units are channels. The group actions below are written with explicit channel indexing (a
# kernel's input-channel slice, the flattened map's H * W columns), independently of
# HiddenLayer.sum_reading, so that they check the slices the analyses use.
CNN = dict(channels=(3, 4), image=(2, 10, 10))  # 10x10 -> 5x5 -> 2x2, 16 features


def cnn_setup(activation="leaky_relu", batchnorm=False, pool="max", bn_eps=1e-5, seed=0):
    opt = ConvOptimizee(**CNN, activation=activation, batchnorm=batchnorm, pool=pool, bn_eps=bn_eps)
    g = torch.Generator().manual_seed(seed)
    params = opt.init(P, generator=g, dtype=F64)
    if batchnorm:
        params = tuple(
            p + 0.3 * torch.randn(p.shape, generator=g, dtype=F64) if i in bn_idx(opt) else p
            for i, p in enumerate(params)
        )
    x = torch.randn(P, 16, opt.num_features, generator=g, dtype=F64)
    y = torch.randint(0, opt.num_classes, (P, 16), generator=g)
    _, grads = grads_of(opt.loss, params, x, y)
    return opt, params, grads, (x, y)


def channel_masks(opt, params, layer, j, kind):
    """Boolean masks (incoming, outgoing) of channel j of conv layer ``layer``, per tensor."""
    h = opt.hidden[layer]
    inc = [torch.zeros_like(p, dtype=torch.bool) for p in params]
    out = [torch.zeros_like(p, dtype=torch.bool) for p in params]
    if kind == "rescale" and h.bn_weight is not None:
        inc[h.bn_weight][:, j] = inc[h.bn_bias][:, j] = True
    else:  # the channel's (in, k, k) kernel and its bias
        inc[h.weight][:, j] = inc[h.bias][:, j] = True
    if kind == "rescale":
        if layer < len(opt.hidden) - 1:  # the next kernel (P, out, in, k, k): input channel j
            out[h.out_weight][:, :, j] = True
        else:  # the softmax weight (P, C, c * H * W), channel-major: columns of channel j
            hw = opt.maps[-1][1] * opt.maps[-1][2]
            out[h.out_weight][:, :, j * hw : (j + 1) * hw] = True
    return inc, out


def act(params, masks, a):
    """The group element a: incoming entries times a, outgoing ones divided by a."""
    inc, out = masks
    one = torch.ones((), dtype=F64)
    return tuple(
        p * torch.where(i, a, one) * torch.where(o, 1 / a, one) for p, i, o in zip(params, inc, out)
    )


def generator_of(params, masks):
    """d/da of the group action at a = 1 (forward-mode AD of ``act``): the tangent vector."""
    one = torch.ones((), dtype=F64)
    _, tangent = torch.func.jvp(lambda a: act(params, masks, a), (one,), (one,))
    return tangent


def units(opt):
    return [(layer, j) for layer, c in enumerate(opt.channels) for j in range(c)]


@pytest.mark.parametrize("pool", ["max", "avg", "none"])
@pytest.mark.parametrize("activation,batchnorm", [("leaky_relu", False), ("relu", True)])
def test_cnn_rescale_is_a_symmetry_and_its_constraint_is_the_generator(activation, batchnorm, pool):
    opt, params, _, (x, y) = cnn_setup(activation, batchnorm, pool)
    loss = opt.loss(params, x, y)
    delta = random_like(params)
    d = deviations(opt, params, delta)["rescale"]
    assert d.shape == (P, sum(CNN["channels"]))
    for k, (layer, j) in enumerate(units(opt)):
        masks = channel_masks(opt, params, layer, j, "rescale")
        for a in (2.5, 0.3):  # the loss is invariant under the group action...
            moved = opt.loss(act(params, masks, torch.tensor(a, dtype=F64)), x, y)
            torch.testing.assert_close(moved, loss, rtol=1e-10, atol=0)
        # ...and d_j is <Delta, generator>: the constraint reads exactly the acted-on slices
        v = generator_of(params, masks)
        ref = sum((dl * t).flatten(1).sum(1) for dl, t in zip(delta, v))
        torch.testing.assert_close(d[:, k], ref, rtol=1e-12, atol=1e-12)


def test_cnn_wrong_slice_or_sigmoid_breaks_the_invariance():
    """The invariance test can fail: a neighbouring channel's outgoing block, or a sigmoid."""
    opt, params, _, (x, y) = cnn_setup()
    loss = opt.loss(params, x, y)
    inc, _ = channel_masks(opt, params, 1, 0, "rescale")
    _, out = channel_masks(opt, params, 1, 1, "rescale")
    moved = opt.loss(act(params, (inc, out), torch.tensor(2.0, dtype=F64)), x, y)
    assert ((moved - loss).abs() > 1e-4).all()
    opt, params, _, (x, y) = cnn_setup("sigmoid")
    masks = channel_masks(opt, params, 0, 0, "rescale")
    moved = opt.loss(act(params, masks, torch.tensor(2.0, dtype=F64)), x, y)
    assert ((moved - opt.loss(params, x, y)).abs() > 1e-4).all()


def test_cnn_scale_and_translation_are_symmetries_with_their_generators():
    opt, params, _, (x, y) = cnn_setup("relu", batchnorm=True, bn_eps=1e-14)  # eps ~ 0: exact
    loss = opt.loss(params, x, y)
    delta = random_like(params)
    dev = deviations(opt, params, delta)
    for k, (layer, j) in enumerate(units(opt)):
        masks = channel_masks(opt, params, layer, j, "scale")
        moved = opt.loss(act(params, masks, torch.tensor(3.0, dtype=F64)), x, y)
        torch.testing.assert_close(moved, loss, rtol=1e-10, atol=0)
        v = generator_of(params, masks)
        ref = sum((dl * t).flatten(1).sum(1) for dl, t in zip(delta, v))
        torch.testing.assert_close(dev["scale"][:, k], ref, rtol=1e-12, atol=1e-12)
    # translation: the same shift of column i of the softmax weight for every class (bias: i=F)
    w = params[-2]
    for i in (0, 5, w.shape[-1]):
        shifted = list(params)
        if i < w.shape[-1]:
            shifted[-2] = w.clone()
            shifted[-2][:, :, i] += 0.7
        else:
            shifted[-1] = params[-1] + 0.7
        torch.testing.assert_close(opt.loss(tuple(shifted), x, y), loss, rtol=1e-10, atol=0)
        col = delta[-2][:, :, i] if i < w.shape[-1] else delta[-1]
        torch.testing.assert_close(dev["translation"][:, i], col.sum(-1))


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("activation", ["leaky_relu", "relu"])
def test_cnn_gradients_satisfy_rescale_and_translation(activation, pool):
    opt, params, grads, _ = cnn_setup(activation, pool=pool)
    terms = deviation_terms(opt, params, grads)
    assert set(terms) == {"rescale", "translation"}
    assert terms["rescale"][0].shape == (P, 7)
    assert terms["translation"][0].shape == (P, 4 * 2 * 2 + 1)
    assert max_relative(terms, "rescale") < 1e-10
    assert max_relative(terms, "translation") < 1e-10
    assert terms["rescale"][1].max() > 1e-3  # the normaliser is not trivially zero


def test_cnn_batchnorm_scale_broken_by_eps_only():
    rel = {}
    for eps in (1e-5, 1e-7):
        opt, params, grads, _ = cnn_setup("relu", batchnorm=True, bn_eps=eps)
        terms = deviation_terms(opt, params, grads)
        assert set(terms) == {"rescale", "scale", "translation"}
        assert max_relative(terms, "rescale") < 1e-10
        assert max_relative(terms, "translation") < 1e-10
        rel[eps] = max_relative(terms, "scale")
    assert 1e-10 < rel[1e-5] < 1e-3
    assert rel[1e-5] / rel[1e-7] == pytest.approx(100, rel=0.2)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_cnn_sgd_step_is_lr_times_gradient_and_random_step_breaks(batchnorm):
    opt, params, grads, _ = cnn_setup("relu", batchnorm=batchnorm)
    lr = 0.37
    sgd = SGD(lr=lr, momentum=0.0)
    updates, _ = sgd.update(grads, sgd.init_state(params), params)
    delta = tuple(-u for u in updates)
    step, grad = deviation_terms(opt, params, delta), deviation_terms(opt, params, grads)
    for c, (d_grad, norm) in grad.items():
        torch.testing.assert_close(step[c][0], lr * d_grad, rtol=0, atol=1e-14 * norm.max().item())
        torch.testing.assert_close(step[c][1], lr * norm)
    m = symmetry_metrics(opt, params, random_like(params))
    for c in constraints_of(opt):
        assert (m[f"{c}/normalized"] > 0.05).all() and (m[f"{c}/normalized"] <= 1 + 1e-12).all()
        assert (m[f"{c}/abs_sum"] >= m[f"{c}/signed_sum"].abs()).all()


def test_cnn_constraints_follow_structure():
    assert constraints_of(ConvOptimizee()) == ("rescale", "translation")
    assert constraints_of(ConvOptimizee(activation="relu", pool="avg", batchnorm=True)) == (
        "rescale",
        "scale",
        "translation",
    )
    for activation in ("sigmoid", "tanh"):
        opt, params, grads, _ = cnn_setup(activation)
        assert constraints_of(opt) == ("translation",)
        assert set(deviations(opt, params, grads)) == {"translation"}
        with pytest.raises(ValueError, match="has no \\['rescale'\\] symmetry"):
            penalty(opt, params, grads, "rescale")
    opt, params, grads, _ = cnn_setup("sigmoid", batchnorm=True)
    assert constraints_of(opt) == ("scale", "translation")
    assert max_relative(deviation_terms(opt, params, grads), "scale") < 1e-2


def test_cnn_batched_delta_matches_loop_and_penalty_gradcheck():
    opt, params, _, _ = cnn_setup("leaky_relu", batchnorm=True)
    steps = [random_like(params, seed=s) for s in range(3)]
    batched = tuple(torch.stack(ts) for ts in zip(*steps))
    for key, value in symmetry_metrics(opt, params, batched).items():
        looped = torch.stack([symmetry_metrics(opt, params, s)[key] for s in steps])
        torch.testing.assert_close(value, looped)
    tiny = ConvOptimizee(channels=(2, 2), image=(1, 4, 4), num_classes=3, activation="relu")
    params = tiny.init(2, generator=torch.Generator().manual_seed(0), dtype=F64)
    delta = tuple(d.requires_grad_(True) for d in random_like(params))
    assert torch.autograd.gradcheck(lambda *d: penalty(tiny, params, d, "rescale"), delta)
