"""l2o.curvature against dense Hessians (torch.func.hessian) and quadratics of known spectrum."""

from __future__ import annotations

import math

import pytest
import torch

from l2o.curvature import HessianOperator, hessian_trace, top_eigenvalue
from l2o.optimizees import MLPOptimizee

DTYPE = torch.float64


def _net(batchnorm=False, population=2, seed=0, activation="tanh"):
    optimizee = MLPOptimizee(sizes=(20, 6, 3), activation=activation, batchnorm=batchnorm)
    gen = torch.Generator().manual_seed(seed)
    params = optimizee.init(population, generator=gen, dtype=DTYPE)
    x = torch.randn(population, 32, 20, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (population, 32), generator=gen)
    return lambda ps: optimizee.loss(ps, x, y), params


def _dense_hessians(loss_fn, params):
    """Independent reference: torch.func.hessian of each member's own loss w.r.t. its flattened
    parameters, (P, D, D)."""
    out = []
    for m in range(params[0].shape[0]):
        sizes = [p[m].numel() for p in params]

        def member_loss(flat, m=m, sizes=sizes):
            parts = [t.reshape(1, *p.shape[1:]) for t, p in zip(flat.split(sizes), params)]
            full = tuple(torch.cat([p[:m], t, p[m + 1 :]]) for p, t in zip(params, parts))
            return loss_fn(full)[m]

        out.append(torch.func.hessian(member_loss)(torch.cat([p[m].reshape(-1) for p in params])))
    return torch.stack(out)


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
def test_hvp_and_dense_match_torch_func_hessian(batchnorm):
    loss_fn, params = _net(batchnorm)
    op = HessianOperator(loss_fn, params)
    dense = _dense_hessians(loss_fn, params)
    torch.testing.assert_close(op.dense(), dense, atol=1e-10, rtol=1e-9)
    gen = torch.Generator().manual_seed(1)
    v = tuple(torch.randn(p.shape, generator=gen, dtype=DTYPE) for p in params)
    hv = torch.cat([t.reshape(2, -1) for t in op.matvec(v)], 1)
    flat_v = torch.cat([t.reshape(2, -1) for t in v], 1)
    torch.testing.assert_close(hv, torch.einsum("pij,pj->pi", dense, flat_v), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
def test_lanczos_top_eigenvalue_matches_the_dense_hessian(batchnorm):
    """Per member of a population of 2, to 1e-6 relative; the reported residual bounds the
    error (it is what a user sees of the accuracy)."""
    loss_fn, params = _net(batchnorm)
    dense = _dense_hessians(loss_fn, params)
    exact = torch.linalg.eigvalsh(dense)[:, -1]
    op = HessianOperator(loss_fn, params)
    top = top_eigenvalue(op, max_iter=150, tol=1e-9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(top.value, exact, rtol=1e-6, atol=0)
    assert ((top.value - exact).abs() <= top.residual + 1e-12).all()
    # The Ritz vector is a unit eigenvector: H y = value y.
    y = torch.cat([t.reshape(2, -1) for t in top.vector], 1)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(2, dtype=DTYPE))
    hy = torch.einsum("pij,pj->pi", dense, y)
    torch.testing.assert_close(hy, top.value[:, None] * y, atol=1e-5, rtol=0)
    assert op.num_hvps == top.iterations < 150


def test_default_settings_are_a_few_tens_of_hvps():
    """At the defaults (tol 1e-4 relative residual, <= 50 steps) the eigenvalue is accurate:
    the error is ~residual^2 / gap."""
    loss_fn, params = _net()
    exact = torch.linalg.eigvalsh(_dense_hessians(loss_fn, params))[:, -1]
    top = top_eigenvalue(
        HessianOperator(loss_fn, params), generator=torch.Generator().manual_seed(0)
    )
    assert top.iterations < 50
    torch.testing.assert_close(top.value, exact, rtol=1e-6, atol=0)


def _quadratic(eigs, population=1, seed=0, diagonal=False):
    """L(θ) = ½ θᵀ A θ with A = Q diag(eigs) Qᵀ per member; params a (P, D) tensor plus a
    (P, 2, 2) one, so the operator sees several tensors of different ndim."""
    d = len(eigs) - 4
    gen = torch.Generator().manual_seed(seed)
    q = torch.eye(len(eigs), dtype=DTYPE)
    if not diagonal:
        q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=DTYPE))
    a = q @ torch.diag(torch.tensor(eigs, dtype=DTYPE)) @ q.T

    def loss_fn(ps):
        theta = torch.cat([ps[0], ps[1].reshape(ps[1].shape[0], -1)], 1)
        return 0.5 * torch.einsum("pi,ij,pj->p", theta, a, theta)

    params = (
        torch.randn(population, d, generator=gen, dtype=DTYPE),
        torch.randn(population, 2, 2, generator=gen, dtype=DTYPE),
    )
    return loss_fn, params, a


def test_quadratic_with_known_indefinite_spectrum():
    """Top = the largest *algebraic* eigenvalue (5, not the -20 of largest magnitude)."""
    eigs = [5.0, 4.0, 1.0, 0.5, 0.0, -1.0, -3.0, -20.0]
    loss_fn, params, a = _quadratic(eigs, population=3)
    op = HessianOperator(loss_fn, params)
    top = top_eigenvalue(op, max_iter=50, tol=1e-12)
    torch.testing.assert_close(top.value, torch.full((3,), 5.0, dtype=DTYPE), rtol=1e-10, atol=0)
    assert top.iterations <= len(eigs)  # the Krylov space is exhausted: exact


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    """Rademacher z has z_i^2 = 1: z^T D z = tr(D) for every probe, so the SE is 0."""
    eigs = [3.0, -1.0, 2.5, 0.25, 7.0, 1.0]
    loss_fn, params, _ = _quadratic(eigs, population=2, diagonal=True)
    tr = hessian_trace(HessianOperator(loss_fn, params), num_probes=8)
    torch.testing.assert_close(tr.value, torch.full((2,), sum(eigs), dtype=DTYPE))
    assert (tr.stderr == 0).all()


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
def test_hutchinson_trace_within_its_standard_error(batchnorm):
    """The estimate is unbiased and its reported SE is right: over 200 seeded runs, the mean
    reported SE equals the closed form sqrt(2 (||H||_F^2 - sum H_ii^2) / k) (Avron & Toledo
    2011) to 6% (measured: within 4%), the estimates' spread equals it to 15% (a std of 200
    values), ~95% of the runs lie within 2 SE of the exact trace, and their mean is within 4
    standard errors of the mean."""
    loss_fn, params = _net(batchnorm)
    dense = _dense_hessians(loss_fn, params)
    exact = dense.diagonal(dim1=1, dim2=2).sum(1)
    k = 16
    closed_se = (
        2 * (dense.square().sum((1, 2)) - dense.diagonal(dim1=1, dim2=2).square().sum(1)) / k
    ).sqrt()
    op = HessianOperator(loss_fn, params)
    runs = [hessian_trace(op, k, generator=torch.Generator().manual_seed(s)) for s in range(200)]
    values = torch.stack([r.value for r in runs])  # (200, P)
    ses = torch.stack([r.stderr for r in runs])
    spread = values.std(0)
    torch.testing.assert_close(ses.mean(0), closed_se, rtol=0.06, atol=0)
    torch.testing.assert_close(spread, closed_se, rtol=0.15, atol=0)
    coverage = ((values - exact).abs() <= 2 * ses).double().mean()
    assert 0.88 <= coverage <= 0.99
    assert ((values.mean(0) - exact).abs() <= 4 * closed_se / math.sqrt(200)).all()
    # One run, its own report: the seeded estimate lies within 3 of its SE.
    one = hessian_trace(op, 64, generator=torch.Generator().manual_seed(123))
    assert ((one.value - exact).abs() <= 3 * one.stderr).all()


def test_bad_input_is_a_clear_error():
    loss_fn, params = _net()
    with pytest.raises(ValueError, match="one loss per population member"):
        HessianOperator(lambda ps: loss_fn(ps).sum(), params)
    with pytest.raises(ValueError, match="leading population dim"):
        HessianOperator(loss_fn, (params[0], params[1][0]) + params[2:])
    op = HessianOperator(loss_fn, params)
    with pytest.raises(ValueError, match="num_probes must be >= 2"):
        hessian_trace(op, 1)
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        top_eigenvalue(op, max_iter=0)
    with pytest.raises(ValueError, match="vector 1 has shape"):
        op.matvec((params[0], params[1][:, :2]) + params[2:])
