"""Tail index of gradient (or update) noise, as in Simsekli et al. (2019).

The estimator is Mohammadi et al. (2015), Corollary 2.4: for K i.i.d. symmetric alpha-stable
samples X_j split into K/m blocks of m consecutive samples with sums Y_i, the sum of m samples
scales as m^(1/alpha), so

    1/alpha_hat = (mean_i log|Y_i| - mean_j log|X_j|) / log m.

alpha = 2 is Gaussian noise; smaller alpha means heavier tails. Like Simsekli et al. we take m
as the largest divisor of K not above sqrt(K), add ``np.spacing(1)`` inside the logs, and for
vector samples use Euclidean norms. Everything is computed in float64. The estimate is not
clipped to (0, 2]: values outside come from noise that is not alpha-stable (or too few samples).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# Simsekli et al.'s guard against log(0); tiny next to any sample that is not exactly zero.
_LOG_EPS = float(np.spacing(1))
MIN_SAMPLES = 4  # the smallest K with a block size m > 1


def block_size(k: int) -> int:
    """Largest divisor of k not above sqrt(k) (1 when k is prime)."""
    m = 1
    for i in range(2, math.isqrt(k) + 1):
        if k % i == 0:
            m = i
    return m


def alpha_estimate(x: Tensor) -> float:
    """Tail index of the samples ``x``: ``(K,)`` scalars, or ``(K, D)`` vectors (row norms).

    Samples keep their order (blocks are consecutive). If K is prime, trailing samples are dropped
    until K has a divisor > 1. Raises ``ValueError`` for K < 4 or fewer than 4 nonzero samples
    (their log would be log(eps) alone, meaningless). Invariant to rescaling ``x`` as long as the
    samples are far above ``np.spacing(1)``.
    """
    x = torch.as_tensor(x).detach().to(dtype=torch.float64)
    if x.dim() not in (1, 2):
        raise ValueError(f"expected samples of shape (K,) or (K, D), got {tuple(x.shape)}")
    k = x.shape[0]
    if k < MIN_SAMPLES:
        raise ValueError(f"need at least {MIN_SAMPLES} samples for a tail index, got {k}")
    mags = x.abs() if x.dim() == 1 else torch.linalg.vector_norm(x, dim=1)
    if int((mags > 0).sum()) < MIN_SAMPLES:
        raise ValueError(f"need at least {MIN_SAMPLES} nonzero samples for a tail index")
    m = block_size(k)
    while m == 1:  # prime K: drop the last sample(s); K >= 4 so K - 1 is composite or >= 4
        k -= 1
        m = block_size(k)
    x = x[:k]
    y = x.reshape(k // m, m, *x.shape[1:]).sum(dim=1)
    y_mags = y.abs() if y.dim() == 1 else torch.linalg.vector_norm(y, dim=1)
    log_y = torch.log(y_mags + _LOG_EPS).mean()
    log_x = torch.log(mags[:k] + _LOG_EPS).mean()
    inv_alpha = float((log_y - log_x) / math.log(m))
    return math.inf if inv_alpha == 0 else 1.0 / inv_alpha


def noise_alphas(noise: Tensor) -> dict[str, float]:
    """Tail indices of minibatch noise, ``noise`` of shape ``(n_batches, D)``.

    Each row is one minibatch's quantity (gradient or update) minus the full-batch one.

    * ``pooled``: ``alpha_estimate`` on all ``n_batches * D`` coordinates flattened row by row,
      as the seed code (and Simsekli et al.'s scalar variant) does. Exactly-zero coordinates, e.g.
      gradients of first-layer weights reading MNIST's always-black border pixels, each add
      log(eps) = -36 to the mean log|X| and pull the estimate *down*, faking heavy tails.
    * ``robust``: the same estimator on the nonzero coordinates only (still in row-major order).
    * ``zero_fraction``: the fraction of exactly-zero coordinates, to tell the two apart.
    """
    noise = torch.as_tensor(noise).detach().to(dtype=torch.float64)
    if noise.dim() != 2:
        raise ValueError(f"noise must be (n_batches, D), got shape {tuple(noise.shape)}")
    flat = noise.reshape(-1)
    nonzero = flat[flat != 0]
    return {
        "pooled": alpha_estimate(flat),
        "robust": alpha_estimate(nonzero),
        "zero_fraction": 1.0 - nonzero.numel() / max(flat.numel(), 1),
    }
