"""Meta-testing experiments: learned optimizers beside tuned baselines, many seeds, one folder.

``evaluate.py`` is a thin CLI over :func:`run_experiment`. For every optimizer and seed one
``Trainer.test`` run of :class:`~l2o.meta_testing.MetaTestSystem` trains a fresh optimizee; the
analysis callbacks stream to TensorBoard (one run per optimizer and seed, so curves overlay);
a summary table and figures are written at the end.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from l2o.checkpoints import load_learned_optimizer
from l2o.data import MNISTDataModule
from l2o.inner import inner_step
from l2o.meta_testing import MetaTestSystem, MinibatchStream, init_optimizee
from l2o.optimizees import MLPOptimizee
from l2o.optimizers import BASELINES, Optimizer, make_baseline
from l2o.seeds import TUNE_RUN

LR_GRID = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 3.0)


@dataclass
class Entry:
    """One optimizer of an experiment: a learned-optimizer checkpoint or a baseline."""

    label: str
    kind: str  # "l2o" or a baseline name
    lr: float | None = None  # None: tune on the grid
    checkpoint: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    trained_on: str | None = None

    def build(self) -> Optimizer:
        if self.kind == "l2o":
            net, _ = load_learned_optimizer(self.checkpoint)
            return net
        return make_baseline(self.kind, self.lr, **self.options)


def parse_entries(specs: list[dict[str, Any]], checkpoints: list[str] = ()) -> list[Entry]:
    """Optimizer specs from the config, e.g. ``{name: adam, lr: tune}``,
    ``{name: l2o, checkpoint: path}``, ``{name: lion_sgd, lr: 0.1, lion_weight: 0.25}``."""
    specs = list(specs) + [{"name": "l2o", "checkpoint": c} for c in checkpoints]
    entries, labels = [], set()
    for spec in specs:
        spec = dict(spec)
        kind = spec.pop("name", None)
        if kind != "l2o" and kind not in BASELINES:
            raise ValueError(
                f"unknown optimizer {kind!r} in {spec}; use 'l2o' (with a "
                f"checkpoint) or one of {sorted(BASELINES)}"
            )
        label = str(spec.pop("label", kind))
        lr = spec.pop("lr", "tune")
        checkpoint = spec.pop("checkpoint", None)
        entry = Entry(label, kind, None if lr == "tune" else float(lr), checkpoint, spec)
        if kind == "l2o":
            if not checkpoint:
                raise ValueError(
                    "an 'l2o' optimizer needs a checkpoint: {name: l2o, checkpoint: "
                    "path/to/last.ckpt}"
                )
            _, trained_on = load_learned_optimizer(checkpoint)  # fail now, not after hours
            entry.trained_on = trained_on.name
            if spec:
                raise ValueError(f"unknown options for a learned optimizer: {sorted(spec)}")
        else:
            make_baseline(kind, entry.lr or 1.0, **dict(spec))  # validates the options
        if label in labels:
            raise ValueError(f"two optimizers are labelled {label!r}; give each a 'label'")
        labels.add(label)
        entries.append(entry)
    if not entries:
        raise ValueError("no optimizers to evaluate: give --optimizers and/or --checkpoints")
    return entries


def plain_run(
    opt: Optimizer,
    optimizee: MLPOptimizee,
    dm: MNISTDataModule,
    seed: int,
    steps: int,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Training losses of one run without Lightning (for tuning): same data as a test run."""
    params = init_optimizee(optimizee, seed, device)
    state = opt.init_state(params)
    losses = []
    stream = MinibatchStream(dm.train_x, dm.train_y, steps, dm.batch_size, seed)
    for x, y in stream:
        step = inner_step(optimizee, opt, params, state, x.to(device), y.to(device))
        if not torch.isfinite(step.loss).all():
            return losses + [math.inf] * (steps - len(losses))
        params, state = step.params, step.state
        losses.append(step.loss.item())
    return losses


def tune_lr(
    entry: Entry,
    optimizee: MLPOptimizee,
    dm: MNISTDataModule,
    grid=LR_GRID,
    steps: int = 50,
    seeds: int = 3,
) -> tuple[float, dict[float, float]]:
    """Best grid learning rate by the summed training loss of the first ``steps`` steps,
    averaged over ``seeds`` tuning runs (seeds disjoint from the reported runs)."""
    scores = {}
    for lr in grid:
        opt = make_baseline(entry.kind, lr, **entry.options)
        runs = [sum(plain_run(opt, optimizee, dm, TUNE_RUN + s, steps)) for s in range(seeds)]
        scores[lr] = float(np.mean(runs)) if all(map(math.isfinite, runs)) else math.inf
    best = min(scores, key=scores.get)
    if not math.isfinite(scores[best]):
        raise RuntimeError(f"{entry.label}: every learning rate of the grid diverged")
    return best, scores


def make_callbacks(cfg: dict[str, Any]) -> list[L.Callback]:
    from callbacks import SymmetryBreaking, TailIndex, UpdateCovariance, UpdateHistograms

    out: list[L.Callback] = []
    if cfg.get("symmetry_every", 0):
        out.append(SymmetryBreaking(every_n_steps=cfg["symmetry_every"]))
    if cfg.get("tail_index_every", 0):
        out.append(
            TailIndex(
                every_n_steps=cfg["tail_index_every"],
                analysis_batches=cfg.get("tail_index_batches"),
            )
        )
    if cfg.get("covariance_every", 0):
        out.append(
            UpdateCovariance(
                every_n_steps=cfg["covariance_every"],
                num_samples=cfg.get("covariance_samples", 1024),
            )
        )
    if cfg.get("histogram_every", 0):
        out.append(UpdateHistograms(every_n_steps=cfg["histogram_every"]))
    return out


def run_experiment(
    entries: list[Entry],
    optimizee: MLPOptimizee,
    dm: MNISTDataModule,
    out: Path,
    steps: int = 1000,
    seeds: int = 3,
    eval_every: int = 10,
    analyses: dict[str, Any] | None = None,
    tune: dict[str, Any] | None = None,
    report_steps: list[int] = (10, 100, 1000),
    criterion_steps: int = 100,
    accelerator: str = "auto",
) -> dict[str, Any]:
    """Tune, run, and summarise. Returns the summary (also written to ``out``)."""
    from l2o.report import make_figures, save_samples, summarize_runs, write_summary

    if steps < 1 or seeds < 1 or eval_every < 1:
        raise ValueError("steps, seeds and eval_every must be >= 1")
    dm.prepare_data()
    dm.setup("test")
    optimizee.check_input(dm.num_features)
    out.mkdir(parents=True, exist_ok=True)
    tune = {"grid": list(LR_GRID), "steps": 50, "seeds": 3, **(tune or {})}
    tuning: dict[str, dict[float, float]] = {}
    for entry in entries:
        if entry.kind != "l2o" and entry.lr is None:
            t0 = time.time()
            entry.lr, tuning[entry.label] = tune_lr(
                entry, optimizee, dm, tune["grid"], tune["steps"], tune["seeds"]
            )
            print(
                f"tuned {entry.label}: lr = {entry.lr:g} ({time.time() - t0:.0f} s; grid "
                f"criterion: summed train loss of the first {tune['steps']} steps)"
            )
    _write_layout(out, optimizee, make_callbacks(analyses or {}))
    histories: dict[str, list[dict]] = {}
    samples: dict[str, list[dict]] = {}
    jobs = [(e, s) for e in entries for s in range(seeds)]
    for i, (entry, seed) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {entry.label} seed {seed}: {steps} steps on {optimizee.name}")
        run_dir = out / entry.label / f"seed_{seed}"
        if run_dir.exists():  # a re-run replaces its own curves instead of doubling them
            shutil.rmtree(run_dir)
        callbacks = make_callbacks(analyses or {})
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            inference_mode=False,
            # flush_secs: curves appear in a running TensorBoard within seconds
            logger=TensorBoardLogger(
                out,
                name=entry.label,
                version=f"seed_{seed}",
                default_hp_metric=False,
                flush_secs=5,
            ),
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=True,
        )
        module = MetaTestSystem(
            entry.build(),
            optimizee,
            seed=seed,
            name=entry.label,
            eval_every=eval_every,
            steps=steps,
        )
        dm.configure_meta_test(seed, steps)
        trainer.test(module, datamodule=dm, verbose=False)
        trainer.logger.experiment.flush()
        histories.setdefault(entry.label, []).append(module.history)
        for cb in callbacks:
            if hasattr(cb, "samples"):
                samples.setdefault(entry.label, []).append(dict(cb.samples))
    summary = summarize_runs(entries, histories, report_steps, criterion_steps, tuning)
    summary["experiment"] = {
        "optimizee": optimizee.name,
        "steps": steps,
        "seeds": seeds,
        "data": dm.source,
        "tuning": tune,
        "criterion_steps": criterion_steps,
    }
    write_summary(summary, out)
    save_samples(samples, out)
    make_figures(histories, samples, out)
    return summary


def _write_layout(out: Path, optimizee: MLPOptimizee, callbacks: list[L.Callback]) -> None:
    """A TensorBoard custom-scalars layout: each analysis on one chart, where the curves of all
    optimizers and seeds overlay (one run each below ``out``)."""
    from torch.utils.tensorboard import SummaryWriter

    from callbacks import custom_scalars_layout

    layout = {
        "meta_test": {
            t: ["Multiline", [f"meta_test/{t}"]]
            for t in ("train_loss", "train_acc", "test_loss", "test_acc")
        }
    }
    layout.update(custom_scalars_layout(optimizee, callbacks))
    layout_dir = out / "_layout"
    if layout_dir.exists():
        shutil.rmtree(layout_dir)
    with SummaryWriter(layout_dir) as writer:
        writer.add_custom_scalars(layout)
