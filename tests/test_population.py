"""Vectorised meta-testing (l2o.population): S seeds as one population run give every seed the
numbers of its own one-seed ``MetaTestSystem`` run (Trainer.test, today's path), analyses
included, and never mix seeds up."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch

from callbacks import SymmetryBreaking, TailIndex, UpdateCovariance, UpdateHistograms
from callbacks.histograms import DISTRIBUTION
from callbacks.update_ratio import UpdateRatio
from callbacks.update_ratio import tensor_names as callback_tensor_names
from l2o.lstm import LSTMOptimizer
from l2o.meta_testing import MetaTestSystem
from l2o.optimizees import MLPOptimizee
from l2o.optimizers import SGD, Adam, Lion, LionSGD
from l2o.population import (
    BATCHED,
    member_state,
    run_seeds,
    tensor_names,
)
from l2o.records import RecordLogger, read_record
from l2o.streams import MetaTestData

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__`.*"),
]

D_IN, HIDDEN, CLASSES, BATCH = 20, 8, 4, 16
STEPS, EVAL_EVERY = 6, 4  # evaluated at 4 and at the last step, 6
LEAKY = MLPOptimizee((D_IN, HIDDEN, CLASSES))
BN = MLPOptimizee((D_IN, HIDDEN, CLASSES), activation="relu", batchnorm=True)
TOL = 1e-6


def tiny_data(steps: int = STEPS) -> MetaTestData:
    g = torch.Generator().manual_seed(0)
    train_x = torch.randn(160, D_IN, generator=g)
    train_y = torch.randint(0, CLASSES, (160,), generator=g)
    test_x = torch.randn(64, D_IN, generator=g)
    test_y = torch.randint(0, CLASSES, (64,), generator=g)
    return MetaTestData(train_x, train_y, test_x, test_y, BATCH, steps)


def make(name: str):
    if name == "sgd":
        return SGD(lr=0.1, momentum=0.9)
    if name == "adam":
        return Adam(lr=1e-2)
    if name == "lion_sgd":
        return LionSGD(Lion(lr=1e-3), SGD(lr=0.05))
    torch.manual_seed(0)  # an untrained LSTM: its updates are far from SGD's
    return LSTMOptimizer(hidden_size=8)


def one_seed(tmp_path, optimizer, seed, callbacks=(), optimizee=LEAKY, steps=STEPS):
    """Today's path: one Trainer.test of a MetaTestSystem; its record and final params."""
    data = tiny_data(steps)
    data.seed = seed
    module = MetaTestSystem(optimizer, optimizee, seed, EVAL_EVERY, steps)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        logger=[RecordLogger(tmp_path / f"seed_{seed}")],
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.test(module, datamodule=data, verbose=False)
    return read_record(tmp_path / f"seed_{seed}"), module


def series(record, tag):
    steps, values = record.scalars[tag]
    return dict(zip(steps.tolist(), values.tolist()))


def assert_matches(run, record, module):
    """Every meta_test/* value of the one-seed run, at the same steps, to TOL."""
    got = run.metrics()
    for tag in ("train_loss", "train_acc", "test_loss", "test_acc"):
        want = series(record, f"meta_test/{tag}")
        have = {s: m[f"meta_test/{tag}"] for s, m in got.items() if f"meta_test/{tag}" in m}
        assert sorted(have) == sorted(want), tag
        for s in want:
            assert have[s] == pytest.approx(want[s], abs=TOL, rel=TOL), (tag, s)
    assert run.diverged_at == module.diverged_at
    for a, b in zip(run.params, module.params):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", ["sgd", "adam", "lstm", "lion_sgd"])
def test_each_seed_matches_its_one_seed_run(tmp_path, name):
    seeds = [0, 1, 2]
    runs = run_seeds(make(name), LEAKY, tiny_data(), seeds, eval_every=EVAL_EVERY)
    assert [r.seed for r in runs] == seeds
    for run, seed in zip(runs, seeds):
        record, module = one_seed(tmp_path, make(name), seed)
        assert_matches(run, record, module)
        assert run.test_steps == [4, 6]


def test_seed_order_cannot_mix_runs_up(tmp_path):
    """Seeds in a shuffled order: each member still matches the one-seed run of *its* seed,
    and the seeds' curves are far apart (different inits and minibatches), so a swap fails."""
    seeds = [7, 3, 5]
    runs = run_seeds(make("adam"), LEAKY, tiny_data(), seeds, eval_every=EVAL_EVERY)
    for run in runs:
        record, module = one_seed(tmp_path, make("adam"), run.seed)
        assert_matches(run, record, module)
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(runs[a].train_loss - runs[b].train_loss).max() > 1e3 * TOL
            assert not torch.allclose(runs[a].params[0], runs[b].params[0])
    # the same seeds in another order give the same per-seed runs
    again = {r.seed: r for r in run_seeds(make("adam"), LEAKY, tiny_data(), [5, 7, 3],
                                          eval_every=EVAL_EVERY)}  # fmt: skip
    for run in runs:
        np.testing.assert_allclose(again[run.seed].train_loss, run.train_loss, rtol=TOL, atol=TOL)


def test_divergence_is_per_seed(tmp_path):
    """A rate that blows up: every seed's divergence step and curve up to it are its own
    one-seed run's, and no step at or after it is reported."""
    opt = SGD(lr=3e18, momentum=0.0)
    seeds = [0, 1]
    runs = run_seeds(opt, LEAKY, tiny_data(), seeds, eval_every=EVAL_EVERY)
    assert any(r.diverged_at is not None for r in runs)
    for run in runs:
        record, module = one_seed(tmp_path, opt, run.seed)
        assert run.diverged_at == module.diverged_at
        want = series(record, "meta_test/train_loss")
        assert len(run.train_loss) == len(want)
        np.testing.assert_allclose(run.train_loss, [want[s] for s in sorted(want)], rtol=TOL)
        if run.diverged_at is not None:
            assert len(run.train_loss) == run.diverged_at - 1


def analyses():
    return [
        SymmetryBreaking(every_n_steps=2),
        UpdateRatio(every_n_steps=3),
        TailIndex(every_n_steps=2),
        UpdateCovariance(every_n_steps=4, num_samples=48),
        UpdateHistograms(every_n_steps=2, max_samples=50),
    ]


@pytest.mark.parametrize(("name", "optimizee"), [("lstm", LEAKY), ("adam", BN)])
def test_analyses_match_the_one_seed_callbacks(tmp_path, name, optimizee):
    """Batched (symmetry, update ratio) and per-seed (tail index, covariance, histograms)
    analyses give each seed the values its one-seed run's callbacks log, at the same steps."""
    seeds = [0, 2]
    runs = run_seeds(
        make(name), optimizee, tiny_data(), seeds, eval_every=EVAL_EVERY, analyses=analyses()
    )
    for run in runs:
        record, module = one_seed(tmp_path, make(name), run.seed, analyses(), optimizee)
        assert_matches(run, record, module)
        tags = [t for t in record.scalars if not t.startswith(("meta_test/", "hparams/"))]
        assert {t.split("/")[0] for t in tags} == {
            "symmetry", "update_ratio", "tail_index", "covariance", "update_hist"
        }  # fmt: skip
        assert sorted(run.scalars) == sorted(tags)
        for tag in tags:
            want = series(record, tag)
            have = run.scalars[tag]
            assert sorted(have) == sorted(want), tag
            for s in want:
                if math.isnan(want[s]):
                    assert math.isnan(have[s]), (tag, s)
                else:
                    assert have[s] == pytest.approx(want[s], rel=1e-4, abs=1e-6), (tag, s)
        for s, samples in record.arrays[DISTRIBUTION].items():
            np.testing.assert_allclose(run.arrays[DISTRIBUTION][s], samples, rtol=1e-5)


def test_batched_analyses_are_the_callbacks_names():
    assert set(BATCHED) == {SymmetryBreaking.name, UpdateRatio.name}
    for optimizee in (LEAKY, BN):
        assert tensor_names(optimizee) == callback_tensor_names(optimizee)


@pytest.mark.parametrize("name", ["sgd", "adam", "lstm", "lion_sgd"])
def test_member_state_is_the_one_member_state(name):
    """The state cut to member m equals the state of a one-member run of m's params after the
    same gradients (each member's state evolves on its own)."""
    opt = make(name)
    g = torch.Generator().manual_seed(1)
    params = LEAKY.init(3, g)
    grads = [tuple(torch.randn(p.shape, generator=g) for p in params) for _ in range(2)]
    state = opt.init_state(params)
    for gr in grads:
        state = opt.update(gr, state, params)[1]
    for m in range(3):
        one = tuple(p[m : m + 1] for p in params)
        ref = opt.init_state(one)
        for gr in grads:
            ref = opt.update(tuple(t[m : m + 1] for t in gr), ref, one)[1]
        cut = member_state(state, params, m)
        flat_cut, flat_ref = _leaves(cut), _leaves(ref)
        assert len(flat_cut) == len(flat_ref)
        for a, b in zip(flat_cut, flat_ref):
            if isinstance(b, torch.Tensor):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
            else:
                assert a == b


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for k in tree for x in _leaves(tree[k])]
    if isinstance(tree, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in tree):
        return [x for t in tree for x in _leaves(t)]
    return [tree]


def test_bad_arguments():
    with pytest.raises(ValueError, match="repeat"):
        run_seeds(make("sgd"), LEAKY, tiny_data(), [1, 1])
    with pytest.raises(ValueError, match="empty"):
        run_seeds(make("sgd"), LEAKY, tiny_data(), [])
    with pytest.raises(ValueError, match="loggers"):
        run_seeds(make("sgd"), LEAKY, tiny_data(), [0, 1], loggers=[[]])


class _Watcher:
    """A logger that notes how many optimizee steps the population had run when each
    ``meta_test/*`` value arrived."""

    def __init__(self, clock: list[int]) -> None:
        self.clock, self.arrivals = clock, []

    def log_metrics(self, metrics, step):
        for tag in metrics:
            if tag.startswith("meta_test/"):
                self.arrivals.append((tag, int(step), self.clock[0]))

    def finalize(self, status):
        pass


@pytest.mark.parametrize("diverging", [False, True])
def test_curves_stream_to_the_loggers_at_every_evaluation(tmp_path, monkeypatch, diverging):
    """TensorBoard shows a vectorised run live: each evaluated step's curve (train steps since
    the last evaluation, then the test metrics) reaches the seed's loggers before the next
    step runs, a diverged seed's curve stops where its one-seed run's does, and
    ``log_seed_run`` writes none of it twice (the records equal the one-seed runs')."""
    import l2o.population as population

    clock = [0]
    inner = population.inner_step

    def counting(*args, **kwargs):
        clock[0] += 1
        return inner(*args, **kwargs)

    monkeypatch.setattr(population, "inner_step", counting)
    opt = SGD(lr=3e18, momentum=0.0) if diverging else make("adam")  # 3e18: diverges at step 3
    seeds, steps = [0, 1], 10
    watchers = [_Watcher(clock) for _ in seeds]
    records = [RecordLogger(tmp_path / f"vec_{s}") for s in seeds]
    loggers = [[w, r] for w, r in zip(watchers, records)]
    runs = run_seeds(opt, LEAKY, tiny_data(steps), seeds, steps, EVAL_EVERY, loggers=loggers)
    assert all(run.streamed for run in runs)
    for run, watcher, logger in zip(runs, watchers, loggers):
        population.log_seed_run(run, logger, opt)
        n = steps if run.diverged_at is None else run.diverged_at - 1
        train = [(s, c) for t, s, c in watcher.arrivals if t == "meta_test/train_loss"]
        assert [s for s, _ in train] == list(range(1, n + 1))  # each step once, in order
        for s, c in train:  # logged at the first evaluation at or after it
            assert c == min(e for e in (4, 8, 10) if e >= s)
        test = [s for t, s, _ in watcher.arrivals if t == "meta_test/test_loss"]
        assert test == [e for e in (4, 8, 10) if e <= n]
    assert all((run.diverged_at is not None) == diverging for run in runs)
    for seed in seeds:
        want, _ = one_seed(tmp_path / "one", opt, seed, steps=steps)
        got = read_record(tmp_path / f"vec_{seed}")
        tags = [t for t in want.scalars if t.startswith("meta_test/")]
        assert sorted(tags) == sorted(t for t in got.scalars if t.startswith("meta_test/"))
        for tag in tags:
            assert series(got, tag).keys() == series(want, tag).keys(), tag
            for s, v in series(want, tag).items():
                assert series(got, tag)[s] == pytest.approx(v, rel=TOL, abs=TOL), (tag, s)
