"""Tail index of gradient (or update) noise, as in Simsekli et al. (2019).

The estimator is Mohammadi et al. (2015), Corollary 2.4: for K i.i.d. symmetric alpha-stable
samples X_j split into K/m blocks of m consecutive samples with sums Y_i, the sum of m samples
scales as m^(1/alpha), so

    1/alpha_hat = (mean_i log|Y_i| - mean_j log|X_j|) / log m.

alpha = 2 is Gaussian noise; smaller alpha means heavier tails. Like Simsekli et al. we take m
as the largest divisor of K not above sqrt(K), add ``np.spacing(1)`` inside the logs, and for
vector samples use Euclidean norms, all in float64 (but for float32 noise, ``noise_alphas``
takes the logs of the samples in float32 and sums them in float64: ~1e-8 relative). The
estimate is not clipped to (0, 2]: values outside come from noise that is not alpha-stable (or
too few samples).

Minibatch noise is a ``(n_batches, D)`` matrix, and ``noise_alphas`` reads it three ways:
``pooled`` and ``robust`` (the seed code's reading: all coordinates as one sample, row by row)
and ``standardized`` (each coordinate against itself only; see ``standardized_alpha``). Only
the last is right when coordinates have different scales or are correlated: on Gaussian noise
whose coordinate scales spread over three decades the first two read ~1.1. ``layer_alphas``
gives all three per parameter tensor; ``symmetric_stable`` draws ground-truth samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# Simsekli et al.'s guard against log(0); tiny next to any sample that is not exactly zero.
_LOG_EPS = float(np.spacing(1))
MIN_SAMPLES = 4  # the smallest K with a block size m > 1
MIN_PAIRS = 4  # standardized: blocks of m = isqrt(pairs) >= 2 pair differences, so n >= 8
PAIRINGS = 8  # standardized: row pairings averaged (fewer: faster, noisier)
PAIRING_SEED = 0  # fixed, so that the estimate is a deterministic function of the noise
STATISTICS = ("pooled", "robust", "standardized", "zero_fraction", "atom_fraction")


def block_size(k: int) -> int:
    """Largest divisor of k not above sqrt(k) (1 when k is prime)."""
    for i in range(math.isqrt(k), 1, -1):  # from the top: the first divisor is the largest
        if k % i == 0:
            return i
    return 1


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
    return _alpha_of(x, mags, k)


def _trimmed(k: int) -> tuple[int, int]:
    """The number of samples used out of k, and their block size m > 1: while k is prime, the
    last sample is dropped (k >= 4, so k - 1 is composite or >= 4)."""
    m = block_size(k)
    while m == 1:
        k -= 1
        m = block_size(k)
    return k, m


def _alpha_of(x: Tensor, mags: Tensor, k: int) -> float:
    """``alpha_estimate`` past its checks: ``mags`` are the samples' magnitudes."""
    k, m = _trimmed(k)
    x = x[:k]
    y = x.reshape(k // m, m, *x.shape[1:]).sum(dim=1)
    y_mags = y.abs() if y.dim() == 1 else torch.linalg.vector_norm(y, dim=1)
    log_y = torch.log(y_mags + _LOG_EPS).mean()
    log_x = torch.log(mags[:k] + _LOG_EPS).mean()
    inv_alpha = float((log_y - log_x) / math.log(m))
    return math.inf if inv_alpha == 0 else 1.0 / inv_alpha


def _scalar_alpha(x: Tensor, log_sum: float, nonzero: int) -> float:
    """``alpha_estimate`` of ``(K,)`` finite samples (float32 or float64), ``nonzero`` of them
    nonzero, whose ``log(|x| + eps)`` sum to ``log_sum``: no pass over the samples for the
    checks or the logs, only for the block sums (in float64)."""
    total = x.shape[0]
    if total < MIN_SAMPLES:
        raise ValueError(f"need at least {MIN_SAMPLES} samples for a tail index, got {total}")
    if nonzero < MIN_SAMPLES:
        raise ValueError(f"need at least {MIN_SAMPLES} nonzero samples for a tail index")
    k, m = _trimmed(total)
    if k < total:  # the dropped samples' logs leave the sum
        log_sum -= float(torch.log(x[k:].double().abs() + _LOG_EPS).sum())
    y = x[:k].reshape(k // m, m).sum(dim=1, dtype=torch.float64)
    log_y = float(torch.log(y.abs() + _LOG_EPS).mean())
    inv_alpha = (log_y - log_sum / k) / math.log(m)
    return math.inf if inv_alpha == 0 else 1.0 / inv_alpha


def symmetric_stable(
    alpha: float,
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Standard symmetric alpha-stable samples S_alpha(1, 0, 0), by Chambers-Mallows-Stuck.

    ``alpha`` in (0, 2]; alpha = 2 is N(0, 2), alpha = 1 the standard Cauchy. Ground truth for
    the estimators (tests check it against ``scipy.stats.levy_stable``). Seed with ``generator``.
    """
    if not 0 < alpha <= 2:
        raise ValueError(f"alpha must be in (0, 2], got {alpha}")
    shape = tuple(shape)
    u = (torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5) * math.pi
    # W ~ Exp(1); clamp so that a uniform draw of exactly 0 cannot give W = inf
    w = -torch.log(torch.rand(shape, generator=generator, dtype=torch.float64).clamp_min(1e-300))
    if alpha == 1:
        x = torch.tan(u)
    else:
        x = (
            torch.sin(alpha * u)
            / torch.cos(u).pow(1 / alpha)
            * (torch.cos((1 - alpha) * u) / w).pow((1 - alpha) / alpha)
        )
    return x.to(dtype)


def _pair_statistics(
    noise: Tensor, pairings: int, live: Tensor | None = None
) -> tuple[Tensor, Tensor, int]:
    """Per-coordinate log growth of pair-difference sums (see ``standardized_alpha``).

    Returns ``(d, continuous, m)``: ``d[j]``, the mean over pairings of ``mean_b log|Y_bj| -
    mean_p log|X_pj|`` for each of the D coordinates (not finite where not ``continuous``),
    the mask of coordinates without an exact-zero pair difference or block sum in any pairing,
    and the block size m (0 when n_batches < 2 * MIN_PAIRS). ``live``, where known: the
    coordinates that are nonzero in some row.
    """
    n, width = noise.shape
    pairs = n // 2
    d = torch.zeros(width, dtype=torch.float64, device=noise.device)
    if pairs < MIN_PAIRS:
        return d, torch.zeros(width, dtype=torch.bool, device=noise.device), 0
    m = math.isqrt(pairs)
    blocks = pairs // m
    # float32 noise stays float32: x - y == 0 exactly when x == y (IEEE, gradual underflow).
    if noise.dtype != torch.float32:
        noise = noise.double()
    # An exact 0 (an atom) gives log 0 = -inf, so d_j is not finite: that is the mask (it also
    # drops a block sum past float32's range, as it must). A coordinate zero in every row has
    # an atom in every pairing: none computes it (blank pixels: ~20-90% of an MLP's
    # coordinates on MNIST; torch's CPU log of 0 is ~20x slower than of a normal number).
    # Coordinates are never mixed: the others' numbers stay the same.
    if live is None:
        live = (noise != 0).any(dim=0)
    cols = live.nonzero()[:, 0]
    if cols.numel() < width:
        noise = noise.index_select(1, cols)
    total = torch.zeros(cols.numel(), dtype=torch.float64, device=noise.device)  # d[cols] sums
    d.fill_(-math.inf)  # the coordinates that no pairing computes
    generator = torch.Generator().manual_seed(PAIRING_SEED)
    for i in range(pairings):
        order = torch.arange(n) if i == 0 else torch.randperm(n, generator=generator)
        order = order[: 2 * pairs].to(noise.device)
        if i == 1:  # the others also skip the coordinates with an atom in the first pairing
            d.index_copy_(0, cols, total)
            keep = torch.isfinite(total).nonzero()[:, 0]
            if keep.numel() < cols.numel():
                cols, noise = cols.index_select(0, keep), noise.index_select(1, keep)
                total = total.index_select(0, keep)
        # One row gather (index_select: ~3x faster than advanced indexing on CPU), then pairs.
        rows = noise.index_select(0, order).view(pairs, 2, -1)
        x = rows[:, 0] - rows[:, 1]
        y = x[: blocks * m].reshape(blocks, m, -1).sum(dim=1)
        total += _mean_log_abs(y) - _mean_log_abs(x)
    d.index_copy_(0, cols, total)
    return d / pairings, torch.isfinite(d), m


def _mean_log_abs(x: Tensor) -> Tensor:
    """Column means of log|x| as float64, the logs taken in float32 (~10x faster on CPU);
    ``x`` is overwritten.

    Exact zeros give -inf. float64 columns are first divided by their largest |x| (its log is
    added back in float64), so that no nonzero value leaves float32's range (unless it is 1e-45
    times its column's largest, which then counts as an exact zero). Error ~1e-6, far below
    the estimator's sampling error.
    """
    mags = x.abs_()
    if mags.dtype == torch.float32:
        return mags.log_().mean(dim=0).double()
    top = mags.amax(dim=0)
    return (mags / top).float().log_().mean(dim=0).double() + top.log()


def _alpha_from(d_sum: float, count: int, m: int) -> float:
    """Standardized alpha from the sum of ``d_j`` over the ``count`` coordinates without atoms."""
    if m == 0 or count == 0:
        return math.nan
    inv_alpha = d_sum / count / math.log(m)
    return math.inf if inv_alpha == 0 else 1.0 / inv_alpha


def standardized_alpha(noise: Tensor, pairings: int = PAIRINGS) -> tuple[float, float]:
    """Tail index of ``(n_batches, D)`` noise, each coordinate measured against itself only.

    Returns ``(alpha, atom_fraction)``. The estimator is the same Corollary 2.4, fed samples that
    meet its i.i.d. assumption. Pooled coordinates do not: their scales differ (a scale mixture
    of alpha-stable laws looks heavier-tailed), they are correlated (weights of one unit share
    its backpropagated error; the 10 output-bias gradients sum to zero in every row), and each
    column of centred noise sums to zero (so blocks along a column shrink). The minibatches,
    however, are disjoint draws from one data set, so *within one coordinate* the rows are
    i.i.d. up to a constant (the centring). Hence, for each coordinate j:

    * pair the rows: ``X_pj = noise[r_2p, j] - noise[r_2p+1, j]`` for p < n_batches // 2 and
      an order r of the rows. Any per-coordinate constant cancels (centring on the mean
      gradient, or on the update of the full-batch gradient), the differences are i.i.d. and
      symmetric even for skewed noise, and for alpha-stable noise they are alpha-stable with
      the same alpha;
    * sum blocks of ``m = isqrt(n_batches // 2)`` consecutive differences: ``Y_bj`` is then
      m^(1/alpha) times a difference in distribution, exactly, for every alpha in (0, 2];
    * ``d_j = mean_b log|Y_bj| - mean_p log|X_pj|`` (all pairs), averaged over ``pairings``
      row orders (the given one, then seeded permutations): each is unbiased, the average
      has 2-6x less spread on small tensors; and ``1/alpha = mean_j d_j / log m``.

    A coordinate's scale adds the same log to both of its means and cancels exactly, so no scale
    is estimated. That is the point of standardizing, without its pitfalls: a scale estimated
    from the same ~40 samples changes the tails (self-normalisation by the standard deviation
    bounds |x / s| by ~sqrt(n)), the mean |x| does not exist for alpha <= 1, and even the median
    |x| of a centred column is biased, by the offset all its entries share (the column mean,
    dominated by its largest sample when alpha is small): ~1.5 for alpha = 1.2 at n = 39.
    Blocks sum *minibatches*, so d_j measures how a coordinate's noise grows from batch size B
    to m * B: the generalised-CLT behaviour the heavy-tail claim is about. With coordinates of
    different alpha_j the result is 1 / mean_j (1/alpha_j).

    Atoms: the alpha-stable law is continuous, so two minibatches never give exactly the same
    noise. A coordinate where a pair difference (or a block sum) is exactly 0 has an atom
    (identically zero, a pixel black in every image of both minibatches, a sign-based update)
    that the logs cannot describe; excluding only the zeros would bias alpha up. Such
    coordinates are dropped whole; ``atom_fraction`` is their share of the D coordinates.
    Coordinates are never mixed, so identically-zero ones do not change the estimate at all.
    The check is the one the estimator meets (the pairs it uses), so a coordinate with a small
    atom that no used pair hits stays in.

    Returns NaN for alpha when n_batches < 8 (fewer than 4 pairs) or when every coordinate has
    an atom (e.g. sign updates). Spread on alpha-stable data with D = 4,000 coordinates: about
    +-0.01 (one standard deviation) at n_batches = 39; with 20 coordinates +-0.1 at
    alpha = 1.5 and +-0.13 at alpha = 2 (per-layer values of small tensors are rough).
    """
    if pairings < 1:
        raise ValueError(f"pairings must be >= 1, got {pairings}")
    noise = _check_noise(noise)
    d, continuous, m = _pair_statistics(noise, pairings)
    atom_fraction = 1.0 - float(continuous.double().mean()) if noise.shape[1] else math.nan
    d_sum = float(torch.where(continuous, d, 0.0).sum())
    return _alpha_from(d_sum, int(continuous.sum()), m), atom_fraction


def _check_noise(noise: Tensor) -> Tensor:
    noise = torch.as_tensor(noise).detach()
    if noise.dim() != 2:
        raise ValueError(f"noise must be (n_batches, D), got shape {tuple(noise.shape)}")
    if not noise.is_floating_point():
        noise = noise.double()
    # A sum is finite only if all its terms are (inf and NaN propagate): one cheap pass, and an
    # entry-wise check only when it fails (finite entries whose sum overflows pass it).
    if not bool(torch.isfinite(noise.sum(dim=0)).all()) and not bool(torch.isfinite(noise).all()):
        bad = int((~torch.isfinite(noise)).sum())
        raise ValueError(f"noise has {bad} non-finite entries (inf/NaN): no tail index")
    return noise


def noise_alphas(noise: Tensor, pairings: int = PAIRINGS) -> dict[str, float]:
    """Tail indices of minibatch noise, ``noise`` of shape ``(n_batches, D)``.

    Each row is one minibatch's quantity (gradient or update) minus the full-batch one.

    * ``pooled``: ``alpha_estimate`` on all ``n_batches * D`` coordinates flattened row by row,
      as the seed code (and Simsekli et al.'s scalar variant) does. Exactly-zero coordinates, e.g.
      gradients of first-layer weights reading MNIST's always-black border pixels, each add
      log(eps) = -36 to the mean log|X| and pull the estimate *down*, faking heavy tails.
    * ``robust``: the same estimator on the nonzero coordinates only (still in row-major order).
      Both pool coordinates: with different scales (or correlated coordinates) they are biased,
      e.g. 1.12 for Gaussian noise whose scales spread over three decades.
    * ``standardized``: each coordinate measured against its own samples only
      (``standardized_alpha``); right on mixed scales, correlated coordinates and any ordering.
      NaN when n_batches < 8 or every coordinate has an atom.
    * ``zero_fraction``: the fraction of exactly-zero entries, to tell pooled and robust apart.
    * ``atom_fraction``: the fraction of coordinates ``standardized`` drops (they have an atom,
      including identically-zero ones).

    Raises ``ValueError`` when fewer than 4 entries are nonzero (``alpha_estimate``) or some
    are inf/NaN. ``pairings``: see ``standardized_alpha``. Cost: ~0.3 s for (468, 15,910)
    float32 noise (15% of its columns zero) on one CPU core, ~0.1 s of it ``standardized``.
    """
    return _alphas(_check_noise(noise), None, pairings, whole=True)[0]


def layer_alphas(
    noise: Tensor | Sequence[Tensor],
    sizes: Sequence[int] | None = None,
    pairings: int = PAIRINGS,
) -> list[dict[str, float]]:
    """``noise_alphas`` per parameter tensor: one dict (the same keys) per tensor, in order.

    ``noise`` is either a tuple of per-tensor noise ``(n_batches, *shape)`` (e.g. minibatch
    gradients minus the full-batch gradient, population dim included), or the flattened
    ``(n_batches, D)`` matrix with ``sizes``, the tensors' numbers of elements summing to D.
    An estimate a tensor's noise cannot give (fewer than 4 nonzero entries, e.g. a frozen
    layer; see ``noise_alphas``) is NaN instead of an error, so that one layer cannot hide the
    others. ``standardized`` averages per-coordinate terms, so the whole network's
    1/standardized is the mean of the layers' 1/standardized weighted by their numbers of
    coordinates without atoms.
    """
    if isinstance(noise, Tensor):
        noise = _check_noise(noise)
        return _alphas(noise, _check_sizes(sizes, noise.shape[1]), pairings, whole=False)[1]
    if sizes is not None:
        raise ValueError("layer_alphas: sizes are implied by a tuple of tensors; omit them")
    tensors = [torch.as_tensor(t).detach() for t in noise]
    if not tensors or any(t.dim() < 1 for t in tensors):
        raise ValueError("layer_alphas: need a non-empty tuple of (n_batches, *shape) tensors")
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(f"layer_alphas: tensors disagree on n_batches (dim 0): {shapes}")
    parts = [_check_noise(t.reshape(n, -1)) for t in tensors]
    return [_safe_noise_alphas(p, pairings) for p in parts]


def tail_alphas(
    noise: Tensor, sizes: Sequence[int], pairings: int = PAIRINGS
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """``(noise_alphas(noise), layer_alphas(noise, sizes))`` in one pass, the same numbers.

    What both read is computed once: the per-coordinate statistics of ``standardized`` (a
    tensor's are its coordinates' share of the whole's: coordinates are never mixed) and the
    per-coordinate sums of ``pooled``'s and ``robust``'s logs (a tensor's are a slice's sum).
    Raises as ``noise_alphas`` does (the per-tensor estimates alone never raise for too few
    nonzero entries: NaN, as ``layer_alphas``).
    """
    noise = _check_noise(noise)
    sizes = _check_sizes(sizes, noise.shape[1])
    return _alphas(noise, sizes, pairings, whole=True)


def _check_sizes(sizes: Sequence[int] | None, width: int) -> list[int]:
    if sizes is None:
        raise ValueError("layer_alphas: pass sizes (elements per tensor) with (n, D) noise")
    sizes = [int(s) for s in sizes]
    if any(s < 1 for s in sizes) or sum(sizes) != width:
        raise ValueError(f"layer_alphas: sizes {sizes} must be >= 1 and sum to D = {width}")
    return sizes


def _alphas(
    noise: Tensor, sizes: list[int] | None, pairings: int, whole: bool
) -> tuple[dict[str, float] | None, list[dict[str, float]]]:
    """The whole noise's alphas (``whole``, raising as ``noise_alphas``) and those of each
    column block of ``sizes`` (NaN where an estimate cannot be made), from one pass.

    ``noise`` has passed ``_check_noise``. Every number is the one the estimators give on the
    whole or on the block alone: per-coordinate terms and logs are sliced, never recomputed.
    """
    if pairings < 1:
        raise ValueError(f"pairings must be >= 1, got {pairings}")
    nonzero = noise != 0
    counts = nonzero.sum(dim=0)  # nonzero entries per coordinate
    d, continuous, m = _pair_statistics(noise, pairings, live=counts > 0)
    # float32 samples stay float32 (narrower floats are widened to it, exactly): the block sums
    # and log sums are float64 all the same, without a float64 copy of the noise.
    if noise.dtype != torch.float64:
        noise = noise.float()
    # log(|x| + eps) of the nonzero entries, in float32 when the noise is (~3x faster than
    # float64 on CPU; eps = 2^-52 is exact in float32): error <= ~1 ulp per entry, ~1e-7
    # relative, and unbiased, so their mean is exact to far below 1e-6. A zero's is log(eps),
    # added from the zeros' count; it is logged as 1 here (torch's CPU log of 0 is slow).
    logs = noise.abs().add_(_LOG_EPS).masked_fill_(~nonzero, 1.0).log_()
    # Per-coordinate sums (nonzero entries, their logs, coordinates without atoms, their d_j):
    # a block's are a slice's sum, since blocks are column ranges and coordinates never mix.
    columns = torch.stack(
        [
            counts.double(),
            logs.sum(dim=0, dtype=torch.float64),
            continuous.double(),
            torch.where(continuous, d, 0.0),
        ]
    )
    spans = [(0, noise.shape[1])] if whole else []
    if sizes is not None:
        ends = np.cumsum(sizes).tolist()
        spans += list(zip([0, *ends[:-1]], ends))
    # One small reduction per block, all read back at once.
    sums = torch.stack([columns[:, a:b].sum(dim=1) for a, b in spans]).tolist() if spans else []

    def block(start: int, end: int, sums: list[float], safe: bool) -> dict[str, float]:
        n_nonzero, log_sum, count, d_sum = int(sums[0]), sums[1], int(sums[2]), sums[3]
        width, entries = end - start, noise.shape[0] * (end - start)
        out = {
            "standardized": _alpha_from(d_sum, count, m),
            "zero_fraction": 1.0 - n_nonzero / max(entries, 1),
            "atom_fraction": 1.0 - count / width if width else math.nan,
        }
        try:
            # Row-major within the block, as the estimators flatten it.
            flat = noise[:, start:end].reshape(-1)
            zeros_log = (entries - n_nonzero) * math.log(_LOG_EPS)
            out["pooled"] = _scalar_alpha(flat, log_sum + zeros_log, n_nonzero)
            # masked_select: ~1.5x faster on the block's copy than on its columns of the noise
            robust = flat.masked_select(nonzero[:, start:end].reshape(-1))
            out["robust"] = _scalar_alpha(robust, log_sum, n_nonzero)
        except ValueError:
            if not safe:
                raise
            out["pooled"] = out["robust"] = math.nan  # too few nonzero entries
        return {k: out[k] for k in STATISTICS}

    whole_alphas = block(*spans[0], sums[0], safe=False) if whole else None
    layers = [block(*span, part, safe=True) for span, part in zip(spans[whole:], sums[whole:])]
    return whole_alphas, layers


def _safe_noise_alphas(noise: Tensor, pairings: int) -> dict[str, float]:
    try:
        return noise_alphas(noise, pairings)
    except ValueError:  # too few nonzero entries: no pooled/robust estimate
        standardized, atom_fraction = standardized_alpha(noise, pairings)
        flat = noise.reshape(-1)
        return {
            "pooled": math.nan,
            "robust": math.nan,
            "standardized": standardized,
            "zero_fraction": float((flat == 0).double().mean()) if flat.numel() else math.nan,
            "atom_fraction": atom_fraction,
        }
