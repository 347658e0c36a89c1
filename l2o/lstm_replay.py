"""The fast replay of the LSTM optimizer: its updates of a batch of gradients under one state.

``LSTMOptimizer.replay`` (the optional ``replay`` of the optimizer protocol, used by
``l2o.optimizers.replay``) lands here. Same arithmetic as ``LSTMOptimizer.update`` on a batch,
several times faster, because it exploits what a replay shares:

* the recurrent half of every gate, ``W_hh h + b``, is computed once per coordinate's state
  instead of once per replayed gradient;
* an exactly-zero gradient coordinate (a blank MNIST pixel's weights: ~80% of a sample's
  coordinates) gets the update of 0, computed once per coordinate;
* the nonzero values are packed per coordinate, so that each coordinate's state is broadcast,
  never gathered per value.

Why a second spelling of the cell (:func:`_lstm_rows`) must stay beside ``l2o.lstm.lstm_cell``:
those three savings need a *feature-major* layout, ``(4H, rows, coordinates)``, where each
coordinate's state is a column broadcast over its rows, layer 0's two input features are two
broadcast FMAs instead of a K = 2 matmul, and tanh is taken through one sigmoid over all gates
(``tanh z = 2 sigmoid(2z) - 1``; torch's CPU tanh is ~10x slower than its sigmoid). The
row-major cell cannot express that without the gathers and copies that the replay avoids
(12.7x the loop of ``update`` calls, ``bench/analysis.py``). ``tests/test_lstm.py`` pins
``_lstm_rows`` to ``lstm_cell`` and to ``torch.lstm_cell``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from l2o.optimizers import Params, State

BLOCK_ROWS = 2**13  # rows per block: the (4H, rows) gate temporaries stay in cache
MIN_WIDTH = 256  # coordinates per block, at least
DENSE_FRACTION = 0.8  # coordinates nonzero in this share of samples or more skip the packing
SAMPLE_CHUNK = 2048  # samples per packing (bounds its index tensors)


@torch.no_grad()
def replay_lstm(opt: nn.Module, grads: Params, state: State, preprocess_parts) -> Params:
    """``opt.update`` of each gradient of a batch (leading dim N) under one state, detached.

    ``opt`` is an ``l2o.lstm.LSTMOptimizer`` and ``preprocess_parts`` is
    :func:`l2o.lstm.preprocess_parts` (passed in: this module sits below ``l2o.lstm``).
    """
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
                    preprocess_parts,
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
    # Flat indices: 1-D index_select / index_copy_ move the values ~2-3x faster than indexing
    # with two index tensors (~3 M values per 1,024 MNIST samples).
    src = sample * coords + coord
    dst = slot * width + col
    del sample, coord, slot, col
    packed = flat.new_zeros(heights[0], width)
    packed.view(-1).index_copy_(0, dst, flat.reshape(-1).index_select(0, src))
    updates = replay_columns(packed, order[:width], heights)
    out.view(-1).index_copy_(0, src, updates.view(-1).index_select(0, dst))


def _lstm_rows(
    g: Tensor,
    hw: list[Tensor],
    cs: list[Tensor],
    w_ih: list[Tensor],
    head: tuple[Tensor, Tensor],
    p: float,
    output_scale: float,
    preprocess_parts,
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
