"""examples/cnn_dropin.py on the tests' MNIST with a checkpoint of a tiny meta-training: the CNN
moves by exactly the learned optimizer's protocol updates, Adam beside it on the same batches."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from l2o.checkpoints import load_learned_optimizer
from l2o.mlp_lopt import MLPLOpt
from tests.conftest import REPO, tiny_args
from train import cli_main as train_main

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__`.*"),
]


def load_example():
    spec = importlib.util.spec_from_file_location("cnn_dropin", REPO / "examples" / "cnn_dropin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory, mnist_root) -> Path:
    tmp = tmp_path_factory.mktemp("fit")
    cli = train_main(
        [
            *tiny_args(tmp, mnist_root, "mlp"),
            "--config",
            str(REPO / "configs" / "tiny_mlp_lopt.yaml"),
            "--trainer.max_epochs",
            "1",
        ]
    )
    return Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"


@pytest.mark.slow  # a tiny meta-training, then three short CNN trainings
def test_cnn_example_steps_are_the_protocol_and_train(mnist_root, mlp_checkpoint, capsys):
    example = load_example()
    steps, batch, lr = 25, 32, 100.0
    args = ["--checkpoint", str(mlp_checkpoint), "--data-root", mnist_root]
    args += ["--steps", str(steps), "--batch-size", str(batch), "--channels", "2", "4"]
    # lr scales the learned update: the tiny meta-training's steps are ~1e-3 (4 meta-steps of
    # training), too small to see the loss move in 25 steps at lr 1
    results = example.main([*args, "--lr", str(lr), "--seed", "3"])
    out = capsys.readouterr().out
    assert "optimizer" in out and "mlp_lopt" in out and "adam" in out
    assert set(results) == {"adam", "mlp_lopt"}

    # Ground truth: the same CNN (same seed), the same minibatches, the protocol by hand.
    net, _ = load_learned_optimizer(mlp_checkpoint)
    assert isinstance(net, MLPLOpt)
    train_x, train_y, test_x, test_y = example.load_images(mnist_root)
    gen = torch.Generator().manual_seed(3)
    model = example.make_model(3, (2, 4))
    params = list(model.parameters())
    states = [None] * len(params)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(train_x), (batch,), generator=gen)
        model.zero_grad()
        loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for i, p in enumerate(params):
                view = (p.detach().unsqueeze(0),)
                states[i] = states[i] or net.init_state(view)
                (u,), states[i] = net.update((p.grad.unsqueeze(0),), states[i], view)
                p.add_(lr * u[0])
    got = results["mlp_lopt"]
    for a, b in zip(got["model"].parameters(), params):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-5)
    assert got["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    init = example.make_model(3, (2, 4))
    assert any(not torch.equal(a, b) for a, b in zip(init.parameters(), params))
    # it trains: the held-out loss falls from chance level (ln 10 = 2.30; measured 2.25 after)
    start_loss, _ = example.evaluate(init, test_x, test_y)
    assert got["test_loss"] == pytest.approx(example.evaluate(model, test_x, test_y)[0])
    assert got["test_loss"] < start_loss - 0.03, (start_loss, got["test_loss"])
    # Adam ran on its own copy from the same initialisation: it moved, and differently
    adam = list(results["adam"]["model"].parameters())
    assert not torch.equal(adam[0], init.conv1.weight)
    assert not torch.equal(adam[0], params[0])
    assert results["adam"]["losses"][0] == pytest.approx(losses[0], rel=1e-6)
    assert 0.0 <= got["test_acc"] <= 1.0


def test_cnn_example_refuses_a_non_checkpoint(tmp_path, mnist_root):
    from l2o.checkpoints import CheckpointError

    bad = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(CheckpointError, match="not an l2o-dynamics"):
        load_example().main(["--checkpoint", str(bad), "--data-root", mnist_root, "--steps", "1"])
