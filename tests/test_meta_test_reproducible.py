"""Meta-testing MLPLOpt is reproducible, and an experiment names the weights it meta-tested.

RESULTS.md section 4.1 saw MLPLOpt's gradient alpha differ by 0.01-0.03 between two
evaluate.py runs (A, B) with equal seeds while the baselines were bit-identical. The meta-test
itself is deterministic: the same command in two fresh processes (other hash seeds) writes
bit-identical records, and the other analysis settings of run B (minibatch covariance, noise
centred on the mean update) leave the trajectory and the gradient alpha bit-identical. What can
differ with nothing else differing is the checkpoint behind the path: both runs named
``runs/mlp_lopt/version_0/checkpoints/last.ckpt`` while that meta-training was still running
and rewriting it. An experiment therefore records the SHA-256, epoch and meta-step of the bytes
it loaded (summary.json, every run's hparams, a printed note), so such runs are told apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluate import cli_main as evaluate_main
from l2o.mlp_lopt import MLPLOpt
from l2o.records import read_record
from tests.conftest import REPO, save_learned_optimizer

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__`.*"),
]

OPTIMIZEE = "{sizes: [784, 8, 10], activation: leaky_relu}"
# Runs A and B of RESULTS.md section 4.1, scaled down: what differs is only the analyses.
ANALYSES = {
    "A": "[{class_path: callbacks.TailIndex, init_args: {every_n_steps: 3, "
    "noise_center: full_batch_update}}, {class_path: callbacks.UpdateCovariance, "
    "init_args: {every_n_steps: 3, num_samples: 64, covariance_mode: per_sample}}]",
    "B": "[{class_path: callbacks.TailIndex, init_args: {every_n_steps: 3, "
    "noise_center: mean_update}}, {class_path: callbacks.UpdateCovariance, "
    "init_args: {every_n_steps: 3, num_samples: null, covariance_mode: minibatch}}]",
}


def save_mlp_lopt(path: Path, seed: int, epoch: int = 0, step: int = 200) -> bytes:
    """An MLPLOpt checkpoint in train.py's layout, with weights drawn from ``seed``; large
    enough steps (step_mult 0.01) that the optimizee moves within a few steps."""
    torch.manual_seed(seed)
    net = MLPLOpt(hidden_sizes=[8, 8], momentum_decays=[0.5, 0.9], time_scales=[1, 10, 100],
                  step_mult=0.01, output_init_scale=1.0)  # fmt: skip
    optimizee = {"sizes": [784, 8, 10], "activation": "leaky_relu"}
    save_learned_optimizer(path, net, "l2o.mlp_lopt.MLPLOpt", optimizee, epoch=epoch,
                           global_step=step)  # fmt: skip
    return path.read_bytes()


def eval_args(mnist_root: str, ckpt: Path, out: Path, name: str, analyses: str) -> list[str]:
    return [
        "--data.root", mnist_root, "--data.download", "false", "--data.batch_size", "32",
        "--optimizee", OPTIMIZEE,
        "--optimizers", f"[{{name: adam, lr: 0.01}}, {{name: l2o, checkpoint: {ckpt}, "
        "label: mlp_lopt}]",
        "--analyses", analyses, "--steps", "6", "--seeds", "1", "--eval_every", "3",
        "--criterion_steps", "4", "--out", str(out), "--name", name,
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def record_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "record.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.slow  # two fresh Python processes, each importing Lightning (~30 s on 2 loaded cores)
def test_mlp_lopt_meta_test_is_bit_identical_in_fresh_processes(tmp_path, mnist_root):
    ckpt = tmp_path / "mlp.ckpt"
    save_mlp_lopt(ckpt, seed=0)
    # Process 1 runs A then B; process 2 runs A again, with another hash seed (set and dict
    # order of str keys), so that anything global to a process would show up.
    script = (
        "import json, sys\nfrom evaluate import cli_main\n"
        "for args in json.loads(sys.argv[1]):\n    cli_main(args)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for hash_seed, names in (("1", ["A1", "B1"]), ("2", ["A2"])):
        runs = [eval_args(mnist_root, ckpt, tmp_path, n, ANALYSES[n[0]]) for n in names]
        res = subprocess.run(
            [sys.executable, "-c", script, json.dumps(runs)],
            cwd=REPO,
            env={**env, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]
    for label in ("adam", "mlp_lopt"):
        # The same command, two processes: every recorded number equal bit for bit.
        a1, a2 = (record_arrays(tmp_path / n / label / "seed_0") for n in ("A1", "A2"))
        assert a1.keys() == a2.keys()
        for key in a1:
            x, y = a1[key], a2[key]
            # NaN: an estimate that cannot be made (e.g. alpha on too few coordinates)
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), (label, key)
        # Run B's analyses replay the optimizer differently; the run they observe is the same.
        ra, rb = (read_record(tmp_path / n / label / "seed_0") for n in ("A1", "B1"))
        grad_tags = [t for t in ra.scalars if t.startswith("tail_index/grad/")]
        assert "tail_index/grad/standardized" in grad_tags
        for tag in ["meta_test/train_loss", "meta_test/test_loss", *grad_tags]:
            for x, y in zip(ra.scalars[tag], rb.scalars[tag]):
                assert np.array_equal(x, y, equal_nan=True), (label, tag)
    # The learned optimizer moved the optimizee (the comparison is not of constant curves).
    losses = read_record(tmp_path / "A1" / "mlp_lopt" / "seed_0").scalars["meta_test/train_loss"]
    assert losses[1][-1] != losses[1][0]


def test_a_rewritten_checkpoint_is_told_apart_by_its_hash(tmp_path, mnist_root, capsys):
    """Two experiments naming one last.ckpt that its meta-training rewrote in between: the
    numbers differ (other weights) and the summary and the runs' hparams say why."""
    ckpt = tmp_path / "last.ckpt"
    out = tmp_path / "out"
    first = save_mlp_lopt(ckpt, seed=0, epoch=0, step=200)
    evaluate_main(eval_args(str(mnist_root), ckpt, out, "A", "[]"))
    printed = capsys.readouterr().out
    second = save_mlp_lopt(ckpt, seed=1, epoch=1, step=400)  # the next epoch's save
    evaluate_main(eval_args(str(mnist_root), ckpt, out, "B", "[]"))

    rows = {n: json.loads((out / n / "summary.json").read_text())["optimizers"] for n in "AB"}
    for name, data, epoch, step in (("A", first, 0, 200), ("B", second, 1, 400)):
        row = rows[name]["mlp_lopt"]
        assert row["checkpoint"] == str(ckpt)  # the same path ...
        assert row["checkpoint_sha256"] == hashlib.sha256(data).hexdigest()  # ... other bytes
        assert (row["checkpoint_epoch"], row["checkpoint_step"]) == (epoch, step)
        run = read_record(out / name / "mlp_lopt" / "seed_0")
        assert run.hparams["checkpoint_sha256"] == row["checkpoint_sha256"]
        assert "checkpoint_sha256" not in rows[name]["adam"]
    assert rows["A"]["mlp_lopt"]["checkpoint_sha256"] != rows["B"]["mlp_lopt"]["checkpoint_sha256"]

    def losses(name: str, label: str) -> np.ndarray:
        return read_record(out / name / label / "seed_0").scalars["meta_test/train_loss"][1]

    assert not np.array_equal(losses("A", "mlp_lopt"), losses("B", "mlp_lopt"))
    # the baseline, as in section 4.1, bit-identical
    assert np.array_equal(losses("A", "adam"), losses("B", "adam"))
    assert "epoch 0, meta-step 200" in printed and hashlib.sha256(first).hexdigest()[:12] in printed
    assert "last.ckpt is rewritten while its meta-training runs" in printed
