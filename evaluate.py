"""Meta-test learned optimizers beside tuned baselines, with live training-dynamics analyses.

    python evaluate.py --config configs/eval_leaky_relu.yaml --data.init_args.root ../shared/data \\
        --checkpoints '[runs/leaky_relu/version_0/checkpoints/last.ckpt]'
    python evaluate.py --config configs/eval_leaky_relu.yaml --steps 200 --seeds 5
    python evaluate.py --config configs/eval_lion_sgd.yaml --print_config   # the whole config
    tensorboard --logdir runs/eval/leaky_relu     # live: one run per optimizer and seed + means
    python -m l2o.report runs/eval/leaky_relu     # re-make summary and figures

Writes ``<out>/<name>/``: TensorBoard runs ``<optimizer>/seed_<s>`` and ``<optimizer>/mean``,
``summary.{md,csv,json}``, ``figures/*.{png,pdf}``, ``config.yaml`` (this command's resolved
config) and ``manifest.json``. The command line follows LightningCLI's conventions: ``--config``,
``--print_config``, ``--trainer.*`` (e.g. ``--trainer.accelerator cpu``), ``--data.*``.
"""

from __future__ import annotations

import copy
import importlib
import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from callbacks.presets import preset as analysis_preset
from l2o.data import MNISTDataModule
from l2o.evaluation import LR_GRID, run_experiment
from l2o.optimizees import ConvOptimizee, MLPOptimizee
from l2o.specs import parse_optimizers

ANALYSES_FILE = Path(__file__).resolve().parent / "configs" / "analyses.yaml"
# The Trainer arguments that a meta-test run sets itself (one run per optimizer and seed).
MANAGED = {
    "logger",
    "callbacks",
    "inference_mode",
    "enable_checkpointing",
    "enable_model_summary",
    "max_epochs",
    "min_epochs",
    "max_steps",
    "min_steps",
    "max_time",
    "limit_train_batches",
    "limit_val_batches",
    "limit_test_batches",
    "limit_predict_batches",
    "val_check_interval",
    "check_val_every_n_epoch",
    "num_sanity_val_steps",
    "fast_dev_run",
    "overfit_batches",
    "default_root_dir",
    "strategy",
    "num_nodes",
    "sync_batchnorm",
    "use_distributed_sampler",
    "reload_dataloaders_every_n_epochs",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "plugins",
    "log_every_n_steps",
}
# Today's per-analysis flags, kept as shorthands: flag -> (analysis name, init argument).
SHORTHANDS = {
    "symmetry_every": ("symmetry", "every_n_steps"),
    "tail_index_every": ("tail_index", "every_n_steps"),
    "covariance_every": ("covariance", "every_n_steps"),
    "histogram_every": ("update_hist", "every_n_steps"),
    "covariance_samples": ("covariance", "num_samples"),
    "tail_index_batches": ("tail_index", "analysis_batches"),
}


def command_line(
    optimizers: list[dict[str, Any]] | None = None,
    checkpoints: list[str] | None = None,
    optimizee: MLPOptimizee | ConvOptimizee | None = None,
    data: MNISTDataModule | None = None,
    analyses: list[L.Callback] | None = None,
    preset: Literal["none", "economy", "full"] | None = None,
    every: dict[str, int] | None = None,
    steps: int = 1000,
    seeds: int = 3,
    eval_every: int = 10,
    tune_grid: list[float] | None = None,
    tune_steps: int = 50,
    tune_seeds: int = 3,
    report_steps: list[int] | None = None,
    criterion_steps: int | None = None,
    out: str = "runs/eval",
    name: str = "experiment",
    overwrite: bool = False,
    smoothing: float = 0.0,
    vectorise_seeds: bool = True,
    symmetry_every: int | None = None,
    tail_index_every: int | None = None,
    covariance_every: int | None = None,
    histogram_every: int | None = None,
    covariance_samples: int | None = None,
    tail_index_batches: int | None = None,
) -> dict[str, Any]:
    """Meta-test optimizers on an optimizee family.

    (The arguments of evaluate.py: jsonargparse reads this signature and docstring, and
    ``cli_main`` runs the experiment.)

    Args:
        optimizers: e.g. ``[{name: adam, lr: tune}, {name: sgd, lr: 0.1, momentum: 0.9},
            {name: l2o, checkpoint: path, label: l2o_beta0}]``; ``lr: tune`` (the default)
            picks the grid rate with the lowest summed training loss over ``tune_steps``. Any
            torch.optim optimizer: ``{class_path: torch.optim.RAdam, init_args: {...}, lr:
            tune}`` (l2o/specs.py; configs/eval_zoo.yaml has Muon, schedule-free, Prodigy).
        checkpoints: learned-optimizer checkpoints, added as ``{name: l2o, checkpoint: ...}``
            (several: labelled by their learned optimizer, e.g. ``l2o`` and ``mlp_lopt``).
        optimizee: the optimizee family (default: the first checkpoint's, else 784-20-10
            Leaky ReLU); a checkpoint meta-trained on another family still runs.
        data: the MNIST data module (``--data.init_args.root``, ``--data.init_args.batch_size``).
        analyses: analysis callbacks (``class_path``/``init_args``); default: the list in
            configs/analyses.yaml. ``[]`` runs none.
        preset: replaces ``analyses`` by a preset of ``callbacks.presets`` (``none``,
            ``economy``: the cheap ones, ``full``: all; each every 16 steps); ``--every`` and
            the shorthands still apply on top.
        every: ``{analysis name: every_n_steps}`` overrides, 0 leaves one out, e.g.
            ``{covariance: 0, tail_index: 5}``.
        steps: optimizee steps per run.
        seeds: runs per optimizer (seeds 0..S-1: same init and minibatches for all).
        eval_every: held-out test loss/accuracy every this many steps.
        tune_grid, tune_steps, tune_seeds: the learning-rate search (default grid: 1e-4 to 3).
        report_steps: steps at which the summary reports each analysis (default: 1, 10, 100,
            1000 up to ``steps``).
        criterion_steps: the summary's "mean train loss over the first K steps" (default:
            min(100, steps)).
        out, name: the experiment folder is ``out/name``.
        overwrite: replace an existing ``out/name`` (else a name in use is refused).
        smoothing: EMA weight in [0, 1) of the training loss in the figures.
        vectorise_seeds: run the seeds of each optimizer as one population run
            (l2o.population; the default): the same numbers to 1e-6 and the same run folders,
            less overhead, curves streamed to TensorBoard at every evaluation; an optimizer
            whose state cannot be split per seed (e.g. Muon) runs its seeds one at a time,
            with a note. ``false``: one ``Trainer.test`` per seed, as before.
        symmetry_every, tail_index_every, covariance_every, histogram_every: shorthands for
            ``every``; 0 leaves the analysis out.
        covariance_samples, tail_index_batches: shorthands for UpdateCovariance's
            ``num_samples`` and TailIndex's ``analysis_batches``.
    """
    raise NotImplementedError("declares the command line only: call cli_main(args)")


def default_analyses() -> list[dict[str, Any]]:
    return yaml.safe_load(ANALYSES_FILE.read_text())


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="evaluate.py",
        description=__doc__.split("\n")[0],
        print_config="--print_config",
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML config file")
    parser.add_function_arguments(command_line, as_positional=False)
    parser.add_class_arguments(L.Trainer, "trainer", skip=MANAGED, instantiate=False)
    parser.set_defaults({"analyses": default_analyses(), "trainer.devices": 1})
    return parser


def _analysis_class(class_path: str) -> type:
    module, _, attr = class_path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def select_analyses(cfg: Namespace) -> list[Namespace]:
    """The analyses' configs with ``--every`` and the shorthand flags applied: a frequency of 0
    leaves an analysis out, any other sets its ``every_n_steps``."""
    every = dict(cfg.every or {})
    extra: dict[str, dict[str, Any]] = {}
    for flag, (name, arg) in SHORTHANDS.items():
        if cfg.get(flag) is not None:
            if arg == "every_n_steps":
                every.setdefault(name, cfg[flag])  # --every, the general form, wins
            else:
                extra.setdefault(name, {})[arg] = cfg[flag]
    names = [getattr(_analysis_class(a.class_path), "name", None) for a in cfg.analyses]
    # Leaving out an analysis that is not there is fine; changing it is a mistake.
    unknown = sorted(n for n, v in every.items() if n not in names and v != 0)
    unknown += sorted(n for n in extra if n not in names)
    if unknown:
        raise ValueError(f"--every: no analysis named {unknown} in --analyses (names: {names})")
    kept = []
    for a, name in zip(cfg.analyses, names):
        if name is None:
            raise ValueError(
                f"--analyses: {a.class_path} is not an analysis (subclass callbacks.base.Analysis)"
            )
        a = copy.deepcopy(a)
        if name in every:
            if every[name] < 0:
                raise ValueError(
                    f"--every {name}: must be >= 0 (0 leaves it out), got {every[name]}"
                )
            if every[name] == 0:
                continue
            a.init_args.every_n_steps = every[name]
        for arg, value in extra.get(name, {}).items():
            a.init_args[arg] = value
        kept.append(a)
    return kept


def cli_main(args: list[str] | None = None) -> dict[str, Any]:
    """Parse, validate, run; returns the summary."""
    parser = build_parser()
    cfg = parser.parse_args(args)
    if cfg.preset is not None:
        cfg = parser.parse_object({"analyses": analysis_preset(cfg.preset)}, cfg_base=cfg)
    cfg.analyses = select_analyses(cfg)
    init = parser.instantiate_classes(cfg)
    grid = list(LR_GRID) if cfg.tune_grid is None else list(cfg.tune_grid)
    specs = parse_optimizers(cfg.optimizers or [], cfg.checkpoints or [], grid)
    optimizee = init.optimizee
    if optimizee is None:  # the first learned optimizer's family, else the study's
        learned = [s for s in specs if getattr(s, "trained_on", None) is not None]
        optimizee = learned[0].trained_on if learned else MLPOptimizee()
    devices = cfg.trainer.devices
    if devices not in (1, "1") and not (isinstance(devices, list) and len(devices) == 1):
        raise ValueError(
            f"--trainer.devices {devices!r}: meta-test runs one optimizee at a time on one "
            "device; give 1 (or one device, e.g. [0]), and run several evaluate.py for more"
        )
    steps = cfg.steps
    # One line per run instead of Lightning's banner (GPU available, tips) for each.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    return run_experiment(
        specs,
        optimizee,
        init.data or MNISTDataModule(),
        Path(cfg.out),
        cfg.name,
        analyses=init.analyses,
        steps=steps,
        seeds=cfg.seeds,
        eval_every=cfg.eval_every,
        tune_grid=grid,
        tune_steps=cfg.tune_steps,
        tune_seeds=cfg.tune_seeds,
        report_steps=cfg.report_steps,
        criterion_steps=min(100, steps) if cfg.criterion_steps is None else cfg.criterion_steps,
        trainer_kwargs=cfg.trainer.as_dict(),
        overwrite=cfg.overwrite,
        config_text=parser.dump(cfg, skip_none=False),
        smoothing=cfg.smoothing,
        vectorise_seeds=cfg.vectorise_seeds,
    )


if __name__ == "__main__":
    cli_main()
