"""Meta-train the LSTM optimizer.

    python train.py fit --config configs/default.yaml                     # a few minutes on a CPU
    python train.py fit --config configs/leaky_relu.yaml --data.root ../shared/data
    python train.py fit --config configs/leaky_relu.yaml --trainer.devices 4 --trainer.strategy ddp
    python train.py fit --config configs/default.yaml --ckpt_path last     # resume a run

Checkpoints land in the run's ``checkpoints/`` folder: ``last.ckpt`` and the best by
meta-validation (``val/summed_loss``). Watch it with ``tensorboard --logdir runs``.
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from l2o.data import MNISTDataModule
from l2o.meta_training import MetaTrainingSystem


class MetaTrainingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data stream must match the model's unroll: one definition, linked.
        for key in ("unroll", "population", "optimizee_steps"):
            parser.link_arguments(f"model.{key}", f"data.{key}")
        # Always keep last.ckpt and the best meta-validated optimizer (--checkpoint.* to change).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/summed_loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}-{step}",
            }
        )

    def before_fit(self) -> None:
        # `--ckpt_path last` resumes the newest run of this logger name in its own folder
        # (Lightning alone would look in a fresh version_N folder and find nothing).
        if self.config_init[self.subcommand].get("ckpt_path") != "last":
            return
        logger = self.trainer.logger
        runs = sorted(
            Path(logger.save_dir, logger.name).glob("version_*/checkpoints/last.ckpt"),
            key=lambda p: p.stat().st_mtime,
        )
        if not runs:
            raise FileNotFoundError(
                f"--ckpt_path last: no last.ckpt under {Path(logger.save_dir, logger.name)}/"
                "version_*/checkpoints; pass the checkpoint's path instead"
            )
        self.config_init[self.subcommand]["ckpt_path"] = str(runs[-1])
        logger._version = runs[-1].parent.parent.name  # log into the resumed run's folder
        print(f"Resuming from {runs[-1]}")


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
            "logger": lazy_instance(
                TensorBoardLogger, save_dir="runs", name="meta_train", flush_secs=10
            ),
        },
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    cli_main()
