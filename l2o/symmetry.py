"""Symmetry breaking of an optimizer's steps (Kunin et al. 2021, "Neural Mechanics").

A loss that is invariant under a continuous group of parameter transformations has gradients
that obey one linear constraint per group generator. Gradient descent inherits the constraint;
an optimizer whose step ``Delta = -update`` violates it *breaks* the symmetry. For the MLPs and
CNNs of ``l2o.optimizees`` three families apply, found from the optimizee's structure (all
hidden layers, unit by unit; a unit is an MLP neuron or a CNN channel):

``rescale`` (hidden layers with a positively homogeneous activation, ``HOMOGENEOUS``)
    Scaling unit j's incoming parameters by a > 0 and its outgoing weights by 1/a leaves the
    network unchanged. Incoming parameters are what feeds the activation: ``(W_l[j], b_l[j])``
    (a neuron's row or a channel's ``(in, k, k)`` kernel), or ``(gamma_l[j], beta_l[j])`` when
    the layer has BatchNorm (BN's affine output is the activation's input, and BN makes W_l,
    b_l scale-free anyway). Outgoing: the entries of the next weight that read unit j
    (``HiddenLayer.sum_reading``): an MLP's column ``W_{l+1}[:, j]``, a convolution's input
    channel ``K_{l+1}[:, j]``, or the ``H * W`` columns of channel j in the softmax layer after
    flattening. A CNN's max- or average pooling is positively homogeneous, so it keeps this.
    ``d_j = <Delta_in, theta_in> - <Delta_out, theta_out>``.
``scale`` (hidden layers with BatchNorm)
    BN divides out any scaling of ``(W_l[j], b_l[j])``: ``d_j = <Delta_in, theta_in>``. BN's
    epsilon breaks this for gradients too, by a relative O(eps / var) (about 1e-4 at eps=1e-5).
``translation`` (the softmax output layer)
    Adding the same constant to every logit changes nothing, so for each input column i of
    ``W_L`` and for the bias (one extra column) ``d_i = sum_k Delta[k, i]``.

Gradients satisfy ``d = 0`` (up to BN's epsilon). Every ``d`` is linear in ``Delta``, so
``Delta = lr * grad`` (SGD) has zero deviation, and the statistics below are differentiable in
``Delta`` (``|.|`` has a subgradient at 0): ``penalty`` can regularise a learned optimizer.

Shapes: ``params`` are the optimizee's tuple, each ``(P, ...)``; ``delta`` matches it with any
extra leading batch dims, ``(..., P, ...)``; results broadcast to ``(..., P[, n])``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from l2o.optimizees import HOMOGENEOUS, Optimizee, Params

CONSTRAINTS = ("rescale", "scale", "translation")


def constraints_of(optimizee: Optimizee) -> tuple[str, ...]:
    """Which symmetry constraints the optimizee's structure has, in ``CONSTRAINTS`` order."""
    out = []
    if optimizee.activation in HOMOGENEOUS:
        out.append("rescale")
    if optimizee.batchnorm:
        out.append("scale")
    out.append("translation")  # the softmax output layer is always there
    return tuple(out)


def _dot(delta: Tensor, theta: Tensor, dims: int) -> Tensor:
    """<delta, theta> over the last ``dims`` dims; delta may carry extra leading batch dims."""
    prod = delta * theta
    return prod.sum(dim=tuple(range(-dims, 0))) if dims else prod


def deviation_terms(
    optimizee: Optimizee,
    params: Params,
    delta: Params,
    constraints: tuple[str, ...] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-unit deviations and their normalisers: ``{constraint: (d, normaliser)}``.

    Both are ``(..., P, n)``, units concatenated over hidden layers (``rescale``, ``scale``) or
    the output layer's input columns plus the bias as column ``n - 1`` (``translation``).
    Normalisers, chosen so that ``|d| / normaliser`` is a scale-free fraction in [0, 1]:

    * rescale: ``|<Delta_in, theta_in>| + |<Delta_out, theta_out>|``;
    * scale: ``||Delta_in|| * ||theta_in||``, i.e. ``|d| / normaliser`` is |cos| of the angle
      between the step and the incoming weights (``|<Delta_in, theta_in>|`` would make the ratio
      identically 1, since ``d`` is that one inner product);
    * translation: ``sum_k |Delta[k, i]|``.

    ``constraints`` restricts the computation (default: all of ``constraints_of(optimizee)``);
    asking for one the optimizee lacks raises ``ValueError``.
    """
    available = constraints_of(optimizee)
    wanted = available if constraints is None else tuple(constraints)
    missing = [c for c in wanted if c not in available]
    if missing:
        raise ValueError(
            f"optimizee {optimizee.name} has no {missing} symmetry; it has {list(available)} "
            f"(rescale needs an activation in {sorted(HOMOGENEOUS)}, scale needs batchnorm)"
        )
    if len(delta) != len(params):
        raise ValueError(f"delta has {len(delta)} tensors but params has {len(params)}")

    out: dict[str, tuple[Tensor, Tensor]] = {}
    if "rescale" in wanted:
        ds, norms = [], []
        for layer in optimizee.hidden:
            if layer.bn_weight is not None:  # BN's affine output feeds the activation
                a = _dot(delta[layer.bn_weight], params[layer.bn_weight], 0)
                a = a + _dot(delta[layer.bn_bias], params[layer.bn_bias], 0)
            else:  # a neuron's row (1 dim) or a channel's kernel (in, k, k): 3 dims
                nd = params[layer.weight].dim() - 2
                a = _dot(delta[layer.weight], params[layer.weight], nd)
                a = a + _dot(delta[layer.bias], params[layer.bias], 0)
            # the entries of the next weight that read unit j (an MLP's column j)
            w, dw = params[layer.out_weight], delta[layer.out_weight]
            b = layer.sum_reading(dw * w)
            ds.append(a - b)
            norms.append(a.abs() + b.abs())
        out["rescale"] = (torch.cat(ds, -1), torch.cat(norms, -1))
    if "scale" in wanted:
        ds, norms = [], []
        for layer in optimizee.hidden:
            nd = params[layer.weight].dim() - 2  # flatten a kernel (in, k, k) like a row
            dw, w = delta[layer.weight].flatten(-nd), params[layer.weight].flatten(-nd)
            db, b = delta[layer.bias], params[layer.bias]
            ds.append(_dot(dw, w, 1) + db * b)
            # torch.linalg.vector_norm has a finite (zero) gradient at 0, unlike sqrt(sum sq)
            # float64: squares of BatchNorm-shrunk gradients (~1e-25) underflow in float32,
            # which made |cos| blow up to 1e7 on a Lion run
            dn = torch.linalg.vector_norm(torch.cat([dw, db.unsqueeze(-1)], -1).double(), dim=-1)
            tn = torch.linalg.vector_norm(torch.cat([w, b.unsqueeze(-1)], -1).double(), dim=-1)
            norms.append((dn * tn).to(dw.dtype))
        out["scale"] = (torch.cat(ds, -1), torch.cat(norms, -1))
    if "translation" in wanted:
        dw, db = delta[-2], delta[-1]  # output layer W_L (..., P, C, in), b_L (..., P, C)
        d = torch.cat([dw.sum(-2), db.sum(-1, keepdim=True)], -1)
        norm = torch.cat([dw.abs().sum(-2), db.abs().sum(-1, keepdim=True)], -1)
        out["translation"] = (d, norm)
    return {c: out[c] for c in wanted}


def deviations(optimizee: Optimizee, params: Params, delta: Params) -> dict[str, Tensor]:
    """``{constraint: d}`` with ``d`` of shape ``(..., P, n)``; see ``deviation_terms``."""
    return {c: d for c, (d, _) in deviation_terms(optimizee, params, delta).items()}


def summarize(terms: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Reduce ``deviation_terms`` output over units, per population member ``(..., P)``.

    Keys ``"<constraint>/abs_sum"`` = sum_j |d_j| (the primary figure),
    ``"<constraint>/signed_sum"`` = sum_j d_j (the seed code's convention; terms of opposite
    sign cancel, so it understates breaking: |signed_sum| <= abs_sum), and
    ``"<constraint>/normalized"`` = mean_j |d_j| / (normaliser_j + tiny), in [0, 1].
    """
    out: dict[str, Tensor] = {}
    for c, (d, norm) in terms.items():
        tiny = torch.finfo(d.dtype).tiny  # only guards 0/0 (e.g. dead ReLU units) -> 0
        out[f"{c}/abs_sum"] = d.abs().sum(-1)
        out[f"{c}/signed_sum"] = d.sum(-1)
        out[f"{c}/normalized"] = (d.abs() / (norm + tiny)).mean(-1)
    return out


def symmetry_metrics(optimizee: Optimizee, params: Params, delta: Params) -> dict[str, Tensor]:
    """All applicable constraints' ``summarize`` statistics for the step ``delta``."""
    return summarize(deviation_terms(optimizee, params, delta))


def penalty(optimizee: Optimizee, params: Params, delta: Params, constraint: str) -> Tensor:
    """sum_j |d_j| for one constraint, ``(..., P)``: a differentiable symmetry-breaking penalty.

    Gradients flow into ``delta`` (and ``params``, if they require grad: detach them to
    penalise only the optimizer's output). Raises ``ValueError`` if the optimizee has no such
    constraint (e.g. ``rescale`` on a sigmoid network).
    """
    if constraint not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {constraint!r}; choose one of {list(CONSTRAINTS)}")
    ((d, _),) = deviation_terms(optimizee, params, delta, (constraint,)).values()
    return d.abs().sum(-1)
