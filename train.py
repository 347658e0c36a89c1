"""Meta-train a learned optimizer (the study's LSTM by default).

    python train.py fit --config configs/default.yaml                     # minutes on a CPU
    python train.py fit --config configs/leaky_relu.yaml --data.root ../shared/data
    python train.py fit --config configs/leaky_relu.yaml --trainer.devices 4 --trainer.strategy ddp
    python train.py fit --config configs/default.yaml --ckpt_path last   # resume this config's run

Checkpoints land in the run's ``checkpoints/`` folder (``runs/<name>/version_N/``): ``last.ckpt``,
the latest state (every epoch end, every ``--checkpoint_minutes`` and on SIGTERM / Ctrl-C), and
``best-*.ckpt``, the best by meta-validation (``val/summed_loss``). Watch it with
``tensorboard --logdir runs``. The policy is :mod:`l2o.checkpointing`'s.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import Namespace, lazy_instance
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from l2o.checkpointing import (
    AtomicCheckpointIO,
    BestCheckpoint,
    CheckpointWriteError,
    Resume,
    ResumeError,
    RunCheckpoint,
    find_resumable,
    resume_from_file,
    run_config,
    safe_overrides,
    timer_elapsed,
)
from l2o.checkpoints import CheckpointError
from l2o.data import MNISTCorrupt, MNISTDataModule, MNISTUnavailable
from l2o.lstm import LSTMOptimizer
from l2o.meta_training import MetaTrainingDiverged, MetaTrainingSystem

REPO = Path(__file__).resolve().parent
DEFAULT_LOGGER = {"save_dir": "runs", "name": "meta_train", "flush_secs": 10}


# ModelCheckpoint options that no longer apply: last.ckpt is RunCheckpoint's (l2o.checkpointing).
_LAST = "last.ckpt is written at every epoch end and every --checkpoint_minutes (0: every step)"
RETIRED_OPTIONS = {
    "--checkpoint.every_n_train_steps": f"{_LAST}, exact to resume",
    "--checkpoint.train_time_interval": f"{_LAST}",
    "--checkpoint.save_last": f"{_LAST}, always",
    "--checkpoint.save_on_exception": "SIGTERM and Ctrl-C save last.ckpt at the next step "
    "boundary (a crash loses at most --checkpoint_minutes)",
}


class ConfigError(ValueError):
    """The command's configuration is invalid (said before any work)."""


class MetaTrainingCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `test` and `predict` have no meaning for meta-training (meta-testing is evaluate.py).
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        # The data stream must match the model's unroll: one definition, linked.
        for key in ("unroll", "population", "optimizee_steps"):
            parser.link_arguments(f"model.{key}", f"data.{key}")
        parser.add_argument(
            "--checkpoint_minutes",
            type=float,
            default=10.0,
            help="Write last.ckpt at least this often (minutes) while training, besides every "
            "epoch end; 0: at every step.",
        )
        parser.add_argument(
            "--threads",
            type=int | None,
            default=None,
            help="torch CPU threads per process. Default: 1, unless OMP_NUM_THREADS is set (these "
            "tensors are small: on a shared 2-core machine 2 threads ran 4-7x slower than 1). "
            "0: torch's default (one per core).",
        )
        # The study's LSTM unless a config names another class, so that
        # --model.learned_optimizer.init_args.* works without a class_path.
        parser.set_defaults({"model.learned_optimizer": lazy_instance(LSTMOptimizer)})
        # best-*.ckpt by meta-validation (--checkpoint.* to change); last.ckpt is RunCheckpoint's.
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")

    def parse_arguments(self, parser, args) -> None:
        for arg in sys.argv[1:] if args is None else args:
            option = str(arg).split("=", 1)[0]
            if option in RETIRED_OPTIONS:
                parser.error(f"{option} is not an option any more: {RETIRED_OPTIONS[option]}")
        super().parse_arguments(parser, args)
        # LightningCLI would replace the model's config by a --ckpt_path file's hyperparameters
        # (silently dropping e.g. --model.meta_lr 0.5, and loading the file unsafely): the
        # checkpoint is resolved and checked against the command in before_fit instead.
        cfg = self.config.get(self.config.get("subcommand") or "", self.config)
        self.requested_ckpt_path = cfg.get("ckpt_path")
        if self.requested_ckpt_path is not None:
            cfg["ckpt_path"] = None

    def instantiate_classes(self) -> None:
        cfg = self.config.get(self.config.get("subcommand") or "", self.config)
        threads = cfg.get("threads")
        if threads is None and not os.environ.get("OMP_NUM_THREADS"):
            threads = 1
        if threads:
            torch.set_num_threads(threads)
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            raise ConfigError(_reason(err)) from err

    # ------------------------------------------------------------------ fit
    def before_fit(self) -> None:
        cfg = self.config[self.subcommand]
        trainer, model, dm = self.trainer, self.model, self.datamodule
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        seed = cfg.get("seed_everything")
        seed = None if isinstance(seed, bool) else seed
        try:
            last = RunCheckpoint(cfg["checkpoint_minutes"], seed_everything=seed)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        current = run_config(dict(model.hparams), dict(dm.hparams), trainer.world_size, seed)
        logger = trainer.logger
        run_root = Path(logger.save_dir, logger.name) if logger and logger.save_dir else None

        self.resume = self._resolve(self.requested_ckpt_path, current, run_root)
        if self.resume is not None:
            self._check_budget(self.resume)
            if self.resume.version is not None:
                self._log_into(self.resume.version)
                # Lightning warns that the run's checkpoint folder is not empty: it is its own.
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* not empty")
            # A budget's clock is in the checkpoint; resuming without a budget does not need it.
            warnings.filterwarnings("ignore", message=r".*following callbacks: \['Timer'\]")
            self.config_init[self.subcommand]["ckpt_path"] = str(self.resume.path)
            self._print_resume(self.resume, model)
        trainer.callbacks.append(last)

    def _resolve(self, requested: str | None, current: dict, run_root: Path | None):
        if requested is None:
            return None
        if requested == "last":
            if run_root is None:
                raise ResumeError("--ckpt_path last needs a logger (it looks in its run folders)")
            resume = find_resumable(run_root, current)
            for note in resume.notes:
                warnings.warn(f"--ckpt_path last: {note}", stacklevel=2)
            return resume
        if not Path(requested).is_file():
            raise FileNotFoundError(
                f"--ckpt_path {requested}: no such file (give a checkpoint's path, or 'last' for "
                "the newest run of this config)"
            )
        return resume_from_file(Path(requested), current, run_root)

    def _check_budget(self, resume: Resume) -> None:
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        budget = timer.time_remaining() if timer is not None else None  # not started: all of it
        spent = timer_elapsed(resume.checkpoint)
        if budget is not None and spent is not None and spent >= budget:
            raise ResumeError(
                f"--trainer.max_time is used up: {resume.path} has already trained for "
                f"{_hms(spent)} of the {_hms(budget)} budget (the budget counts the time spent "
                "before the resume). Pass a larger --trainer.max_time, or leave it out to train "
                "the remaining steps."
            )

    def _log_into(self, version: str) -> None:
        """Continue logging in the resumed run's folder: a new logger of the same class and
        arguments with that ``version`` (a public constructor argument)."""
        spec = self.config[self.subcommand].get("trainer", {}).get("logger")
        if isinstance(spec, Namespace) and spec.get("class_path"):
            module, _, name = spec["class_path"].rpartition(".")
            cls = getattr(importlib.import_module(module), name)
            kwargs = dict(spec.get("init_args") or {})
        else:
            cls, kwargs = TensorBoardLogger, dict(DEFAULT_LOGGER)
        self.trainer.logger = cls(**{**kwargs, "version": version})

    def _print_resume(self, resume: Resume, model: MetaTrainingSystem) -> None:
        if not self.trainer.is_global_zero:
            return
        ckpt = resume.checkpoint
        where = f"in {Path(resume.path).parent.parent}" if resume.version else "into a new run"
        print(
            f"Resuming from {resume.path} (epoch {ckpt.get('epoch')}, step "
            f"{ckpt.get('global_step')}) {where}"
        )
        for change in safe_overrides(ckpt, dict(model.hparams)):
            print(f"  applied: {change}")

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        last = next((c for c in trainer.callbacks if isinstance(c, RunCheckpoint)), None)
        best = trainer.checkpoint_callback
        if last is None or not last.last_path.is_file():
            return
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        stopped = (
            trainer.should_stop  # the time budget
            or done < trainer.num_training_batches  # a step limit mid-epoch
            or trainer.current_epoch < max_epochs  # a step limit at an epoch's end
        )
        folder = last.last_path.parent
        best_path = getattr(best, "best_model_path", "") if isinstance(best, BestCheckpoint) else ""
        print(
            f"Meta-training {'stopped early (time budget or step limit)' if stopped else 'done'}. "
            f"Checkpoints in {folder}/:"
        )
        if best_path:
            print(f"  {Path(best_path).name}: the best by meta-validation (evaluate this one)")
        print(f"  {last.last_path.name}: the final state (continue it with --ckpt_path last)")
        if stopped:
            print("Continue it: the same command plus --ckpt_path last (and a larger budget).")
        result = Path(best_path) if best_path else last.last_path
        print(f"Next: {evaluate_command(result, self.model, self.datamodule)}")


def evaluate_command(path: Path, model: MetaTrainingSystem, dm: MNISTDataModule) -> str:
    """The evaluate.py command for a checkpoint: the eval config of its optimizee, if any."""
    import yaml

    def family(spec: dict) -> tuple:
        if "class_path" in spec:  # another optimizee class (eval_cnn.yaml's ConvOptimizee)
            return (spec["class_path"], str(spec.get("init_args")))
        return (
            list(spec.get("sizes", [784, 20, 10])),
            spec.get("activation", "leaky_relu"),
            bool(spec.get("batchnorm", False)),
        )

    parts = ["python evaluate.py"]
    for config in sorted((REPO / "configs").glob("eval_*.yaml")):
        spec = (yaml.safe_load(config.read_text()) or {}).get("optimizee")
        if spec and family(spec) == family(model.hparams["optimizee"]):
            parts.append(f"--config {config.relative_to(REPO)}")
            break
    if dm.root not in ("data/", "data"):
        parts.append(f"--data.init_args.root {dm.root}")
    parts.append(f"--checkpoints '[{path}]'")
    return " ".join(parts)


def _reason(err: BaseException) -> str:
    """The real reason inside jsonargparse's "Does not validate against any of the Union
    subtypes" (which lists one error per subtype, the one that matters among them)."""
    text = str(err)
    if "Does not validate against any of the Union subtypes" not in text or "Errors:" not in text:
        return text
    reasons = []
    for line in text.split("Errors:", 1)[1].splitlines():
        if line.startswith("  - "):
            reasons.append(line[4:].strip())
        elif line.startswith("    ") and reasons:  # a reason's continuation lines
            reasons[-1] += " " + line.strip()
        elif line and not line.startswith(" "):
            break
    reasons = [r for r in reasons if not r.startswith("Expected a <class 'NoneType'>")]
    return "; ".join(reasons) if reasons else text


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def cli_main(args: list[str] | None = None, run: bool = True) -> MetaTrainingCLI:
    return MetaTrainingCLI(
        MetaTrainingSystem,
        MNISTDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        trainer_defaults={
            # Meta-validation trains optimizees, which needs autograd, not inference mode.
            "inference_mode": False,
            "logger": lazy_instance(TensorBoardLogger, **DEFAULT_LOGGER),
        },
        save_config_kwargs={"overwrite": True},
    )


# Errors that are the user's to fix: printed as one message, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    ResumeError,
    CheckpointError,
    CheckpointWriteError,
    MNISTCorrupt,
    MNISTUnavailable,
    MetaTrainingDiverged,
    FileNotFoundError,
)


def main(argv: list[str] | None = None) -> None:
    try:
        cli_main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1 if isinstance(err, (MetaTrainingDiverged, CheckpointWriteError)) else 2)


if __name__ == "__main__":
    main()
