"""Meta-training with PES and truncation schedules (l2o/meta_training.py's estimator seam).

- The seam feeds PES's estimate, untouched, to the meta-optimizer: two training steps equal a
  hand-written loop of ``PES.estimate`` + ``.grad`` + clipping + Adam, bit for bit.
- Per-member restarts (desynchronised schedule): restarted members get exactly the fresh
  optimizee rows and a fresh learned-optimizer state, the others carry on untouched.
- ``configs/tiny_pes.yaml`` through train.py: learns, checkpoints PES's particles, and a run
  stopped mid-epoch and resumed ends bit-identical to the uninterrupted one (PES and TBPTT with
  log-uniform, desynchronised schedules).
- MLPLOpt under PES; bad combinations fail before any work.
DDP (2 CPU processes) with PES is in test_meta_training.py.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from l2o.data import MNISTDataModule, seeded_generator
from l2o.estimators import PES, set_meta_gradients
from l2o.meta_training import _PES_NOISE, MetaTrainingSystem
from l2o.mlp_lopt import MLPLOpt
from l2o.truncation import TruncationSchedule, lstm_member_rows
from tests.conftest import REPO, assert_bit_identical, tiny_args
from train import cli_main

TINY_PES = str(REPO / "configs" / "tiny_pes.yaml")
SIZES = [784, 8, 10]


def fit(tmp_path: Path, mnist_root: str, *extra: str, name: str = "pes"):
    return cli_main([*tiny_args(tmp_path, mnist_root, name), "--config", TINY_PES, *extra])


def ckpt(tmp_path: Path, name: str = "pes") -> dict:
    path = tmp_path / name / "version_0" / "checkpoints" / "last.ckpt"
    return torch.load(path, weights_only=True)


def weights(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_training_steps_apply_exactly_the_pes_estimate(mnist_root):
    seed, pairs, steps = 3, 2, 2
    model = MetaTrainingSystem(
        optimizee={"sizes": SIZES}, unroll=4, optimizee_steps=8, population=pairs,
        estimator="pes", pes_sigma=0.02, grad_clip=0.5, meta_lr=0.01, seed=seed,
    )  # fmt: skip
    reference = copy.deepcopy(model.learned_optimizer)
    initial = weights(reference)
    data = dict(
        root=mnist_root, download=False, batch_size=16, unroll=4, optimizee_steps=8,
        population=pairs, runs_per_epoch=1, val_runs=1, val_steps=0,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        inference_mode=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=MNISTDataModule(**data))
    assert trainer.global_step == steps

    # The same by hand: fresh optimizees seeded (seed, rank 0, run 0), noise (seed, 0, salt, k).
    dm = MNISTDataModule(**data)
    dm.setup()
    pes = PES(reference, model.optimizee, pairs=pairs, sigma=0.02, meta_loss="log")
    carry = pes.init_carry(model.optimizee.init(pairs, seeded_generator(seed, 0, 0)))
    adam = torch.optim.Adam(reference.parameters(), lr=0.01)
    for k, (x, y) in zip(range(steps), dm.train_dataloader()):
        est = pes.estimate(carry, x, y, seeded_generator(seed, 0, _PES_NOISE, k))
        set_meta_gradients(reference.parameters(), est.grads)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        adam.step()
        carry = est.carry
    assert not torch.equal(weights(reference), initial)
    assert torch.equal(weights(model.learned_optimizer), weights(reference))
    for a, b in zip(model._carry["xi"], carry["xi"]):
        assert torch.equal(a, b)
    for a, b in zip(model._carry["params"], carry["params"]):
        assert torch.equal(a, b)


def test_desynchronised_members_restart_alone_with_fresh_rows_and_state():
    seed, members = 1, 3
    model = MetaTrainingSystem(
        optimizee={"sizes": SIZES}, unroll=4, optimizee_steps=16, population=members,
        desync=True, seed=seed,
    )  # fmt: skip
    schedule = TruncationSchedule(members, 4, 16, desync=True, seed=seed * 1_000_003)
    restarts, partial = 0, False
    for k in range(14):
        before = model._carry
        model._advance()
        trunc = schedule.next_truncation()
        carry = model._carry
        if k == 0:
            assert trunc.restart.all()
        if trunc.restart.any() and before is not None:
            fresh = model.fresh_optimizees(members, (seed, 0, restarts))
            partial |= not bool(trunc.restart.all())
            rows = lstm_member_rows(carry["state"]["shapes"], trunc.restart)
            for m in range(members):
                for p, f, b in zip(carry["params"], fresh, before["params"]):
                    assert torch.equal(p[m], f[m] if trunc.restart[m] else b[m]), (k, m)
            # Fresh LSTM state (zeros) on the restarted members' coordinates only.
            for key in ("h", "c"):
                assert (carry["state"][key][:, rows] == 0).all()
                assert torch.equal(carry["state"][key][:, ~rows], before["state"][key][:, ~rows])
        restarts += int(bool(trunc.restart.any()))
        assert model._runs_started == restarts
        # "Train" the carry: mark every tensor so that a kept row is told from a fresh one.
        model._carry = {
            **carry,
            "params": tuple(p + 1.0 for p in carry["params"]),
            "state": {**carry["state"], "h": carry["state"]["h"] + 1, "c": carry["state"]["c"] + 1},
        }
    assert partial  # the premise: some truncation restarted some members but not all


def test_tiny_pes_config_meta_trains_and_checkpoints_the_particles(tmp_path, mnist_root):
    before = weights(MetaTrainingSystem(optimizee={"sizes": SIZES}).learned_optimizer)
    cli = fit(tmp_path, mnist_root)
    model = cli.model
    assert model.hparams.estimator == "pes" and cli.trainer.global_step == 12  # 2 x 2 x 12 / 4
    assert not torch.equal(before, weights(model.learned_optimizer))
    metrics = cli.trainer.callback_metrics
    for key in ("train/meta_loss", "train/meta_grad_norm", "val/summed_loss"):
        assert torch.isfinite(metrics[key]), key
    (carry,) = ckpt(tmp_path)["l2o"]["carries"]
    pairs = 2
    assert carry["params"][0].shape[0] == 2 * pairs  # the + and - particles
    assert carry["state"]["h"].shape[0] == 2 * pairs  # per-particle LSTM state
    named = dict(model.learned_optimizer.named_parameters())
    assert [x.shape for x in carry["xi"]] == [(pairs, *w.shape) for w in named.values()]
    assert carry["draws"] == 12
    sched = carry["schedule"]
    assert ((sched["lengths"] >= 4) & (sched["lengths"] <= 12) & (sched["lengths"] % 4 == 0)).all()
    # xi is the sum of the perturbations since each pair's run restarted: ~ sigma * sqrt(k).
    for m in range(pairs):
        k = int(sched["steps"][m]) // 4
        xi = torch.cat([x[m].flatten() for x in carry["xi"]])
        assert k >= 1
        assert abs(xi.std().item() / (0.01 * math.sqrt(k)) - 1) < 0.1, (m, k)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["pes", "tbptt"])
def test_mid_epoch_stop_then_resume_is_bit_identical(tmp_path, mnist_root, estimator):
    # tiny_pes.yaml: log-uniform run lengths and desynchronised starts; PES or TBPTT.
    est = ["--model.estimator", estimator]
    fit(tmp_path, mnist_root, *est, name="straight")
    first = fit(tmp_path, mnist_root, *est, "--trainer.max_steps", "5", name="split")
    assert first.trainer.global_step == 5
    resumed = fit(tmp_path, mnist_root, *est, "--ckpt_path", "last", name="split")
    assert resumed.trainer.global_step == 12
    straight, split = ckpt(tmp_path, "straight"), ckpt(tmp_path, "split")
    assert_bit_identical(split, straight)
    for key in ("steps", "lengths", "runs"):  # the schedule is part of the carry compared
        assert torch.equal(split["l2o"]["carries"][0]["schedule"][key],
                           straight["l2o"]["carries"][0]["schedule"][key])  # fmt: skip


def test_mlp_lopt_is_meta_trained_by_pes(tmp_path, mnist_root):
    # MLPLOpt keeps one step count per population, so its members restart in lockstep.
    lockstep = ["--model.truncation", "constant", "--model.desync", "false",
                "--model.optimizee_steps", "8"]  # fmt: skip
    mlp = str(REPO / "configs" / "tiny_mlp_lopt.yaml")
    cli = fit(tmp_path, mnist_root, "--config", mlp, *lockstep, "--trainer.max_epochs", "1")
    assert isinstance(cli.model.learned_optimizer, MLPLOpt)
    assert cli.trainer.global_step == 4
    assert cli.trainer.callback_metrics["train/meta_grad_norm"] > 0
    last = ckpt(tmp_path)
    (carry,) = last["l2o"]["carries"]
    # 4 particles, each run 8 steps = 2 truncations: the second run's state is at step 8.
    assert carry["state"]["momentum"].shape[0] == 4 and carry["state"]["step"] == 8
    assert carry["schedule"]["runs"].tolist() == [2, 2]
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"estimator": "es"}, "estimator must be one of"),
        ({"estimator": "pes", "population": 2, "pes_pairs": 4}, "--model.population 4"),
        ({"truncation": "log_uniform"}, "needs min_optimizee_steps"),
        (
            {
                "truncation": "log_uniform",
                "min_optimizee_steps": 1,
                "optimizee_steps": 3,
                "unroll": 2,
            },
            "optimizee_steps=3 is not a multiple",
        ),  # fmt: skip
        ({"truncation": "uniform"}, "truncation must be one of"),
        ({"estimator": "pes", "pes_sigma": 0.0}, "sigma must be > 0"),
        ({"learned_optimizer": MLPLOpt(), "population": 2, "desync": True}, "shared by the whole"),
    ],
)
def test_bad_estimator_and_schedule_settings_fail_at_construction(kwargs, match):
    base = {"optimizee": {"sizes": SIZES}, "unroll": 4, "optimizee_steps": 8}
    with pytest.raises(ValueError, match=match):
        MetaTrainingSystem(**{**base, **kwargs})
