"""A per-parameter MLP learned optimizer (Metz et al. 2022, "Practical tradeoffs between memory,
compute, and performance in learned optimizers": the MLP family of ``small_fc_lopt``).

Each coordinate of each parameter tensor gets a feature vector

    g, p, m_k (one momentum per decay), v, m_k / sqrt(v + eps), 1 / sqrt(v + eps)

(v: the second-moment accumulator), each divided by its RMS over the coordinates of its tensor,
separately per population member and per replayed gradient, then the training-step features
tanh(t / s - 1) for time scales s over several decades. One small MLP, shared by all
coordinates, maps the features to a direction d and a log-magnitude m, and the update is

    update = -step_mult * d * exp(exp_mult * m).

Every coordinate of every tensor is one row of a single batched MLP call (the per-tensor RMS
normalisation is one segmented reduction), so there is no Python loop over tensors or
coordinates. It implements the optimizer protocol of :mod:`l2o.optimizers`; meta-train it with

    python train.py fit --config configs/mlp_lopt.yaml --data.root ../shared/data
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l2o.optimizers import Params, State

# learned_optimization's MLPLOpt embeds the step with 11 scales up to 1e5; the study's runs are
# 200 steps long (meta-testing 1,000), so scales past 1e4 would be constant inputs.
TIME_SCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)


class MLPLOpt(nn.Module):
    """Per-parameter MLP learned optimizer.

    Args:
        hidden_sizes: widths of the MLP's hidden layers (ReLU), shared by all coordinates.
            learned_optimization's MLPLOpt uses two of 32; ``small_fc_lopt`` two of 4.
        momentum_decays: decays of the momentum accumulators m_k = b_k m_k + (1 - b_k) g.
            Windows of ~1 to ~100 steps: the study's optimizees train for 200 steps.
        rms_decay: decay of the second-moment accumulator v = b v + (1 - b) g^2 (0.999 in
            ``small_fc_lopt``). Bias-corrected like Adam's, so that ``eps`` means the same at
            step 1 as at step 1,000 (the correction is one number per tensor, so it changes
            nothing else after the RMS normalisation).
        eps: added to v under the reciprocal square roots (learned_optimization: 1e-6 there,
            applied to an uncorrected v).
        time_scales: s of the training-step features tanh(t / s - 1), t = steps taken so far.
        step_mult: lambda_1 of update = -lambda_1 d exp(lambda_2 m) (1e-3 in learned_optimization).
        exp_mult: lambda_2 (1e-3 in learned_optimization).
        output_init_scale: the output layer's initial weights are scaled by this, so that an
            untrained optimizer takes small steps (biases start at 0).
        norm_eps: added to the mean square under the RMS normalisation, only to keep an
            all-zero tensor's feature at 0 (learned_optimization adds 1e-5, which would
            flatten the second-moment feature of an MNIST network, whose gradients are
            ~1e-2 and second moments ~1e-4).
    """

    name = "mlp_lopt"

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (32, 32),
        momentum_decays: Sequence[float] = (0.1, 0.5, 0.9, 0.99),
        rms_decay: float = 0.999,
        eps: float = 1e-8,
        time_scales: Sequence[float] = TIME_SCALES,
        step_mult: float = 1e-3,
        exp_mult: float = 1e-3,
        output_init_scale: float = 0.1,
        norm_eps: float = 1e-30,
    ) -> None:
        super().__init__()
        hidden_sizes = tuple(int(h) for h in hidden_sizes)
        momentum_decays = tuple(float(b) for b in momentum_decays)
        time_scales = tuple(float(s) for s in time_scales)
        if any(h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes must be >= 1, got {list(hidden_sizes)}")
        if not momentum_decays or any(not 0.0 <= b < 1.0 for b in momentum_decays):
            raise ValueError(f"momentum_decays must be in [0, 1), got {list(momentum_decays)}")
        if not 0.0 <= rms_decay < 1.0:
            raise ValueError(f"rms_decay must be in [0, 1), got {rms_decay}")
        if any(s <= 0 for s in time_scales):
            raise ValueError(f"time_scales must be > 0, got {list(time_scales)}")
        if eps <= 0 or norm_eps <= 0:
            raise ValueError("eps and norm_eps must be > 0")
        if step_mult <= 0:
            raise ValueError(f"step_mult must be > 0, got {step_mult}")
        self.hidden_sizes = hidden_sizes
        self.momentum_decays = momentum_decays
        self.rms_decay = float(rms_decay)
        self.eps = float(eps)
        self.time_scales = time_scales
        self.step_mult = float(step_mult)
        self.exp_mult = float(exp_mult)
        self.output_init_scale = float(output_init_scale)
        self.norm_eps = float(norm_eps)

        widths = (self.num_features, *hidden_sizes, 2)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        # learned_optimization's init: weights ~ N(0, 1/fan_in) (truncated at 2 std), biases 0.
        for layer in self.layers:
            nn.init.trunc_normal_(layer.weight, std=1 / math.sqrt(layer.in_features))
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.layers[-1].weight.mul_(self.output_init_scale)

    # ------------------------------------------------------------------ plain data
    @property
    def num_normalized(self) -> int:
        """Features normalised per tensor: g, p, v, 1/sqrt(v), and m_k, m_k/sqrt(v) per decay."""
        return 4 + 2 * len(self.momentum_decays)

    @property
    def num_features(self) -> int:
        return self.num_normalized + len(self.time_scales)

    def config(self) -> dict[str, Any]:
        """The ``__init__`` arguments as plain data (checkpoints load with weights_only=True)."""
        return {
            "hidden_sizes": list(self.hidden_sizes),
            "momentum_decays": list(self.momentum_decays),
            "rms_decay": self.rms_decay,
            "eps": self.eps,
            "time_scales": list(self.time_scales),
            "step_mult": self.step_mult,
            "exp_mult": self.exp_mult,
            "output_init_scale": self.output_init_scale,
            "norm_eps": self.norm_eps,
        }

    # ------------------------------------------------------------------ the protocol
    def init_state(self, params: Params) -> State:
        """Accumulators over the concatenated coordinates (like the LSTM's hidden state):
        ``momentum`` (n, K), ``rms`` (n,), the step count, and the tensors' shapes."""
        n = sum(p.numel() for p in params)
        ref = params[0]
        return {
            "momentum": ref.new_zeros(n, len(self.momentum_decays)),
            "rms": ref.new_zeros(n),
            "step": 0,
            "shapes": tuple(tuple(p.shape) for p in params),
        }

    def update(self, grads: Params, state: State, params: Params | None = None):
        if params is None:
            raise ValueError(
                "MLPLOpt takes the parameters as a feature: call update(grads, state, params)"
            )
        shapes = tuple(tuple(s) for s in state["shapes"])
        lead = tuple(grads[0].shape[: grads[0].dim() - len(shapes[0])])
        features, momentum, rms = self.features(grads, state, params)
        out = self.mlp(features)
        step = -self.step_mult * out[..., 0] * torch.exp(self.exp_mult * out[..., 1])
        updates = tuple(
            u.reshape(*lead, *shape)
            for u, shape in zip(step.split([math.prod(s) for s in shapes], dim=-1), shapes)
        )
        if lead:  # a replay: there is no single next state
            return updates, state
        new_state = {"momentum": momentum, "rms": rms, "step": state["step"] + 1, "shapes": shapes}
        return updates, new_state

    # ------------------------------------------------------------------ the pieces
    def features(
        self, grads: Params, state: State, params: Params
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(features (*lead, n, F), the next momentum (*lead, n, K), the next rms (*lead, n)).

        Inputs are detached, like the gradient: the meta-gradient flows through the update only
        (the study's first-order convention). That also keeps the RMS normalisation of a nearly
        zero tensor (a fresh bias) from amplifying meta-gradients by 1 / its RMS.
        """
        shapes = tuple(tuple(s) for s in state["shapes"])
        lead = tuple(grads[0].shape[: grads[0].dim() - len(shapes[0])])
        g = torch.cat([x.detach().reshape(*lead, -1) for x in grads], dim=-1)  # (*lead, n)
        p = torch.cat([x.detach().reshape(-1) for x in params]).expand_as(g)
        mom_prev = state["momentum"].detach()
        rms_prev = state["rms"].detach()
        t = int(state["step"])

        decays = g.new_tensor(self.momentum_decays)
        momentum = decays * mom_prev + (1 - decays) * g.unsqueeze(-1)  # (*lead, n, K)
        rms = self.rms_decay * rms_prev + (1 - self.rms_decay) * g * g
        v_hat = rms / (1 - self.rms_decay ** (t + 1))
        rsqrt = torch.rsqrt(v_hat + self.eps).unsqueeze(-1)
        raw = torch.cat(
            [
                g.unsqueeze(-1),
                p.unsqueeze(-1),
                momentum,
                v_hat.unsqueeze(-1),
                momentum * rsqrt,
                rsqrt,
            ],
            dim=-1,
        )
        normalized = self.normalize(raw, shapes)
        scales = g.new_tensor(self.time_scales)
        time = torch.tanh(t / scales - 1.0).expand(*normalized.shape[:-1], -1)
        return torch.cat([normalized, time], dim=-1), momentum, rms

    def normalize(self, x: Tensor, shapes: Sequence[Sequence[int]]) -> Tensor:
        """x (*lead, n, F) divided by its RMS over each (tensor, population member) segment.

        Every leading index (a replayed gradient) is normalised on its own. A tensor's shape
        starts with the population dim P, and ``reshape(-1)`` keeps each member's coordinates
        contiguous, so the segments are contiguous runs of the concatenated coordinates.
        """
        if x.shape[-2] == 0:  # no coordinates (an empty tensor): nothing to normalise
            return x
        if len(shapes) == 1:  # one tensor (the torch.optim drop-in's call): equal-sized segments
            members = shapes[0][0]
            per = x.reshape(-1, members, x.shape[-2] // members, x.shape[-1])
            scale = torch.rsqrt(per.square().mean(dim=-2, keepdim=True) + self.norm_eps)
            return (per * scale).reshape(x.shape)
        sizes = [math.prod(s[1:]) for s in shapes for _ in range(s[0])]
        seg = torch.repeat_interleave(
            torch.arange(len(sizes), device=x.device),
            torch.tensor(sizes, device=x.device),
            output_size=x.shape[-2],
        )
        flat = x.reshape(-1, x.shape[-2], x.shape[-1])  # (B, n, F)
        sums = flat.new_zeros(flat.shape[0], len(sizes), flat.shape[-1])
        sums = sums.index_add(1, seg, flat * flat)
        counts = x.new_tensor(sizes).unsqueeze(-1)
        scale = torch.rsqrt(sums / counts + self.norm_eps)  # (B, segments, F)
        return (flat * scale.index_select(1, seg)).reshape(x.shape)

    def mlp(self, features: Tensor) -> Tensor:
        """The shared MLP, in the features' dtype (float64 params keep float64 arithmetic)."""
        h = features
        for i, layer in enumerate(self.layers):
            h = F.linear(h, layer.weight.to(h.dtype), layer.bias.to(h.dtype))
            if i < len(self.layers) - 1:
                h = F.relu(h)
        return h
