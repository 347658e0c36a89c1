"""l2o.step_length: exact values on quadratics, closed forms of the noise-weighted fit, and the
per-sample observations against an independent computation (per-sample gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2o.covariance import per_sample_grads
from l2o.optimizees import MLPOptimizee, grads_of
from l2o.step_length import fit_step_length, step_length

DTYPE = torch.float64


def _quadratic(noise: float, population=2, n=8, d=5, seed=0):
    """Per-sample losses ℓ_i(θ) = ½ (θ − c_i)ᵀ A (θ − c_i), params split into two tensors. The
    minibatch loss is exactly quadratic along any line whatever the c_i (noise), so the fit
    must recover its valley exactly."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=gen, dtype=DTYPE)
    a = m @ m.T + 0.5 * torch.eye(d, dtype=DTYPE)
    centers = torch.randn(population, 1, d, generator=gen, dtype=DTYPE)
    centers = centers + noise * torch.randn(population, n, d, generator=gen, dtype=DTYPE)

    def losses_fn(ps):
        theta = torch.cat(ps, 1)[:, None, :] - centers  # (P, n, d)
        return 0.5 * torch.einsum("pni,ij,pnj->pn", theta, a, theta)

    theta0 = torch.randn(population, d, generator=gen, dtype=DTYPE)
    return losses_fn, theta0, a, centers.mean(1)


def _split(theta):
    return (theta[:, :2], theta[:, 2:])


@pytest.mark.parametrize("noise", [0.0, 0.7], ids=["noise_free", "noisy"])
@pytest.mark.parametrize("k, expected", [(1.0, 0.0), (2.0, 1.0), (0.5, -0.5), (3.0, 2.0)])
def test_newton_multiples_on_a_quadratic(noise, k, expected):
    """θ₁ = θ₀ − k H⁻¹∇L: the floor along the step is at k = 1, so step_length = k − 1
    (1: the opposite wall; 2: twice as high on the other side)."""
    losses_fn, theta0, a, center = _quadratic(noise)
    grad = (theta0 - center) @ a  # ∇ of the mean loss (A symmetric)
    theta1 = theta0 - k * torch.linalg.solve(a, grad.T).T
    out = step_length(losses_fn, _split(theta0), _split(theta1))
    torch.testing.assert_close(out.value, torch.full((2,), expected, dtype=DTYPE))
    assert out.convex.all()
    if noise == 0:
        assert (out.variances == 0).all()
    else:
        assert (out.variances > 0).all()


def test_gradient_descent_step_on_a_quadratic():
    """θ₁ = θ₀ − lr g: the exact line minimum is at lr* = gᵀg / gᵀAg, so the value is
    lr / lr* − 1."""
    losses_fn, theta0, a, center = _quadratic(noise=0.3)
    g = (theta0 - center) @ a
    lr_star = (g * g).sum(1) / torch.einsum("pi,ij,pj->p", g, a, g)
    lr = torch.tensor([0.3, 1.7], dtype=DTYPE) * lr_star
    theta1 = theta0 - lr[:, None] * g
    out = step_length(losses_fn, _split(theta0), _split(theta1))
    torch.testing.assert_close(out.value, lr / lr_star - 1)
    torch.testing.assert_close(out.distance, lr * g.norm(dim=1))


def test_fit_limits_have_closed_forms():
    """Derivatives certain, losses vague: the parabola through the two slopes,
    step_length = −g₁/g₀. Losses certain, slopes equally vague: c = f₀, a + b = f₁ − f₀ and
    b = (g₀ + 2(f₁ − f₀) − g₁) / 2 (least squares of the two slopes under that constraint)."""
    obs = torch.tensor([[1.0, 0.8, -1.0, 0.4], [2.0, 1.5, -0.6, -0.1]], dtype=DTYPE)
    slopes_sure = fit_step_length(obs, torch.tensor([[1e6, 1e6, 1e-6, 1e-6]] * 2, dtype=DTYPE))
    torch.testing.assert_close(slopes_sure.value, -obs[:, 3] / obs[:, 2], rtol=1e-8, atol=1e-10)

    losses_sure = fit_step_length(obs, torch.tensor([[1e-6, 1e-6, 1e6, 1e6]] * 2, dtype=DTYPE))
    f0, f1, g0, g1 = obs.unbind(1)
    b = (g0 + 2 * (f1 - f0) - g1) / 2
    a = (f1 - f0) - b
    torch.testing.assert_close(losses_sure.coeffs[:, 0], f0, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(losses_sure.value, -2 * a / b - 1, rtol=1e-8, atol=1e-10)


def test_fit_is_the_weighted_least_squares_solution():
    """Against numpy's solution of the weighted normal equations, random inputs; invariant to a
    common scale of the variances; a concave fit is NaN."""
    rng = np.random.default_rng(0)
    design = np.array([[1, 0, 0], [1, 1, 1], [0, 1, 0], [0, 1, 2]], dtype=float)
    obs = rng.normal(size=(50, 4))
    var = rng.uniform(0.01, 2.0, size=(50, 4))
    fit = fit_step_length(torch.tensor(obs), torch.tensor(var))
    for i in range(50):
        w = np.diag(1 / var[i])
        coeffs = np.linalg.solve(design.T @ w @ design, design.T @ w @ obs[i])
        np.testing.assert_allclose(fit.coeffs[i].numpy(), coeffs, rtol=1e-9, atol=1e-12)
        if coeffs[2] > 0:
            assert fit.value[i].item() == pytest.approx(-2 * coeffs[2] / coeffs[1] - 1, rel=1e-9)
        else:
            assert np.isnan(fit.value[i].item()) and not fit.convex[i]
    assert fit.convex.any() and not fit.convex.all()  # both branches were exercised
    scaled = fit_step_length(torch.tensor(obs), torch.tensor(var * 1e4))
    torch.testing.assert_close(scaled.value, fit.value, equal_nan=True)


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
def test_observations_on_a_network_match_per_sample_gradients(batchnorm):
    """f, g and their variances from the jvps equal those from the losses, the full gradient
    and the per-sample gradients (vmap, or jacrev inside the batch for BatchNorm) projected on
    the step, at both ends of an actual SGD step."""
    optimizee = MLPOptimizee(sizes=(6, 5, 3), activation="tanh", batchnorm=batchnorm)
    gen = torch.Generator().manual_seed(0)
    params = optimizee.init(2, generator=gen, dtype=DTYPE)
    x = torch.randn(2, 12, 6, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (2, 12), generator=gen)
    _, grads = grads_of(optimizee.loss, params, x, y)
    after = tuple(p - 0.5 * g for p, g in zip(params, grads))
    out = step_length(lambda ps: optimizee.losses(ps, x, y), params, after)
    d = [b - a for a, b in zip(params, after)]
    for end, ps in enumerate((params, after)):
        losses = optimizee.losses(ps, x, y)
        full = grads_of(optimizee.loss, ps, x, y)[1]
        g = sum((gi * di).flatten(1).sum(1) for gi, di in zip(full, d))
        per = per_sample_grads(optimizee, ps, x, y)  # (N, P, ...)
        slopes = sum((gi * di).flatten(2).sum(2) for gi, di in zip(per, d))  # (N, P)
        torch.testing.assert_close(out.observations[:, end], losses.mean(1))
        torch.testing.assert_close(out.observations[:, 2 + end], g)
        torch.testing.assert_close(out.variances[:, end], losses.var(1) / 12)
        torch.testing.assert_close(out.variances[:, 2 + end], slopes.var(0) / 12)
    assert torch.isfinite(out.value[out.convex]).all()


def test_no_step_and_bad_input():
    losses_fn, theta0, _, _ = _quadratic(0.1)
    out = step_length(losses_fn, _split(theta0), _split(theta0.clone()))
    assert torch.isnan(out.value).all() and not out.convex.any()
    with pytest.raises(ValueError, match="same shapes"):
        step_length(losses_fn, _split(theta0), (theta0[:, :3], theta0[:, 3:]))
    with pytest.raises(ValueError, match=r"per-sample losses \(P, N\)"):
        step_length(lambda ps: losses_fn(ps).mean(1), _split(theta0), _split(theta0 + 1))
    with pytest.raises(ValueError, match="variances must be >= 0"):
        fit_step_length(torch.zeros(4), -torch.ones(4))
    with pytest.raises(ValueError, match=r"\(P, 4\)"):
        fit_step_length(torch.zeros(3), torch.ones(3))
