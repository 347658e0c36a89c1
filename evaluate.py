"""Meta-test learned optimizers beside tuned baselines, with live training-dynamics analyses.

    python evaluate.py --config configs/eval_leaky_relu.yaml --data.root ../shared/data \\
        --checkpoints '[runs/leaky_relu/version_0/checkpoints/last.ckpt]'
    python evaluate.py --config configs/eval_leaky_relu.yaml --steps 200 --seeds 5
    tensorboard --logdir runs/eval            # live: one run per optimizer and seed

Writes ``<out>/<name>/``: TensorBoard runs ``<optimizer>/seed_<s>``, ``summary.csv``,
``summary.json``, ``summary.md`` and ``figures/*.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonargparse import CLI

from l2o.data import MNISTDataModule
from l2o.evaluation import LR_GRID, parse_entries, run_experiment
from l2o.optimizees import MLPOptimizee


def evaluate(
    optimizers: list[dict[str, Any]] | None = None,
    checkpoints: list[str] | None = None,
    optimizee: MLPOptimizee | None = None,
    data: MNISTDataModule | None = None,
    steps: int = 1000,
    seeds: int = 3,
    eval_every: int = 10,
    symmetry_every: int = 1,
    tail_index_every: int = 10,
    tail_index_batches: int | None = None,
    covariance_every: int = 50,
    covariance_samples: int = 1024,
    histogram_every: int = 50,
    tune_grid: list[float] | None = None,
    tune_steps: int = 50,
    tune_seeds: int = 3,
    report_steps: list[int] | None = None,
    criterion_steps: int = 100,
    out: str = "runs/eval",
    name: str = "experiment",
    accelerator: str = "auto",
) -> dict[str, Any]:
    """Meta-test optimizers on an optimizee family.

    Args:
        optimizers: e.g. ``[{name: adam, lr: tune}, {name: sgd, lr: 0.1, momentum: 0.9},
            {name: l2o, checkpoint: path, label: l2o_beta0}]``; ``lr: tune`` (the default)
            picks the grid rate with the lowest summed training loss over ``tune_steps``.
        checkpoints: learned-optimizer checkpoints, added as ``{name: l2o, checkpoint: ...}``.
        optimizee: the optimizee family (default: the first checkpoint's, else 784-20-10
            Leaky ReLU); a checkpoint meta-trained on another family still runs.
        data: the MNIST data module (``--data.root``, ``--data.batch_size``, ...).
        steps: optimizee steps per run.
        seeds: runs per optimizer (seeds 0..S-1: same init and minibatches for all).
        eval_every: held-out test loss/accuracy every this many steps.
        symmetry_every, tail_index_every, covariance_every, histogram_every: analysis
            frequencies in steps (0 turns an analysis off).
        tail_index_batches: cap on the minibatches of the tail-index analysis set.
        covariance_samples: N per-sample updates for the covariance analysis.
        tune_grid, tune_steps, tune_seeds: the learning-rate search.
        report_steps: steps at which the summary reports each analysis.
        criterion_steps: the summary's "mean train loss over the first K steps".
        out, name: the experiment folder is ``out/name``.
        accelerator: Lightning accelerator (auto, cpu, gpu).
    """
    entries = parse_entries(optimizers or [], checkpoints or [])
    if optimizee is None:
        trained = [e for e in entries if e.kind == "l2o"]
        from l2o.checkpoints import load_learned_optimizer

        optimizee = load_learned_optimizer(trained[0].checkpoint)[1] if trained else MLPOptimizee()
    for e in entries:
        if e.kind == "l2o" and e.trained_on != optimizee.name:
            print(
                f"note: {e.label} was meta-trained on {e.trained_on}; testing it on "
                f"{optimizee.name} (generalisation)"
            )
    analyses = {
        "symmetry_every": symmetry_every,
        "tail_index_every": tail_index_every,
        "tail_index_batches": tail_index_batches,
        "covariance_every": covariance_every,
        "covariance_samples": covariance_samples,
        "histogram_every": histogram_every,
    }
    return run_experiment(
        entries,
        optimizee,
        data or MNISTDataModule(),
        Path(out) / name,
        steps=steps,
        seeds=seeds,
        eval_every=eval_every,
        analyses=analyses,
        tune={"grid": tune_grid or list(LR_GRID), "steps": tune_steps, "seeds": tune_seeds},
        report_steps=report_steps or [s for s in (1, 10, 100, 1000) if s <= steps],
        criterion_steps=criterion_steps,
        accelerator=accelerator,
    )


def cli_main(args: list[str] | None = None) -> dict[str, Any]:
    return CLI(evaluate, args=args, as_positional=False)


if __name__ == "__main__":
    cli_main()
