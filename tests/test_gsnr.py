"""l2o.gsnr against values worked out by hand and against a known Gaussian distribution."""

from __future__ import annotations

import math

import pytest
import torch

from l2o.covariance import per_sample_grads
from l2o.gsnr import gradient_noise
from l2o.optimizees import MLPOptimizee, grads_of

DTYPE = torch.float64


def test_hand_computed_values():
    """g_1 = (1, 0), g_2 = (2, 0), g_3 = (3, 3), plus a coordinate that is 0 for every sample.

    ḡ = (2, 1, 0); σ² (1/N) = (2/3, 2, 0) -> r = (6, 1/2), the constant third is left out:
    mean GSNR 13/4, constant fraction 1/3. s² (1/(N−1)) = (1, 3): norm test sqrt(4/3 / 5).
    <g_i, ḡ> = (2, 4, 9), variance (1/(N−1)) 13: inner-product test sqrt(13/3) / 5.
    g_i − (<g_i, ḡ>/5) ḡ = (0.2, −0.4), (0.4, −0.8), (−0.6, 1.2): squares 0.2 + 0.8 + 1.8 = 2.8,
    orthogonality test sqrt(2.8 / 6) / sqrt(5)."""
    g = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [3.0, 3.0, 0.0]], dtype=DTYPE)
    out = gradient_noise(g)
    assert out.num_samples == 3
    expected = {
        "mean_gsnr": 13 / 4,
        "constant_fraction": 1 / 3,
        "norm_test": math.sqrt(4 / 3 / 5),
        "inner_product_test": math.sqrt(13 / 3) / 5,
        "orthogonality_test": math.sqrt(2.8 / 6) / math.sqrt(5),
    }
    for key, value in expected.items():
        assert getattr(out, key).shape == (1,)
        assert getattr(out, key).item() == pytest.approx(value, rel=1e-12), key


def test_known_gaussian_distribution():
    """g_i ~ N(μ, diag σ²), N = 20,000: mean GSNR -> mean(μ²/σ²) (+ ~1/N bias), the norm test
    -> sqrt(Σσ² / (N ||μ||²)), the inner-product test -> sqrt(Σ μ_j² σ_j² / N) / ||μ||², the
    orthogonality test -> sqrt((Σσ² − Σ μ_j² σ_j² / ||μ||²) / (N ||μ||²))."""
    gen = torch.Generator().manual_seed(0)
    d, n = 40, 20_000
    mu = torch.linspace(-1.0, 2.0, d, dtype=DTYPE)
    sigma = torch.linspace(0.5, 3.0, d, dtype=DTYPE)
    g = mu + sigma * torch.randn(n, d, generator=gen, dtype=DTYPE)
    out = gradient_noise(g)
    true_gsnr = (mu.square() / sigma.square()).mean().item()
    assert out.mean_gsnr.item() == pytest.approx(true_gsnr, rel=0.03)
    norm = mu.square().sum().item()
    assert out.norm_test.item() == pytest.approx(
        math.sqrt(sigma.square().sum().item() / (n * norm)), rel=0.02
    )
    assert out.inner_product_test.item() == pytest.approx(
        math.sqrt((mu.square() * sigma.square()).sum().item() / n) / norm, rel=0.03
    )
    # The noise orthogonal to μ: Σσ² minus its component along μ, Σ μ_j² σ_j² / ||μ||².
    orth = sigma.square().sum().item() - (mu.square() * sigma.square()).sum().item() / norm
    assert out.orthogonality_test.item() == pytest.approx(math.sqrt(orth / (n * norm)), rel=0.03)
    assert out.constant_fraction.item() == 0


def test_no_signal_scores_one_over_n():
    """μ = 0: each coordinate's ratio is χ²₁ / χ²_{N−1}, of mean 1/(N−3)."""
    gen = torch.Generator().manual_seed(1)
    n = 50
    g = torch.randn(n, 4000, generator=gen, dtype=DTYPE)
    assert gradient_noise(g).mean_gsnr.item() == pytest.approx(1 / (n - 3), rel=0.1)


def test_tuple_form_population_and_float32_agree():
    """Per-sample gradients of a real population of 2 (the covariance analysis' layout): the
    tuple, the (N, P, D) tensor, each member's (N, D) and float32 copies all agree, and ḡ is
    the minibatch gradient."""
    optimizee = MLPOptimizee(sizes=(6, 5, 3), activation="tanh")
    gen = torch.Generator().manual_seed(0)
    params = optimizee.init(2, generator=gen, dtype=DTYPE)
    x = torch.randn(2, 24, 6, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (2, 24), generator=gen)
    per = per_sample_grads(optimizee, params, x, y)
    flat = torch.cat([t.reshape(24, 2, -1) for t in per], 2)
    whole = gradient_noise(per)
    torch.testing.assert_close(
        flat.mean(0),
        torch.cat([g.reshape(2, -1) for g in grads_of(optimizee.loss, params, x, y)[1]], 1),
    )
    for other in (gradient_noise(flat),):
        for a, b in zip(whole[:5], other[:5]):
            torch.testing.assert_close(a, b)
    for m in range(2):
        member = gradient_noise(flat[:, m])
        for a, b in zip(whole[:5], member[:5]):
            torch.testing.assert_close(a[m : m + 1], b)
    single = gradient_noise(tuple(t.float() for t in per))
    for a, b in zip(whole[:5], single[:5]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        gradient_noise(torch.ones(1, 5))
    with pytest.raises(ValueError, match="same .N, P. leading dims"):
        gradient_noise((torch.ones(4, 1, 3), torch.ones(5, 1, 2)))
    with pytest.raises(ValueError, match="finite"):
        gradient_noise(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"\(N, D\) or \(N, P, D\)"):
        gradient_noise(torch.ones(3))
