"""Meta-training throughput: optimizee steps per second and peak memory.

    python bench/meta_train.py                      # CPU: populations 1 and 8
    python bench/meta_train.py --populations 1 64   # e.g. on a GPU

Times the real training step (``MetaTrainingSystem.unroll`` + meta-backward + Adam step) on the
study's setting: the 784-20-10 Leaky ReLU optimizee, unroll 20, batch 128, random MNIST-shaped
data (throughput does not depend on the pixels). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from l2o.lstm import LSTMOptimizer, detach_state  # noqa: E402
from l2o.meta_training import MetaTrainingSystem  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(
    population: int,
    compile: bool,
    device: str,
    unroll: int = 20,
    truncations: int = 10,
    batch: int = 128,
) -> dict:
    system = MetaTrainingSystem(
        LSTMOptimizer(torch_compile=compile), unroll=unroll, population=population
    ).to(device)
    meta_opt = torch.optim.Adam(system.learned_optimizer.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(unroll, population, batch, 784, generator=gen).to(device)
    y = torch.randint(0, 10, (unroll, population, batch), generator=gen).to(device)
    params = system.optimizee.init(population, gen, device=device)
    state = system.learned_optimizer.init_state(params)

    def truncation():
        nonlocal params, state
        losses, _, params, state = system.unroll(params, state, x, y)
        meta_opt.zero_grad()
        system.meta_loss(losses).backward()
        meta_opt.step()
        params, state = tuple(p.detach() for p in params), detach_state(state)

    for _ in range(3):  # warm-up (and compilation)
        truncation()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(truncations):
        truncation()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {
        "population": population,
        "compile": compile,
        "steps_per_s": truncations * unroll * population / dt,
        "truncations_per_s": truncations / dt,
    }
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--populations", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--truncations", type=int, default=10)
    ap.add_argument("--no-eager", action="store_true", help="skip the eager (uncompiled) rows")
    args = ap.parse_args()
    rows = []
    for p in args.populations:
        for compile in [True] if args.no_eager else [False, True]:
            rows.append(bench(p, compile, args.device, truncations=args.truncations))
            r = rows[-1]
            print(
                f"population {p:3d}  compile={str(compile):5s}  "
                f"{r['steps_per_s']:8.1f} optimizee steps/s",
                flush=True,
            )
    print()
    print("| population | torch.compile | optimizee steps/s | meta-steps/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['population']} | {r['compile']} | {r['steps_per_s']:.1f} | "
            f"{r['truncations_per_s']:.2f} |"
        )
    best = {
        p: max(r["steps_per_s"] for r in rows if r["population"] == p) for p in args.populations
    }
    result = {f"steps_per_s_p{p}": round(v, 2) for p, v in best.items()}
    result.update(
        {
            f"steps_per_s_p{r['population']}_{'compiled' if r['compile'] else 'eager'}": round(
                r["steps_per_s"], 2
            )
            for r in rows
        }
    )
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if args.device == "cuda":
        result["peak_gpu_mb"] = round(max(r.get("peak_gpu_mb", 0) for r in rows), 1)
        result["gpu"] = torch.cuda.get_device_name()
    result.update(
        device=args.device,
        torch=torch.__version__,
        cpus=os.cpu_count(),
        threads=torch.get_num_threads(),
        machine=platform.machine(),
    )
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
