"""Gradient signal-to-noise, from the per-sample gradients of one minibatch.

Everything here is a function of the per-sample gradients g_1 ... g_N that the covariance
analysis already computes (:func:`l2o.covariance.per_sample_grads`): no second pass over the
data. With ḡ = 1/N Σ g_i the minibatch gradient (the gradient of the mean loss):

* **mean GSNR** (Liu et al. 2020, "Understanding Why Neural Networks Generalize Well Through
  GSNR of Parameters", eq. 1; Cockpit's MeanGSNR): per coordinate j,
  ``r_j = ḡ_j² / σ_j²`` with ``σ_j² = 1/N Σ_i (g_ij − ḡ_j)²``, averaged over the coordinates.
  Coordinates whose per-sample gradients are all equal (σ_j = 0: e.g. the weights of an MNIST
  pixel that is blank in the whole batch, exactly zero for every sample) have no defined ratio
  and are left out of the mean; their share is reported as ``constant_fraction`` (Cockpit adds
  eps = 1e-5 to σ² instead, which scores them 0 and pulls the mean down by their share). A
  coordinate with no signal scores 1/(N−3) on average (Gaussian noise), not 0: ḡ_j² carries
  the noise σ_j²/N.
* **norm test** (Byrd, Chin, Nocedal & Wu 2012, "Sample size selection in optimization
  methods for machine learning", eq. 3.9; Cockpit's NormTest): the smallest θ for which
  ``1/N ||Var_i g_i||_1 <= θ² ||ḡ||²`` holds, i.e.
  ``θ = sqrt(Σ_j s_j² / N) / ||ḡ||`` with ``s_j² = 1/(N−1) Σ_i (g_ij − ḡ_j)²``: the minibatch
  gradient's relative error. Byrd et al. grow the batch when it exceeds their θ (~0.5-0.9).
* **inner-product test** (Bollapragada, Byrd & Nocedal 2018, "Adaptive sampling strategies for
  stochastic optimization", eq. 3.4; Cockpit's InnerTest):
  ``θ = sqrt(Var_i <g_i, ḡ> / N) / ||ḡ||²`` (Var with 1/(N−1)): how well the minibatch
  gradient's direction is a descent direction of the expected loss.
* **orthogonality test** (same paper, eq. 3.6; Cockpit's OrthoTest):
  ``ν = sqrt(Σ_i ||g_i − (<g_i, ḡ>/||ḡ||²) ḡ||² / (N (N−1))) / ||ḡ||``: the noise orthogonal
  to ḡ, relative to it.

Cost: four reads of the N x D gradients (float64 accumulation, no float64 copy); nothing of
size D x D.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

Params = tuple[Tensor, ...]


class GradientNoise(NamedTuple):
    mean_gsnr: Tensor  # (P,) mean over non-constant coordinates of ḡ_j² / σ_j²
    constant_fraction: Tensor  # (P,) share of coordinates left out (σ_j = 0)
    norm_test: Tensor  # (P,) θ of Byrd et al. 2012
    inner_product_test: Tensor  # (P,) θ of Bollapragada et al. 2018
    orthogonality_test: Tensor  # (P,) ν of Bollapragada et al. 2018
    num_samples: int


def gradient_noise(per_sample_grads: Params | Tensor) -> GradientNoise:
    """Mean GSNR, norm test, inner-product test and orthogonality test of one minibatch.

    Args:
        per_sample_grads: the gradient of each sample's loss, as
            :func:`l2o.covariance.per_sample_grads` returns them (a tuple of (N, P, *shape)
            tensors), or one tensor (N, P, D), or (N, D) for one optimizee (P = 1). The mean
            over N must be the minibatch gradient (per-sample gradients of the mean loss times
            N, i.e. of each sample's own loss).

    Returns per-member values, shape (P,). A member whose minibatch gradient is exactly zero
    gets inf for the tests; one whose every coordinate is constant gets NaN for the GSNR.
    """
    blocks = _blocks(per_sample_grads)
    n = blocks[0].shape[0]
    pop = blocks[0].shape[1]
    f64 = dict(dtype=torch.float64)
    zero = torch.zeros(pop, **f64, device=blocks[0].device)
    gsnr_sum, used, total = zero.clone(), zero.clone(), 0
    var_sum = zero.clone()  # Σ_j s_j² (1/(N−1))
    mean_sq = zero.clone()  # ||ḡ||²
    dots = torch.zeros(n, pop, **f64, device=blocks[0].device)  # <g_i, ḡ>
    sq_norms = torch.zeros_like(dots)  # ||g_i||²
    for block in blocks:
        # Reductions accumulate in float64 without a float64 copy of the block (one read each).
        mean = block.mean(0, **f64)  # (P, d)
        second = torch.linalg.vector_norm(block, dim=0, **f64).square() / n
        # σ² = E[g²] − ḡ²: exact to ~1e-16 ḡ² in float64, i.e. for any GSNR below ~1e12.
        var0 = (second - mean.square()).clamp_min(0)
        live = var0 > 1e-14 * second  # all samples equal (to rounding): no ratio
        gsnr_sum += torch.where(live, mean.square() / var0.where(live, 1.0), 0.0).sum(1)
        used += live.sum(1)
        total += block.shape[2]
        var_sum += var0.sum(1) * n / (n - 1)
        mean_sq += mean.square().sum(1)
        # In the block's dtype (a float32 GEMM: ~1e-7 relative, far below these tests' noise).
        dots += torch.einsum("npd,pd->np", block, mean.to(block.dtype)).double()
        sq_norms += torch.linalg.vector_norm(block, dim=2, **f64).square()
    if not (torch.isfinite(mean_sq).all() and torch.isfinite(sq_norms).all()):
        raise ValueError("per-sample gradients must be finite")
    mean_gsnr = gsnr_sum / used  # NaN when no coordinate varies
    norm_test = (var_sum / n).sqrt() / mean_sq.sqrt()  # inf when ḡ = 0
    inner = (dots.var(0, unbiased=True) / n).sqrt() / mean_sq
    # Σ_i ||g_i − c_i ḡ||² = Σ_i ||g_i||² − <g_i, ḡ>² / ||ḡ||² (c_i = <g_i, ḡ> / ||ḡ||²).
    orth_sq = (sq_norms - dots.square() / mean_sq).sum(0).clamp_min(0)
    ortho = (orth_sq / (n * (n - 1))).sqrt() / mean_sq.sqrt()
    return GradientNoise(mean_gsnr, 1 - used / total, norm_test, inner, ortho, n)


def _blocks(grads: Params | Tensor) -> list[Tensor]:
    """(N, P, d_k) views of the input, checked."""
    if isinstance(grads, Tensor):
        if grads.dim() == 2:
            grads = grads[:, None, :]
        if grads.dim() != 3:
            raise ValueError(
                f"per-sample gradients as one tensor must be (N, D) or (N, P, D), got "
                f"{tuple(grads.shape)}"
            )
        blocks = [grads]
    elif isinstance(grads, (tuple, list)) and grads:
        if any(g.dim() < 2 for g in grads):
            raise ValueError("each per-sample gradient tensor must be (N, P, *shape)")
        blocks = [_flat_view(g) for g in grads]
    else:
        raise ValueError("per_sample_grads must be a tensor or a non-empty tuple of tensors")
    n, pop = blocks[0].shape[:2]
    if any(b.shape[:2] != (n, pop) for b in blocks):
        raise ValueError(
            f"all tensors need the same (N, P) leading dims: {[tuple(b.shape[:2]) for b in blocks]}"
        )
    if n < 2:
        raise ValueError(f"need at least 2 per-sample gradients for a variance, got {n}")
    return blocks


def _flat_view(g: Tensor) -> Tensor:
    """(N, P, *shape) -> (N, P, d) without a copy where possible: the coordinates are permuted
    into memory order first (vmap's per-sample gradients come out transposed), which changes
    nothing here, every statistic being a sum over coordinates."""
    order = sorted(range(2, g.dim()), key=lambda k: -g.stride(k))
    return g.permute(0, 1, *order).reshape(g.shape[0], g.shape[1], -1)
