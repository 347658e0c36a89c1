"""Tail-index estimator: recovers alpha of stable samples, scale-free, zero-robust variant."""

import pytest
import torch
from scipy.stats import levy_stable

from l2o.tail_index import alpha_estimate, block_size, noise_alphas

N = 100_000


def stable(alpha, n=N, seed=0):
    return torch.from_numpy(levy_stable.rvs(alpha, 0.0, size=n, random_state=seed))


@pytest.mark.parametrize("alpha", [1.2, 1.5, 1.8, 2.0])
def test_recovers_alpha_and_is_scale_free(alpha):
    x = stable(alpha)
    est = alpha_estimate(x)
    assert est == pytest.approx(alpha, abs=0.1)
    for scale in (1e-3, 1e3):
        assert alpha_estimate(x * scale) == pytest.approx(est, abs=1e-6)


def test_block_size_and_prime_k():
    assert block_size(100_000) == 250
    assert block_size(12) == 3
    assert block_size(13) == 1
    x = stable(1.5, n=10_007)  # prime: the last sample is dropped, K = 10_006 = 2 * 5003
    assert alpha_estimate(x) == alpha_estimate(x[:-1])
    assert alpha_estimate(torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5])) > 0  # K = 5 -> 4, m = 2
    with pytest.raises(ValueError, match="at least 4 samples"):
        alpha_estimate(torch.ones(3))
    with pytest.raises(ValueError, match="nonzero"):
        alpha_estimate(torch.tensor([0.0, 0.0, 1.0, 0.0, 2.0, 0.0]))


def test_vector_samples_use_norms():
    # i.i.d. Gaussian vectors: sums of m rows have norms sqrt(m) larger -> alpha = 2
    x = torch.randn(40_000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert alpha_estimate(x) == pytest.approx(2.0, abs=0.1)


def test_zeros_pull_pooled_down_but_not_robust():
    # (n_batches, D) noise where half the coordinates are always exactly zero (dead pixels)
    n_batches, d = 50, 4000
    noise = torch.zeros(n_batches, d, dtype=torch.float64)
    live = torch.arange(0, d, 2)
    noise[:, live] = stable(1.5, n=n_batches * len(live)).view(n_batches, -1)
    out = noise_alphas(noise)
    assert out["zero_fraction"] == pytest.approx(0.5)
    assert out["robust"] == pytest.approx(1.5, abs=0.1)
    assert out["pooled"] < out["robust"] - 0.2
    assert out["pooled"] == alpha_estimate(noise.flatten())
    with pytest.raises(ValueError, match="n_batches, D"):
        noise_alphas(noise.flatten())
