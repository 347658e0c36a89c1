"""Optimizee families: functional MLPs and small CNNs on MNIST-sized inputs.

Parameters are plain tensors in a tuple, never registered ``nn.Parameter``s, so that
meta-training can differentiate through their updates. Every tensor carries a leading
*population* dimension P: P independent optimizees are trained in one vectorized call.

``MLPOptimizee``'s parameter tuple, per hidden layer ``l``::

    W_l (P, out, in), b_l (P, out)[, gamma_l (P, out), beta_l (P, out) with batchnorm]

``ConvOptimizee``'s, per convolutional layer ``l`` (``k x k`` kernels)::

    K_l (P, out, in, k, k), b_l (P, out)[, gamma_l (P, out), beta_l (P, out) with batchnorm]

Both end with the output layer ``W_L (P, C, in), b_L (P, C)`` whose logits go through softmax
(for the CNN, ``in`` is the flattened last feature map, channel-major as ``nn.Flatten``).
Inputs are always flat vectors ``x (P, B, features)`` (MNIST: 784), labels ``y (P, B)``.

Both families describe their hidden units to the analyses in the same way (``hidden``: one
``HiddenLayer`` per hidden layer, a unit being a neuron or a channel), and round-trip through a
plain-data spec (``spec_of`` / ``build_optimizee``) that checkpoints store.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

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
    """Indices into the parameter tuple for one hidden layer (used by the analyses).

    A *unit* is a neuron of an MLP layer or a channel of a convolutional layer: ``weight[:, j]``
    (the unit's row, or its ``(in, k, k)`` kernel) and ``bias[:, j]`` compute it. The next
    layer's weight ``out_weight`` reads unit j through the slice that ``sum_reading`` selects:
    an MLP's column j, a convolution's input channel j, or, after flattening a ``C x H x W``
    feature map, the ``H * W`` consecutive columns of channel j.
    """

    weight: int
    bias: int
    bn_weight: int | None  # gamma, when the layer has BatchNorm
    bn_bias: int | None
    out_weight: int  # the next layer's weight, which reads this layer's units
    # Where the units sit in out_weight (shape without the population dim): the dim that
    # indexes them, counted from the end, and how many consecutive entries along it read one
    # unit. An MLP's (out, units) is (-1, 1); a convolution's (out, units, k, k) is (-3, 1);
    # the output layer after a flattened C x H x W map, (classes, C * H * W), is (-1, H * W).
    out_unit_dim: int = -1
    out_group: int = 1
    out_ndim: int = 2  # dims of out_weight without the population dim

    def sum_reading(self, t: Tensor) -> Tensor:
        """Sum ``t``, shaped like ``out_weight`` with any leading dims ``(..., P, *shape)``,
        over the entries that read each unit: ``(..., P, units)``."""
        unit = self.out_unit_dim
        if self.out_group > 1:  # (.., units * group, ..) -> (.., units, group, ..)
            t = t.unflatten(unit, (-1, self.out_group))
            unit, ndim = unit - 1, self.out_ndim + 1
        else:
            ndim = self.out_ndim
        return t.sum(dim=tuple(d for d in range(-ndim, 0) if d != unit))


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

    @property
    def num_features(self) -> int:
        """Width of the input vectors."""
        return self.sizes[0]

    @property
    def num_classes(self) -> int:
        return self.sizes[-1]

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
        return _init_roles(self.roles, population, generator, device, dtype)

    def activate(self, z: Tensor) -> Tensor:
        if self.activation == "leaky_relu":
            return F.leaky_relu(z, self.negative_slope)
        return ACTIVATIONS[self.activation](z)

    def logits(self, params: Params, x: Tensor, taps: list | None = None) -> Tensor:
        """x: (P, B, in) -> logits (P, B, C). Extra leading dims broadcast. ``taps``: a list
        that receives each linear layer's ``(input, output)`` (:meth:`per_sample_gram`)."""
        h = x
        for layer in self.hidden:
            z = _linear(h, params[layer.weight], params[layer.bias])
            if taps is not None:
                taps.append((h, z))
            if layer.bn_weight is not None:
                mean = z.mean(dim=-2, keepdim=True)
                var = z.var(dim=-2, unbiased=False, keepdim=True)
                z = (z - mean) * torch.rsqrt(var + self.bn_eps)
                z = z * params[layer.bn_weight].unsqueeze(-2) + params[layer.bn_bias].unsqueeze(-2)
            h = self.activate(z)
        z = _linear(h, params[-2], params[-1])
        if taps is not None:
            taps.append((h, z))
        return z

    def per_sample_gram(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """Gram matrix ``G_ij = <g_i, g_j>`` of the per-sample loss gradients, (P, N, N),
        without forming the gradients: x (P, N, in), y (P, N).

        A linear layer's gradient for sample i is the outer product of the loss gradient at its
        output, d_i, and its input a_i (the bias's is d_i), so
        ``<g_i, g_j> = sum over layers of (d_i . d_j) (a_i . a_j + 1)``: one backward and a few
        (N, width) GEMMs instead of the (N, D) gradients (65 MB for the study's 784-20-10 MLP at
        N = 1,024; ``l2o.covariance``). Exact only without BatchNorm, whose batch statistics
        couple the samples: raises there.
        """
        if self.batchnorm:
            raise ValueError("per_sample_gram: BatchNorm couples the samples' gradients")
        taps: list[tuple[Tensor, Tensor]] = []
        with torch.enable_grad():
            leaves = tuple(p.detach().requires_grad_(True) for p in params)
            logits = self.logits(leaves, x, taps)
            loss = F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum")
            deltas = torch.autograd.grad(loss, [z for _, z in taps])
        gram = None
        for (a, _), d in zip(taps, deltas, strict=True):
            a = a.detach()
            term = (a @ a.transpose(-1, -2)).add_(1) * (d @ d.transpose(-1, -2))
            gram = term if gram is None else gram + term
        return gram

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


POOLS = ("max", "avg", "none")


@dataclass(frozen=True)
class ConvOptimizee:
    """A family of small CNN classifiers of images given as flat vectors (MNIST: 1 x 28 x 28).

    Each convolutional layer is conv (``kernel_size``, ``stride``, zero ``padding``) ->
    [BatchNorm2d] -> activation -> [pooling]; the last feature map is flattened channel-major
    (as ``nn.Flatten``) into a linear softmax layer. The default, 1 -> 8 -> 16 channels of 3x3
    'same' convolutions with Leaky ReLU and 2x2 max-pooling (28x28 -> 14x14 -> 7x7, then
    16 * 7 * 7 = 784 features -> 10 classes), has 9,098 parameters.

    Symmetries (``l2o.symmetry``): a unit is a channel. Max- and average pooling are positively
    homogeneous (max(a z) = a max(z) for a > 0), so with a (Leaky) ReLU, scaling channel j's
    kernel and bias (or its BatchNorm gamma, beta) by a and the next layer's weights reading
    channel j by 1 / a leaves the network unchanged: the ``rescale`` symmetry holds per channel.
    With BatchNorm2d (per-channel statistics over batch and positions) the channel's kernel and
    bias are scale-free (``scale``); the softmax layer has ``translation``.

    The population is one grouped convolution (``groups = P``: member p's channels are group
    p), so P members cost one call. Extra leading dims of ``x`` (replays) are folded into the
    batch; BatchNorm still normalises each replay's minibatch on its own.

    Args:
        channels: output channels of each convolutional layer; at least one layer.
        image: ``(channels, height, width)`` of the input images, which arrive flattened.
        num_classes: outputs of the softmax layer.
        kernel_size: square kernels, ``kernel_size x kernel_size``.
        stride: convolution stride.
        padding: zero padding of each side; ``None``: ``kernel_size // 2`` ('same' for odd
            kernels at stride 1).
        pool: ``max``, ``avg`` or ``none``: pooling after each layer's activation.
        pool_size: pooling window and stride.
        activation: one of ``leaky_relu``, ``relu``, ``sigmoid``, ``tanh``.
        batchnorm: BatchNorm2d (affine, batch statistics) between each convolution and its
            activation.
        negative_slope: Leaky ReLU slope.
        bn_eps: BatchNorm epsilon. It breaks the scale symmetry by O(eps) (see README).

    Its plain-data spec (``spec_of``, what checkpoints store) is its fields plus
    ``family: cnn``; ``build_optimizee`` reads it back.
    """

    channels: Sequence[int] = (8, 16)
    image: Sequence[int] = (1, 28, 28)
    num_classes: int = 10
    kernel_size: int = 3
    stride: int = 1
    padding: int | None = None
    pool: str = "max"
    pool_size: int = 2
    activation: str = "leaky_relu"
    batchnorm: bool = False
    negative_slope: float = 0.01
    bn_eps: float = 1e-5
    hidden: tuple[HiddenLayer, ...] = field(init=False, repr=False, compare=False)
    # (C, H, W) of each layer's output (after pooling); the last one is flattened
    maps: tuple[tuple[int, int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        channels = tuple(int(c) for c in self.channels)
        image = tuple(int(s) for s in self.image)
        object.__setattr__(self, "channels", channels)
        object.__setattr__(self, "image", image)
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}"
            )
        if not channels:
            raise ValueError("channels=[]: need at least one convolutional layer")
        if any(c < 1 for c in channels):
            raise ValueError(f"channels={list(channels)}: channel counts must be >= 1")
        if len(image) != 3 or any(s < 1 for s in image):
            raise ValueError(
                f"image={list(image)}: must be [channels, height, width], each >= 1 "
                "(MNIST: [1, 28, 28])"
            )
        if self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes}: need >= 2 classes")
        if self.kernel_size < 1 or self.stride < 1 or self.pool_size < 1:
            raise ValueError(
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"pool_size={self.pool_size}: each must be >= 1"
            )
        padding = self.kernel_size // 2 if self.padding is None else int(self.padding)
        if padding < 0:
            raise ValueError(f"padding={padding} must be >= 0 (None: kernel_size // 2)")
        object.__setattr__(self, "padding", padding)
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; choose one of {list(POOLS)}")
        if self.bn_eps <= 0:
            raise ValueError("bn_eps must be > 0")

        maps, (h, w) = [], image[1:]
        for layer, c_out in enumerate(channels, 1):
            h_conv = (h + 2 * padding - self.kernel_size) // self.stride + 1
            w_conv = (w + 2 * padding - self.kernel_size) // self.stride + 1
            if h_conv < 1 or w_conv < 1:
                raise ValueError(
                    f"conv layer {layer} gets a {h}x{w} map, smaller than its "
                    f"{self.kernel_size}x{self.kernel_size} kernel with padding {padding}: use "
                    "a smaller kernel_size, more padding, less pooling or fewer layers"
                )
            h, w = h_conv, w_conv
            if self.pool != "none":
                if h < self.pool_size or w < self.pool_size:
                    raise ValueError(
                        f"the {self.pool_size}x{self.pool_size} pooling after conv layer "
                        f"{layer} gets a {h}x{w} map: use a smaller pool_size, pool='none' "
                        "or fewer layers"
                    )
                h, w = h // self.pool_size, w // self.pool_size
            maps.append((c_out, h, w))
        object.__setattr__(self, "maps", tuple(maps))

        hidden, i = [], 0
        per_layer = 4 if self.batchnorm else 2
        for layer in range(len(channels)):
            bn_w, bn_b = (i + 2, i + 3) if self.batchnorm else (None, None)
            if layer < len(channels) - 1:  # the next conv's kernel (out, in, k, k): in = unit
                reads = dict(out_unit_dim=-3, out_group=1, out_ndim=4)
            else:  # the softmax layer's (classes, C * H * W): H * W columns per channel
                reads = dict(out_unit_dim=-1, out_group=h * w, out_ndim=2)
            hidden.append(HiddenLayer(i, i + 1, bn_w, bn_b, out_weight=i + per_layer, **reads))
            i += per_layer
        object.__setattr__(self, "hidden", tuple(hidden))

    # ------------------------------------------------------------------ structure
    @property
    def name(self) -> str:
        image = "x".join(map(str, self.image))
        conv = f"k{self.kernel_size}"
        if self.stride != 1:
            conv += f"s{self.stride}"
        if self.padding != self.kernel_size // 2:
            conv += f"p{self.padding}"
        pool = "" if self.pool == "none" else f"-{self.pool}pool{self.pool_size}"
        bn = "bn-" if self.batchnorm else ""
        widths = "-".join(map(str, (*self.channels, self.num_classes)))
        return f"cnn-{image}-{widths}-{conv}{pool}-{bn}{self.activation}"

    @property
    def num_features(self) -> int:
        """Width of the input vectors: the flattened image."""
        return math.prod(self.image)

    @property
    def roles(self) -> list[tuple[str, tuple[int, ...], int]]:
        """(role, shape without population dim, fan_in) of each parameter tensor."""
        out: list[tuple[str, tuple[int, ...], int]] = []
        k, c_in = self.kernel_size, self.image[0]
        for c_out in self.channels:
            fan_in = c_in * k * k
            out += [("weight", (c_out, c_in, k, k), fan_in), ("bias", (c_out,), fan_in)]
            if self.batchnorm:
                out += [("gamma", (c_out,), fan_in), ("beta", (c_out,), fan_in)]
            c_in = c_out
        features = math.prod(self.maps[-1])
        out += [("weight", (self.num_classes, features), features)]
        out += [("bias", (self.num_classes,), features)]
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
        """Seeded initialisation, the distribution of nn.Conv2d's and nn.Linear's defaults
        (kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in =
        in_channels * k * k for kernels and biases); BatchNorm's affine starts at (1, 0)."""
        return _init_roles(self.roles, population, generator, device, dtype)

    def activate(self, z: Tensor) -> Tensor:
        if self.activation == "leaky_relu":
            return F.leaky_relu(z, self.negative_slope)
        return ACTIVATIONS[self.activation](z)

    def logits(self, params: Params, x: Tensor) -> Tensor:
        """x: (P, B, C * H * W) -> logits (P, B, classes). Extra leading dims broadcast, and
        x with P = 1 is shared by the whole population."""
        pop = params[0].shape[0]
        if x.dim() < 3 or x.shape[-1] != self.num_features:
            raise ValueError(
                f"optimizee {self.name} takes x of shape (..., P, B, {self.num_features}) "
                f"(flattened {'x'.join(map(str, self.image))} images), got {tuple(x.shape)}"
            )
        if x.shape[-3] != pop:
            if x.shape[-3] != 1:
                raise ValueError(
                    f"x has a population dim of {x.shape[-3]} but the params have {pop}"
                )
            x = x.expand(*x.shape[:-3], pop, *x.shape[-2:])
        lead, batch = x.shape[:-3], x.shape[-2]
        n_lead = math.prod(lead)
        # (L, P, B, C*H*W) -> (L*B, P*C, H, W): member p's channels are group p of a grouped conv
        h = x.reshape(n_lead, pop, batch, *self.image).transpose(1, 2)
        h = h.reshape(n_lead * batch, pop * self.image[0], *self.image[1:])
        for layer in self.hidden:
            kernel = params[layer.weight]
            h = F.conv2d(
                h,
                kernel.reshape(-1, *kernel.shape[2:]),
                params[layer.bias].reshape(-1),
                stride=self.stride,
                padding=self.padding,
                groups=pop,
            )
            if layer.bn_weight is not None:
                # statistics per replay, member and channel over (batch, height, width)
                z = h.unflatten(0, (n_lead, batch))
                mean = z.mean(dim=(1, 3, 4), keepdim=True)
                var = z.var(dim=(1, 3, 4), unbiased=False, keepdim=True)
                z = (z - mean) * torch.rsqrt(var + self.bn_eps)
                gamma = params[layer.bn_weight].reshape(-1, 1, 1)
                h = (z * gamma + params[layer.bn_bias].reshape(-1, 1, 1)).flatten(0, 1)
            h = self.activate(h)
            if self.pool == "max":
                h = F.max_pool2d(h, self.pool_size)
            elif self.pool == "avg":
                h = F.avg_pool2d(h, self.pool_size)
        # (L*B, P*C, H, W) -> (L, P, B, C*H*W): channel-major per member, as nn.Flatten
        h = h.reshape(n_lead, batch, pop, -1).transpose(1, 2)
        out = _linear(h, params[-2], params[-1])
        return out.reshape(*lead, pop, batch, self.num_classes)

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
        if num_features != self.num_features:
            image = "x".join(map(str, self.image))
            raise ValueError(
                f"optimizee {self.name} takes {self.num_features} inputs ({image} images) but "
                f"the data has {num_features} features; set the optimizee's image to the "
                "data's [channels, height, width]"
            )


Optimizee = MLPOptimizee | ConvOptimizee
# spec_of(...)["family"] -> class; a spec without "family" is an MLP (older checkpoints)
FAMILIES: dict[str, type] = {"mlp": MLPOptimizee, "cnn": ConvOptimizee}


def _init_roles(
    roles: list[tuple[str, tuple[int, ...], int]],
    population: int,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> Params:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, drawn in ``roles`` order;
    BatchNorm's gamma = 1, beta = 0."""
    params: list[Tensor] = []
    for role, shape, fan_in in roles:
        if role in ("gamma", "beta"):
            t = torch.full((population, *shape), float(role == "gamma"), dtype=dtype)
        else:
            t = torch.rand((population, *shape), generator=generator, dtype=dtype)
            t = (2 * t - 1) / math.sqrt(fan_in)
        params.append(t.to(device))
    return tuple(params)


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


def build_optimizee(spec: Optimizee | dict) -> Optimizee:
    """An optimizee family from itself or from its plain-data spec (``spec_of``).

    A spec's ``family`` key picks the class (``mlp``, ``cnn``); without it the spec is an
    MLP's, as in checkpoints written before the CNN family existed.
    """
    if isinstance(spec, (MLPOptimizee, ConvOptimizee)):
        return spec
    if not isinstance(spec, dict):
        raise TypeError(
            "optimizee must be an MLPOptimizee, a ConvOptimizee or a dict (a spec_of), got "
            f"{type(spec).__name__}"
        )
    spec = dict(spec)
    family = spec.pop("family", "mlp")
    if family not in FAMILIES:
        raise ValueError(f"unknown optimizee family {family!r}; choose one of {sorted(FAMILIES)}")
    cls = FAMILIES[family]
    allowed = {f.name for f in fields(cls) if f.init}
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(
            f"unknown optimizee option(s) {sorted(unknown)} for the {family} family; it takes "
            f"{sorted(allowed)}"
        )
    return cls(**spec)


def spec_of(optimizee: Optimizee) -> dict:
    """Plain-data description (safe for checkpoints loaded with weights_only=True).

    An MLP's spec has no ``family`` key (unchanged from before the CNN family); a CNN's has
    ``family: cnn``. ``build_optimizee(spec_of(o)) == o``.
    """
    if isinstance(optimizee, ConvOptimizee):
        return {
            "family": "cnn",
            "channels": list(optimizee.channels),
            "image": list(optimizee.image),
            "num_classes": optimizee.num_classes,
            "kernel_size": optimizee.kernel_size,
            "stride": optimizee.stride,
            "padding": optimizee.padding,
            "pool": optimizee.pool,
            "pool_size": optimizee.pool_size,
            "activation": optimizee.activation,
            "batchnorm": optimizee.batchnorm,
            "negative_slope": optimizee.negative_slope,
            "bn_eps": optimizee.bn_eps,
        }
    if not isinstance(optimizee, MLPOptimizee):
        raise TypeError(f"spec_of takes an optimizee family, got {type(optimizee).__name__}")
    return {
        "sizes": list(optimizee.sizes),
        "activation": optimizee.activation,
        "batchnorm": optimizee.batchnorm,
        "negative_slope": optimizee.negative_slope,
        "bn_eps": optimizee.bn_eps,
    }
