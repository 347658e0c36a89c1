"""evaluate.py end to end: a learned checkpoint beside tuned baselines, every analysis, the
TensorBoard events read back with TensorBoard's own reader, summary files re-made by the report
from the runs' records, figures; divergence as a result; output folders; bad input refused
before any work."""

from __future__ import annotations

import fcntl
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from evaluate import cli_main as evaluate_main
from l2o.checkpoints import CheckpointError, load_learned_optimizer
from l2o.evaluation import FolderInUse
from l2o.report import main as report_main
from tests.conftest import REPO
from tests.test_meta_training import fit

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__`.*"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, mnist_root) -> str:
    tmp = tmp_path_factory.mktemp("ckpt")
    cli = fit(tmp, mnist_root, "--trainer.max_epochs", "1")
    return str(Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt")


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory, checkpoint) -> str:
    """The learned optimizer with NaN head weights: every update it makes is NaN."""
    ckpt = torch.load(checkpoint, weights_only=True)
    for key in ckpt["state_dict"]:
        if key.endswith("head.weight"):
            ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], math.nan)
    path = tmp_path_factory.mktemp("nan") / "nan.ckpt"
    torch.save(ckpt, path)
    return str(path)


NO_ANALYSES = ["--analyses", "[]"]
ANALYSES = [
    "--tail_index_every",
    "3",
    "--covariance_every",
    "3",
    "--covariance_samples",
    "64",
    "--histogram_every",
    "3",
]


def run_eval(tmp_path, mnist_root, *extra, name="exp"):
    """A tiny experiment; every analysis (at steps 1, 3, 6) unless ``extra`` sets --analyses."""
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
        "--criterion_steps",
        "4",
        "--tune_grid",
        "[0.01, 0.1]",
        "--tune_steps",
        "3",
        "--tune_seeds",
        "1",
        "--out",
        str(tmp_path),
        "--name",
        name,
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        *([] if "--analyses" in extra else ANALYSES),
        *extra,
    ]
    return evaluate_main(args)


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def strict_json(path: Path):
    def refuse(token):
        raise ValueError(f"{path} holds {token}: not valid JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.slow  # ~20 s: three optimizers x two seeds with every analysis, then the report
def test_evaluate_logs_every_tag_and_writes_the_summary(tmp_path, mnist_root, checkpoint, capsys):
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
        "update_hist/zero_fraction",
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
        seeds = [events(exp / label / f"seed_{s}") for s in (0, 1)]
        for seed, acc in enumerate(seeds):
            tags = set(acc.Tags()["scalars"])
            assert ("meta_test/lr" in tags) == (label != "l2o")  # the chosen rate is logged
            missing = expected - tags
            assert not missing, (label, seed, sorted(missing))
            assert acc.Tags()["histograms"] == ["update_hist/log10_abs_update"]
            # the run's hparams for TensorBoard's HParams tab
            start = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
            info = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info
            hp = {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
            assert hp["optimizer"] == label and hp["seed"] == seed
            assert hp["optimizee"] == "mlp-784-8-10-leaky_relu"
            assert hp["lr"] == {"sgd": "0.1", "l2o": "learned"}.get(label, hp["lr"])
            assert hp["checkpoint"] == (checkpoint if label == "l2o" else "")
            # the custom-scalars layout rides in every run: no empty extra run
            assert "custom_scalars__config__" in acc.Tags()["tensors"]
        # one run per optimizer with the seed means beside the seeds'
        mean = events(exp / label / "mean")
        for tag in ("meta_test/train_loss", "symmetry/update/rescale/abs_sum"):
            per_seed = [{e.step: e.value for e in a.Scalars(tag)} for a in seeds]
            got = {e.step: e.value for e in mean.Scalars(tag)}
            assert sorted(got) == sorted(per_seed[0])
            for step, value in got.items():
                ref = np.mean([float(p[step]) for p in per_seed])
                assert value == pytest.approx(ref, rel=1e-6), (label, tag, step)
    assert not (exp / "_layout").exists()
    assert sorted(p.name for p in exp.iterdir() if p.is_dir()) == ["adam", "figures", "l2o", "sgd"]
    # Summary: strict JSON; tuned lr recorded from the grid, the fixed one kept.
    saved = strict_json(exp / "summary.json")
    rows = saved["optimizers"]
    assert rows["adam"]["lr"] in (0.01, 0.1)
    assert set(rows["adam"]["lr_grid_scores"]) == {"0.01", "0.1"}
    assert rows["sgd"]["lr"] == 0.1 and rows["l2o"]["kind"] == "learned"
    assert rows["l2o"]["checkpoint"] == checkpoint
    for row in rows.values():
        assert len(row["final_train_loss"]["values"]) == 2
        assert 0 <= row["final_test_acc"]["mean"] <= 1
        assert "symmetry/update/rescale/abs_sum@mean" in row
        assert row["diverged"] == []
    assert summary["optimizers"].keys() == rows.keys()
    header = (exp / "summary.csv").read_text().splitlines()[0]
    assert header == "optimizer,metric,mean,std,values"
    for fig in ("loss", "symmetry", "tail_index", "covariance", "update_histograms"):
        for ext in ("png", "pdf"):
            assert (exp / "figures" / f"{fig}.{ext}").stat().st_size > 1000, (fig, ext)
    # Ground truth through the whole pipeline: SGD's gradient symmetry deviations are ~0
    # while its momentum update's, like Adam's, are not exactly the gradient's.
    assert rows["sgd"]["symmetry/grad/rescale/normalized@mean"]["mean"] < 1e-3
    assert rows["adam"]["symmetry/update/rescale/normalized@mean"]["mean"] > 1e-2
    # The summary is made from the records, exactly (float64) as the runs computed it:
    # the summed loss equals the event files' per-step losses summed (float32 there).
    for label, row in rows.items():
        for seed in (0, 1):
            steps = events(exp / label / f"seed_{seed}").Scalars("meta_test/train_loss")
            assert [e.step for e in steps] == list(range(1, 7))
            got = row["summed_train_loss"]["values"][seed]
            assert got == pytest.approx(sum(e.value for e in steps), rel=1e-6)
    # The manifest says complete; the config was saved; the last line says what next (#16).
    assert strict_json(exp / "manifest.json")["status"] == "complete"
    assert "covariance_samples: 64" in (exp / "config.yaml").read_text()
    out = capsys.readouterr().out.strip().splitlines()
    assert (
        out[-2] == f"Results: {exp}/ (summary.md, summary.json, summary.csv, figures/, config.yaml)"
    )
    assert out[-1].startswith(f"Next: tensorboard --logdir {exp}")
    # python -m l2o.report re-makes the same summary from the same store
    before = (exp / "summary.json").read_text()
    (exp / "summary.json").unlink()
    assert report_main([str(exp)]) == 0
    assert (exp / "summary.json").read_text() == before


def test_same_seed_same_curve_for_the_same_optimizer(tmp_path, mnist_root):
    """Seeds fix init and minibatch order: two optimizers' entries with the same settings
    produce identical losses, and different seeds differ."""
    summary = run_eval(
        tmp_path,
        mnist_root,
        "--optimizers",
        "[{name: sgd, lr: 0.1, label: a}, {name: sgd, lr: 0.1, label: b}]",
        *NO_ANALYSES,
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
        "--every",
        "{tail_index: 0, covariance: 0}",
    )
    row = summary["optimizers"]["l2o"]
    assert row["trained_on"] == "mlp-784-8-10-leaky_relu"
    assert summary["experiment"]["optimizee"] == "mlp-784-12-12-10-sigmoid"
    # sigmoid has no rescale symmetry, only translation
    assert "symmetry/update/translation/abs_sum@mean" in row
    assert "symmetry/update/rescale/abs_sum@mean" not in row
    assert not any(k.startswith(("tail_index/", "covariance/")) for k in row)


# --------------------------------------------------------------------------- divergence (#10)
def test_a_diverged_run_is_a_result(tmp_path, mnist_root, nan_checkpoint):
    """SGD at lr 1e4 blows up at step 7 and a NaN checkpoint at step 1: both are recorded as
    diverged (loss inf from there), the other optimizer's results are intact, and an
    optimizer whose every grid rate diverges is recorded as such."""
    summary = run_eval(
        tmp_path,
        mnist_root,
        "--optimizers",
        "[{name: sgd, lr: 1e4, momentum: 0, label: blowup}, {name: sgd, lr: 0.1, label: ok},"
        " {name: sgd, momentum: 0, label: hopeless}]",
        "--checkpoints",
        f"[{nan_checkpoint}]",
        "--optimizee",
        "{sizes: [784, 8, 10]}",
        "--steps",
        "9",
        "--tune_grid",
        "[1e5]",
        "--tune_steps",
        "6",
        "--every",
        "{tail_index: 0, covariance: 0}",
    )
    exp = tmp_path / "exp"
    rows = strict_json(exp / "summary.json")["optimizers"]  # valid JSON despite inf and NaN
    div = rows["blowup"]["diverged"]
    assert [d["seed"] for d in div] == [0, 1] and all(4 < d["step"] <= 9 for d in div)
    assert rows["blowup"]["final_train_loss"]["mean"] is None  # inf: null in strict JSON
    assert summary["optimizers"]["blowup"]["summed_train_loss"]["mean"] == math.inf
    assert all(v is not None for v in rows["blowup"]["mean_train_loss_first"]["values"])
    assert rows["l2o"]["diverged"] == [{"seed": 0, "step": 1}, {"seed": 1, "step": 1}]
    assert rows["ok"]["diverged"] == [] and rows["ok"]["final_train_loss"]["mean"] < 2.3
    assert rows["hopeless"]["status"] == "tuning failed: every grid rate diverged"
    assert rows["hopeless"]["lr_grid_scores"] == {"100000": None}
    assert not (exp / "hopeless").exists()
    md = (exp / "summary.md").read_text()
    at = ", ".join(f"seed {d['seed']} at step {d['step']}" for d in div)
    assert "| blowup | 10000 | inf | inf |" in md and f"2/2 ({at})" in md
    assert "| hopeless | tuning failed: every grid rate diverged |" in md
    for d in div:  # TensorBoard has the marker, and the run stopped at it
        acc = events(exp / "blowup" / f"seed_{d['seed']}")
        assert [e.step for e in acc.Scalars("meta_test/diverged_at_step")] == [d["step"]]
        assert max(e.step for e in acc.Scalars("meta_test/train_loss")) == d["step"] - 1
        # the symmetry analysis saw only the finite steps
        sym = acc.Scalars("symmetry/update/translation/abs_sum")
        assert [e.step for e in sym] == list(range(1, d["step"]))
    assert (exp / "figures" / "loss.png").stat().st_size > 1000


# --------------------------------------------------------------------------- folders (#11)
def test_a_name_in_use_is_refused_and_overwrite_leaves_nothing_stale(tmp_path, mnist_root):
    run_eval(tmp_path, mnist_root, "--optimizers", "[{name: sgd, lr: 0.1}, {name: adam}]",
             *NO_ANALYSES)  # fmt: skip
    exp = tmp_path / "exp"
    with pytest.raises(FolderInUse, match="holds a complete experiment.*--overwrite true"):
        run_eval(tmp_path, mnist_root, "--optimizers", "[{name: sgd, lr: 0.5}]", *NO_ANALYSES)
    assert (exp / "adam").exists()  # untouched
    summary = run_eval(tmp_path, mnist_root, "--optimizers", "[{name: sgd, lr: 0.5}]",
                       "--overwrite", "true", *NO_ANALYSES)  # fmt: skip
    assert list(summary["optimizers"]) == ["sgd"]
    assert not (exp / "adam").exists()  # the previous experiment's folders are gone
    assert not list(tmp_path.glob(".exp.replaced-*"))
    assert report_main([str(exp)]) == 0
    assert list(strict_json(exp / "summary.json")["optimizers"]) == ["sgd"]


def test_an_interrupted_experiment_is_not_reused_silently(tmp_path, mnist_root):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "manifest.json").write_text('{"status": "running", "runs": []}')
    with pytest.raises(FolderInUse, match="interrupted"):
        run_eval(tmp_path, mnist_root, "--optimizers", "[{name: sgd, lr: 0.1}]", *NO_ANALYSES)


def test_two_experiments_cannot_write_one_folder(tmp_path, mnist_root):
    with open(tmp_path / ".exp.lock", "a+") as lock:  # what a running evaluate.py holds
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 12345\n")
        lock.flush()
        with pytest.raises(FolderInUse, match="being written by another evaluate.py"):
            run_eval(tmp_path, mnist_root, "--optimizers", "[{name: sgd, lr: 0.1}]",
                     "--overwrite", "true", *NO_ANALYSES)  # fmt: skip
    assert not (tmp_path / "exp").exists()


# --------------------------------------------------------------------------- bad input
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


@pytest.mark.parametrize(
    ("optimizers", "error", "match"),
    [
        ("[{name: rmsprop}]", ValueError, "unknown optimizer 'rmsprop'"),
        ("[{name: l2o}]", ValueError, "needs a checkpoint"),
        ("[{name: adam, lr: tune}, {name: sgd, lr: 0}]", ValueError, "'sgd': lr must be.*> 0"),
        ("[{name: sgd, lr: 0.1, momentun: 0.9}]", ValueError, "'sgd'.*momentun"),
        ("[{name: lion_sgd, lr: 0.1, lion_lr: 0}]", ValueError, "learning rate must be > 0"),
        ("[{class_path: torch.optim.LBFGS, lr: 1.0}]", ValueError, "LBFGS cannot be replayed"),
        ("[{name: sgd, lr: 0.1, label: a/b}]", ValueError, "plain folder name"),
        ("[{name: sgd, lr: 0.1}, {name: sgd, lr: 0.2}]", ValueError, "labelled 'sgd'"),
        ("[{name: l2o, checkpoint: missing.ckpt}]", FileNotFoundError, "missing.ckpt"),
    ],
)
def test_bad_optimizer_specs_are_refused_before_any_work(
    tmp_path, mnist_root, optimizers, error, match
):
    with pytest.raises(error, match=match):
        run_eval(tmp_path, mnist_root, "--optimizers", optimizers, *NO_ANALYSES)
    assert not (tmp_path / "exp").exists()  # nothing tuned, nothing written


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--tune_grid", "[]"], "--tune_grid is empty"),
        (["--tune_grid", "[0.1, -1]"], "--tune_grid rates must be > 0"),
        (["--tune_steps", "0"], "--tune_steps must be >= 1"),
        (["--tune_seeds", "0"], "--tune_seeds must be >= 1"),
        (["--criterion_steps", "0"], "--criterion_steps must be between 1 and --steps"),
        (["--criterion_steps", "7"], "--criterion_steps must be between 1 and --steps"),
        (["--report_steps", "[1, 7]"], r"--report_steps \[7\] outside 1..--steps \(6\)"),
        (["--report_steps", "[0]"], r"--report_steps \[0\]"),
        (
            ["--covariance_samples", "1001"],
            "num_samples .* is 1001 but the training split has only 1000",
        ),
        (["--every", "{curvature: 3}"], "no analysis named"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--name", "../x"], "plain folder name"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, mnist_root, flags, match):
    """#12: each of these was accepted and gave a silently wrong (or no) result."""
    with pytest.raises(ValueError, match=match):
        run_eval(tmp_path, mnist_root, "--optimizers", "[{name: adam, lr: tune}]", *flags)
    assert not (tmp_path / "exp").exists()


def test_the_optimizee_must_fit_the_data(tmp_path, mnist_root):
    with pytest.raises(ValueError, match="takes 100 inputs"):
        run_eval(tmp_path, mnist_root, "--optimizers", "[{name: sgd, lr: 0.1}]",
                 "--optimizee", "{sizes: [100, 8, 10]}", *NO_ANALYSES)  # fmt: skip


# --------------------------------------------------------------------------- command line
def test_print_config_lists_the_analyses_as_config_objects(capsys):
    with pytest.raises(SystemExit) as done:
        evaluate_main(["--every", "{covariance: 5}", "--print_config"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for cls in ("SymmetryBreaking", "TailIndex", "UpdateCovariance", "UpdateHistograms"):
        assert f"class_path: callbacks.{cls}" in out
    assert "trainer:" in out and "accelerator: auto" in out


def test_report_command_line(tmp_path, capsys):
    """#14: `python -m l2o.report` with no argument, --help, or a folder that is not an
    experiment: usage and a reason, not a traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "l2o.report"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "usage: python -m l2o.report" in proc.stderr and "required: folder" in proc.stderr
    with pytest.raises(SystemExit) as done:
        report_main(["--help"])
    assert done.value.code == 0 and "usage: python -m l2o.report" in capsys.readouterr().out
    for folder, reason in ((tmp_path / "nope", "is not a folder"), (tmp_path, "no manifest.json")):
        with pytest.raises(SystemExit) as done:
            report_main([str(folder)])
        assert done.value.code == 2 and reason in capsys.readouterr().err
