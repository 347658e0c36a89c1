"""Per-sample gradients, per-sample updates and the spectrum of their covariance.

The analysis asks how the optimizer reshapes minibatch noise: with per-sample gradients g_i and
the optimizer's per-sample updates u_i = U(g_i; state) (replayed against the *current* state,
which is not advanced), it compares

    K_update = 1/N sum_i (u_i - U(g; state)) (u_i - U(g; state))^T     (g: full-batch gradient)
    K_grad   = 1/N sum_i (g_i - g) (g_i - g)^T

through their top eigenvalue and trace. The update covariance is centred on the update of the
full-batch gradient, not on the mean of the u_i: the optimizer is nonlinear, so the two differ.

``mode="minibatch"`` is the study's definition instead: the samples are cut into disjoint
minibatches of B, and g_i, u_i are the gradient of each minibatch's mean loss and its update
(g: their mean). Without BatchNorm the minibatch gradient covariance is the per-sample one of
the same samples divided by B (up to the sample-to-sample spread); nonlinear optimizers do not
scale that way, which is why both are available.

D (15,910 for the 784-20-10 MLP) is too large for a D x D matrix, so the spectrum comes from the
N x N Gram matrix (small N) or from matrix-free Lanczos (large N); neither forms K.

``method="auto"`` (the default) takes two exact shortcuts where they apply, per-sample mode:

* an MLP without BatchNorm (``MLPOptimizee.per_sample_gram``): each layer's per-sample gradient
  is an outer product, so the gradients' Gram matrix comes from a few (N, width) GEMMs, and the
  gradient covariance from its centred spectrum (:func:`gram_spectrum`), without the (N, D)
  gradients (65 MB at N = 1,024);
* an optimizer whose update is linear in the gradient, ``c g + b`` (SGD:
  ``l2o.optimizers.linear_gain``): u_i - U(g) = c (g_i - g), so K_update = c^2 K_grad, with no
  replay.

With both (SGD on the study's MLP) no per-sample gradient is formed. ``gram`` and ``lanczos``
skip the shortcuts: the reference the tests hold them to (equal to ~1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh
from torch import Tensor

from l2o.optimizees import Optimizee, Params, grads_of
from l2o.optimizers import Optimizer, State, linear_gain, replay, replay_chunks

# The N x N Gram costs N^2 D flops, Lanczos ~50-100 matvecs of 4 N D flops: past a few hundred
# samples Lanczos wins (at N = 1,024 about 2x: README, "Benchmarks", bench/analysis.py).
GRAM_MAX_N = 512


# --------------------------------------------------------------------------- per-sample grads
def per_sample_grads(
    optimizee: Optimizee, params: Params, x: Tensor, y: Tensor, chunk_size: int | None = None
) -> Params:
    """Gradient of each sample's loss, each tensor shaped (N, P, *shape).

    Args:
        params: the optimizee's parameters, leading population dim P.
        x: (N, in), shared by the population, or (P, N, in).
        y: (N,) or (P, N).
        chunk_size: samples per vectorized call (bounds memory); None does all at once.

    Without BatchNorm a sample's loss depends on that sample only, so ``vmap(grad)`` over single
    samples is exact and cheap. With BatchNorm the batch statistics couple the samples: a batch
    of one would be wrong, so each sample's gradient is taken inside the full batch, as the
    Jacobian of the per-sample loss vector (one vector-Jacobian product per sample, vmapped).
    Either way, the mean over samples is the gradient of the batch's mean loss.
    """
    pop = params[0].shape[0]
    if x.dim() == 2:
        x = x.unsqueeze(0).expand(pop, -1, -1)
    if y.dim() == 1:
        y = y.unsqueeze(0).expand(pop, -1)
    params = tuple(p.detach() for p in params)

    if optimizee.batchnorm:
        # Summing over the population keeps each member's gradient separate (they share no
        # parameters) and leaves one output per sample: the Jacobian is (N, P, *shape).
        def batch_losses(ps: Params) -> Tensor:
            return optimizee.losses(ps, x, y).sum(0)

        return tuple(torch.func.jacrev(batch_losses, chunk_size=chunk_size)(params))

    def sample_loss(ps: Params, xi: Tensor, yi: Tensor) -> Tensor:
        # xi (P, in), yi (P,): one sample per member, a batch of one.
        return optimizee.losses(ps, xi.unsqueeze(-2), yi.unsqueeze(-1)).sum()

    per_sample = torch.func.vmap(
        torch.func.grad(sample_loss), in_dims=(None, 1, 1), chunk_size=chunk_size
    )
    return tuple(per_sample(params, x, y))


def minibatch_grads(
    optimizee: Optimizee,
    params: Params,
    xb: Tensor,
    yb: Tensor,
    chunk_size: int | None = None,
) -> Params:
    """Gradient of each minibatch's mean loss: ``xb (n, B, D), yb (n, B)`` -> tuple of ``(n, *p)``.

    ``params`` are the meta-test optimizee's ``(1, ...)`` tensors. One vectorized call
    (``torch.func.vmap`` of ``torch.func.grad`` over minibatches); with BatchNorm each minibatch
    normalises with its own batch statistics, exactly as in the training step.
    """
    params = tuple(p.detach() for p in params)

    def loss_of(ps: Params, x: Tensor, y: Tensor) -> Tensor:
        return optimizee.loss(ps, x.unsqueeze(0), y.unsqueeze(0)).sum()

    with torch.enable_grad():
        grad_fn = torch.func.vmap(
            torch.func.grad(loss_of), in_dims=(None, 0, 0), chunk_size=chunk_size
        )
        return tuple(g.detach() for g in grad_fn(params, xb, yb))


# --------------------------------------------------------------------------- spectrum
def update_covariance(
    updates: Tensor,
    center: Tensor | None = None,
    method: str = "auto",
    gram_max_n: int = GRAM_MAX_N,
) -> dict:
    """Top eigenvalue and trace of K = 1/N sum_i (u_i - center)(u_i - center)^T.

    Args:
        updates: (N, D), or (N, ...) flattened to that.
        center: (D,) e.g. the full-batch update; None means the mean of the u_i.
        method: ``gram`` (eigvalsh of the N x N matrix A A^T / N, exact), ``lanczos`` (ARPACK
            on A^T A / N, matrix-free, one pass over A per product), or ``auto``:
            gram when N <= gram_max_n, else lanczos.

    Returns ``{"top_eig", "trace", "method", "num_samples", "dim"}``. K's nonzero eigenvalues
    equal those of A A^T / N (A = rows u_i - center), so the D x D matrix is never formed.
    """
    n = updates.shape[0]
    a = updates.detach().reshape(n, -1)
    dim = a.shape[1]
    c = a.mean(0) if center is None else center.reshape(-1).to(a.dtype)
    if c.numel() != dim:
        raise ValueError(f"center has {c.numel()} entries, updates have {dim} per sample")
    return _spectrum(a - c, method, gram_max_n)  # a copy: the caller's updates stay intact


def _spectrum(a: Tensor, method: str = "auto", gram_max_n: int = GRAM_MAX_N) -> dict:
    """:func:`update_covariance` of the rows ``a`` (N, D), already centred."""
    n, dim = a.shape
    # Trace = ||A||_F^2 / N, accumulated in float64 a block of rows at a time (no big upcast:
    # blocks of ~2 MB, small enough for the allocator to reuse, not map, their memory).
    step = max(1, 2**18 // max(1, dim))
    trace = sum(float(a[s : s + step].double().square().sum()) for s in range(0, n, step)) / n
    if method == "auto":
        method = "gram" if n <= gram_max_n else "lanczos"
    if method not in ("gram", "lanczos"):
        raise ValueError(f"method must be 'auto', 'gram' or 'lanczos', got {method!r}")
    if trace == 0.0:
        top = 0.0
    elif method == "gram" or min(n, dim) < 3:  # ARPACK needs k < size - 1
        top = _or_nan(trace, lambda: float(torch.linalg.eigvalsh((a @ a.t()).double() / n)[-1]))
    else:
        top = _or_nan(trace, lambda: _lanczos_top(a))
    return {"top_eig": top, "trace": trace, "method": method, "num_samples": n, "dim": dim}


def _or_nan(trace: float, top) -> float:
    """``top()``, or NaN where the rows overflow (a diverging optimizee): a non-finite trace,
    or an eigensolver that fails on them. The analysis logs NaN and the run goes on."""
    if not math.isfinite(trace):
        return math.nan
    try:
        value = top()
    except (ArpackError, torch.linalg.LinAlgError):
        return math.nan
    return value if math.isfinite(value) else math.nan


# Lanczos vectors ARPACK keeps (its ncv). Its default, 20 for one eigenvalue, spends 21 matvecs
# where 8 converge to the same tolerance in 9 on the study's covariances (the top eigenvalue is
# well separated: lambda_2 / lambda_1 ~ 0.06-0.23); a smaller gap restarts, still converging.
LANCZOS_NCV = 8


# Bytes of rows per block of the one-pass matrix-vector product (32 rows of the 784-20-10 MLP's
# 15,910 float32 coordinates): small enough that a block read for A_b u is still in cache for
# A_b^T (A_b u).
LANCZOS_BLOCK_BYTES = 2**21


def _lanczos_top(a: Tensor) -> float:
    """Largest eigenvalue of A^T A / N by implicitly restarted Lanczos (ARPACK), matrix-free.

    The operator is A^T A / N on R^D, applied in one pass over A: block by block of rows,
    ``A_b u`` and then ``A_b^T (A_b u)`` while the block is in cache. A A^T / N on R^N has the
    same nonzero spectrum, but each of its products reads the whole of A twice (``A (A^T v)``),
    and the (N, D) rows do not fit in cache (65 MB at N = 1,024): the one pass was 1.5x faster
    there (52 vs 82 ms, the same eigenvalue to 2e-7).
    """
    n, dim = a.shape
    dtype = np.float32 if a.dtype == torch.float32 else np.float64
    work = a if a.dtype in (torch.float32, torch.float64) else a.double()
    rows = max(1, LANCZOS_BLOCK_BYTES // (dim * work.element_size()))

    def matvec(u: np.ndarray) -> np.ndarray:
        u = torch.from_numpy(np.ascontiguousarray(u, dtype=dtype).reshape(-1)).to(work.device)
        out = torch.zeros(dim, dtype=work.dtype, device=work.device)
        for start in range(0, n, rows):
            block = work[start : start + rows]
            out.addmv_(block.t(), block @ u)
        return (out / n).cpu().numpy()

    return _arpack_top(matvec, dim, dtype)


def _arpack_top(matvec, dim: int, dtype) -> float:
    """Largest eigenvalue of the symmetric operator ``matvec`` on R^dim (ARPACK, seeded)."""
    op = LinearOperator((dim, dim), matvec=matvec, dtype=dtype)
    v0 = np.random.default_rng(0).standard_normal(dim).astype(dtype)  # reproducible start
    ncv = min(LANCZOS_NCV, dim)
    vals = eigsh(op, k=1, which="LA", v0=v0, ncv=ncv, return_eigenvectors=False)
    return float(vals[0])


def gram_spectrum(gram: Tensor, dim: int | None = None) -> dict:
    """:func:`update_covariance` of rows known only through their Gram matrix
    ``G_ij = <g_i, g_j>`` (N x N), centred on their mean; ``dim``: their length D, reported.

    With H = I - 11^T / N the centring, K's nonzero spectrum is that of H G H / N, and
    ``trace K = (trace G - N mean(G)) / N``. Float64 throughout; H G H is applied, never formed
    (``v -> H G H v`` is one product with G). Small N: eigvalsh of H G H, exact.
    """
    n = gram.shape[-1]
    g = gram.detach().reshape(n, n).double()
    trace = float(torch.diagonal(g).sum() - n * g.mean()) / n
    if trace == 0.0:
        top = 0.0
    elif n <= GRAM_EIGVALSH_N:
        centred = g - g.mean(0, keepdim=True) - g.mean(1, keepdim=True) + g.mean()
        top = _or_nan(trace, lambda: float(torch.linalg.eigvalsh(centred / n)[-1]))
    else:

        def matvec(v: np.ndarray) -> np.ndarray:
            v = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1))
            w = g @ (v - v.mean())
            return ((w - w.mean()) / n).numpy()

        top = _or_nan(trace, lambda: _arpack_top(matvec, n, np.float64))
    return {"top_eig": top, "trace": trace, "method": "kronecker", "num_samples": n, "dim": dim}


# Below this N the centred Gram's eigvalsh is as quick as ARPACK (float64, 2-core CPU).
GRAM_EIGVALSH_N = 128

# The Kronecker Gram costs ~N^2 (sum of layer widths) flops and N^2 float64s, the rows' route
# ~N D: past ~10,000 samples of the 784-20-10 MLP the rows are cheaper. Measured with SGD on an
# Intel Xeon (2 threads): 27 vs 293 ms at N = 1,024, 291 vs 1,200 at 4,096, 468 vs 1,059 at 4,992.
KRONECKER_MAX_N = 8192


# --------------------------------------------------------------------------- the analysis
def flatten(tensors: Params) -> Tensor:
    """(N, *shape_k) tensors -> (N, D), coordinates in parameter order."""
    n = tensors[0].shape[0]
    return torch.cat([t.reshape(n, -1) for t in tensors], dim=1)


def centred_rows(tensors: Params, center: Params, out: Tensor | None = None) -> Tensor:
    """``flatten(tensors) - flatten(center)`` (center: one ``(1, *shape_k)`` or ``(*shape_k)``
    tensor per ``tensors``' ``(N, *shape_k)``), written tensor by tensor into ``out`` (N, D)
    when its shape, dtype and device fit, else into a new tensor.

    The same float arithmetic as flattening then subtracting, in one pass and without the
    intermediate copy: for N = 1,024 per-sample gradients of the 784-20-10 MLP each (N, D)
    copy is 65 MB, and a fresh allocation of that size costs more in page faults than the
    subtraction itself (~8x on the study's CPU), so callers keep ``out`` between steps.
    """
    n = tensors[0].shape[0]
    sizes = [t[0].numel() for t in tensors]
    dim, dtype, device = sum(sizes), tensors[0].dtype, tensors[0].device
    if out is None or out.shape != (n, dim) or out.dtype != dtype or out.device != device:
        out = torch.empty(n, dim, dtype=dtype, device=device)
    start = 0
    for t, c, size in zip(tensors, center, sizes, strict=True):
        c = c.reshape(1, size).to(dtype)
        torch.sub(t.reshape(n, size), c, out=out[:, start : start + size])
        start += size
    return out


MODES = ("per_sample", "minibatch")


def covariance_analysis(
    optimizee: Optimizee,
    opt: Optimizer,
    state: State,
    params: Params,
    x: Tensor,
    y: Tensor,
    chunk_size: int | None = None,
    method: str = "auto",
    mode: str = "per_sample",
    batch_size: int | None = None,
    per_sample: Params | Callable[[], Params] | None = None,
    workspace: dict | None = None,
) -> dict:
    """Covariance spectra of per-sample (or minibatch) updates and gradients at one step.

    Args:
        params: one optimizee (P = 1).
        x, y: the samples, (N, in) and (N,) (or with the leading P = 1).
        chunk_size: samples (minibatches) per vectorized call for the gradients and the
            optimizer replay; None picks a memory-bounded default.
        method: see :func:`update_covariance`; ``auto`` also takes the exact shortcuts of
            the module docstring.
        mode: ``per_sample`` (one gradient per sample) or ``minibatch`` (the study's: the first
            ``N // batch_size * batch_size`` samples cut, in order, into disjoint minibatches of
            ``batch_size``, one gradient per minibatch's mean loss; at least 2 minibatches).
        batch_size: B of ``minibatch`` mode (required there, ignored otherwise).
        per_sample: the per-sample gradients of ``x``, ``y`` at ``params`` where the caller
            has them, or a function that returns them, called only if they are needed
            (``callbacks.base.per_sample_grads_cached``; only read); ``per_sample`` mode only.
        workspace: a dict the caller keeps between calls: the (N, D) rows are written into
            the buffer it holds (a fresh 65 MB tensor per step costs more than its arithmetic).

    The state is only read. Updates are centred on the update of the full-batch gradient under
    the same state, gradients on the full-batch gradient. In ``minibatch`` mode the full-batch
    gradient is the mean of the minibatch gradients (with BatchNorm: of minibatches normalised
    with their own statistics, as in training), and its update rides along in the same replay.
    Returns ``update_top_eig``, ``update_trace``, ``grad_top_eig``, ``grad_trace``,
    ``num_samples`` (covariance samples: N, or the number of minibatches), ``dim``, ``method``
    and ``mode``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if params[0].shape[0] != 1:
        raise ValueError(
            f"covariance_analysis takes one optimizee (P = 1), got {params[0].shape[0]}"
        )
    x = x.reshape(1, *x.shape[-2:])
    y = y.reshape(1, -1)
    if mode == "minibatch":
        return _minibatch_covariance(
            optimizee, opt, state, params, x[0], y[0], chunk_size, method, batch_size
        )
    n = x.shape[1]
    if optimizee.batchnorm and chunk_size is None:
        chunk_size = batchnorm_chunk(n)
    workspace = {} if workspace is None else workspace
    # method="auto" takes the exact shortcuts (see the module docstring); gram and lanczos
    # always form the (N, D) rows: the reference the shortcuts are tested against.
    gain = linear_gain(opt, state) if method == "auto" else None
    gram_of = getattr(optimizee, "per_sample_gram", None)
    if method != "auto" or optimizee.batchnorm or n > KRONECKER_MAX_N:
        gram_of = None

    def grads() -> Params:
        if per_sample is None:
            return per_sample_grads(optimizee, params, x, y, chunk_size=chunk_size)
        return per_sample() if callable(per_sample) else per_sample

    with torch.no_grad():
        # The full-batch gradient centres the rows; with both shortcuts no row is formed.
        full_grad = None
        if gram_of is None or gain is None:
            _, full_grad = grads_of(optimizee.loss, params, x, y)
        g, rows = None, workspace.get("rows")
        if gram_of is not None:
            grad_cov = gram_spectrum(gram_of(params, x, y), optimizee.num_params)
        else:
            # One (N, D) buffer for both: the gradients' rows, centred, then the updates'.
            g = grads()
            rows = centred_rows(g, full_grad, rows)
            grad_cov = _spectrum(rows, method)
        if gain is not None:  # u_i - U(g) = gain (g_i - g): K_update = gain^2 K_grad
            upd_cov = {
                **grad_cov,
                "top_eig": gain**2 * grad_cov["top_eig"],
                "trace": gain**2 * grad_cov["trace"],
            }
        else:
            full_update, _ = opt.update(full_grad, state, params)  # new state discarded
            g = grads() if g is None else g
            rows = replay_rows(opt, g, state, params, full_update, rows, chunk_size)
            upd_cov = _spectrum(rows, method)
            workspace["rows"] = rows
        del g  # the caller's cache may keep its copy
    return _result(upd_cov, grad_cov, mode)


def replay_rows(
    opt: Optimizer,
    grads: Params,
    state: State,
    params: Params,
    center: Params,
    out: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``centred_rows(replay(opt, grads, state, params, chunk_size), center, out)``.

    Without an optimizer's own ``replay``, the chunks of ``l2o.optimizers.chunked_replay``
    (the same ``opt.update`` calls) are centred straight into ``out``: no (N, D) update tensor
    and no concatenation of the chunks.
    """
    if getattr(opt, "replay", None) is not None:
        return centred_rows(replay(opt, grads, state, params, chunk_size), center, out)
    n = grads[0].shape[0]
    for start, updates in replay_chunks(opt, grads, state, params, chunk_size):
        if start == 0:  # the buffer as centred_rows would take it, for all N rows
            dim = sum(u[0].numel() for u in updates)
            like = (n, dim, updates[0].dtype, updates[0].device)
            if out is None or (*out.shape, out.dtype, out.device) != like:
                out = torch.empty(n, dim, dtype=like[2], device=like[3])
        centred_rows(updates, center, out[start : start + updates[0].shape[0]])
    return out


def batchnorm_chunk(n: int) -> int:
    """Default samples per vectorized call with BatchNorm: jacrev's vmapped backward holds
    ~chunk x batch temporaries."""
    return max(1, 2**16 // n)


def _minibatch_covariance(optimizee, opt, state, params, x, y, chunk_size, method, batch_size):
    if batch_size is None or batch_size < 1:
        raise ValueError(f"mode='minibatch' needs batch_size >= 1, got {batch_size}")
    n = x.shape[0] // batch_size
    if n < 2:
        raise ValueError(
            f"mode='minibatch': {x.shape[0]} samples make {n} minibatch(es) of {batch_size}; "
            "a covariance needs at least 2"
        )
    xb = x[: n * batch_size].reshape(n, batch_size, -1)
    yb = y[: n * batch_size].reshape(n, batch_size)
    with torch.no_grad():
        g = minibatch_grads(optimizee, params, xb, yb, chunk_size)
        full = tuple(t.mean(dim=0) for t in g)
        # The full-batch gradient's update is the last row of one replay: every update takes
        # the same arithmetic path (see callbacks.tail_index.TailIndex.compute).
        both = tuple(torch.cat([t, f.unsqueeze(0)]) for t, f in zip(g, full))
        u_flat = flatten(replay(opt, both, state, params, chunk_size=chunk_size))
        g_flat = flatten(g)
        del g
        grad_cov = update_covariance(g_flat, flatten(full)[0], method)
        del g_flat
        upd_cov = update_covariance(u_flat[:-1], u_flat[-1], method)
    return _result(upd_cov, grad_cov, "minibatch")


def _result(upd_cov: dict, grad_cov: dict, mode: str) -> dict:
    return {
        "update_top_eig": upd_cov["top_eig"],
        "update_trace": upd_cov["trace"],
        "grad_top_eig": grad_cov["top_eig"],
        "grad_trace": grad_cov["trace"],
        "num_samples": upd_cov["num_samples"],
        "dim": upd_cov["dim"],
        "method": upd_cov["method"],
        "mode": mode,
    }
