"""Meta-gradient estimators beside truncated backprop: Persistent Evolution Strategies (PES).

PES (Vicol, Metz, Sohl-Dickstein 2021, "Unbiased Gradient Estimation in Unrolled Computation
Graphs with Persistent Evolution Strategies", the antithetic variant PES-A) estimates the gradient
of the meta-objective of *whole* inner runs from truncations, without backprop:

- ``pairs`` antithetic particle pairs. Pair i draws ε_i ~ N(0, σ²I) over the learned optimizer's
  weights θ every truncation; its particle ``+`` runs the truncation with θ + ε_i, its particle
  ``-`` with θ − ε_i. Both start from the same optimizee and see the same minibatches (common
  random numbers: L⁺ − L⁻ then measures θ, not data noise).
- Each particle carries its own optimizee params and learned-optimizer state across truncations;
  each pair carries ξ_i, the sum of its ε's since its inner run started (ξ_i += ε_i before each
  truncation; ξ_i = 0 when the run restarts).
- Estimate: g = 1/(2 N σ²) Σ_i ξ_i (L⁺_i − L⁻_i), L = the truncation's meta-loss of the particle.

Summed over the truncations of a run, E[g] is the gradient of the Gaussian-smoothed objective
E_ε Σ_k f_k (the earlier truncations' perturbations move the state that truncation k starts
from: ξ, not ε, carries their credit). Unlike truncated backprop it has no truncation bias, and it
includes the second-order terms that training's backprop drops (the gradient fed to the learned
optimizer is detached there, but PES differentiates the true dynamics).

The meta-loss of a truncation is TBPTT's: ``sum`` (Σ_t ℓ_t) or ``log`` (log Σ_t ℓ_t). Both keep
PES unbiased: PES needs the run's objective to be a *sum over truncations* of terms that each
depend on their own truncation's trajectory, and Σ_k log(Σ_{t in k} ℓ_t) is such a sum (the log
is taken per truncation, never of the whole run). The objective then depends on where the
truncation boundaries fall; with :mod:`l2o.truncation` every run starts on a boundary, so it is
always Σ_k log(loss summed over run steps [kT, (k+1)T)), the run's TBPTT objective.

No autograd graph is built (the learned optimizer runs under ``torch.no_grad``), so memory does
not grow with the unroll. Particles are a batch dimension: the learned optimizer runs once per
step under ``torch.func.vmap`` with stacked per-particle weights (:class:`ParticleOptimizer`), and
the optimizees are one population of 2N (particle k = row k; rows [0, N) are the ``+`` particles,
rows [N, 2N) the ``-`` ones, pair i = rows i and N + i).

Use from a LightningModule (manual optimization), one truncation per ``training_step``::

    pes = PES(learned_optimizer, optimizee, pairs=8, sigma=0.01, meta_loss="log")
    carry = pes.init_carry(fresh_params)               # (N, ...) one optimizee per pair
    carry = pes.reset(carry, due, fresh_params)        # due: (N,) bool, pairs whose run restarts
    est = pes.estimate(carry, x, y, generator)         # x: (T, N, B, D), y: (T, N, B)
    set_meta_gradients(learned_optimizer.parameters(), est.grads, reduce_mean)
    clip, meta_opt.step(); carry = est.carry
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from l2o.inner import inner_step
from l2o.optimizers import Params, State
from l2o.trees import tensor_leaves, tree_map
from l2o.truncation import restart_members

META_LOSSES = ("log", "sum")


def truncation_meta_loss(losses: Tensor, kind: str) -> Tensor:
    """The meta-loss of one truncation per optimizee: losses (T, P) -> (P,).

    ``sum``: Σ_t ℓ_t; ``log``: log Σ_t ℓ_t (the study). TBPTT averages it over the population.
    """
    if kind not in META_LOSSES:
        raise ValueError(f"meta_loss must be one of {META_LOSSES}, got {kind!r}")
    total = losses.sum(0)
    return total.log() if kind == "log" else total


# --------------------------------------------------------------------------- particles
class _Call(nn.Module):
    """``functional_call`` calls ``forward``; this forwards to a protocol method instead."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, method: str, *args: Any) -> Any:
        return getattr(self.inner, method)(*args)


def _split(tree: Any) -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:
    """A tree's tensor leaves, and how to rebuild it from new tensor leaves (other leaves,
    e.g. the LSTM's ``shapes`` or a step count, are kept as they are)."""
    return tensor_leaves(tree)


def _vmapped(call: _Call, method: str, weights: dict[str, Tensor], *args: Any) -> Any:
    """vmap ``module.method(*args)`` over particles with per-particle ``weights``: every tensor in
    ``args`` has a leading particle dim; non-tensor leaves (in and out, e.g. the LSTM's
    ``shapes``) are the same for every particle and pass through."""
    tensors, rebuild = _split(args)
    out_rebuild: list[Callable[[list[Tensor]], Any]] = []

    def one(w: dict[str, Tensor], *leaves: Tensor) -> list[Tensor]:
        out = torch.func.functional_call(call, w, (method, *rebuild(list(leaves))))
        out_tensors, out_rb = _split(out)
        out_rebuild.append(out_rb)  # vmap traces ``one`` once: this is its output's structure
        return out_tensors

    out = torch.func.vmap(one)(weights, *tensors)
    return out_rebuild[0](out)


def _population_of_one(ts: Params) -> Params:
    return tuple(t.unsqueeze(1) for t in ts)


def particle_update(
    call: _Call, weights: dict[str, Tensor], grads: Params, state: State, params: Params | None
) -> tuple[Params, State]:
    """The learned optimizer's update for every particle at once (what PES compiles)."""
    args = (_population_of_one(grads), state)
    if params is not None:
        args += (_population_of_one(params),)
    updates, new_state = _vmapped(call, "update", weights, *args)
    return tuple(u.squeeze(1) for u in updates), new_state


class ParticleOptimizer:
    """A learned optimizer whose weights differ per particle, as a protocol optimizer.

    Row k of the population (the leading dim of params and grads) is one particle, driven by the
    learned optimizer with ``weights[name][k]``; every tensor of the state gets a leading particle
    dim. One ``torch.func.vmap`` over ``functional_call`` runs all particles at once: no Python
    loop, for any ``nn.Module`` that implements ``init_state``/``update``. Inside, each particle
    sees params/grads with a population dim of 1, as a single optimizee. Replaying a batch of
    gradients against one state is not supported (PES never does it).

    Args:
        learned_optimizer: the module whose parameters ``weights`` replaces.
        weights: per-parameter tensors (K, *param.shape), keyed by ``named_parameters`` names.
        update_fn: :func:`particle_update` or a compiled version of it.
    """

    def __init__(
        self,
        learned_optimizer: nn.Module,
        weights: dict[str, Tensor],
        update_fn: Callable[..., tuple[Params, State]] = particle_update,
    ) -> None:
        self.module = learned_optimizer
        self.name = f"particles({getattr(learned_optimizer, 'name', 'learned')})"
        self._call = _Call(learned_optimizer)
        self._weights = {f"inner.{k}": w for k, w in weights.items()}
        self._update_fn = update_fn
        self.particles = next(iter(weights.values())).shape[0]

    def init_state(self, params: Params) -> State:
        self._check(params)
        state = _vmapped(self._call, "init_state", self._weights, _population_of_one(params))
        return tree_map(lambda t: t.contiguous() if isinstance(t, Tensor) else t, state)

    def update(
        self, grads: Params, state: State, params: Params | None = None
    ) -> tuple[Params, State]:
        self._check(grads)
        return self._update_fn(self._call, self._weights, grads, state, params)

    def _check(self, tensors: Params) -> None:
        if tensors[0].shape[0] != self.particles:
            raise ValueError(
                f"{self.particles} particles, but the population dim is {tensors[0].shape[0]}"
            )


# --------------------------------------------------------------------------- PES
class Estimate(NamedTuple):
    grads: tuple[Tensor, ...]  # the meta-gradient, one tensor per learned_optimizer.parameters()
    carry: dict  # the state to pass to the next truncation
    losses: Tensor  # (T, 2N) optimizee losses of every particle (detached), for logging
    meta_loss: Tensor  # scalar: the truncation meta-loss averaged over particles, for logging
    penalty: Tensor  # scalar: the penalty summed over the truncation, averaged over particles


class PES:
    """Antithetic Persistent Evolution Strategies over a learned optimizer's weights.

    Args:
        learned_optimizer: an ``nn.Module`` implementing the optimizer protocol
            (:mod:`l2o.optimizers`); its parameters are the weights θ. It is read, never changed.
        optimizee: the optimizee family (``loss(params, x, y) -> (P,)``, as ``inner_step``).
        pairs: antithetic pairs N on this process (2N particles). Under DDP each rank runs its
            own N pairs with its own noise; averaging the ranks' estimates gives N x world pairs.
        sigma: standard deviation σ of the perturbations (the smoothing scale of the objective).
        meta_loss: ``log`` or ``sum`` of each truncation's losses (:func:`truncation_meta_loss`).
        torch_compile: ``torch.compile`` the vmapped update of all particles (fuses the LSTM's
            gate arithmetic: ~4.7x faster per step at the study's size on a 2-core CPU, after
            ~20 s of compilation per shape).

    The carried state (``carry``) is a dict of tensors and plain data, safe for checkpoints
    loaded with ``weights_only=True``: ``params`` (2N rows), ``state`` (the learned optimizer's,
    every tensor with a leading 2N dim), ``xi`` (one (N, *shape) tensor per weight).
    """

    def __init__(
        self,
        learned_optimizer: nn.Module,
        optimizee: Any,
        pairs: int = 8,
        sigma: float = 0.01,
        meta_loss: str = "log",
        torch_compile: bool = False,
    ) -> None:
        if pairs < 1:
            raise ValueError(f"pairs must be >= 1, got {pairs}")
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if meta_loss not in META_LOSSES:
            raise ValueError(f"meta_loss must be one of {META_LOSSES}, got {meta_loss!r}")
        for method in ("init_state", "update"):
            if not callable(getattr(learned_optimizer, method, None)):
                raise TypeError(
                    f"{type(learned_optimizer).__name__} lacks {method}(): PES needs a learned "
                    "optimizer of the protocol in l2o/optimizers.py"
                )
        if not list(learned_optimizer.parameters()):
            raise ValueError("the learned optimizer has no parameters to estimate a gradient for")
        self.learned_optimizer = learned_optimizer
        self.optimizee = optimizee
        self.pairs, self.sigma, self.meta_loss = pairs, float(sigma), meta_loss
        self.torch_compile = torch_compile
        self._update_fn: Callable[..., tuple[Params, State]] = particle_update
        if torch_compile:
            from l2o.lstm import compile_options

            self._update_fn = torch.compile(
                particle_update, dynamic=False, options=compile_options()
            )

    # ------------------------------------------------------------------ carried state
    def _theta(self) -> dict[str, Tensor]:
        return {k: p.detach() for k, p in self.learned_optimizer.named_parameters()}

    def _particles(self, weights: dict[str, Tensor]) -> ParticleOptimizer:
        return ParticleOptimizer(self.learned_optimizer, weights, self._update_fn)

    def _fresh_state(self, params2: Params) -> State:
        k = params2[0].shape[0]
        theta = {n: w.expand(k, *w.shape) for n, w in self._theta().items()}
        with torch.no_grad():
            return self._particles(theta).init_state(params2)

    def init_carry(self, params: Params) -> dict:
        """Fresh carry: ``params`` (N, ...), one optimizee per pair, shared by its two particles."""
        self._check_pairs(params)
        params2 = tuple(torch.cat([p, p]) for p in params)
        xi = tuple(w.new_zeros(self.pairs, *w.shape) for w in self._theta().values())
        return {"params": params2, "state": self._fresh_state(params2), "xi": xi}

    def reset(self, carry: dict, mask: Tensor, params: Params) -> dict:
        """Restart the inner runs of the pairs in ``mask`` (N,) with optimizees ``params`` (N, ...)
        (only the masked rows are used): fresh params and state for both particles, ξ = 0."""
        self._check_pairs(params)
        mask = mask.to(device=params[0].device, dtype=torch.bool)
        if mask.shape != (self.pairs,):
            raise ValueError(f"mask must have shape ({self.pairs},), got {tuple(mask.shape)}")
        if not bool(mask.any()):
            return carry
        mask2 = torch.cat([mask, mask])
        fresh2 = tuple(torch.cat([p, p]) for p in params)
        new_params = restart_members(mask2, fresh2, carry["params"])
        new_state = restart_members(mask2, self._fresh_state(fresh2), carry["state"])
        xi = restart_members(mask, tuple(torch.zeros_like(x) for x in carry["xi"]), carry["xi"])
        return {"params": new_params, "state": new_state, "xi": xi}

    def _check_pairs(self, params: Params) -> None:
        if params[0].shape[0] != self.pairs:
            raise ValueError(
                f"PES has {self.pairs} pairs but got {params[0].shape[0]} optimizees: "
                "pass one fresh optimizee per pair (link data.population to the pairs)"
            )

    # ------------------------------------------------------------------ one truncation
    def estimate(
        self,
        carry: dict,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        penalty: Callable[[Params, Params], Tensor] | None = None,
    ) -> Estimate:
        """One truncation of ``T = len(x)`` steps for every particle, and the PES estimate.

        Args:
            carry: from :meth:`init_carry` / :meth:`reset` / the previous estimate.
            x, y: the truncation's minibatches, (T, N, B, ...) and (T, N, B): pair i's two
                particles see ``x[:, i]``.
            generator: draws the perturbations (seed it per rank and step for reproducible,
                resumable runs; its device decides where ε is drawn).
            penalty: optional extra per-step objective ``penalty(params, updates) -> (2N,)``
                (e.g. beta x the symmetry-breaking penalty), summed over steps and added to each
                particle's meta-loss.
        """
        if x.shape[1] != self.pairs or y.shape[1] != self.pairs:
            raise ValueError(
                f"batch has population {x.shape[1]}, PES {self.pairs} pairs: "
                "link data.population to the number of pairs"
            )
        n = self.pairs
        theta = self._theta()
        gen_device = generator.device if generator is not None else torch.device("cpu")
        eps = {
            k: (
                self.sigma
                * torch.randn((n, *w.shape), generator=generator, device=gen_device, dtype=w.dtype)
            ).to(w.device)
            for k, w in theta.items()
        }
        xi = tuple(a + e for a, e in zip(carry["xi"], eps.values()))
        weights = {k: torch.cat([w + eps[k], w - eps[k]]) for k, w in theta.items()}
        opt = self._particles(weights)
        params, state = carry["params"], carry["state"]
        losses: list[Tensor] = []
        extra: Tensor | float = 0.0
        with torch.no_grad():
            for t in range(x.shape[0]):
                xt = torch.cat([x[t], x[t]])
                yt = torch.cat([y[t], y[t]])
                step = inner_step(self.optimizee, opt, params, state, xt, yt, meta=False)
                if penalty is not None:
                    extra = extra + penalty(params, step.updates)
                params, state = step.params, step.state
                losses.append(step.loss)
            losses_t = torch.stack(losses)  # (T, 2N)
            meta = truncation_meta_loss(losses_t, self.meta_loss)  # (2N,)
            f = meta + extra
            diff = f[:n] - f[n:]  # (N,)
            scale = 1.0 / (2 * n * self.sigma**2)
            grads = tuple(scale * torch.tensordot(diff.to(a.dtype), a, dims=1) for a in xi)
        new_carry = {"params": params, "state": state, "xi": xi}
        pen = extra.mean() if isinstance(extra, Tensor) else meta.new_zeros(())
        return Estimate(grads, new_carry, losses_t, meta.mean(), pen)


# --------------------------------------------------------------------------- plumbing
def set_meta_gradients(
    parameters: Iterable[Tensor],
    grads: Iterable[Tensor],
    reduce_mean: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """Put an estimate into ``.grad`` (replacing it), averaged across processes first.

    ``reduce_mean`` all-reduces one flat vector (one collective per step), e.g. in a
    LightningModule under DDP ``lambda t: self.trainer.strategy.reduce(t, reduce_op="mean")``;
    then every rank holds the same gradient and its meta-optimizer step keeps ranks identical.
    """
    parameters, grads = list(parameters), list(grads)
    if len(parameters) != len(grads):
        raise ValueError(f"{len(grads)} gradients for {len(parameters)} parameters")
    flat = torch.cat([g.reshape(-1) for g in grads])
    if reduce_mean is not None:
        flat = reduce_mean(flat)
    offset = 0
    for p, g in zip(parameters, grads):
        if g.shape != p.shape:
            raise ValueError(f"gradient of shape {tuple(g.shape)} for a {tuple(p.shape)} weight")
        p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()


# --------------------------------------------------------------------------- throughput
def pes_throughput(
    pairs: int = 4,
    unroll: int = 20,
    truncations: int = 5,
    batch: int = 128,
    sizes: tuple[int, ...] = (784, 20, 10),
    device: str = "cpu",
    learned_optimizer: nn.Module | None = None,
    warmup: int = 2,
    torch_compile: bool = False,
) -> dict:
    """PES meta-training throughput on the study's setting (for ``bench/meta_train.py``).

    Times whole PES meta-steps (estimate, ``.grad``, Adam) on random MNIST-shaped data (the
    warm-up steps include compilation) and
    returns ``pes_steps_per_s``: optimizee steps per second summed over the 2N particles (the
    figure comparable to TBPTT's steps/s at population 2N), and ``peak_gpu_mb`` on CUDA.
    """
    import time

    from l2o.lstm import LSTMOptimizer
    from l2o.optimizees import MLPOptimizee

    lo = (learned_optimizer or LSTMOptimizer()).to(device)
    optimizee = MLPOptimizee(sizes=sizes)
    pes = PES(lo, optimizee, pairs=pairs, sigma=0.01, torch_compile=torch_compile)
    meta_opt = torch.optim.Adam(lo.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(unroll, pairs, batch, sizes[0], generator=gen).to(device)
    y = torch.randint(0, sizes[-1], (unroll, pairs, batch), generator=gen).to(device)
    carry = pes.init_carry(optimizee.init(pairs, gen, device=device))

    def meta_step() -> None:
        nonlocal carry
        est = pes.estimate(carry, x, y, gen)
        set_meta_gradients(lo.parameters(), est.grads)
        meta_opt.step()
        carry = est.carry

    for _ in range(warmup):
        meta_step()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(truncations):
        meta_step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {
        "pairs": pairs,
        "compile": torch_compile,
        "pes_steps_per_s": truncations * unroll * 2 * pairs / dt,
        "truncations_per_s": truncations / dt,
    }
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
