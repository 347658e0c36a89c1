"""Truncation schedules (l2o/truncation.py): distributions, per-member restarts at the right
truncations, exact resume, and per-member restarts of the carried optimizee and LSTM state
(ground truth: the LSTM is coordinatewise, so a member's rows evolve exactly as that member
alone would)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from scipy import stats

from l2o.inner import inner_step
from l2o.lstm import LSTMOptimizer
from l2o.optimizees import MLPOptimizee
from l2o.optimizers import SGD
from l2o.truncation import (
    TruncationSchedule,
    log_uniform,
    lstm_member_rows,
    restart_members,
    restart_state,
)


# --------------------------------------------------------------------------- distributions
def test_log_uniform_draws_pass_a_ks_test_and_a_wrong_law_fails_it():
    draws = log_uniform(torch.Generator().manual_seed(0), 4000, 20.0, 2000.0).numpy()
    assert draws.min() >= 20 and draws.max() <= 2000
    assert stats.kstest(draws, stats.loguniform(20, 2000).cdf).pvalue > 0.01
    assert stats.kstest(draws, stats.uniform(20, 1980).cdf).pvalue < 1e-6  # the test has power


def test_log_uniform_run_lengths_are_multiples_of_unroll_with_log_uniform_quantiles():
    sched = TruncationSchedule(
        2000, unroll=20, min_steps=100, max_steps=10_000, distribution="log_uniform", seed=3
    )
    lengths = torch.tensor([sched.draw_length(m, r) for m in range(2000) for r in range(2)])
    assert (lengths % 20 == 0).all() and lengths.min() >= 100 and lengths.max() <= 10_000
    # Quantile q of the law is 100 * 100^q; rounding moves a draw by <= 10 steps.
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        emp = torch.quantile(lengths.double(), q).item()
        assert abs(math.log(emp / (100 * 100**q))) < 0.06 + 10 / (100 * 100**q), q
    # Runs of one member are independent draws, and the draws are a function of the seed.
    assert sched.draw_length(0, 0) != sched.draw_length(0, 1)
    same = TruncationSchedule(5, 20, 100, 10_000, "log_uniform", seed=3)
    assert [same.draw_length(m, 1) for m in range(5)] == [sched.draw_length(m, 1) for m in range(5)]


# --------------------------------------------------------------------------- restarts
def run(sched: TruncationSchedule, truncations: int):
    return [sched.next_truncation() for _ in range(truncations)]


def test_constant_schedule_without_desync_is_the_lockstep_of_today():
    out = run(TruncationSchedule(3, unroll=20, min_steps=200), 25)
    for k, trunc in enumerate(out):
        assert trunc.restart.tolist() == [k % 10 == 0] * 3
        assert trunc.step.tolist() == [(k % 10) * 20] * 3
        assert trunc.run.tolist() == [k // 10] * 3


def test_desync_restarts_each_member_when_its_own_run_ends():
    sched = TruncationSchedule(16, unroll=20, min_steps=200, desync=True, seed=1)
    out = run(sched, 40)
    offsets = out[0].step
    assert len(set(offsets.tolist())) >= 5  # not in lockstep
    assert ((offsets % 20 == 0) & (offsets >= 0) & (offsets < 200)).all()
    for k, trunc in enumerate(out):
        pos = k * 20 + offsets  # steps since the (virtual) start of the first run
        assert trunc.restart.tolist() == ((pos % 200 == 0) | (k == 0)).tolist(), k
        assert trunc.step.tolist() == (pos % 200).tolist()
        assert trunc.run.tolist() == (pos // 200).tolist()


def test_log_uniform_schedule_restarts_exactly_when_each_drawn_run_ends():
    sched = TruncationSchedule(
        6, unroll=10, min_steps=20, max_steps=300, distribution="log_uniform", desync=True
    )
    out = run(sched, 200)
    for m in range(6):
        starts = [k for k, t in enumerate(out) if t.restart[m]]
        assert starts[0] == 0 and len(starts) > 3
        first = sched.draw_length(m, 0)
        offset = out[0].step[m].item()
        assert starts[1] - starts[0] == (first - offset) // 10
        for r, (a, b) in enumerate(zip(starts[1:], starts[2:]), start=1):
            assert (b - a) * 10 == sched.draw_length(m, r), (m, r)
            assert out[a].run[m] == r and out[a].step[m] == 0


def test_state_round_trip_resumes_exactly():
    def make():
        return TruncationSchedule(
            8, unroll=20, min_steps=40, max_steps=2000, distribution="log_uniform", desync=True
        )

    straight, split = make(), make()
    expected = run(straight, 137)
    run(split, 37)
    buf = io.BytesIO()
    torch.save(split.state_dict(), buf)
    buf.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for a, b in zip(expected[37:], run(resumed, 100)):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="same population"):
        TruncationSchedule(4, 20, 40).load_state_dict(split.state_dict())


def test_force_restart_restarts_the_masked_members_next():
    sched = TruncationSchedule(3, unroll=20, min_steps=200)
    run(sched, 3)
    sched.force_restart(torch.tensor([False, True, False]))
    trunc = sched.next_truncation()
    assert trunc.restart.tolist() == [False, True, False]
    assert trunc.step.tolist() == [60, 0, 60] and trunc.run.tolist() == [0, 1, 0]


def test_bad_schedules_fail_with_what_to_change():
    with pytest.raises(ValueError, match="multiple of unroll"):
        TruncationSchedule(2, unroll=20, min_steps=50)
    with pytest.raises(ValueError, match="no multiple of unroll"):
        TruncationSchedule(2, 20, 41, 59, "log_uniform")
    with pytest.raises(ValueError, match="min_steps <= max_steps"):
        TruncationSchedule(2, 20, 100, None, "log_uniform")
    with pytest.raises(ValueError, match="distribution"):
        TruncationSchedule(2, 20, 100, 200, "uniform")


# --------------------------------------------------------------------------- carried state
def unroll(opt, optimizee, params, state, xs, ys):
    for t in range(xs.shape[0]):
        step = inner_step(optimizee, opt, params, state, xs[t], ys[t])
        params, state = step.params, step.state
    return params, state


def lstm_setup(population: int = 3):
    torch.manual_seed(0)
    lo = LSTMOptimizer(hidden_size=4)
    optimizee = MLPOptimizee(sizes=(5, 3, 2))
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(6, population, 7, 5, generator=gen)
    ys = torch.randint(0, 2, (6, population, 7), generator=gen)
    return lo, optimizee, xs, ys


def test_lstm_member_rows_pick_exactly_one_members_state():
    lo, optimizee, xs, ys = lstm_setup()
    params = optimizee.init(3, torch.Generator().manual_seed(1))
    _, state = unroll(lo, optimizee, params, lo.init_state(params), xs, ys)
    rows = [lstm_member_rows(state["shapes"], torch.arange(3) == m) for m in range(3)]
    assert (sum(r.long() for r in rows) == 1).all()  # a partition of the coordinates
    for m in range(3):  # member m alone (population 1): the same LSTM state, in order
        alone = tuple(p[m : m + 1] for p in params)
        x, y = xs[:, m : m + 1], ys[:, m : m + 1]
        _, s = unroll(lo, optimizee, alone, lo.init_state(alone), x, y)
        torch.testing.assert_close(state["h"][:, rows[m]], s["h"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state["c"][:, rows[m]], s["c"], rtol=1e-5, atol=1e-6)


def test_restarting_one_member_mid_run_equals_running_it_fresh():
    """Member 1 restarts after 3 steps: afterwards it follows a fresh run of the new optimizee,
    and members 0 and 2 follow their uninterrupted runs."""
    lo, optimizee, xs, ys = lstm_setup()
    params = optimizee.init(3, torch.Generator().manual_seed(1))
    fresh = optimizee.init(3, torch.Generator().manual_seed(2))
    mask = torch.tensor([False, True, False])
    p_mid, s_mid = unroll(lo, optimizee, params, lo.init_state(params), xs[:3], ys[:3])
    p_mid = restart_members(mask, fresh, p_mid)
    s_mid = restart_state(lo, s_mid, lo.init_state(fresh), mask)
    p_end, s_end = unroll(lo, optimizee, p_mid, s_mid, xs[3:], ys[3:])
    p_ref, s_ref = unroll(lo, optimizee, params, lo.init_state(params), xs, ys)
    f1 = tuple(p[1:2] for p in fresh)
    p_new, s_new = unroll(lo, optimizee, f1, lo.init_state(f1), xs[3:, 1:2], ys[3:, 1:2])
    for got, ref, new in zip(p_end, p_ref, p_new):
        torch.testing.assert_close(got[~mask], ref[~mask], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[mask], new, rtol=1e-5, atol=1e-6)
    keep = lstm_member_rows(s_end["shapes"], ~mask)
    torch.testing.assert_close(s_end["h"][:, keep], s_ref["h"][:, keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_end["h"][:, ~keep], s_new["h"], rtol=1e-5, atol=1e-6)


def test_restart_state_of_per_member_tensors_and_shared_entries():
    params = (torch.randn(3, 4), torch.randn(3, 2))
    sgd = SGD(lr=0.1, momentum=0.9)
    state = sgd.update(params, sgd.init_state(params), params)[1]
    fresh = sgd.init_state(params)
    with pytest.raises(ValueError, match="cannot be restarted per member"):
        restart_state(sgd, state, fresh, torch.tensor([True, False, False]))  # its shared step
    mom = {"m": state["momentum"]}
    out = restart_state(sgd, mom, {"m": fresh["momentum"]}, torch.tensor([True, False, True]))
    assert (out["m"][0][[0, 2]] == 0).all() and torch.equal(out["m"][0][1], mom["m"][0][1])
    with pytest.raises(ValueError, match="no leading member dim"):
        restart_members(torch.tensor([True, False]), mom, mom)
