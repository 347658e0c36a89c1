"""PES (l2o/estimators.py) against ground truth.

- ``ParticleOptimizer`` (vmap over per-particle weights) equals running each particle alone.
- One, two, three truncations equal the PES-A formula computed by a plain reference loop
  (perturbations read back from the carried ξ: first truncation ξ = ε, then ξ accumulates).
- Over a whole inner run, PES averaged over many pairs agrees with the exact gradient of the
  run's meta-objective, which is backprop through the full unroll with the optimizee's gradient
  *not* detached (``create_graph=True``): a z-test per direction, with a smoothing-bias margin.
  Truncated backprop as training does it (first order, state detached between truncations) is
  far off there, and so is first-order backprop through the full unroll (toy problem).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from l2o.estimators import PES, ParticleOptimizer, set_meta_gradients, truncation_meta_loss
from l2o.lstm import LSTMOptimizer, detach_state
from l2o.optimizees import MLPOptimizee

F64 = torch.float64


# --------------------------------------------------------------------------- toy problem
class ToyMomentum(nn.Module):
    """A two-weight learned optimizer of the protocol: heavy ball with learned lr and momentum."""

    name = "toy"

    def __init__(self, lr: float = 0.08, beta: float = 0.6) -> None:
        super().__init__()
        self.log_lr = nn.Parameter(torch.tensor(math.log(lr), dtype=F64))
        self.beta_logit = nn.Parameter(torch.tensor(math.log(beta / (1 - beta)), dtype=F64))

    def init_state(self, params):
        return {"m": tuple(torch.zeros_like(p) for p in params)}

    def update(self, grads, state, params=None):
        beta = torch.sigmoid(self.beta_logit)
        m = tuple(beta * mi + g for mi, g in zip(state["m"], grads))
        return tuple(-self.log_lr.exp() * mi for mi in m), {"m": m}


class NoisyQuadratic:
    """loss(w) = 1/2 sum_j a_j (w_j - x_j)^2 with a fresh target x per step (minibatch noise)."""

    def __init__(self, a: torch.Tensor) -> None:
        self.a = a

    def loss(self, params, x, y):
        return 0.5 * (self.a * (params[0] - x) ** 2).sum(-1)


def toy_task(steps: int = 20):
    gen = torch.Generator().manual_seed(0)
    optimizee = NoisyQuadratic(torch.tensor([0.3, 1.0, 3.0, 10.0], dtype=F64))
    w0 = (torch.randn(1, 4, generator=gen, dtype=F64),)
    xs = 0.3 * torch.randn(steps, 1, 4, generator=gen, dtype=F64)
    return optimizee, w0, xs, torch.zeros(steps, 1, 1)


def lstm_task(steps: int = 12):
    torch.manual_seed(0)
    lo = LSTMOptimizer(hidden_size=3, num_layers=1).to(F64)
    optimizee = MLPOptimizee(sizes=(3, 4, 2))
    gen = torch.Generator().manual_seed(0)
    w0 = optimizee.init(1, gen, dtype=F64)
    xs = torch.randn(steps, 1, 8, 3, generator=gen, dtype=F64)
    ys = torch.randint(0, 2, (steps, 1, 8), generator=gen)
    return lo, optimizee, w0, xs, ys


# --------------------------------------------------------------------------- references
def backprop_gradient(lo, optimizee, params, xs, ys, unroll, kind, second_order, truncate):
    """d/dθ of Σ_truncations meta_loss(truncation) for one inner run, by backprop.

    ``second_order=True, truncate=False``: the exact gradient of the run's objective.
    ``second_order=False, truncate=True``: truncated backprop as meta-training does it.
    """
    state = lo.init_state(params)
    params = tuple(p.clone().requires_grad_(True) for p in params)
    total = 0.0
    for start in range(0, xs.shape[0], unroll):
        if truncate:
            params = tuple(p.detach().requires_grad_(True) for p in params)
            state = detach_state(state)
        losses = []
        for t in range(start, start + unroll):
            loss = optimizee.loss(params, xs[t], ys[t])
            grads = torch.autograd.grad(
                loss.sum(), params, create_graph=second_order, retain_graph=True
            )
            if not second_order:
                grads = tuple(g.detach() for g in grads)
            updates, state = lo.update(grads, state, params)
            params = tuple(p + u for p, u in zip(params, updates))
            losses.append(loss)
        total = total + truncation_meta_loss(torch.stack(losses), kind).mean()
    return flat(torch.autograd.grad(total, list(lo.parameters())))


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def pes_run_estimates(lo, optimizee, w0, xs, ys, unroll, kind, sigma, groups, pairs):
    """(groups, dim): independent PES estimates, each summed over the truncations of one inner
    run (every pair on the same task: same init, same minibatches) and averaged over pairs."""
    out = []
    for g in range(groups):
        pes = PES(lo, optimizee, pairs=pairs, sigma=sigma, meta_loss=kind)
        carry = pes.init_carry(tuple(p.expand(pairs, *p.shape[1:]).clone() for p in w0))
        gen = torch.Generator().manual_seed(1000 + g)
        total = 0.0
        for start in range(0, xs.shape[0], unroll):
            x = xs[start : start + unroll]
            y = ys[start : start + unroll]
            est = pes.estimate(
                carry, x.expand(-1, pairs, *x.shape[2:]), y.expand(-1, pairs, *y.shape[2:]), gen
            )
            carry = est.carry
            total = total + flat(est.grads)
        out.append(total)
    return torch.stack(out)


def z_scores(estimates: torch.Tensor, reference: torch.Tensor, directions: torch.Tensor):
    """Per direction: (mean projected estimate - projected reference) / its standard error,
    and the mean minus reference in units of |reference|."""
    proj = estimates @ directions.T
    mean, se = proj.mean(0), proj.std(0) / math.sqrt(len(estimates))
    ref = directions @ reference
    return (mean - ref) / se, (mean - ref).abs() / reference.norm(), se


# --------------------------------------------------------------------------- vmap
@pytest.mark.parametrize("kind", ["lstm", "lstm_compile_flag", "toy"])
def test_particle_optimizer_equals_each_particle_alone(kind):
    torch.manual_seed(0)
    if kind == "toy":
        lo, optimizee = ToyMomentum(), NoisyQuadratic(torch.ones(4, dtype=F64))
        params = (torch.randn(5, 4, dtype=F64),)
    else:
        lo = LSTMOptimizer(hidden_size=4, torch_compile=kind == "lstm_compile_flag")
        optimizee = MLPOptimizee(sizes=(5, 3, 2))
        params = optimizee.init(5, torch.Generator().manual_seed(0))
    weights = {
        n: p.detach() + 0.1 * torch.randn(5, *p.shape, dtype=p.dtype)
        for n, p in lo.named_parameters()
    }
    particles = ParticleOptimizer(lo, weights)
    state = particles.init_state(params)
    grads = [tuple(torch.randn_like(p) for p in params) for _ in range(2)]
    for g in grads:
        updates, state = particles.update(g, state, params)
    for k in range(5):  # the ground truth: particle k alone, its weights loaded into a copy
        alone = copy.deepcopy(lo)
        alone.torch_compile = False
        alone.load_state_dict({n: w[k] for n, w in weights.items()})
        pk = tuple(p[k : k + 1] for p in params)
        s = alone.init_state(pk)
        for g in grads:
            u, s = alone.update(tuple(t[k : k + 1] for t in g), s, pk)
        for a, b in zip(u, updates):
            torch.testing.assert_close(b[k : k + 1], a, rtol=1e-5, atol=1e-7)
    if kind != "toy":
        assert lo.torch_compile == (kind == "lstm_compile_flag")  # the vmap stop-gap undone
        assert state["h"].shape[0] == 5  # every state tensor gets a leading particle dim


# --------------------------------------------------------------------------- the formula
@pytest.mark.parametrize("kind", ["log", "sum", "log+penalty"])
def test_estimates_equal_pes_formula_over_three_truncations(kind):
    """Truncation k's estimate = 1/(2Nσ²) Σ_i ξ_ik (L⁺_ik − L⁻_ik), with ξ_ik = ε_i1 + ... + ε_ik
    and L±_ik the meta-loss of truncation k of an optimizee driven by θ ± ε_i1, ..., θ ± ε_ik
    (each ε in its own truncation): recomputed here by a plain loop over pairs and signs.
    With a penalty, L gains Σ_t penalty(params_t, updates_t)."""
    kind, _, with_penalty = kind.partition("+")

    def penalty(params, updates):  # any per-particle function of (params before, updates)
        return 3.0 * sum(
            (u * p).flatten(1).sum(1) + (u**2).flatten(1).sum(1) for u, p in zip(updates, params)
        )

    lo, optimizee, w0, xs, ys = lstm_task(steps=9)
    pairs, sigma, unroll = 3, 0.05, 3
    pes = PES(lo, optimizee, pairs=pairs, sigma=sigma, meta_loss=kind)
    pen_fn = penalty if with_penalty else None
    gen = torch.Generator().manual_seed(5)
    w = tuple(torch.cat([p, p + 0.01 * torch.randn_like(p), p]) for p in w0)  # 3 tasks
    x = torch.cat([xs, xs.flip(0), xs], 1)
    y = torch.cat([ys, ys.flip(0), ys], 1)
    carry = pes.init_carry(w)
    theta = {n: p.detach() for n, p in lo.named_parameters()}
    names = list(theta)
    xis, estimates = [torch.zeros(pairs, 0)], []
    for start in range(0, 9, unroll):
        est = pes.estimate(carry, x[start : start + unroll], y[start : start + unroll], gen, pen_fn)
        carry = est.carry
        xis.append(torch.cat([xi.reshape(pairs, -1) for xi in carry["xi"]], 1))
        estimates.append(flat(est.grads))
    epsilons = [xis[1]] + [xis[k + 1] - xis[k] for k in range(1, 3)]
    shapes = [theta[n].shape for n in names]

    def unflatten(vec):
        parts = vec.split([math.prod(s) for s in shapes])
        return {n: theta[n] + part.view(s) for n, part, s in zip(names, parts, shapes)}

    for k in range(3):
        expected = torch.zeros_like(estimates[k])
        for i in range(pairs):
            meta = []
            for sign in (1, -1):
                net = copy.deepcopy(lo)
                params = tuple(p[i : i + 1] for p in w)
                state = net.init_state(params)
                for j in range(k + 1):
                    net.load_state_dict(unflatten(sign * epsilons[j][i]))
                    losses, pen = [], 0.0
                    for t in range(j * unroll, (j + 1) * unroll):
                        leaf = tuple(p.detach().requires_grad_(True) for p in params)
                        loss = optimizee.loss(leaf, x[t, i : i + 1], y[t, i : i + 1])
                        g = torch.autograd.grad(loss.sum(), leaf)
                        with torch.no_grad():
                            u, state = net.update(g, state, leaf)
                        params = tuple(p.detach() + d for p, d in zip(leaf, u))
                        losses.append(loss.detach())
                        if with_penalty:
                            pen = pen + penalty(leaf, u).detach()
                meta.append(truncation_meta_loss(torch.stack(losses), kind) + pen)
            expected += xis[k + 1][i] * (meta[0] - meta[1]).item()
        expected /= 2 * pairs * sigma**2
        torch.testing.assert_close(estimates[k], expected, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- ground truth
@pytest.mark.parametrize("kind", ["sum", "log"])
def test_pes_matches_exact_full_unroll_gradient_toy(kind):
    """Noisy quadratic, 20 steps in 5 truncations of 4. The toy optimizer's updates depend
    strongly on the optimizee's curvature, so the second-order terms matter here: first-order
    backprop through the full unroll is off by 10x in d/d log_lr."""
    optimizee, w0, xs, ys = toy_task()
    lo = ToyMomentum()
    exact = backprop_gradient(lo, optimizee, w0, xs, ys, 4, kind, True, False)
    tbptt = backprop_gradient(lo, optimizee, w0, xs, ys, 4, kind, False, True)
    first_order = backprop_gradient(lo, optimizee, w0, xs, ys, 4, kind, False, False)
    est = pes_run_estimates(lo, optimizee, w0, xs, ys, 4, kind, 1e-3, groups=16, pairs=2000)
    axes = torch.eye(2, dtype=F64)
    z, rel, se = z_scores(est, exact, axes)
    # |z| < 4, or within the smoothing-bias margin: at σ = 1e-3 Gaussian smoothing moves the
    # gradient by O(σ²) (1e-6 relative here); 1e-3 of |exact| is a generous bound.
    assert ((z.abs() < 4) | (rel < 1e-3)).all(), (z, exact, est.mean(0))
    assert (se < 0.05 * exact.norm()).all()  # the test has the power to see a 5% error
    for biased in (tbptt, first_order):
        zb, relb, _ = z_scores(est, biased, axes)
        assert zb.abs().max() > 10 and relb.max() > 0.1, (zb, biased, exact)


def test_pes_matches_exact_full_unroll_gradient_lstm():
    """A 1-layer, 3-unit LSTM (88 weights) on a 3-4-2 MLP, 12 steps in 4 truncations of 3,
    the study's log meta-loss. z-test along the exact gradient and 3 random directions."""
    lo, optimizee, w0, xs, ys = lstm_task()
    exact = backprop_gradient(lo, optimizee, w0, xs, ys, 3, "log", True, False)
    tbptt = backprop_gradient(lo, optimizee, w0, xs, ys, 3, "log", False, True)
    est = pes_run_estimates(lo, optimizee, w0, xs, ys, 3, "log", 1e-3, groups=12, pairs=500)
    gen = torch.Generator().manual_seed(1)
    dirs = torch.cat(
        [
            (exact / exact.norm())[None],
            nn.functional.normalize(torch.randn(3, exact.numel(), generator=gen, dtype=F64), dim=1),
        ]
    )
    z, rel, se = z_scores(est, exact, dirs)
    # Smoothing bias: measured 5% of |exact| along it at σ = 1e-2, O(σ²): 0.05% at 1e-3.
    assert ((z.abs() < 4) | (rel < 2e-3)).all(), (z, rel)
    assert se[0] < 0.1 * exact.norm()
    zb, relb, _ = z_scores(est, tbptt, dirs)
    assert zb.abs().max() > 10 and relb.max() > 0.5, (zb, relb)  # opposite sign along exact


# --------------------------------------------------------------------------- restarts
def test_reset_restarts_only_masked_pairs_and_then_equals_a_fresh_pes():
    lo, optimizee, w0, xs, ys = lstm_task(steps=6)
    pairs = 3
    pes = PES(lo, optimizee, pairs=pairs, sigma=0.01)
    first = optimizee.init(pairs, torch.Generator().manual_seed(1), dtype=F64)
    fresh = optimizee.init(pairs, torch.Generator().manual_seed(2), dtype=F64)
    x, y = xs.expand(-1, pairs, -1, -1), ys.expand(-1, pairs, -1)
    gen = torch.Generator().manual_seed(3)
    carry = pes.estimate(pes.init_carry(first), x[:3], y[:3], gen).carry
    mask = torch.tensor([False, True, False])
    after = pes.reset(carry, mask, fresh)
    rows = torch.cat([mask, mask])  # pair 1 = particles 1 and 4
    for old, new, f in zip(carry["params"], after["params"], fresh):
        torch.testing.assert_close(new[~rows], old[~rows], rtol=0, atol=0)
        torch.testing.assert_close(new[rows], torch.cat([f[1:2], f[1:2]]), rtol=0, atol=0)
    for key in ("h", "c"):
        assert (after["state"][key][rows] == 0).all()
        torch.testing.assert_close(after["state"][key][~rows], carry["state"][key][~rows])
    for old, new in zip(carry["xi"], after["xi"]):
        assert (new[1] == 0).all() and (old[1] != 0).any()
        torch.testing.assert_close(new[~mask], old[~mask], rtol=0, atol=0)
    # A carry whose every pair restarted behaves exactly like a fresh one: nothing of the old
    # runs (params, state, accumulated ξ) leaks into the new run's estimates.
    everyone = pes.reset(carry, torch.ones(pairs, dtype=torch.bool), fresh)
    a, b = everyone, pes.init_carry(fresh)
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for start in (0, 3):
        ea = pes.estimate(a, x[start : start + 3], y[start : start + 3], gen_a)
        eb = pes.estimate(b, x[start : start + 3], y[start : start + 3], gen_b)
        for ga, gb in zip(ea.grads, eb.grads):
            torch.testing.assert_close(ga, gb, rtol=0, atol=0)
        a, b = ea.carry, eb.carry


def test_estimate_builds_no_graph_and_leaves_the_learned_optimizer_alone():
    """Forward only: nothing returned or carried holds an autograd graph, so memory cannot grow
    with the unroll; the weights and their .grad are untouched."""
    lo, optimizee, w0, xs, ys = lstm_task(steps=4)
    before = {n: p.detach().clone() for n, p in lo.named_parameters()}
    pes = PES(lo, optimizee, pairs=2, sigma=0.01)
    carry = pes.init_carry(optimizee.init(2, torch.Generator().manual_seed(0), dtype=F64))
    est = pes.estimate(carry, xs.expand(-1, 2, -1, -1), ys.expand(-1, 2, -1))
    leaves = [*est.grads, est.losses, est.meta_loss]
    leaves += [t for t in torch.utils._pytree.tree_leaves(est.carry) if isinstance(t, torch.Tensor)]
    assert all(t.grad_fn is None and not t.requires_grad for t in leaves)
    assert est.losses.shape == (4, 4) and torch.isfinite(est.losses).all()
    for n, p in lo.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


def test_set_meta_gradients_reduces_one_flat_vector():
    """Under DDP the ranks' estimates are averaged by one all-reduce of the flat gradient: here
    a stand-in for the collective averages with another rank's estimate."""
    lo = ToyMomentum()
    mine = (torch.tensor(1.0, dtype=F64), torch.tensor(2.0, dtype=F64))
    other = torch.tensor([3.0, -4.0], dtype=F64)
    calls = []

    def reduce_mean(t):
        calls.append(t.clone())
        return (t + other) / 2

    set_meta_gradients(lo.parameters(), mine, reduce_mean)
    assert len(calls) == 1 and torch.equal(calls[0], torch.tensor([1.0, 2.0], dtype=F64))
    assert lo.log_lr.grad.item() == 2.0 and lo.beta_logit.grad.item() == -1.0
    with pytest.raises(ValueError, match="gradients for 2 parameters"):
        set_meta_gradients(lo.parameters(), mine[:1])


def test_bad_input_fails_before_any_work():
    lo, optimizee = ToyMomentum(), NoisyQuadratic(torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="sigma"):
        PES(lo, optimizee, sigma=0.0)
    with pytest.raises(ValueError, match="pairs"):
        PES(lo, optimizee, pairs=0)
    with pytest.raises(ValueError, match="meta_loss"):
        PES(lo, optimizee, meta_loss="mean")
    with pytest.raises(TypeError, match="lacks init_state"):
        PES(nn.Linear(2, 2), optimizee)
    pes = PES(lo, optimizee, pairs=2)
    with pytest.raises(ValueError, match="one fresh optimizee per pair"):
        pes.init_carry((torch.zeros(3, 4, dtype=F64),))
    carry = pes.init_carry((torch.zeros(2, 4, dtype=F64),))
    with pytest.raises(ValueError, match="link data.population"):
        pes.estimate(carry, torch.zeros(2, 3, 4, dtype=F64), torch.zeros(2, 3, 1))


@pytest.mark.slow
def test_compiled_pes_equals_eager_pes():
    torch.manual_seed(0)
    lo = LSTMOptimizer(hidden_size=4)
    optimizee = MLPOptimizee(sizes=(5, 3, 2))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 2, 7, 5, generator=gen), torch.randint(0, 2, (3, 2, 7), generator=gen)
    params = optimizee.init(2, gen)
    out = []
    for compiled in (False, True):
        pes = PES(lo, optimizee, pairs=2, sigma=0.01, torch_compile=compiled)
        carry = pes.init_carry(params)
        noise = torch.Generator().manual_seed(1)
        for _ in range(2):
            est = pes.estimate(carry, x, y, noise)
            carry = est.carry
        out.append(est)
    for a, b in zip(out[0].grads, out[1].grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out[1].carry["state"]["h"], out[0].carry["state"]["h"])
