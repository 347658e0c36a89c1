"""evaluate.py end to end: a learned checkpoint beside tuned baselines, every analysis, the
TensorBoard events read back with TensorBoard's own reader, summary files, figures, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from evaluate import cli_main as evaluate_main
from l2o.checkpoints import CheckpointError, load_learned_optimizer
from tests.test_meta_training import fit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, mnist_root) -> str:
    tmp = tmp_path_factory.mktemp("ckpt")
    cli = fit(tmp, mnist_root, "--trainer.max_epochs", "1")
    return str(Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt")


def run_eval(tmp_path, mnist_root, *extra):
    args = [
        "--data.root",
        mnist_root,
        "--data.download",
        "false",
        "--data.batch_size",
        "32",
        "--steps",
        "6",
        "--seeds",
        "2",
        "--eval_every",
        "3",
        "--tail_index_every",
        "3",
        "--covariance_every",
        "3",
        "--covariance_samples",
        "64",
        "--histogram_every",
        "3",
        "--tune_grid",
        "[0.01, 0.1]",
        "--tune_steps",
        "3",
        "--tune_seeds",
        "1",
        "--out",
        str(tmp_path),
        "--name",
        "exp",
        "--accelerator",
        "cpu",
        *extra,
    ]
    return evaluate_main(args)


def scalar_tags(run_dir: Path) -> set[str]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return set(acc.Tags()["scalars"]) | {f"hist:{t}" for t in acc.Tags()["histograms"]}


def test_evaluate_logs_every_tag_and_writes_the_summary(tmp_path, mnist_root, checkpoint):
    summary = run_eval(
        tmp_path,
        mnist_root,
        "--checkpoints",
        f"[{checkpoint}]",
        "--optimizers",
        "[{name: sgd, lr: 0.1, momentum: 0.9}, {name: adam}]",
        "--optimizee",
        "{sizes: [784, 8, 10], activation: leaky_relu}",
    )
    exp = tmp_path / "exp"
    expected = {
        "meta_test/train_loss",
        "meta_test/train_acc",
        "meta_test/test_loss",
        "meta_test/test_acc",
        "update_hist/mean_abs_update",
        "hist:update_hist/abs_update",
        "covariance/update/top_eig",
        "covariance/update/trace",
        "covariance/grad/top_eig",
        "covariance/grad/trace",
    }
    expected |= {
        f"symmetry/{q}/{c}/{s}"
        for q in ("update", "grad")
        for c in ("rescale", "translation")
        for s in ("abs_sum", "signed_sum", "normalized")
    }
    expected |= {f"tail_index/{q}/{e}" for q in ("update", "grad") for e in ("pooled", "robust")}
    for label in ("sgd", "adam", "l2o"):
        for seed in (0, 1):
            tags = scalar_tags(exp / label / f"seed_{seed}")
            assert ("meta_test/lr" in tags) == (label != "l2o")  # the chosen rate is logged
            missing = expected - tags
            assert not missing, (label, seed, sorted(missing))
    # The custom-scalars layout sits at the experiment root, so TensorBoard finds it.
    assert list((exp / "_layout").glob("events.out.tfevents.*"))
    # Summary: tuned lr recorded from the grid, the fixed one kept, per-seed values present.
    saved = json.loads((exp / "summary.json").read_text())
    rows = saved["optimizers"]
    assert rows["adam"]["lr"] in (0.01, 0.1) and set(rows["adam"]["lr_grid_scores"]) == {
        "0.01",
        "0.1",
    }
    assert rows["sgd"]["lr"] == 0.1 and rows["l2o"]["kind"] == "l2o"
    for row in rows.values():
        assert len(row["final_train_loss"]["values"]) == 2
        assert 0 <= row["final_test_acc"]["mean"] <= 1
        assert "symmetry/update/rescale/abs_sum@mean" in row
    assert summary["optimizers"].keys() == rows.keys()
    header = (exp / "summary.csv").read_text().splitlines()[0]
    assert header == "optimizer,metric,mean,std,values"
    for fig in ("loss", "symmetry", "tail_index", "covariance", "update_histograms"):
        assert (exp / "figures" / f"{fig}.png").stat().st_size > 1000, fig
    # Ground truth through the whole pipeline: SGD's gradient symmetry deviations are ~0
    # while its momentum update's, like Adam's, are not exactly the gradient's.
    sgd = rows["sgd"]
    assert sgd["symmetry/grad/rescale/normalized@mean"]["mean"] < 1e-3
    assert rows["adam"]["symmetry/update/rescale/normalized@mean"]["mean"] > 1e-2


def test_same_seed_same_curve_for_the_same_optimizer(tmp_path, mnist_root):
    """Seeds fix init and minibatch order: two optimizers' entries with the same settings
    produce identical losses, and different seeds differ."""
    summary = run_eval(
        tmp_path,
        mnist_root,
        "--optimizers",
        "[{name: sgd, lr: 0.1, label: a}, {name: sgd, lr: 0.1, label: b}]",
        "--symmetry_every",
        "0",
        "--tail_index_every",
        "0",
        "--covariance_every",
        "0",
        "--histogram_every",
        "0",
    )
    a, b = (summary["optimizers"][k]["final_train_loss"]["values"] for k in ("a", "b"))
    assert a == b and a[0] != a[1]


def test_a_learned_optimizer_generalises_to_another_family(tmp_path, mnist_root, checkpoint):
    summary = run_eval(
        tmp_path,
        mnist_root,
        "--checkpoints",
        f"[{checkpoint}]",
        "--optimizee",
        "{sizes: [784, 12, 12, 10], activation: sigmoid}",
        "--tail_index_every",
        "0",
        "--covariance_every",
        "0",
    )
    row = summary["optimizers"]["l2o"]
    assert row["trained_on"] == "mlp-784-8-10-leaky_relu"
    assert summary["experiment"]["optimizee"] == "mlp-784-12-12-10-sigmoid"
    # sigmoid has no rescale symmetry, only translation
    assert "symmetry/update/translation/abs_sum@mean" in row
    assert "symmetry/update/rescale/abs_sum@mean" not in row


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_learned_optimizer(tmp_path / "nope.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="could not read"):
        load_learned_optimizer(corrupt)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="not an l2o-dynamics"):
        load_learned_optimizer(other)


def test_bad_optimizer_specs_are_clear(tmp_path, mnist_root):
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        run_eval(tmp_path, mnist_root, "--optimizers", "[{name: rmsprop}]")
    with pytest.raises(ValueError, match="needs a checkpoint"):
        run_eval(tmp_path, mnist_root, "--optimizers", "[{name: l2o}]")
    with pytest.raises(FileNotFoundError):
        run_eval(tmp_path, mnist_root, "--checkpoints", "[missing.ckpt]")
    with pytest.raises(ValueError, match="takes 100 inputs"):
        run_eval(
            tmp_path,
            mnist_root,
            "--optimizers",
            "[{name: sgd, lr: 0.1}]",
            "--optimizee",
            "{sizes: [100, 8, 10]}",
        )
