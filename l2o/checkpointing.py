"""Checkpoints a user can trust: atomic writes, ``last.ckpt`` that is really the last state,
signals that save, and resumes that refuse another run's checkpoint.

The policy (``train.py`` installs it; README "Checkpoints and resuming"):

- ``last.ckpt`` is written at every epoch end (after meta-validation, improved or not), at a step
  boundary at least every ``minutes`` (``--checkpoint_minutes``; 0: every step), when training
  stops early (``--trainer.max_time``, ``max_steps``), and on SIGTERM / SIGINT, after which the
  process exits 143 / 130. It holds everything a resume needs, down to the position in the
  epoch's data stream, so a resumed run ends bit-identical to an uninterrupted one.
- ``best-*.ckpt`` (:class:`BestCheckpoint`) is the best by meta-validation.
- Every file is written atomically (:class:`AtomicCheckpointIO`): a temporary file in the same
  folder, fsync, ``os.replace``. A crash, ``kill -9`` or a full disk leaves the previous file
  intact; temporary files of a killed save are removed when the run is resumed.
- A resume must match the checkpoint's run config (:func:`run_config`), except the settings that
  are safe to change (:data:`SAFE_ON_RESUME`, trainer limits), which are applied and printed.
  ``--ckpt_path last`` resumes the newest run *with this config*, from its newest intact
  checkpoint (:func:`find_resumable`).
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from l2o.checkpoints import CheckpointError, read_checkpoint, read_l2o_checkpoint

LAST = "last.ckpt"
TEMP_PREFIX = "."  # temporary files: .<name>.<random>.tmp, hidden, in the checkpoint's folder
TEMP_SUFFIX = ".tmp"
# Test hook: seconds to sleep in the middle of writing a checkpoint's bytes, so that a fault
# test can kill the process while a save is in progress. Never set it otherwise.
SLOW_SAVE_ENV = "L2O_TEST_SLOW_SAVE"
# Settings a resume may change: they are applied (and printed), not checked.
SAFE_ON_RESUME = ("model.meta_lr", "model.grad_clip")
# Data settings that say where the data is, not what it is (its identity is checked separately).
_DATA_LOCATION = ("root", "download")
# Linked from the model by train.py: compared once, as model.*.
_DATA_LINKED = ("unroll", "population", "optimizee_steps")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, quota, permissions); the previous file with
    that name is intact."""

    def __str__(self) -> str:
        return str(self.strerror)


class ResumeError(ValueError):
    """The checkpoint cannot be resumed by this command (another run's config, a used-up budget)."""


# ---------------------------------------------------------------------------- atomic writes
class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the target's folder, fsync, then ``os.replace``:
    atomic on every POSIX filesystem (NFS, tmpfs, volumes), so a reader never sees a partial
    checkpoint. Loads with ``weights_only=True`` and the clear errors of
    :func:`l2o.checkpoints.read_checkpoint`."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_save(checkpoint, Path(path))

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("l2o-dynamics checkpoints are loaded with weights_only=True only")
        ckpt = read_checkpoint(path)  # on CPU; Lightning moves the states to the device
        return ckpt

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        Path(path).unlink(missing_ok=True)


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``torch.save(obj)`` to ``path`` atomically; a failure leaves ``path`` as it was and
    no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX
    )
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make checkpoints private
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            if os.environ.get(SLOW_SAVE_ENV):  # test hook: a save that can be killed midway
                f.flush()
                time.sleep(float(os.environ[SLOW_SAVE_ENV]))
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise CheckpointWriteError(
                err.errno,
                f"could not write {path} ({len(data) / 1e6:.1f} MB): {os.strerror(err.errno)}. "
                f"The previous {path.name}, if any, is intact; free space, then resume with "
                "--ckpt_path last",
            ) from err
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; some filesystems cannot fsync a directory, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files that killed saves left in ``folder`` (call it only when no
    other process writes there: at the start of a run)."""
    stale = [p for p in folder.glob(f"{TEMP_PREFIX}*.ckpt.*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# ---------------------------------------------------------------------------- run configs
def run_config(
    model_hparams: dict[str, Any],
    data_hparams: dict[str, Any] | None,
    world_size: int | None = None,
    seed_everything: int | None = None,
) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint, as flat ``group.key`` entries: the
    learned optimizer (class and config), the optimizee, unroll, population, optimizee_steps,
    the meta-loss and penalty, every seed, the batch size and data sampling, the number of DDP
    processes. Not: :data:`SAFE_ON_RESUME`, trainer limits, where the data lives."""
    cfg: dict[str, Any] = {}
    for key, value in model_hparams.items():
        if key.startswith("_") or f"model.{key}" in SAFE_ON_RESUME:
            continue
        if key == "learned_optimizer" and isinstance(value, dict) and "class_path" not in value:
            value = {"class_path": "l2o.lstm.LSTMOptimizer", "init_args": value}  # older format
        cfg[f"model.{key}"] = _plain(value)
    for key, value in (data_hparams or {}).items():
        if key.startswith("_") or key in _DATA_LOCATION or key in _DATA_LINKED:
            continue
        cfg[f"data.{'sampling_seed' if key == 'seed' else key}"] = _plain(value)
    if world_size is not None:
        cfg["trainer.world_size"] = int(world_size)
    if seed_everything is not None:
        cfg["seed_everything"] = int(seed_everything)
    return cfg


def checkpoint_run_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    meta = ckpt.get("l2o", {})
    return run_config(
        ckpt.get("hyper_parameters", {}),
        ckpt.get("datamodule_hyper_parameters", {}),
        meta.get("world_size"),
        meta.get("seed_everything"),
    )


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: checkpoint A, this command B`` for every differing key (keys an older checkpoint
    did not record are not compared)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key not in saved:
            continue
        if saved.get(key) != current.get(key):
            now = current.get(key, "(unset)")
            out.append(f"{key}: checkpoint {saved.get(key)!r}, this command {now!r}")
    return out


def safe_overrides(ckpt: dict[str, Any], model_hparams: dict[str, Any]) -> list[str]:
    """The safe settings this command changes relative to the checkpoint (applied)."""
    saved = ckpt.get("hyper_parameters", {})
    out = []
    for full in SAFE_ON_RESUME:
        key = full.split(".", 1)[1]
        if key in saved and saved[key] != model_hparams.get(key):
            out.append(f"{full}: {saved[key]!r} in the checkpoint -> {model_hparams.get(key)!r}")
    return out


# ---------------------------------------------------------------------------- finding a resume
@dataclass
class Resume:
    path: Path  # the checkpoint to resume from
    checkpoint: dict[str, Any]
    version: str | None  # the logger version folder to continue, or None: a new one
    notes: list[str] = field(default_factory=list)  # skipped files, worth a warning


def _ordered_checkpoints(folder: Path) -> list[Path]:
    """last.ckpt first, then the others newest first."""
    files = [p for p in folder.glob("*.ckpt") if p.is_file()]
    return sorted(files, key=lambda p: (p.name != LAST, -p.stat().st_mtime))


def find_resumable(run_root: Path, current: dict[str, Any]) -> Resume:
    """``--ckpt_path last``: the newest run below ``run_root`` (``<save_dir>/<name>``) whose
    config is ``current``, from its newest intact checkpoint. Corrupt or truncated files are
    skipped (and reported in ``notes``); runs of another config are never chosen."""
    versions = [d for d in run_root.glob("version_*") if (d / "checkpoints").is_dir()]
    newest = {
        d: max((p.stat().st_mtime for p in (d / "checkpoints").glob("*.ckpt")), default=-1.0)
        for d in versions
    }
    notes: list[str] = []
    mismatches: list[tuple[str, list[str]]] = []
    for version in sorted(versions, key=lambda d: newest[d], reverse=True):
        for path in _ordered_checkpoints(version / "checkpoints"):
            try:
                ckpt = read_l2o_checkpoint(path)
            except CheckpointError as err:
                notes.append(f"skipped {path}: {err}")
                continue
            diffs = config_differences(checkpoint_run_config(ckpt), current)
            if diffs:
                mismatches.append((version.name, diffs))
                break  # every checkpoint of a run has its config
            return Resume(path, ckpt, version.name, notes)
    if mismatches:
        name, diffs = mismatches[0]
        others = "".join(f", {n}" for n, _ in mismatches[1:])
        raise ResumeError(
            f"--ckpt_path last: no run below {run_root} has this command's config, so none is "
            f"resumed. The newest, {name}{others and ' (and' + others + ')'}, differs in:\n  "
            + "\n  ".join(diffs)
            + "\nResume that run with its own config (its config.yaml), or start a new run "
            "(drop --ckpt_path)."
        )
    skipped = ("\n  " + "\n  ".join(notes)) if notes else ""
    raise FileNotFoundError(
        f"--ckpt_path last: no intact checkpoint below {run_root}/version_*/checkpoints"
        f"{skipped}\nStart a new run (drop --ckpt_path) or pass a checkpoint's path."
    )


def resume_from_file(path: Path, current: dict[str, Any], run_root: Path | None) -> Resume:
    """``--ckpt_path FILE``: refuse another config's checkpoint; continue in the run folder when
    FILE is that run's last.ckpt, else branch into a new run folder."""
    ckpt = read_l2o_checkpoint(path)
    diffs = config_differences(checkpoint_run_config(ckpt), current)
    if diffs:
        raise ResumeError(
            f"{path} was written by a run of another config; resuming it would mix two runs. "
            "It differs in:\n  " + "\n  ".join(diffs) + "\nResume with the checkpoint's config "
            "(its run's config.yaml), or start a new run (drop --ckpt_path)."
        )
    version = None
    folder = path.resolve().parent
    if (
        path.name == LAST
        and folder.name == "checkpoints"
        and run_root is not None
        and folder.parent.parent == run_root.resolve()
    ):
        version = folder.parent.name
    return Resume(path, ckpt, version)


def timer_elapsed(ckpt: dict[str, Any]) -> float | None:
    """Seconds of training that a checkpoint's ``--trainer.max_time`` Timer had counted."""
    state = ckpt.get("callbacks", {}).get("Timer")
    if not isinstance(state, dict):
        return None
    return state.get("time_elapsed", {}).get("train")


# ---------------------------------------------------------------------------- callbacks
class BestCheckpoint(ModelCheckpoint):
    """``best-*.ckpt``: the ``save_top_k`` best checkpoints by meta-validation. ``last.ckpt`` is
    :class:`RunCheckpoint`'s; without meta-validation (``data.val_steps: 0``) there is no best.

    Args:
        monitor: the logged metric that ranks checkpoints.
        mode: ``min`` or ``max`` of ``monitor``.
        save_top_k: how many best checkpoints to keep.
        filename: their name; it must keep ``best`` in it.
    """

    def __init__(
        self,
        monitor: str = "val/summed_loss",
        mode: str = "min",
        save_top_k: int = 1,
        filename: str = "best-{epoch}-{step}",
    ) -> None:
        super().__init__(monitor=monitor, mode=mode, save_top_k=save_top_k, filename=filename)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        dm = getattr(trainer, "datamodule", None)
        if trainer.limit_val_batches == 0 or getattr(dm, "val_steps", None) == 0:
            self.save_top_k = 0  # nothing to rank: last.ckpt is the result
            if stage == "fit" and trainer.is_global_zero:
                warnings.warn(
                    "no meta-validation (data.val_steps=0 or trainer.limit_val_batches=0), so no "
                    "best checkpoint is chosen; the run's result is its last.ckpt.",
                    stacklevel=2,
                )


class RunCheckpoint(Checkpoint):
    """``last.ckpt``: at every epoch end, every ``minutes`` at a step boundary (0: every step),
    when training stops early, and on SIGTERM / SIGINT (then exit 128 + signal number).

    Under DDP every decision is agreed by all ranks (one all-reduce per step) and rank 0 writes.
    The last batch of an epoch is never saved mid-epoch: the epoch-end save follows it, after
    meta-validation, so that a resume never skips an epoch's validation.

    Args:
        minutes: the longest time between two saves of last.ckpt while training.
        dirpath: the checkpoint folder; default: the logger's ``<version>/checkpoints``.
        seed_everything: the run's global seed, recorded for resume checks.
    """

    def __init__(
        self, minutes: float = 10.0, dirpath: str | None = None, seed_everything: int | None = None
    ) -> None:
        if not minutes >= 0:
            raise ValueError(f"checkpoint_minutes must be >= 0 (0: every step), got {minutes}")
        self.minutes = float(minutes)
        self.dirpath = dirpath
        self.seed_everything = seed_everything
        self.signum: int | None = None
        self.saves = 0
        self._last_save = time.monotonic()
        self._previous_handlers: dict[int, Any] = {}

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath) / LAST

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.dirpath is None:
            self.dirpath = trainer.strategy.broadcast(_checkpoint_dir(trainer))
        if trainer.is_global_zero and Path(self.dirpath).is_dir():
            stale = remove_stale_temp_files(Path(self.dirpath))
            if stale:
                print(f"Removed {len(stale)} temporary file(s) of killed saves in {self.dirpath}")

    # -- signals: Lightning's own SIGTERM handler (installed just before training) exits 0
    #    without saving; ours replaces it for the training loop and is restored afterwards.
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_save = time.monotonic()
        if trainer.received_sigterm:  # arrived between Lightning's handler and ours
            self.signum = signal.SIGTERM
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: abort now, without saving
                raise KeyboardInterrupt
            return
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name} received: saving {LAST} at the next step boundary, "
            f"then exiting with code {128 + signum} (Ctrl-C again aborts without saving).",
            file=sys.stderr,
            flush=True,
        )

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
        self._previous_handlers = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    # -- when to save
    def _agree(self, trainer: L.Trainer) -> tuple[int, bool]:
        """(signal number or 0, a timed save is due), the same on every rank."""
        due = self.minutes == 0 or time.monotonic() - self._last_save >= 60 * self.minutes
        signum = self.signum or 0
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            t = torch.tensor(
                [signum, int(due and trainer.is_global_zero)], device=trainer.strategy.root_device
            )
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            signum, due = int(t[0]), bool(t[1])
        return signum, due

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        signum, due = self._agree(trainer)
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch-end save comes after meta-validation (and the signal waits for it)
        stopping = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
        if signum or due or stopping:
            self.save(trainer)
        if signum:
            self._exit(trainer, signum)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signum, _ = self._agree(trainer)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if done >= trainer.num_training_batches:  # else stopped early: saved at the batch end
            self.save(trainer)
        if signum:
            self._exit(trainer, signum)

    def save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.last_path, weights_only=False)
        self.saves += 1
        self._last_save = time.monotonic()

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint.setdefault("l2o", {})["seed_everything"] = self.seed_everything

    def _exit(self, trainer: L.Trainer, signum: int) -> None:
        if trainer.is_global_zero:
            print(
                f"Stopped by {signal.Signals(signum).name} at step {trainer.global_step}: the run "
                f"is saved in {self.last_path}. Resume it with the same command plus "
                "--ckpt_path last.",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(128 + signum)


def _checkpoint_dir(trainer: L.Trainer) -> str:
    """The folder ModelCheckpoint would pick: ``<save_dir>/<name>/<version>/checkpoints``."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return os.path.join(save_dir, str(logger.name), version, "checkpoints")
    return os.path.join(trainer.default_root_dir, "checkpoints")
