"""The fast paths of the costly analyses give the numbers of the code they replaced (to 1e-6).

The ground truth is ``l2o/tail_index.py`` and ``l2o/covariance.py`` as they were before the
analysis-overhead work (issue 13, part 4), read from the repository's history (commit
``REFERENCE``) rather than kept as frozen copies. Inputs are made the way the analyses make
them, including what the fast paths special-case: coordinates that are exactly zero in every
row or in some rows (blank pixels), float64 noise, tensors with too few nonzero entries, too few
minibatches.
"""

import functools
import math
import subprocess
import sys
import types

import pytest
import torch

from l2o.tail_index import layer_alphas, noise_alphas, standardized_alpha, tail_alphas
from tests.conftest import REPO

REFERENCE = "5667e2a"  # main just before the fast paths


@functools.cache
def reference(path: str) -> types.ModuleType:
    """The module at ``path`` as it was at ``REFERENCE`` (its imports are today's modules)."""
    try:
        source = subprocess.run(
            ["git", "show", f"{REFERENCE}:{path}"], cwd=REPO, capture_output=True, text=True,
            check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs the repository's git history (commit {REFERENCE})")
    name = "reference_" + path.replace("/", "_").removesuffix(".py")
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    exec(compile(source, f"{REFERENCE}:{path}", "exec"), module.__dict__)
    return module


class _Lazy:  # old_ti.noise_alphas(...) reads the reference only when a test runs
    def __init__(self, path: str):
        self.path = path

    def __getattr__(self, attr: str):
        return getattr(reference(self.path), attr)


old_ti = _Lazy("l2o/tail_index.py")
old_cov = _Lazy("l2o/covariance.py")

REL = 1e-6
SIZES = [1568, 20, 200, 10]  # a 78-20-10 MLP: weights, bias, weights, bias


def close(new: dict, old: dict) -> None:
    assert new.keys() == old.keys()
    for key, want in old.items():
        if math.isnan(want):
            assert math.isnan(new[key]), key
        else:
            assert new[key] == pytest.approx(want, rel=REL, abs=1e-12), key


def mnist_like_noise(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """(n, D) noise: heavy-ish tails, a third of the first layer's columns identically zero
    (blank pixels), some columns zero in a few rows only, and a last tensor all zero."""
    g = torch.Generator().manual_seed(seed)
    d = sum(SIZES)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise /= torch.rand(n, d, generator=g, dtype=torch.float64).clamp_min(0.05)  # tails
    noise *= torch.logspace(-3, 1, d, dtype=torch.float64)[torch.randperm(d, generator=g)]
    blank = torch.rand(SIZES[0], generator=g) < 0.33
    noise[:, : SIZES[0]][:, blank] = 0
    noise[torch.rand(n, d, generator=g) < 0.05] = 0  # atoms in some rows only
    noise[:, -SIZES[-1] :] = 0  # a frozen tensor: no pooled / robust estimate
    return noise.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [39, 40, 8, 7])
def test_tail_alphas_equal_the_old_estimators(n, dtype):
    noise = mnist_like_noise(n, seed=n, dtype=dtype)
    whole, layers = tail_alphas(noise, SIZES)
    close(whole, old_ti.noise_alphas(noise))
    close(noise_alphas(noise), old_ti.noise_alphas(noise))
    old_layers = old_ti.layer_alphas(noise, SIZES)
    assert len(layers) == len(old_layers) == len(SIZES)
    for new, old in zip(layers, old_layers):
        close(new, old)
    for new, old in zip(layer_alphas(noise, SIZES), old_layers):
        close(new, old)
    assert math.isnan(layers[-1]["pooled"])  # the frozen tensor took the NaN path
    for pairings in (1, 3):
        new, old = standardized_alpha(noise, pairings), old_ti.standardized_alpha(noise, pairings)
        assert new[1] == pytest.approx(old[1], abs=1e-12)
        assert (math.isnan(new[0]) and math.isnan(old[0])) or new[0] == pytest.approx(
            old[0], rel=REL
        )


def test_tail_alphas_raise_as_noise_alphas():
    noise = torch.zeros(39, sum(SIZES))
    noise[0, :3] = 1.0  # 3 nonzero entries: no pooled estimate for the whole
    with pytest.raises(ValueError, match="nonzero"):
        tail_alphas(noise, SIZES)
    with pytest.raises(ValueError, match="nonzero"):
        old_ti.noise_alphas(noise)
    for new, old in zip(layer_alphas(noise, SIZES), old_ti.layer_alphas(noise, SIZES)):
        close(new, old)
    noise[1, 5] = math.inf
    with pytest.raises(ValueError, match="non-finite"):
        tail_alphas(noise, SIZES)
    with pytest.raises(ValueError, match="sum to D"):
        tail_alphas(torch.ones(39, 10), [5, 4])


# --------------------------------------------------------------------------- covariance
def _covariance_case(opt_name: str, batchnorm: bool = False, n: int = 600, seed: int = 0):
    """A 40-12-5 MLP (D = 557) at random params, N samples whose inputs are a third blank
    (zero per-sample gradient coordinates), and an optimizer with a non-trivial state."""
    from l2o.lstm import LSTMOptimizer
    from l2o.optimizees import MLPOptimizee
    from l2o.optimizers import SGD, Adam

    torch.manual_seed(seed)
    optimizee = MLPOptimizee((40, 12, 5), activation="leaky_relu", batchnorm=batchnorm)
    params = optimizee.init(generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(n, 40, generator=gen) * (torch.rand(n, 40, generator=gen) > 0.33)
    x[:, :5] = 0  # blank in every sample
    y = torch.randint(0, 5, (n,), generator=gen)
    opt = {"sgd": SGD(lr=0.1, momentum=0.9), "adam": Adam(lr=1e-3), "lstm": LSTMOptimizer()}[
        opt_name
    ]
    state = opt.init_state(params)
    for _ in range(2):  # a state past its initial zeros
        step = tuple(torch.randn_like(p) * 0.1 for p in params)
        _, state = opt.update(step, state, params)
    return optimizee, opt, state, params, x, y


@pytest.mark.parametrize("method", ["auto", "lanczos", "gram"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam", "lstm"])
def test_covariance_analysis_equals_the_old_one(opt_name, method):
    from l2o.covariance import covariance_analysis, per_sample_grads

    case = _covariance_case(opt_name)
    want = old_cov.covariance_analysis(*case, method=method)
    got = covariance_analysis(*case, method=method)
    # the callback's way: per-sample gradients from the step's cache, a buffer kept between
    # steps (here dirty from a call at other params, which must not leak into this one)
    workspace: dict = {}
    other = _covariance_case(opt_name, seed=5)
    covariance_analysis(*other, method=method, workspace=workspace)
    optimizee, _, _, params, x, y = case
    g = per_sample_grads(optimizee, params, x, y)
    kept = tuple(t.clone() for t in g)
    cached = covariance_analysis(*case, method=method, per_sample=g, workspace=workspace)
    for t, k in zip(g, kept):
        assert torch.equal(t, k)  # the cached gradients are only read
    for res in (got, cached):
        assert res.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert res[key] == pytest.approx(value, rel=REL), key
            elif key == "method" and method == "auto" and opt_name == "sgd":
                # auto's shortcuts: SGD's update covariance is lr^2 x the Kronecker Gram's
                assert res[key] == "kronecker"
            else:
                assert res[key] == value, key


@pytest.mark.parametrize("opt_name", ["sgd", "lstm"])
def test_minibatch_and_batchnorm_covariance_equal_the_old_ones(opt_name):
    from l2o.covariance import covariance_analysis

    for kwargs, case in (
        ({"mode": "minibatch", "batch_size": 32}, _covariance_case(opt_name)),
        ({}, _covariance_case(opt_name, batchnorm=True, n=96)),
    ):
        want = old_cov.covariance_analysis(*case, method="lanczos", **kwargs)
        got = covariance_analysis(*case, method="lanczos", **kwargs)
        for key in ("update_top_eig", "update_trace", "grad_top_eig", "grad_trace"):
            assert got[key] == pytest.approx(want[key], rel=REL), key
