"""Tail-index estimators against ground truth: alpha-stable samples of known alpha.

The minibatch-noise tests build noise the way ``callbacks.tail_index`` does (each row a
minibatch's quantity minus the mean over minibatches, so every column sums to zero) from
symmetric alpha-stable samples with mixed coordinate scales, and check that ``standardized``
recovers alpha within 0.1 while ``pooled`` and ``robust`` are off by more than 0.1: the test
fails on today's estimators and passes on the new one.
"""

import math

import pytest
import torch
from scipy.stats import cauchy, ks_2samp, kstest, levy_stable, norm

from l2o.tail_index import (
    STATISTICS,
    alpha_estimate,
    block_size,
    layer_alphas,
    noise_alphas,
    standardized_alpha,
    symmetric_stable,
)

N = 100_000
ALPHAS = [1.2, 1.5, 1.8, 2.0]
N_BATCHES = [39, 128]  # MNIST's 5,000-image subset / 128, and a 16k-image analysis set
SEEDS = [0, 1, 2]
D = 4000
TOL = 0.1


def stable(alpha, n=N, seed=0):
    return torch.from_numpy(levy_stable.rvs(alpha, 0.0, size=n, random_state=seed))


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------- the ground-truth generator


@pytest.mark.parametrize("alpha", [0.8, 1.2, 1.5, 1.8])
def test_symmetric_stable_matches_scipy(alpha):
    ours = symmetric_stable(alpha, (20_000,), gen(0)).numpy()
    assert ks_2samp(ours, levy_stable.rvs(alpha, 0.0, size=20_000, random_state=1)).pvalue > 1e-3
    # the comparison has power: alpha off by 0.3 is rejected
    wrong = levy_stable.rvs(alpha - 0.3, 0.0, size=20_000, random_state=1)
    assert ks_2samp(ours, wrong).pvalue < 1e-3


def test_symmetric_stable_closed_forms_and_seeding():
    # S_2(1, 0, 0) is N(0, 2); S_1(1, 0, 0) is the standard Cauchy
    gauss = symmetric_stable(2.0, (20_000,), gen(0)).numpy()
    assert kstest(gauss, norm(scale=2**0.5).cdf).pvalue > 1e-3
    assert kstest(gauss, norm().cdf).pvalue < 1e-3  # the wrong scale is rejected
    assert kstest(symmetric_stable(1.0, (20_000,), gen(0)).numpy(), cauchy().cdf).pvalue > 1e-3
    a, b = symmetric_stable(1.5, (3, 4), gen(7)), symmetric_stable(1.5, (3, 4), gen(7))
    assert torch.equal(a, b) and a.dtype == torch.float64
    for bad in (0.0, 2.5):
        with pytest.raises(ValueError, match="alpha must be in"):
            symmetric_stable(bad, (3,))


# ----------------------------------------------------------------- Corollary 2.4 on i.i.d. data


@pytest.mark.parametrize("alpha", ALPHAS)
def test_recovers_alpha_and_is_scale_free(alpha):
    x = stable(alpha)
    est = alpha_estimate(x)
    assert est == pytest.approx(alpha, abs=TOL)
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
    x = torch.randn(40_000, 3, generator=gen(0), dtype=torch.float64)
    assert alpha_estimate(x) == pytest.approx(2.0, abs=TOL)


# ----------------------------------------------------------------- minibatch noise


def scales(kind, d, g):
    """Per-coordinate scales: the settings in which pooling coordinates goes wrong."""
    if kind == "unscaled":
        return torch.ones(d, dtype=torch.float64)
    if kind == "log_uniform":  # spread log-uniformly over three decades
        return 10 ** (-3 * torch.rand(d, generator=g, dtype=torch.float64))
    if kind == "half_at_1e-3":  # half the coordinates at 1e-3, at random positions
        s = torch.ones(d, dtype=torch.float64)
        s[torch.randperm(d, generator=g)[: d // 2]] = 1e-3
        return s
    if kind == "contiguous_blocks":  # runs of 64 coordinates (a unit's weights), one scale each
        runs = 10 ** (-3 * torch.rand(-(-d // 64), generator=g, dtype=torch.float64))
        return runs.repeat_interleave(64)[:d]
    raise ValueError(kind)


def centred_noise(alpha, n, kind="unscaled", seed=0, d=D):
    """(n, d) noise as the callback builds it: minibatch quantity minus the minibatch mean."""
    g = gen(seed)
    x = symmetric_stable(alpha, (n, d), g) * scales(kind, d, g)
    return x - x.mean(dim=0)


@pytest.mark.parametrize("kind", ["log_uniform", "half_at_1e-3", "contiguous_blocks"])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_standardized_is_right_on_mixed_scales_where_pooling_fails(alpha, kind):
    for n in N_BATCHES:
        for seed in SEEDS:
            out = noise_alphas(centred_noise(alpha, n, kind, seed))
            where = (alpha, kind, n, seed, out)
            assert out["standardized"] == pytest.approx(alpha, abs=TOL), where
            assert abs(out["pooled"] - alpha) > TOL, where
            assert abs(out["robust"] - alpha) > TOL, where
            assert out["atom_fraction"] == 0.0 and out["zero_fraction"] == 0.0


@pytest.mark.parametrize("alpha", ALPHAS)
def test_orderings_of_centred_noise(alpha):
    """Rows sum to zero. Read row by row, unscaled noise is fine for every variant; read column
    by column, each block of the pooled sample sums whole columns (to ~0) and pooled/robust
    fail. standardized has no reading order: permuting coordinates changes nothing, permuting
    minibatches (other pairs) stays within the tolerance."""
    for n in N_BATCHES:
        for seed in SEEDS:
            noise = centred_noise(alpha, n, seed=seed)
            out = noise_alphas(noise)
            for variant in ("pooled", "robust", "standardized"):
                assert out[variant] == pytest.approx(alpha, abs=TOL), (variant, n, seed, out)
            column_major = noise_alphas(noise.T.contiguous())  # flattens noise column by column
            assert abs(column_major["pooled"] - alpha) > TOL, (n, seed, column_major)
            assert abs(column_major["robust"] - alpha) > TOL, (n, seed, column_major)
            g = gen(100 + seed)
            cols = noise[:, torch.randperm(D, generator=g)]
            assert standardized_alpha(cols)[0] == pytest.approx(out["standardized"], abs=1e-9)
            rows = noise[torch.randperm(n, generator=g)]
            assert standardized_alpha(rows)[0] == pytest.approx(alpha, abs=TOL)


@pytest.mark.parametrize("alpha", [1.8, 2.0])
def test_correlated_coordinates(alpha):
    """Every coordinate shares a per-minibatch factor of 1/10 its scale (an outlier example
    moves many weights at once). Each coordinate is still alpha-stable, so standardized is
    right; pooled block sums grow faster than m^(1/alpha) and read 1.47-1.66. (A heavier-tailed
    shared factor leaves standardized unbiased but only as precise as a few coordinates: at
    alpha = 1.2, n = 39 one seed reads 1.02, so it is not tested below alpha = 1.8.)"""
    for n in N_BATCHES:
        for seed in SEEDS:
            g = gen(seed)
            x = symmetric_stable(alpha, (n, D), g) + 0.1 * symmetric_stable(alpha, (n, 1), g)
            out = noise_alphas(x - x.mean(dim=0))
            assert out["standardized"] == pytest.approx(alpha, abs=TOL), (n, seed, out)
            assert abs(out["pooled"] - alpha) > TOL and abs(out["robust"] - alpha) > TOL, out


@pytest.mark.parametrize("beta", [-0.8, 0.8])
def test_standardized_handles_skewed_noise(beta):
    # pair differences of skewed alpha-stable noise are symmetric alpha-stable, same alpha
    for alpha in (1.5, 1.8):
        x = levy_stable.rvs(alpha, beta, size=(128, 2000), random_state=3)
        x = torch.from_numpy(x) * scales("log_uniform", 2000, gen(3))
        assert standardized_alpha(x)[0] == pytest.approx(alpha, abs=TOL)


def test_standardized_is_exactly_per_coordinate():
    noise = centred_noise(1.5, 39, "log_uniform")
    alpha = standardized_alpha(noise)[0]
    c = 10 ** (6 * torch.rand(D, generator=gen(1), dtype=torch.float64) - 3)
    # a scale of each coordinate's own and an offset of its own (e.g. noise centred on the
    # update of the full-batch gradient instead of the mean update) cancel
    assert standardized_alpha(noise * c)[0] == pytest.approx(alpha, abs=1e-5)
    assert standardized_alpha(noise + c)[0] == pytest.approx(alpha, abs=1e-5)
    assert noise_alphas(noise * c)["robust"] != pytest.approx(
        noise_alphas(noise)["robust"], abs=0.05
    )
    # float32 noise (what the callback passes) gives the float64 answer
    assert standardized_alpha(noise.float())[0] == pytest.approx(alpha, abs=1e-3)


def test_zeros_pull_pooled_down_but_not_robust_or_standardized():
    # (n_batches, D) noise where half the coordinates are always exactly zero (dead pixels)
    n_batches, d = 50, 4000
    noise = torch.zeros(n_batches, d, dtype=torch.float64)
    live = torch.arange(0, d, 2)
    noise[:, live] = stable(1.5, n=n_batches * len(live)).view(n_batches, -1)
    out = noise_alphas(noise)
    assert out["zero_fraction"] == pytest.approx(0.5)
    assert out["atom_fraction"] == pytest.approx(0.5)
    assert out["robust"] == pytest.approx(1.5, abs=TOL)
    assert out["standardized"] == pytest.approx(1.5, abs=TOL)
    assert out["pooled"] < out["robust"] - 0.2
    # the same estimate (its log sums are taken per coordinate, then added: float rounding)
    assert out["pooled"] == pytest.approx(alpha_estimate(noise.flatten()), rel=1e-12)
    # coordinates are never mixed: the zero ones change nothing (but float rounding)
    assert out["standardized"] == pytest.approx(standardized_alpha(noise[:, live])[0], rel=1e-9)
    assert list(out) == list(STATISTICS)
    with pytest.raises(ValueError, match="n_batches, D"):
        noise_alphas(noise.flatten())


def test_identically_zero_coordinates_do_not_move_standardized():
    for alpha in (1.2, 2.0):
        noise = centred_noise(alpha, 39, "log_uniform")
        padded = torch.zeros(39, 5000, dtype=torch.float64)
        where = torch.randperm(5000, generator=gen(2))[:D].sort().values  # 20% zero columns
        padded[:, where] = noise
        got, atoms = standardized_alpha(padded)
        assert got == pytest.approx(standardized_alpha(noise)[0], rel=1e-9)
        assert atoms == pytest.approx(0.2)


def test_atoms_are_dropped_and_reported():
    # a quarter of the coordinates repeat one value on a random half of the minibatches (a
    # pixel black in every image of those minibatches): they are dropped, the rest is right
    n, alpha = 128, 1.5
    x = symmetric_stable(alpha, (n, D), gen(0))
    sparse = torch.rand(n, D, generator=gen(1)) < 0.5
    sparse[:, D // 4 :] = False
    x[sparse] = 0.0
    out = noise_alphas(x - x.mean(dim=0))
    assert out["atom_fraction"] == pytest.approx(0.25)
    assert out["standardized"] == pytest.approx(alpha, abs=TOL)
    # sign-like noise is all atoms: no standardized estimate, pooled and robust still give one
    signs = torch.randint(-1, 2, (n, 50), generator=gen(2)).double()
    out = noise_alphas(signs)
    assert math.isnan(out["standardized"]) and out["atom_fraction"] == 1.0
    assert math.isfinite(out["robust"])


def test_standardized_needs_eight_minibatches_and_finite_noise():
    out = noise_alphas(centred_noise(1.5, 7))
    assert math.isnan(out["standardized"]) and math.isfinite(out["robust"])
    assert math.isfinite(noise_alphas(centred_noise(1.5, 8))["standardized"])
    noise = centred_noise(1.5, 39)
    noise[3, 5] = math.inf
    with pytest.raises(ValueError, match="non-finite"):
        noise_alphas(noise)
    noise[3, 5] = math.nan
    with pytest.raises(ValueError, match="1 non-finite"):
        noise_alphas(noise.float())
    # finite entries whose column sum overflows are still noise (the check sums columns first)
    noise[3, 5] = 0.0
    noise[:2, 5] = 3e38
    assert math.isfinite(noise_alphas(noise.float())["robust"])
    with pytest.raises(ValueError, match="pairings"):
        standardized_alpha(centred_noise(1.5, 39), pairings=0)


# ----------------------------------------------------------------- per parameter tensor


def test_layer_alphas():
    """Four tensors of different alpha and scale (one frozen): each gets its own alpha."""
    n, g = 128, gen(5)
    truth = [1.2, 2.0, 1.5]
    parts = [
        symmetric_stable(1.2, (n, 3000), g) * scales("log_uniform", 3000, g),
        symmetric_stable(2.0, (n, 1500), g) * 1e-3,
        symmetric_stable(1.5, (n, 500), g) * scales("contiguous_blocks", 500, g),
        torch.zeros(n, 10, dtype=torch.float64),  # a frozen layer
    ]
    noise = torch.cat(parts, dim=1)
    noise -= noise.mean(dim=0)
    sizes = [p.shape[1] for p in parts]
    layers = layer_alphas(noise, sizes)
    assert len(layers) == 4 and all(list(r) == list(STATISTICS) for r in layers)
    for r, alpha in zip(layers, truth):
        assert r["standardized"] == pytest.approx(alpha, abs=TOL), (alpha, r)
        assert r["zero_fraction"] == 0.0 and r["atom_fraction"] == 0.0
    frozen = layers[3]
    assert all(math.isnan(frozen[k]) for k in ("pooled", "robust", "standardized"))
    assert frozen["zero_fraction"] == 1.0 and frozen["atom_fraction"] == 1.0
    # the uniformly scaled layer is fine for robust too; the log-uniform one is not
    assert layers[1]["robust"] == pytest.approx(2.0, abs=TOL)
    assert abs(layers[0]["robust"] - 1.2) > TOL
    # standardized averages per-coordinate terms: the network's 1/alpha is the layers' 1/alpha
    # weighted by their coordinates without atoms
    whole = noise_alphas(noise)["standardized"]
    kept = [(1 - r["atom_fraction"]) * s for r, s in zip(layers, sizes)]
    inv = sum(k / r["standardized"] for k, r in zip(kept, layers) if k) / sum(kept)
    assert 1 / whole == pytest.approx(inv, rel=1e-9)
    # the parameter-tuple form (n_batches, population, *shape) gives the same numbers
    shapes = [(1, 30, 100), (1, 1500), (1, 20, 25), (1, 10)]
    tensors = [t.reshape(n, *s) for t, s in zip(torch.split(noise, sizes, dim=1), shapes)]
    again = layer_alphas(tuple(tensors))
    for a, b in zip(layers, again):
        assert a == pytest.approx(b, nan_ok=True)


def test_layer_alphas_rejects_bad_input():
    noise = centred_noise(1.5, 39, d=100)
    with pytest.raises(ValueError, match="sum to D = 100"):
        layer_alphas(noise, [50, 40])
    with pytest.raises(ValueError, match="pass sizes"):
        layer_alphas(noise)
    with pytest.raises(ValueError, match="omit them"):
        layer_alphas((noise,), [100])
    with pytest.raises(ValueError, match="disagree on n_batches"):
        layer_alphas((noise, noise[:10]))
