"""The optimizer zoo through evaluate.py: ``{class_path: ..., init_args: ..., lr: ...}`` specs
run torch.optim classes and classes of the optional ``zoo`` extra through the functional
adapter under every analysis; each run's first update is checked against the class's own
``step()`` on the same gradient (what the adapter must reproduce), read back from the run's
record; bad specs are refused before any work."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from evaluate import cli_main
from l2o.data import MNISTDataModule
from l2o.meta_testing import init_optimizee
from l2o.optimizees import MLPOptimizee
from l2o.records import read_record
from l2o.streams import MetaTestData

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__`.*"),
]

OPTIMIZEE = MLPOptimizee(sizes=(784, 8, 10), activation="leaky_relu")
STEPS, BATCH = 6, 32
NAMES = ["layer1/weight", "layer1/bias", "layer2/weight", "layer2/bias"]


def run_zoo(tmp_path: Path, mnist_root: str, optimizers: str, *extra: str) -> dict:
    """The tiny setting of tests/test_evaluate.py, every analysis on (the update ratio at every
    step), one seed."""
    return cli_main(
        [
            "--data.root", mnist_root, "--data.download", "false",
            "--data.batch_size", str(BATCH),
            "--optimizee", "{sizes: [784, 8, 10], activation: leaky_relu}",
            "--optimizers", optimizers,
            "--steps", str(STEPS), "--seeds", "1", "--eval_every", "3",
            "--criterion_steps", "4",
            "--tune_grid", "[0.001, 0.01]", "--tune_steps", "3", "--tune_seeds", "1",
            "--every", "{update_ratio: 1, tail_index: 3, covariance: 3, update_hist: 3}",
            "--covariance_samples", "64",
            "--out", str(tmp_path), "--name", "zoo",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            *extra,
        ]
    )  # fmt: skip


def first_step(mnist_root: str):
    """The run's initial params (seed 0) and its first two minibatches, as evaluate.py has them."""
    dm = MNISTDataModule(root=mnist_root, download=False, batch_size=BATCH)
    dm.prepare_data()
    dm.setup("test")
    batches = list(MetaTestData.of(dm, 2, 0).test_dataloader())
    return init_optimizee(OPTIMIZEE, 0), batches


def torch_first_update(params, batch, make_opt):
    """The class's own first step on the run's first gradient, the ordinary torch way."""
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    opt = make_opt(leaves)
    OPTIMIZEE.loss(tuple(leaves), *batch).sum().backward()
    opt.step()
    return [(leaf - p).detach() for leaf, p in zip(leaves, params)]


def check_run(summary: dict, exp: Path, label: str, kind: str, params, batches, updates):
    """The summary lists the class, the losses are finite, the per-sample analyses ran, and the
    run's first update is ``updates`` (through its update ratios and its step-2 loss)."""
    row = summary["optimizers"][label]
    assert row["kind"] == kind and row["class_path"] == kind
    assert row["diverged"] == []
    assert all(math.isfinite(v) for v in row["final_train_loss"]["values"])
    rec = read_record(exp / label / "seed_0")
    steps, losses = rec.series("meta_test/train_loss")
    assert list(steps) == list(range(1, STEPS + 1)) and all(map(math.isfinite, losses))
    for tag in ("covariance/update/top_eig", "tail_index/update/pooled"):
        s, v = rec.series(tag)
        assert list(s) == [1, 3, 6] and all(map(math.isfinite, v)), tag
    for name, u, p in zip(NAMES, updates, params):
        expected = float(u.double().norm() / p.double().norm())
        got = rec.series(f"update_ratio/{name}")[1][0]
        assert got == pytest.approx(expected, rel=1e-5), (label, name)
    # the step-2 loss is taken at params + that update
    moved = tuple(p + u for p, u in zip(params, updates))
    assert losses[1] == pytest.approx(float(OPTIMIZEE.loss(moved, *batches[1])), rel=1e-5)


@pytest.mark.slow  # ~1 min on a loaded 2-core machine: two optimizers, tuning, every analysis
def test_torch_optim_classes_through_evaluate(tmp_path, mnist_root):
    """torch.optim.RAdam (lr tuned on the grid, betas from init_args) and torch.optim.Muon
    (2-D weights; biases by AdamW, as torch's documentation says) run under every analysis;
    their first updates are torch's own RAdam step and Muon + AdamW steps."""
    summary = run_zoo(
        tmp_path,
        mnist_root,
        "[{class_path: torch.optim.RAdam, init_args: {betas: [0.8, 0.99]}, lr: tune}, "
        "{class_path: torch.optim.Muon, lr: 0.02, label: muon, "
        " other: {class_path: torch.optim.AdamW, lr: 0.003, init_args: {weight_decay: 0.1}}}]",
    )
    exp = tmp_path / "zoo"
    rows = summary["optimizers"]
    assert list(rows) == ["radam", "muon"]
    lr = rows["radam"]["lr"]
    assert lr in (0.001, 0.01) and set(rows["radam"]["lr_grid_scores"]) == {"0.001", "0.01"}
    assert rows["muon"]["lr"] == 0.02
    params, batches = first_step(mnist_root)

    ups = {
        "radam": torch_first_update(
            params, batches[0], lambda ls: torch.optim.RAdam(ls, lr=lr, betas=(0.8, 0.99))
        ),
        "muon": _muon_first_update(params, batches[0]),
    }
    for label, kind in (("radam", "torch.optim.RAdam"), ("muon", "torch.optim.Muon")):
        check_run(summary, exp, label, kind, params, batches, ups[label])
    assert rows["radam"]["init_args"] == {"betas": [0.8, 0.99]}


def _muon_first_update(params, batch):
    """torch's documented use: Muon on the 2-D weights, AdamW on the rest. Muon takes 2-D
    tensors only, so the leaves are the population member's own (P = 1)."""
    leaves = [p[0].detach().clone().requires_grad_(True) for p in params]
    matrices = [leaf for leaf in leaves if leaf.dim() == 2]
    rest = [leaf for leaf in leaves if leaf.dim() != 2]
    opts = [
        torch.optim.Muon(matrices, lr=0.02),
        torch.optim.AdamW(rest, lr=0.003, weight_decay=0.1),
    ]
    OPTIMIZEE.loss(tuple(leaf[None] for leaf in leaves), *batch).sum().backward()
    for o in opts:
        o.step()
    return [(leaf[None] - p).detach() for leaf, p in zip(leaves, params)]


@pytest.mark.slow  # ~1 min: two optimizers of the optional extra under every analysis
def test_zoo_extra_classes_through_evaluate(tmp_path, mnist_root):
    """schedulefree.AdamWScheduleFree (lr tuned) and prodigyopt.Prodigy (lr 1.0, as its docs
    say) from the optional ``zoo`` extra; their first updates are the packages' own steps."""
    schedulefree = pytest.importorskip("schedulefree")
    prodigyopt = pytest.importorskip("prodigyopt")
    summary = run_zoo(
        tmp_path,
        mnist_root,
        "[{class_path: schedulefree.AdamWScheduleFree, lr: tune, label: sf_adamw, "
        "  init_args: {warmup_steps: 2}}, "
        "{class_path: prodigyopt.Prodigy, lr: 1.0, init_args: {d0: 1.0e-4}}]",
    )
    exp = tmp_path / "zoo"
    rows = summary["optimizers"]
    assert list(rows) == ["sf_adamw", "prodigy"]
    lr = rows["sf_adamw"]["lr"]
    assert lr in (0.001, 0.01) and rows["prodigy"]["lr"] == 1.0
    params, batches = first_step(mnist_root)

    def sf(leaves):
        opt = schedulefree.AdamWScheduleFree(leaves, lr=lr, warmup_steps=2)
        opt.train()  # schedule-free steps in train mode: the gradient at y, the params
        return opt

    sf_update = torch_first_update(params, batches[0], sf)
    check_run(summary, exp, "sf_adamw", "schedulefree.AdamWScheduleFree", params, batches,
              sf_update)  # fmt: skip
    # Prodigy couples all coordinates (its step-size estimate d): one optimizer per member.
    leaves = [p[0].detach().clone().requires_grad_(True) for p in params]
    opt = prodigyopt.Prodigy(leaves, lr=1.0, d0=1e-4)
    OPTIMIZEE.loss(tuple(leaf[None] for leaf in leaves), *batches[0]).sum().backward()
    opt.step()
    pr_update = [(leaf[None] - p).detach() for leaf, p in zip(leaves, params)]
    check_run(summary, exp, "prodigy", "prodigyopt.Prodigy", params, batches, pr_update)


def test_bad_class_path_specs_are_refused_before_any_work(tmp_path, mnist_root):
    """Unknown class, not an optimizer, L-BFGS (named), bad init_args: clear errors, and no
    experiment folder is made."""
    cases = {
        "{class_path: torch.optim.NoSuchOpt}": "has no optimizer 'NoSuchOpt'",
        "{class_path: no_such_package.Opt}": "cannot import 'no_such_package'",
        "{class_path: torch.nn.Linear}": "not a torch.optim.Optimizer subclass",
        "{class_path: torch.optim.LBFGS, lr: 1.0}": "torch.optim.LBFGS cannot be replayed",
        "{class_path: torch.optim.Adam, init_args: {betaz: [0.9, 0.99]}}": "betaz",
        "{class_path: torch.optim.Adam, init_args: {betas: [1.5, 0.99]}}": "beta",
        "{class_path: torch.optim.Adam, init_args: {lr: 0.1}, lr: 0.1}": "lr given twice",
        "{class_path: torch.optim.Adam, lr: -1}": "lr must be a number > 0",
        "{class_path: torch.optim.Adam, momentum: 0.9}": "unknown keys ['momentum']",
        "{class_path: torch.optim.Muon, other: {lr: 0.1}}": "other must be a mapping with",
    }
    for spec, match in cases.items():
        with pytest.raises(ValueError, match=re.escape(match)):
            run_zoo(tmp_path, mnist_root, f"[{spec}]")
    assert not (tmp_path / "zoo").exists()


def test_several_checkpoints_are_labelled_by_their_learned_optimizer(tmp_path):
    """The zoo's ``--checkpoints '[lstm, mlp]'``: each labelled by its learned optimizer (the
    LSTM ``l2o``, the MLP ``mlp_lopt``), a second LSTM ``l2o_2``; one checkpoint stays ``l2o``;
    every learned optimizer is the checkpoint's own (same weights)."""
    from l2o.lstm import LSTMOptimizer
    from l2o.mlp_lopt import MLPLOpt
    from l2o.specs import parse_optimizers
    from tests.test_dropin import _write_checkpoint

    paths, nets = {}, {}
    torch.manual_seed(0)  # two LSTMs with different weights
    for name, net in (("lstm", LSTMOptimizer()), ("mlp", MLPLOpt()), ("lstm2", LSTMOptimizer())):
        nets[name] = net
        paths[name] = str(tmp_path / f"{name}.ckpt")
        cls = type(net)
        _write_checkpoint(paths[name], net, f"{cls.__module__}.{cls.__qualname__}")
    specs = parse_optimizers(
        [{"name": "adam", "lr": 0.01}],
        [paths["lstm"], paths["mlp"], paths["lstm2"]],
    )
    assert [s.label for s in specs] == ["adam", "l2o", "mlp_lopt", "l2o_2"]
    assert [type(s.optimizer).__name__ for s in specs[1:]] == [
        "LSTMOptimizer",
        "MLPLOpt",
        "LSTMOptimizer",
    ]
    assert [s.info["checkpoint"] for s in specs[1:]] == [
        paths["lstm"],
        paths["mlp"],
        paths["lstm2"],
    ]
    for spec, name in zip(specs[1:], ("lstm", "mlp", "lstm2")):
        theirs = nets[name].state_dict()
        for k, v in spec.optimizer.state_dict().items():
            assert torch.equal(v, theirs[k]), (name, k)
    assert [s.label for s in parse_optimizers([], [paths["mlp"]])] == ["l2o"]
    with pytest.raises(ValueError, match="labelled 'l2o'"):  # a spec took the label already
        parse_optimizers([{"name": "sgd", "lr": 0.1, "label": "l2o"}], [paths["lstm"]])
