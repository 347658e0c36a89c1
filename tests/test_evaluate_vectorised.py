"""evaluate.py --vectorise_seeds (the default): each optimizer's seeds as one population run
(l2o.population) give the experiment of the per-seed Trainer runs (--vectorise_seeds false):
the same summary.json, the same records (every tag, step and value to 1e-6), the same manifest;
an optimizer whose state cannot be cut per seed (Muon) falls back to the per-seed runs;
divergence stays a result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from l2o.evaluation import vectorisable
from l2o.lstm import LSTMOptimizer
from l2o.mlp_lopt import MLPLOpt
from l2o.optimizees import MLPOptimizee
from l2o.optimizers import SGD, Adam, Lion, LionSGD
from l2o.records import read_record
from l2o.torch_adapter import make_torch_optimizer
from tests.test_evaluate import checkpoint, nan_checkpoint, run_eval  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__`.*"),
]

TOL = 1e-6
# Fields that name the experiment's time or place, not its numbers.
VOLATILE = {"started", "finished", "folder", "path", "created"}


def assert_close(a, b, where: str = "") -> None:
    """Equal in structure; numbers to 1e-6 (relative for large ones); inf and nan as such."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {a.keys()} vs {b}"
        for k in a:
            if k not in VOLATILE:
                assert_close(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: {a} vs {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}/{i}")
    elif isinstance(a, float) or isinstance(b, float):
        x, y = float(a), float(b)
        if math.isnan(x) or math.isnan(y):
            assert math.isnan(x) and math.isnan(y), f"{where}: {x} vs {y}"
        else:
            assert x == pytest.approx(y, rel=TOL, abs=TOL), f"{where}: {x} vs {y}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_same_experiment(plain: Path, vec: Path) -> None:
    read = lambda p: json.loads(p.read_text())  # noqa: E731 (summary.json holds NaN/Infinity)
    assert_close(read(plain / "summary.json"), read(vec / "summary.json"), "summary")
    mp, mv = read(plain / "manifest.json"), read(vec / "manifest.json")
    assert mv["status"] == "complete"
    assert_close(mp["runs"], mv["runs"], "manifest/runs")
    assert_close(mp["optimizers"], mv["optimizers"], "manifest/optimizers")
    for run in mp["runs"]:
        rp, rv = read_record(plain / run["dir"]), read_record(vec / run["dir"])
        assert rp.scalars.keys() == rv.scalars.keys(), run["dir"]
        for tag, (steps, values) in rp.scalars.items():
            np.testing.assert_array_equal(steps, rv.scalars[tag][0], err_msg=tag)
            np.testing.assert_allclose(rv.scalars[tag][1], values, rtol=TOL, atol=TOL, err_msg=tag)
        assert rp.arrays.keys() == rv.arrays.keys(), run["dir"]
        for tag, by_step in rp.arrays.items():
            assert by_step.keys() == rv.arrays[tag].keys(), tag
            for step, samples in by_step.items():
                np.testing.assert_allclose(rv.arrays[tag][step], samples, rtol=1e-5, atol=TOL)
        assert (vec / run["dir"]).is_dir() and list((vec / run["dir"]).glob("events.*"))
    for label in {r["label"] for r in mp["runs"]}:
        assert list((vec / label / "mean").glob("events.*")), label


@pytest.mark.slow  # like test_evaluate's every-analysis run: three optimizers x two seeds, twice
def test_vectorised_seeds_give_the_same_experiment(tmp_path, mnist_root, checkpoint, capsys):  # noqa: F811
    """sgd (fixed lr), adam (tuned) and a tiny learned LSTM, 2 seeds, every analysis."""
    extra = [
        "--checkpoints",
        f"[{checkpoint}]",
        "--optimizers",
        "[{name: sgd, lr: 0.1, momentum: 0.9}, {name: adam}]",
        "--optimizee",
        "{sizes: [784, 8, 10], activation: leaky_relu}",
    ]
    plain = run_eval(tmp_path, mnist_root, *extra, "--vectorise_seeds", "false", name="plain")
    assert "(one population run)" not in capsys.readouterr().out  # the per-seed path
    vec = run_eval(tmp_path, mnist_root, *extra, "--vectorise_seeds", "true", name="vec")
    out = capsys.readouterr().out
    assert out.count("(one population run)") == 3, out
    assert "one at a time" not in out
    assert vec.keys() == plain.keys()
    assert_same_experiment(tmp_path / "plain", tmp_path / "vec")


def test_an_optimizer_that_cannot_be_cut_falls_back(tmp_path, mnist_root, capsys):
    """Muon's state cannot be cut to one seed: its seeds run one at a time, beside a
    vectorised sgd, and the experiment is the per-seed one."""
    extra = [
        "--optimizers",
        "[{name: sgd, lr: 0.1}, {class_path: torch.optim.Muon, lr: 0.01, label: muon, "
        "other: {class_path: torch.optim.AdamW, lr: 3.0e-4}}]",
        "--optimizee",
        "{sizes: [784, 8, 10], activation: leaky_relu}",
        "--analyses",
        "[]",
    ]
    run_eval(tmp_path, mnist_root, *extra, "--vectorise_seeds", "false", name="plain")
    capsys.readouterr()
    run_eval(tmp_path, mnist_root, *extra, "--vectorise_seeds", "true", name="vec")
    out = capsys.readouterr().out
    assert "note: muon runs its seeds one at a time" in out, out
    assert "sgd seeds 0-1" in out and "muon seed 1:" in out, out
    assert_same_experiment(tmp_path / "plain", tmp_path / "vec")


def test_a_diverged_seed_is_a_result_when_vectorised(tmp_path, mnist_root, nan_checkpoint, capsys):  # noqa: F811
    extra = ["--checkpoints", f"[{nan_checkpoint}]", "--optimizers", "[{name: sgd, lr: 0.1}]"]
    run_eval(tmp_path, mnist_root, *extra, "--analyses", "[]", "--vectorise_seeds", "false",
             name="plain")  # fmt: skip
    capsys.readouterr()
    run_eval(tmp_path, mnist_root, *extra, "--analyses", "[]", "--vectorise_seeds", "true",
             name="vec")  # fmt: skip
    out = capsys.readouterr().out
    assert "seed 0: diverged at step 1" in out and "seed 1: diverged at step 1" in out, out
    assert_same_experiment(tmp_path / "plain", tmp_path / "vec")
    runs = json.loads((tmp_path / "vec" / "manifest.json").read_text())["runs"]
    assert [r["status"] for r in runs if r["label"] != "sgd"] == ["diverged", "diverged"]


def make(name: str):
    if name == "sgd":
        return SGD(lr=0.1, momentum=0.9)
    if name == "adam":
        return Adam(lr=1e-2)
    if name == "lion_sgd":
        return LionSGD(Lion(lr=1e-3), SGD(lr=0.05))
    if name == "lstm":
        torch.manual_seed(0)
        return LSTMOptimizer(hidden_size=8)
    if name == "mlp_lopt":
        torch.manual_seed(0)
        return MLPLOpt()
    if name == "schedulefree":
        pytest.importorskip("schedulefree")
        return make_torch_optimizer("schedulefree.SGDScheduleFree", 1e-2)
    return make_torch_optimizer(name, 1e-2)


@pytest.mark.parametrize(
    "name", ["sgd", "adam", "lion_sgd", "lstm", "mlp_lopt", "torch.optim.RAdam", "schedulefree"]
)
def test_these_optimizers_are_vectorisable(name):
    assert vectorisable(make(name), MLPOptimizee((20, 8, 4))) is None


def test_a_state_with_one_entry_per_member_is_not():
    """Muon (matrices; AdamW for the biases) keeps one torch.optim state per member."""
    assert "cannot cut" in vectorisable(make("torch.optim.Muon"), MLPOptimizee((20, 8, 4)))


def test_a_state_cut_that_mixes_members_is_caught(monkeypatch):
    """If member_state gave member 0's state for every member, the probe must say so."""
    from l2o import evaluation, population

    real = population.member_state
    monkeypatch.setattr(evaluation, "member_state", lambda st, p, m: real(st, p, 0))
    assert "does not cut" in vectorisable(make("adam"), MLPOptimizee((20, 8, 4)))
