"""Optimizee families: functional MLPs on MNIST-sized inputs.

Parameters are plain tensors in a tuple, never registered ``nn.Parameter``s, so that
meta-training can differentiate through their updates. Every tensor carries a leading
*population* dimension P: P independent optimizees are trained in one vectorized call.

Layout of the parameter tuple, per hidden layer ``l``::

    W_l (P, out, in), b_l (P, out)[, gamma_l (P, out), beta_l (P, out) with batchnorm]

followed by the output layer ``W_L (P, C, in), b_L (P, C)`` whose logits go through softmax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

Params = tuple[Tensor, ...]

ACTIVATIONS = {
    "leaky_relu": None,  # slope taken from the optimizee, see MLPOptimizee.activate
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}
# Activations that are positively homogeneous: f(a x) = a f(x) for a > 0, which gives the
# rescale symmetry of Kunin et al. (2021) between a neuron's incoming and outgoing weights.
HOMOGENEOUS = {"leaky_relu", "relu"}


@dataclass(frozen=True)
class HiddenLayer:
    """Indices into the parameter tuple for one hidden layer (used by the analyses)."""

    weight: int
    bias: int
    bn_weight: int | None  # gamma, when the layer has BatchNorm
    bn_bias: int | None
    out_weight: int  # the next layer's weight, whose column j reads this layer's neuron j


@dataclass(frozen=True)
class MLPOptimizee:
    """A family of MLP classifiers, e.g. the study's 784-20-10 Leaky ReLU network.

    Args:
        sizes: layer widths, input first, classes last; at least one hidden layer.
        activation: one of ``leaky_relu``, ``relu``, ``sigmoid``, ``tanh``.
        batchnorm: BatchNorm (affine, batch statistics) between each hidden linear layer and
            its activation, as in the study's BatchNorm-ReLU optimizee.
        negative_slope: Leaky ReLU slope.
        bn_eps: BatchNorm epsilon. It breaks the scale symmetry by O(eps) (see README).
    """

    sizes: Sequence[int] = (784, 20, 10)
    activation: str = "leaky_relu"
    batchnorm: bool = False
    negative_slope: float = 0.01
    bn_eps: float = 1e-5
    hidden: tuple[HiddenLayer, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.sizes)
        object.__setattr__(self, "sizes", sizes)
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}"
            )
        if len(sizes) < 3:
            raise ValueError(f"sizes={list(sizes)}: need input, at least one hidden, and output")
        if any(s < 1 for s in sizes) or sizes[-1] < 2:
            raise ValueError(f"sizes={list(sizes)}: widths must be >= 1 and classes >= 2")
        if self.bn_eps <= 0:
            raise ValueError("bn_eps must be > 0")
        hidden, i = [], 0
        per_layer = 4 if self.batchnorm else 2
        for _ in range(len(sizes) - 2):
            bn_w, bn_b = (i + 2, i + 3) if self.batchnorm else (None, None)
            hidden.append(HiddenLayer(i, i + 1, bn_w, bn_b, out_weight=i + per_layer))
            i += per_layer
        object.__setattr__(self, "hidden", tuple(hidden))

    # ------------------------------------------------------------------ structure
    @property
    def name(self) -> str:
        bn = "bn-" if self.batchnorm else ""
        return f"mlp-{'-'.join(map(str, self.sizes))}-{bn}{self.activation}"

    @property
    def roles(self) -> list[tuple[str, tuple[int, ...], int]]:
        """(role, shape without population dim, fan_in) of each parameter tensor."""
        out: list[tuple[str, tuple[int, ...], int]] = []
        pairs = list(zip(self.sizes[:-1], self.sizes[1:]))
        for k, (fan_in, fan_out) in enumerate(pairs):
            out += [("weight", (fan_out, fan_in), fan_in), ("bias", (fan_out,), fan_in)]
            if self.batchnorm and k < len(pairs) - 1:
                out += [("gamma", (fan_out,), fan_in), ("beta", (fan_out,), fan_in)]
        return out

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Parameter shapes without the population dimension."""
        return [shape for _, shape, _ in self.roles]

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    # ------------------------------------------------------------------ functions
    def init(
        self,
        population: int = 1,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Params:
        """Seeded initialisation, nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in));
        BatchNorm's affine starts at gamma = 1, beta = 0."""
        params: list[Tensor] = []
        for role, shape, fan_in in self.roles:
            if role in ("gamma", "beta"):
                t = torch.full((population, *shape), float(role == "gamma"), dtype=dtype)
            else:
                t = torch.rand((population, *shape), generator=generator, dtype=dtype)
                t = (2 * t - 1) / math.sqrt(fan_in)
            params.append(t.to(device))
        return tuple(params)

    def activate(self, z: Tensor) -> Tensor:
        if self.activation == "leaky_relu":
            return F.leaky_relu(z, self.negative_slope)
        return ACTIVATIONS[self.activation](z)

    def logits(self, params: Params, x: Tensor) -> Tensor:
        """x: (P, B, in) -> logits (P, B, C). Extra leading dims broadcast."""
        h = x
        for layer in self.hidden:
            z = _linear(h, params[layer.weight], params[layer.bias])
            if layer.bn_weight is not None:
                mean = z.mean(dim=-2, keepdim=True)
                var = z.var(dim=-2, unbiased=False, keepdim=True)
                z = (z - mean) * torch.rsqrt(var + self.bn_eps)
                z = z * params[layer.bn_weight].unsqueeze(-2) + params[layer.bn_bias].unsqueeze(-2)
            h = self.activate(z)
        return _linear(h, params[-2], params[-1])

    def losses(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample cross-entropy, (P, B)."""
        logits = self.logits(params, x)
        return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none").view(y.shape)

    def loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy per optimizee, (P,)."""
        return self.losses(params, x, y).mean(dim=-1)

    def accuracy(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return (self.logits(params, x).argmax(-1) == y).float().mean(dim=-1)

    def check_input(self, num_features: int) -> None:
        if num_features != self.sizes[0]:
            raise ValueError(
                f"optimizee {self.name} takes {self.sizes[0]} inputs but the data has "
                f"{num_features} features"
            )


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return torch.matmul(x, weight.transpose(-1, -2)) + bias.unsqueeze(-2)


def grads_of(loss_fn, params: Params, *args) -> tuple[Tensor, Params]:
    """Loss per optimizee and its gradient, detached: what an optimizer sees.

    The population's losses are summed, which gives each member its own gradient.
    """
    with torch.enable_grad():
        leaves = tuple(p.detach().requires_grad_(True) for p in params)
        losses = loss_fn(leaves, *args)
        grads = torch.autograd.grad(losses.sum(), leaves)
    return losses.detach(), grads


def build_optimizee(spec: MLPOptimizee | dict) -> MLPOptimizee:
    if isinstance(spec, MLPOptimizee):
        return spec
    if not isinstance(spec, dict):
        raise TypeError(f"optimizee must be an MLPOptimizee or a dict, got {type(spec).__name__}")
    unknown = set(spec) - {"sizes", "activation", "batchnorm", "negative_slope", "bn_eps"}
    if unknown:
        raise ValueError(f"unknown optimizee option(s) {sorted(unknown)}")
    return MLPOptimizee(**spec)


def spec_of(optimizee: MLPOptimizee) -> dict:
    """Plain-data description (safe for checkpoints loaded with weights_only=True)."""
    return {
        "sizes": list(optimizee.sizes),
        "activation": optimizee.activation,
        "batchnorm": optimizee.batchnorm,
        "negative_slope": optimizee.negative_slope,
        "bn_eps": optimizee.bn_eps,
    }
