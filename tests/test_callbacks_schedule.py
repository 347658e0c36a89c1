"""Linear and log-spaced analysis schedules (callbacks/base.py): the exact step sets, and that a
run analyses exactly those steps."""

from __future__ import annotations

import pytest

from callbacks import SymmetryBreaking, UpdateHistograms
from callbacks.base import schedule_steps
from callbacks.curvature import Curvature
from callbacks.gsnr import GradientNoise
from callbacks.step_length import StepLength
from callbacks.update_ratio import UpdateRatio
from tests.test_callbacks import Run, make_optimizer

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__`.*"),
]


def test_linear_is_step_one_then_every_multiple():
    assert schedule_steps(10, 4) == [1, 4, 8]
    assert schedule_steps(10, 1) == list(range(1, 11))
    assert schedule_steps(3, 50) == [1]


def test_log_is_geometric_from_the_first_to_the_last_step():
    # K = ceil(20 / 4) + 1 = 6 points: round(20 ** (k / 5)) = 1, 1.82, 3.31, 6.03, 10.99, 20
    assert schedule_steps(20, 4, "log") == [1, 2, 3, 6, 11, 20]
    # K = 11: 100 ** (k / 10) = 1, 1.58, 2.51, 3.98, 6.31, 10, 15.8, 25.1, 39.8, 63.1, 100
    assert schedule_steps(100, 10, "log") == [1, 2, 3, 4, 6, 10, 16, 25, 40, 63, 100]
    assert schedule_steps(5, 1, "log") == [1, 2, 3, 4, 5]  # dense: every step
    assert schedule_steps(4, 100, "log") == [1, 4]  # always the first and the last
    assert schedule_steps(1, 5, "log") == [1]
    for total, every in ((1000, 16), (1000, 64), (777, 5)):
        log, linear = schedule_steps(total, every, "log"), schedule_steps(total, every)
        assert log[0] == 1 and log[-1] == total
        assert len(log) <= len(linear) + 1  # the same budget as linear, never more
    with pytest.raises(ValueError, match="schedule"):
        schedule_steps(10, 2, "cosine")


@pytest.mark.parametrize(
    "factory",
    [SymmetryBreaking, UpdateHistograms, UpdateRatio, Curvature, StepLength, GradientNoise],
    ids=lambda f: f.__name__,
)
def test_every_analysis_takes_a_schedule(factory):
    assert factory(every_n_steps=3, schedule="log").schedule == "log"
    assert factory(every_n_steps=3).schedule == "linear"
    with pytest.raises(ValueError, match="schedule"):
        factory(every_n_steps=3, schedule="geometric")


def test_a_run_analyses_exactly_the_log_schedules_steps(tmp_path):
    """20 steps, every 4 on the log scale: steps 1, 2, 3, 6, 11 and 20, the last included."""
    lin, log = UpdateRatio(every_n_steps=4), SymmetryBreaking(every_n_steps=4, schedule="log")
    run = Run(tmp_path, make_optimizer("sgd"), [lin, log], steps=20)
    assert sorted(run.recorded("update_ratio/layer1/weight")) == [1, 4, 8, 12, 16, 20]
    assert sorted(run.recorded("symmetry/update/translation/abs_sum")) == [1, 2, 3, 6, 11, 20]
    assert sorted(run.logged("symmetry/update/translation/abs_sum")) == [1, 2, 3, 6, 11, 20]
