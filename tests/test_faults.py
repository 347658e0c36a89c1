"""Real faults against meta-training: kill -9 at random moments (also inside a save), SIGTERM
and Ctrl-C, truncated checkpoints, a full disk. The ground truth is the uninterrupted run: every
interrupted-then-resumed run must end bit-identical to it (learned-optimizer weights, Adam's
state, global_step, the carried optimizees, the data stream's position)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from l2o.checkpointing import LAST, TEMP_SUFFIX
from l2o.checkpoints import CheckpointError, read_l2o_checkpoint
from tests.conftest import REPO, assert_bit_identical, tiny_args
from train import cli_main

EPOCHS = "3"  # 12 meta-steps of the tiny config


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_root) -> dict:
    """last.ckpt of the uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    cli_main([*tiny_args(root, mnist_root), "--trainer.max_epochs", EPOCHS])
    return load(root / "tiny" / "version_0" / "checkpoints" / LAST)


def command(root: Path, mnist_root: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        *tiny_args(root, mnist_root),
        "--trainer.max_epochs",
        EPOCHS,
        "--checkpoint_minutes",
        "0",  # last.ckpt at every step: many saves to kill
        *extra,
    ]


def environment(slow_save: float | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("L2O_TEST_SLOW_SAVE", None)
    if slow_save:
        env["L2O_TEST_SLOW_SAVE"] = str(slow_save)  # widen every save: time to kill inside it
    return env


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError("the training process never got there")


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.glob(f".*{TEMP_SUFFIX}")] if folder.is_dir() else []


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_bit_identical(tmp_path, mnist_root, reference):
    rng = random.Random(8)
    folder = tmp_path / "tiny" / "version_0" / "checkpoints"
    last = folder / LAST
    env = environment(slow_save=0.25)
    killed_in_save = 0
    # Alternate: a kill at a random moment after a save, and a kill inside a save.
    for kill in ("random", "in_save", "random", "in_save", "random", "in_save"):
        resume = ["--ckpt_path", "last"] if last.exists() else []
        proc = start(command(tmp_path, mnist_root, *resume), env)
        step_before = load(last)["global_step"] if last.exists() else -1
        if kill == "random":
            reached = wait_for(lambda s=step_before: last.exists() and load_step(last) > s, proc)
            time.sleep(rng.uniform(0.0, 0.8))
        else:
            reached = wait_for(lambda: bool(temp_files(folder)), proc)
        assert reached, proc.communicate()[1][-3000:]
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.communicate()
        if kill == "in_save" and temp_files(folder):
            killed_in_save += 1
        # Whatever the moment, last.ckpt is intact: the previous state or the new one.
        read_l2o_checkpoint(last)
    assert killed_in_save >= 1  # the premise: some kills did land inside a save
    proc = start(command(tmp_path, mnist_root, "--ckpt_path", "last"), env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert temp_files(folder) == []  # nothing leaked
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["version_0"]
    assert_bit_identical(load(last), reference)


def load_step(path: Path) -> int:
    try:
        return load(path)["global_step"]
    except Exception:  # being replaced right now: try again
        return -1


@pytest.mark.slow
def test_sigterm_and_ctrl_c_save_last_ckpt_and_exit_nonzero(tmp_path, mnist_root, reference):
    last = tmp_path / "tiny" / "version_0" / "checkpoints" / LAST
    env = environment(slow_save=0.3)
    stopped_at = []
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        resume = ["--ckpt_path", "last"] if last.exists() else []
        proc = start(command(tmp_path, mnist_root, *resume), env)
        before = load(last)["global_step"] if last.exists() else -1
        assert wait_for(lambda b=before: last.exists() and load_step(last) > b, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == code, err[-3000:]
        assert f"Stopped by {sig.name}" in err
        ckpt = load(last)
        stopped_at.append(ckpt["global_step"])
        assert 0 < ckpt["global_step"] < 12
    proc = start(command(tmp_path, mnist_root, "--ckpt_path", "last"), environment(None))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert stopped_at[0] < stopped_at[1] < 12
    assert_bit_identical(load(last), reference)


def test_truncated_last_ckpt_falls_back_to_the_newest_intact_one(tmp_path, mnist_root):
    args = tiny_args(tmp_path, mnist_root)
    straight = tmp_path / "straight"
    cli_main([*tiny_args(straight, mnist_root)])
    cli_main([*args, "--trainer.max_epochs", "1"])
    folder = tmp_path / "tiny" / "version_0" / "checkpoints"
    data = (folder / LAST).read_bytes()
    (folder / LAST).write_bytes(data[: len(data) // 2])  # a save cut short (non-atomic copy)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        cli_main([*args, "--ckpt_path", str(folder / LAST)])  # a named file: no fallback
    with pytest.warns(UserWarning, match=r"skipped .*last\.ckpt: could not read .*truncated"):
        resumed = cli_main([*args, "--ckpt_path", "last"])  # the best checkpoint, epoch 0
    assert resumed.trainer.global_step == 8
    assert_bit_identical(
        load(folder / LAST), load(straight / "tiny" / "version_0" / "checkpoints" / LAST)
    )


FULL_DISK = """
import resource, signal, sys, torch
from pathlib import Path
from l2o.checkpointing import CheckpointWriteError, atomic_save
path = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # exceeding the limit: an error, not a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    atomic_save({"w": torch.zeros(100_000)}, path)  # 400 kB
except CheckpointWriteError as err:
    print(err)
    sys.exit(3)
"""


def test_atomic_save_writes_what_torch_save_writes(tmp_path):
    from l2o.checkpointing import atomic_save

    obj = {"w": torch.arange(5.0), "meta": {"k": (1, 2)}}
    atomic_save(obj, tmp_path / "a.ckpt")
    torch.save(obj, tmp_path / "b.ckpt")
    a, b = load(tmp_path / "a.ckpt"), load(tmp_path / "b.ckpt")
    assert torch.equal(a["w"], b["w"]) and a["meta"] == b["meta"] == {"k": (1, 2)}
    # ... with the same permissions as a plain file (not mkstemp's private 0600)
    assert (tmp_path / "a.ckpt").stat().st_mode == (tmp_path / "b.ckpt").stat().st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "b.ckpt"]


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / LAST
    torch.save({"w": torch.ones(10)}, path)
    previous = path.read_bytes()
    res = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(path)],
        cwd=REPO,
        env=environment(None),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 3, res.stderr[-2000:]
    assert (
        f"could not write {path}" in res.stdout
        and "The previous last.ckpt, if any, is intact" in res.stdout
    )
    assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]  # no temporary file left
