"""Per-sample gradients, per-sample updates and the spectrum of their covariance.

The analysis asks how the optimizer reshapes minibatch noise: with per-sample gradients g_i and
the optimizer's per-sample updates u_i = U(g_i; state) (replayed against the *current* state,
which is not advanced), it compares

    K_update = 1/N sum_i (u_i - U(g; state)) (u_i - U(g; state))^T     (g: full-batch gradient)
    K_grad   = 1/N sum_i (g_i - g) (g_i - g)^T

through their top eigenvalue and trace. The update covariance is centred on the update of the
full-batch gradient, not on the mean of the u_i: the optimizer is nonlinear, so the two differ.

D (15,910 for the 784-20-10 MLP) is too large for a D x D matrix, so the spectrum comes from the
N x N Gram matrix (small N) or from matrix-free Lanczos (large N); neither forms K.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor

from l2o.lstm import LSTMOptimizer, preprocess_parts
from l2o.optimizees import MLPOptimizee, Params, grads_of
from l2o.optimizers import Optimizer, State, replay

# The N x N Gram costs N^2 D flops, Lanczos ~50-100 matvecs of 4 N D flops: past a few hundred
# samples Lanczos wins (N = 1024, D = 15,910: 0.14 s against 0.47 s on a 2-core CPU).
GRAM_MAX_N = 512
ROW_BUDGET = 2**18  # LSTM rows (sample x coordinate) per protocol replay call: ~0.5 GB temps
BLOCK_ROWS = 2**13  # rows per block of the fast LSTM path: its temporaries stay in cache
MIN_WIDTH = 256  # coordinates per block of the fast LSTM path, at least
DENSE_FRACTION = 0.8  # coordinates nonzero in this share of samples or more skip the packing
SAMPLE_CHUNK = 2048  # samples per packing of the fast LSTM path (bounds its index tensors)


# --------------------------------------------------------------------------- per-sample grads
def per_sample_grads(
    optimizee: MLPOptimizee, params: Params, x: Tensor, y: Tensor, chunk_size: int | None = None
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


# --------------------------------------------------------------------------- per-sample updates
def per_sample_updates(
    opt: Optimizer,
    grads: Params,
    state: State,
    params: Params | None = None,
    chunk_size: int | None = None,
    fast: bool = True,
) -> Params:
    """The optimizer's update of each gradient in a batch (leading dim N), state not advanced.

    This is :func:`l2o.optimizers.replay` with a memory-bounded default chunk. For the plain
    :class:`~l2o.lstm.LSTMOptimizer` and ``fast=True`` it takes a specialised path with the same
    arithmetic (tested against the protocol) that exploits what a replay shares: the recurrent
    half of every gate, W_hh h + b, is computed once per state instead of once per sample, and an
    exactly-zero gradient coordinate (e.g. a blank MNIST pixel's weights) gets the update of 0,
    computed once per coordinate; the nonzero values are packed per coordinate so that each
    coordinate's state is broadcast, never gathered per value. The fast path returns detached
    updates (an analysis, not meta-training).
    """
    n_coords = sum(g[0].numel() for g in grads)
    if fast and _plain_lstm(opt, state):
        return _lstm_per_sample(opt, grads, state)
    if chunk_size is None:
        chunk_size = max(1, ROW_BUDGET // max(1, n_coords))
    return replay(opt, grads, state, params, chunk_size)


def _plain_lstm(opt: Optimizer, state: State) -> bool:
    """True when the fast path reproduces ``opt.update`` (an unmodified LSTMOptimizer)."""
    return (
        type(opt) is LSTMOptimizer
        and isinstance(state, dict)
        and {"h", "c", "shapes"} <= set(state)
        and all(type(c) is torch.nn.LSTMCell for c in opt.cells)
    )


@torch.no_grad()
def _lstm_per_sample(opt: LSTMOptimizer, grads: Params, state: State) -> Params:
    n = grads[0].shape[0]
    shapes = state["shapes"]
    flat = torch.cat([g.reshape(n, -1) for g in grads], dim=1)  # (N, coords)
    coords, hidden, dtype = flat.shape[1], opt.hidden_size, flat.dtype
    # Feature-major layout (features, coords): each gate is a contiguous slab and the elementwise
    # work vectorizes along coordinates. hw[l] = W_hh h_l + b_ih + b_hh is shared by all samples.
    # The cell-input gate's rows are doubled so that one sigmoid over all gates also gives
    # tanh(z) = 2 sigmoid(2z) - 1 (torch's CPU tanh is ~10x slower than its sigmoid).
    double_g = torch.ones(4 * hidden, 1, dtype=dtype, device=flat.device)
    double_g[2 * hidden : 3 * hidden] = 2.0
    hw, cs, w_ih = [], [], []
    for layer, cell in enumerate(opt.cells):
        b = (cell.bias_ih + cell.bias_hh).to(dtype)[:, None]
        rec = torch.addmm(b, cell.weight_hh.to(dtype), state["h"][layer].to(dtype).t())
        hw.append(rec * double_g)
        cs.append((2 * state["c"][layer].to(dtype)).t().contiguous())  # 2c: see _lstm_rows
        w_ih.append(cell.weight_ih.to(dtype) * double_g)
    head = (opt.head.weight.to(dtype), opt.head.bias.to(dtype))

    def replay_columns(vals: Tensor, cols: Tensor, heights: list[int]) -> Tensor:
        """Overwrite vals (K, m), gradient values at coordinates cols, with their updates.

        Column j only needs its first heights[j] rows (heights non-increasing). Blocks of
        ~BLOCK_ROWS values keep the (4H, rows) gate temporaries in cache; they are at least
        MIN_WIDTH columns wide because the elementwise kernels vectorize along columns (8 wide
        is ~2x slower than 256 wide). Each column's state is broadcast over its rows.
        """
        hw_c, cs_c = [t[:, cols] for t in hw], [t[:, cols] for t in cs]
        start, m = 0, vals.shape[1]
        while start < m and heights[start] > 0:
            k = heights[start]
            stop = min(m, start + max(MIN_WIDTH, BLOCK_ROWS // k))
            block = slice(start, stop)
            kc = max(1, BLOCK_ROWS // (stop - start))
            for r in range(0, k, kc):
                vals[r : r + kc, block] = _lstm_rows(
                    vals[r : r + kc, block],
                    [t[:, block] for t in hw_c],
                    [t[:, block] for t in cs_c],
                    w_ih,
                    head,
                    opt.preprocess_p,
                    opt.output_scale,
                )
            start = stop
        return vals

    # The update of a zero gradient, per coordinate: computed once, copied where g == 0 (a blank
    # MNIST pixel's weights: ~80% of a sample's coordinates).
    everything = torch.arange(coords, device=flat.device)
    out = replay_columns(flat.new_zeros(1, coords), everything, [1] * coords)
    out = out.expand(n, coords).contiguous()

    # Samples a chunk at a time: the packing's index tensors stay ~0.3 GB at most.
    for s in range(0, n, SAMPLE_CHUNK):
        _replay_nonzero(flat[s : s + SAMPLE_CHUNK], out[s : s + SAMPLE_CHUNK], replay_columns)
    sizes = [math.prod(shape) for shape in shapes]
    return tuple(
        u.reshape(n, *shape) for u, shape in zip(out.split(sizes, dim=1), shapes, strict=True)
    )


def _replay_nonzero(flat: Tensor, out: Tensor, replay_columns) -> None:
    """Write into out (k, coords) the updates of the nonzero entries of flat (k, coords)."""
    n, coords = flat.shape
    nonzero = flat != 0
    counts = nonzero.sum(0)
    # Mostly-nonzero coordinates (biases, the output layer, central pixels): replayed densely,
    # zeros included. Below DENSE_FRACTION nonzero, packing saves more than it costs (measured
    # on MNIST gradients: 0.8 was the best threshold of 0.3-1).
    dense = counts >= DENSE_FRACTION * n
    cols = dense.nonzero()[:, 0]
    if len(cols):
        out[:, cols] = replay_columns(flat[:, cols], cols, [n] * len(cols))

    # The rest, packed per coordinate ("ELL" layout): column j of `packed` holds coordinate
    # order[j]'s nonzero values in its first counts[j] rows, columns sorted by count. Blocks of
    # columns of similar counts are then dense problems, with no per-value gather of the LSTM
    # state and no work on the zeros beyond a block's padding (~1% on MNIST).
    nz = (nonzero & ~dense).t().contiguous()  # (coords, k)
    del nonzero
    coord, sample = nz.nonzero(as_tuple=True)  # coordinate-major: each coordinate's run
    if not len(coord):
        return
    counts = torch.bincount(coord, minlength=coords)
    slot = torch.arange(len(coord), device=flat.device) - (counts.cumsum(0) - counts)[coord]
    order = torch.argsort(counts, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(coords, device=flat.device)
    col = rank[coord]
    heights = counts[order]
    width = int((heights > 0).sum())  # columns past this one hold no nonzero
    heights = heights[:width].tolist()
    packed = flat.new_zeros(heights[0], width)
    packed[slot, col] = flat[sample, coord]
    out[sample, coord] = replay_columns(packed, order[:width], heights)[slot, col]


def _lstm_rows(
    g: Tensor,
    hw: list[Tensor],
    cs: list[Tensor],
    w_ih: list[Tensor],
    head: tuple[Tensor, Tensor],
    p: float,
    output_scale: float,
) -> Tensor:
    """The LSTM optimizer's output for g (k, m), given per coordinate hw[l] (4H, m) (cell-input
    rows doubled) and 2 c[l] (H, m). Mathematically torch.lstm_cell's arithmetic; float32
    rounding differs by ~1e-7 (tanh is taken through sigmoid)."""
    k, m = g.shape
    hidden = cs[0].shape[0]
    # Two contiguous features, not stacked: broadcasting a strided operand is ~6x slower in
    # TensorIterator.
    x0, x1 = preprocess_parts(g, p)
    inp = x0  # layer 0 reads x0, x1 instead
    for layer, (rec, c_prev, w) in enumerate(zip(hw, cs, w_ih)):
        rec = rec.view(4 * hidden, 1, m)
        if layer == 0:  # two input features: two broadcast FMAs beat a K = 2 matmul ~4x
            gates = torch.addcmul(rec, w[:, :1, None], x0)
            gates.addcmul_(w[:, 1:, None], x1)
        else:
            gates = (w @ inp).view(4 * hidden, k, m).add_(rec)
        i, f, g2, o = gates.sigmoid_().view(4, hidden, k, m).unbind(0)  # lstm_cell's order
        # With s_g = sigmoid(2g) and c_prev stored as 2c: 2c' = f 2c + 4 i s_g - 2 i, and
        # h = o tanh(c') = 2 o sigmoid(2c') - o. Fewer passes than spelling out the tanh's.
        c2 = f * c_prev.view(hidden, 1, m)
        c2.addcmul_(i, g2, value=4).sub_(i, alpha=2)
        h = torch.mul(o, c2.sigmoid_())
        inp = h.mul_(2).sub_(o).view(hidden, k * m)
    return torch.addmm(head[1][:, None], head[0], inp).view(k, m).mul_(output_scale)


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
            on A^T A / N or A A^T / N, whichever side is smaller, matrix-free), or ``auto``:
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
    a = a - c  # a copy: the caller's updates stay intact
    # Trace = ||A||_F^2 / N, accumulated in float64 a block of rows at a time (no big upcast).
    step = max(1, 2**22 // max(1, dim))
    trace = sum(float(a[s : s + step].double().square().sum()) for s in range(0, n, step)) / n
    if method == "auto":
        method = "gram" if n <= gram_max_n else "lanczos"
    if method not in ("gram", "lanczos"):
        raise ValueError(f"method must be 'auto', 'gram' or 'lanczos', got {method!r}")
    if trace == 0.0:
        top = 0.0
    elif method == "gram" or min(n, dim) < 3:  # ARPACK needs k < size - 1
        top = float(torch.linalg.eigvalsh((a @ a.t()).double() / n)[-1])
    else:
        top = _lanczos_top(a)
    return {"top_eig": top, "trace": trace, "method": method, "num_samples": n, "dim": dim}


def _lanczos_top(a: Tensor) -> float:
    """Largest eigenvalue of A^T A / N by implicitly restarted Lanczos (ARPACK), matrix-free.

    The operator works on the smaller side (R^N as A A^T / N, or R^D as A^T A / N): same nonzero
    spectrum, shorter Lanczos vectors. Each matvec is two GEMVs in torch, in A's dtype.
    """
    n, dim = a.shape
    size = min(n, dim)
    dtype = np.float32 if a.dtype == torch.float32 else np.float64
    work = a if a.dtype in (torch.float32, torch.float64) else a.double()

    def matvec(v: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(v, dtype=dtype).reshape(-1)).to(work.device)
        if n <= dim:
            out = work @ (work.t() @ v)
        else:
            out = work.t() @ (work @ v)
        return (out / n).cpu().numpy()

    op = LinearOperator((size, size), matvec=matvec, dtype=dtype)
    v0 = np.random.default_rng(0).standard_normal(size).astype(dtype)  # reproducible start
    vals = eigsh(op, k=1, which="LA", v0=v0, return_eigenvectors=False)
    return float(vals[0])


# --------------------------------------------------------------------------- the analysis
def flatten(tensors: Params) -> Tensor:
    """(N, *shape_k) tensors -> (N, D), coordinates in parameter order."""
    n = tensors[0].shape[0]
    return torch.cat([t.reshape(n, -1) for t in tensors], dim=1)


def covariance_analysis(
    optimizee: MLPOptimizee,
    opt: Optimizer,
    state: State,
    params: Params,
    x: Tensor,
    y: Tensor,
    chunk_size: int | None = None,
    method: str = "auto",
) -> dict:
    """Covariance spectra of per-sample updates and per-sample gradients at one step.

    Args:
        params: one optimizee (P = 1).
        x, y: the batch, (N, in) and (N,) (or with the leading P = 1).
        chunk_size: samples per vectorized call for the gradients' Jacobian (BatchNorm) and the
            optimizer replay; None picks a memory-bounded default.
        method: see :func:`update_covariance`.

    The state is only read. Per-sample updates are centred on the update of the full-batch
    gradient under the same state; per-sample gradients on the full-batch gradient.
    Returns ``update_top_eig``, ``update_trace``, ``grad_top_eig``, ``grad_trace``,
    ``num_samples``, ``dim`` and the ``method`` used.
    """
    if params[0].shape[0] != 1:
        raise ValueError(
            f"covariance_analysis takes one optimizee (P = 1), got {params[0].shape[0]}"
        )
    x = x.reshape(1, *x.shape[-2:])
    y = y.reshape(1, -1)
    n = x.shape[1]
    if optimizee.batchnorm and chunk_size is None:
        chunk_size = max(1, 2**16 // n)  # jacrev's vmapped backward holds ~chunk x batch temps
    with torch.no_grad():
        _, full_grad = grads_of(optimizee.loss, params, x, y)
        full_update, _ = opt.update(full_grad, state, params)  # new state discarded
        g = per_sample_grads(optimizee, params, x, y, chunk_size=chunk_size)
        u = per_sample_updates(opt, g, state, params, chunk_size=chunk_size)
        g_flat = flatten(g)
        del g  # keep one copy of the N x D gradients
        u_flat = flatten(u)
        del u
        grad_cov = update_covariance(g_flat, flatten(full_grad)[0], method)
        del g_flat
        upd_cov = update_covariance(u_flat, flatten(full_update)[0], method)
    return {
        "update_top_eig": upd_cov["top_eig"],
        "update_trace": upd_cov["trace"],
        "grad_top_eig": grad_cov["top_eig"],
        "grad_trace": grad_cov["trace"],
        "num_samples": n,
        "dim": upd_cov["dim"],
        "method": upd_cov["method"],
    }
