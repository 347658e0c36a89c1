"""The learned optimizer of Andrychowicz et al. (2016): a coordinatewise two-layer LSTM.

Every coordinate of every parameter tensor is one row of a single batched LSTM call, with its own
hidden state and shared weights: no Python loop over tensors or coordinates. It implements the
optimizer protocol of :mod:`l2o.optimizers`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from l2o.lstm_replay import replay_lstm
from l2o.optimizers import Params, State, chunked_replay
from l2o.trees import tree_map

# Inductor's CPU tanh (Sleef) is the slowest op of the fused gate kernels. Its exp form
# 2 / (1 + exp(-2x)) - 1 differs from torch.tanh by at most 2e-7 absolute (no overflow at
# +-inf) and makes compiled meta-training ~10% faster on a 2-core CPU (bench/meta_train.py).
# Set for this compile only, not globally; GPU (Triton) code ignores it. Torch < 2.8 has no such
# option (its CPU tanh was the exp form already) and would reject it.
COMPILE_OPTIONS = {"cpp.use_decompose_tanh": True}

# Coordinates per call of the cell when no graph is kept (meta-testing, meta-validation): the
# (rows, 4H) gates of a block stay in cache. For the 47,730 coordinates of a 3-seed population
# (vectorised meta-testing, eager) the whole meta-test step took 36-39 ms in blocks against
# 45-48 ms in one call, back to back on a 2-core AVX-512 CPU; a single seed's 15,910 took the
# same either way (12-13 ms). With a graph (meta-training) blocks are slower: the backward would
# see one node per block.
NO_GRAD_BLOCK = 8192


def compile_options() -> dict[str, Any]:
    """COMPILE_OPTIONS that this torch's inductor knows."""
    from torch._inductor import config

    def known(key: str) -> bool:
        node = config
        for part in key.split("."):
            if not hasattr(node, part):
                return False
            node = getattr(node, part)
        return True

    return {k: v for k, v in COMPILE_OPTIONS.items() if known(k)}


def preprocess_parts(g: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """Andrychowicz et al., appendix A: (log|g|/p, sign g) if |g| >= e^-p, else (-1, e^p g),
    as two tensors shaped like g."""
    a = g.abs()
    big = a >= math.exp(-p)
    log_part = torch.where(big, a.clamp_min(math.exp(-p)).log() / p, -1.0)
    sign_part = torch.where(big, torch.sign(g), g * math.exp(p))
    return log_part, sign_part


def preprocess(g: Tensor, p: float) -> Tensor:
    """:func:`preprocess_parts` stacked as the LSTM's input features, shape (*g.shape, 2)."""
    return torch.stack(preprocess_parts(g, p), dim=-1)


class LSTMOptimizer(nn.Module):
    """Coordinatewise LSTM optimizer.

    Args:
        hidden_size: LSTM width (20 in the study).
        num_layers: stacked LSTM cells (2 in the study).
        preprocess_p: p of the log/sign gradient preprocessing (10 in the study).
        output_scale: the linear head's output is multiplied by this (0.1 in the study).
        torch_compile: run the LSTM through ``torch.compile`` (fuses the gate arithmetic; about 1.6x
            faster meta-training on a 2-core CPU, after ~10 s of compilation per shape).
    """

    name = "l2o"

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        preprocess_p: float = 10.0,
        output_scale: float = 0.1,
        torch_compile: bool = False,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or num_layers < 1:
            raise ValueError("hidden_size and num_layers must be >= 1")
        if preprocess_p <= 0:
            raise ValueError("preprocess_p must be > 0")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.preprocess_p = preprocess_p
        self.output_scale = output_scale
        self.torch_compile = torch_compile
        self._compiled = None
        self.cells = nn.ModuleList(
            nn.LSTMCell(2 if i == 0 else hidden_size, hidden_size) for i in range(num_layers)
        )
        self.head = nn.Linear(hidden_size, 1)

    def config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "preprocess_p": self.preprocess_p,
            "output_scale": self.output_scale,
        }

    def init_state(self, params: Params) -> State:
        n = sum(p.numel() for p in params)
        ref = params[0]
        zeros = ref.new_zeros(self.num_layers, n, self.hidden_size)
        return {"h": zeros, "c": zeros.clone(), "shapes": tuple(tuple(p.shape) for p in params)}

    def update(self, grads: Params, state: State, params: Params | None = None):
        shapes = state["shapes"]
        lead = grads[0].shape[: grads[0].dim() - len(shapes[0])]
        flat = torch.cat([g.reshape(*lead, -1) for g in grads], dim=-1)
        n = flat.shape[-1]
        k = flat.numel() // n  # number of gradients replayed against this one state
        replaying = len(lead) > 0
        h, c = state["h"], state["c"]
        if replaying:  # the same state for each replayed gradient
            h = h.unsqueeze(1).expand(-1, k, n, -1).reshape(self.num_layers, k * n, -1)
            c = c.unsqueeze(1).expand(-1, k, n, -1).reshape(self.num_layers, k * n, -1)
        blocked = not torch.is_grad_enabled() and not replaying
        if torch._C._functorch.is_batchedtensor(flat):
            # Under vmap (PES's particles, each with its own weights): torch.lstm_cell has no
            # batching rule, and the compiled core is compiled for unbatched inputs.
            out, new_h, new_c = lstm_forward(
                lstm_cell, flat.reshape(-1), h, c, self.preprocess_p, *self._weights()
            )
        elif self.torch_compile and not replaying:
            if self._compiled is None:
                self._compiled = torch.compile(
                    functools.partial(lstm_forward, lstm_cell),
                    dynamic=False,
                    options=compile_options(),
                )
            run = blocks(self._compiled) if blocked else self._compiled
            out, new_h, new_c = run(flat.reshape(-1), h, c, self.preprocess_p, *self._weights())
        else:
            # Eager: torch's LSTM cell kernel, ~4x faster on CPU than the spelled-out gates.
            run = functools.partial(lstm_forward, torch.lstm_cell)
            run = blocks(run) if blocked else run
            out, new_h, new_c = run(flat.reshape(-1), h, c, self.preprocess_p, *self._weights())
        out = (out * self.output_scale).view(*lead, n)
        updates = tuple(
            u.reshape(*lead, *shape)
            for u, shape in zip(out.split([math.prod(s) for s in shapes], dim=-1), shapes)
        )
        if replaying:  # there is no single next state
            return updates, state
        return updates, {"h": new_h, "c": new_c, "shapes": shapes}

    def replay(self, grads: Params, state: State, params: Params | None = None) -> Params:
        """``update`` of a batch of gradients (leading dim N) under one state, for analyses.

        The same numbers as ``update`` (to float rounding, ~1e-7), detached, several times
        faster: :func:`l2o.lstm_replay.replay_lstm` shares across the batch what a replay
        shares. A subclass that changes ``update`` or the cells gets the chunked protocol
        replay instead, so that the two can never disagree.
        """
        plain = type(self).update is LSTMOptimizer.update and all(
            type(c) is nn.LSTMCell for c in self.cells
        )
        if not plain:
            return chunked_replay(self, grads, state, params)
        return replay_lstm(self, grads, state, preprocess_parts)

    def _weights(self) -> list[Tensor]:
        ws: list[Tensor] = []
        for cell in self.cells:
            ws += [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
        return ws + [self.head.weight, self.head.bias]

    def __getstate__(self):  # a compiled function does not pickle (DDP spawn, deepcopy)
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_compiled": None}


def lstm_cell(
    x: Tensor,
    hx: tuple[Tensor, Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
) -> tuple[Tensor, Tensor]:
    """The LSTM cell, ``torch.lstm_cell``'s arithmetic and signature spelled out, so that
    ``torch.compile`` can fuse the gate math (it cannot see into ``torch.lstm_cell``).

    This is the project's one definition of the cell. The eager path calls torch's kernel of
    the same math instead (4x faster on CPU); the fast replay of ``l2o.lstm_replay`` is a
    layout-specialised variant (see there why); tests pin all three equal.
    """
    h, c = hx
    gates = x @ w_ih.t() + h @ w_hh.t() + (b_ih + b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def lstm_forward(cell, flat: Tensor, h: Tensor, c: Tensor, p: float, *weights: Tensor):
    """The LSTM optimizer on every coordinate of ``flat`` (one row each): preprocessing, the
    stacked ``cell`` (``torch.lstm_cell`` or :func:`lstm_cell`), the linear head.

    Returns the head's output (before ``output_scale``), the new h and c ``(layers, n, H)``.
    """
    x = preprocess(flat, p)
    hs, cs = [], []
    for layer in range(h.shape[0]):
        w_ih, w_hh, b_ih, b_hh = weights[4 * layer : 4 * layer + 4]
        x, cl = cell(x, (h[layer], c[layer]), w_ih, w_hh, b_ih, b_hh)
        hs.append(x)
        cs.append(cl)
    out = torch.nn.functional.linear(x, weights[-2], weights[-1]).squeeze(-1)
    return out, torch.stack(hs), torch.stack(cs)


def blocks(forward, block: int | None = None):
    """``forward`` (:func:`lstm_forward` with its cell bound, or its compiled version) over
    the coordinates in blocks of at most ``block`` (default ``NO_GRAD_BLOCK``), results written
    into one output: the same numbers, with each block's gate temporaries in cache. Blocks are
    equal in size but the last (a compiled forward is specialised to at most two shapes)."""

    def run(flat: Tensor, h: Tensor, c: Tensor, p: float, *weights: Tensor):
        n = flat.shape[0]
        count = -(-n // (block or NO_GRAD_BLOCK))
        if count <= 1:
            return forward(flat, h, c, p, *weights)
        size = -(-n // count)
        out, new_h, new_c = flat.new_empty(n), torch.empty_like(h), torch.empty_like(c)
        for s in range(0, n, size):
            e = min(n, s + size)
            o, hb, cb = forward(flat[s:e], h[:, s:e], c[:, s:e], p, *weights)
            out[s:e], new_h[:, s:e], new_c[:, s:e] = o, hb, cb
        return out, new_h, new_c

    return run


def detach_state(state: Any) -> Any:
    """Detach every tensor of a (nested) optimizer state: the truncation of TBPTT."""
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, state)
