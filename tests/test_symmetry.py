"""Symmetry constraints: gradients obey them, SGD keeps them, random steps break them."""

import pytest
import torch

from l2o.optimizees import MLPOptimizee, grads_of
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
