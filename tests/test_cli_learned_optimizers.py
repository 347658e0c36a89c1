"""Both learned optimizers end to end through the command lines, on the tiny setting:
``train.py fit`` meta-trains the LSTM (configs/tiny.yaml) and MLPLOpt (tiny.yaml layered with
tiny_mlp_lopt.yaml); ``evaluate.py`` meta-tests both checkpoints beside Adam with every analysis
of configs/analyses.yaml on; the drop-in loads the same checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from evaluate import cli_main as evaluate_main
from evaluate import default_analyses
from l2o import LearnedOptimizer
from l2o.checkpoints import load_learned_optimizer
from l2o.lstm import LSTMOptimizer
from l2o.mlp_lopt import MLPLOpt
from tests.conftest import REPO, save_learned_optimizer, tiny_args
from train import cli_main as train_main

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__`.*"),
]

TINY_MLP = str(REPO / "configs" / "tiny_mlp_lopt.yaml")


def meta_train(tmp: Path, mnist_root: str, name: str, *extra: str):
    cli = train_main([*tiny_args(tmp, mnist_root, name), *extra, "--trainer.max_epochs", "1"])
    return cli, Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, mnist_root) -> dict[str, tuple]:
    tmp = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    return {
        "lstm": meta_train(tmp, mnist_root, "lstm"),
        "mlp_lopt": meta_train(tmp, mnist_root, "mlp", "--config", TINY_MLP),
    }


@pytest.mark.slow  # two tiny meta-trainings (the module's fixture)
def test_train_meta_trains_both_and_checkpoints_load(checkpoints):
    """Each command meta-trains its own class (the config layer picks MLPLOpt and its sizes);
    the checkpoint holds the trained weights (not the initial ones) and the drop-in loads it."""
    for label, cls in (("lstm", LSTMOptimizer), ("mlp_lopt", MLPLOpt)):
        cli, path = checkpoints[label]
        trained = cli.model.learned_optimizer
        assert type(trained) is cls
        assert cli.trainer.global_step > 0
        net, optimizee = load_learned_optimizer(path)
        assert type(net) is cls and net.config() == trained.config()
        assert tuple(optimizee.sizes) == (784, 8, 10)
        for k, v in trained.state_dict().items():
            assert torch.equal(net.state_dict()[k], v.cpu()), (label, k)
        torch.manual_seed(0)
        fresh = cls(**trained.config())
        moved = [not torch.equal(a, b) for a, b in zip(fresh.parameters(), net.parameters())]
        assert any(moved), f"{label}: meta-training did not change the weights"
        opt = LearnedOptimizer([torch.nn.Parameter(torch.ones(3))], checkpoint=path)
        assert type(opt.learned_optimizer) is cls
    mlp = checkpoints["mlp_lopt"][0].model.learned_optimizer
    assert mlp.hidden_sizes == (8, 8) and mlp.momentum_decays == (0.5, 0.9)


@pytest.mark.slow  # ~1 min: three optimizers x 2 seeds with every analysis
def test_evaluate_meta_tests_both_with_every_analysis(tmp_path, mnist_root, checkpoints):
    lstm, mlp = (str(checkpoints[k][1]) for k in ("lstm", "mlp_lopt"))
    summary = evaluate_main(
        [
            "--data.root",
            mnist_root,
            "--data.download",
            "false",
            "--data.batch_size",
            "32",
            "--optimizee",
            "{sizes: [784, 8, 10], activation: leaky_relu}",
            "--optimizers",
            f"[{{name: adam, lr: 0.01}}, {{name: l2o, checkpoint: {lstm}, label: lstm}}, "
            f"{{name: l2o, checkpoint: {mlp}, label: mlp_lopt}}]",
            "--steps",
            "6",
            "--seeds",
            "2",
            "--eval_every",
            "3",
            "--criterion_steps",
            "4",
            # every analysis of configs/analyses.yaml, each at steps that fall in 6 steps
            "--every",
            "{symmetry: 1, tail_index: 3, covariance: 3, update_hist: 3, update_ratio: 3,"
            " step_length: 3}",
            "--covariance_samples",
            "64",
            "--out",
            str(tmp_path),
            "--name",
            "both",
            "--trainer.accelerator",
            "cpu",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    rows = summary["optimizers"]
    assert set(rows) == {"adam", "lstm", "mlp_lopt"}
    assert rows["lstm"]["checkpoint"] == lstm and rows["mlp_lopt"]["checkpoint"] == mlp
    analyses = {entry["class_path"].rsplit(".", 1)[-1] for entry in default_analyses()}
    assert len(analyses) == 6  # a new analysis in configs/analyses.yaml: add its tags below
    prefixes = (
        "symmetry/",
        "tail_index/",
        "covariance/",
        "update_hist/",
        "update_ratio/",
        "step_length/",
    )
    for label in ("lstm", "mlp_lopt"):
        for seed in (0, 1):
            acc = EventAccumulator(str(tmp_path / "both" / label / f"seed_{seed}"))
            acc.Reload()
            tags = acc.Tags()["scalars"]
            for prefix in prefixes:
                assert any(t.startswith(prefix) for t in tags), (label, seed, prefix)
            losses = [e.value for e in acc.Scalars("meta_test/train_loss")]
            assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
        row = rows[label]
        assert row["diverged"] == []
        for prefix in prefixes:
            assert any(k.startswith(prefix) for k in row), (label, prefix)
    # two different learned optimizers ran, not one twice: their trajectories differ
    a, b = (rows[k]["final_train_loss"]["values"] for k in ("lstm", "mlp_lopt"))
    assert a != b


@pytest.mark.parametrize(
    "config, family, criterion",
    [
        ("eval_cnn.yaml", "ConvOptimizee", None),
        ("eval_learned_optimizers.yaml", "MLPOptimizee", 100),
    ],
)
def test_eval_configs_take_both_checkpoints_on_the_command_line(
    tmp_path, config, family, criterion
):
    """The configs parse with the learned optimizers appended (--optimizers+), each its own
    label, on the intended optimizee family, with every analysis of configs/analyses.yaml."""
    from evaluate import build_parser, select_analyses
    from l2o.specs import parse_optimizers

    net = MLPLOpt(hidden_sizes=[4])
    path = tmp_path / "m.ckpt"
    optimizee = {"sizes": [784, 20, 10], "activation": "leaky_relu"}
    save_learned_optimizer(path, net, "l2o.mlp_lopt.MLPLOpt", optimizee)
    parser = build_parser()
    cfg = parser.parse_args(
        [
            "--config",
            str(REPO / "configs" / config),
            "--optimizers+",
            f"{{name: l2o, checkpoint: {path}, label: lstm}}",
            "--optimizers+",
            f"{{name: l2o, checkpoint: {path}, label: mlp_lopt}}",
        ]
    )
    assert cfg.steps == 200 and cfg.seeds == 5 and cfg.criterion_steps == criterion
    labels = [s.label for s in parse_optimizers(cfg.optimizers, [], [0.1])]
    assert labels[-2:] == ["lstm", "mlp_lopt"] and "adam" in labels
    assert len(select_analyses(cfg)) == len(default_analyses())
    init = parser.instantiate_classes(cfg)
    assert type(init.optimizee).__name__ == family
    if family == "ConvOptimizee":
        assert tuple(init.optimizee.channels) == (8, 16)
