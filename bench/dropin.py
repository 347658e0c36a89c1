"""Step time of the torch.optim drop-in (``l2o.LearnedOptimizer``) beside ``torch.optim.Adam``.

    python bench/dropin.py                 # 2-conv CNN on MNIST-shaped data, batch 128, 50 steps
    python bench/dropin.py --quick         # tiny sizes, a smoke test (seconds)
    python bench/dropin.py --device cuda

Model: conv(1->c1, 3x3) - ReLU - maxpool - conv(c1->c2, 3x3) - ReLU - maxpool - linear(->10) on
random 1x28x28 inputs (the timing does not depend on the pixels). Each optimizer (Adam, the
MLPLOpt and the LSTM learned optimizers with random weights: the cost does not depend on them)
trains its own copy of the same model for ``--warmup`` + ``--steps`` steps; the table gives the
median time of ``opt.step()`` alone and of a whole iteration (forward, backward, step), and the
step-time ratio to Adam. The last line is one JSON object with ``dropin_step_ratio_vs_adam``
(per learned optimizer, by its ``name``).

A learned optimizer runs a small network per coordinate (MLPLOpt: 21 -> 32 -> 32 -> 2, about
1,800 multiply-adds per coordinate; the study's LSTM: two 20-wide LSTM cells, ~5,000), where
Adam does ~10 flops: expect ratios of tens to hundreds on a CPU, less on a GPU. The drop-in calls
the protocol once per parameter tensor (state per parameter, for state_dict), so a model with
many small tensors also pays Python overhead per tensor.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from l2o import LearnedOptimizer  # noqa: E402
from l2o.lstm import LSTMOptimizer  # noqa: E402
from l2o.mlp_lopt import MLPLOpt  # noqa: E402


class CNN(nn.Module):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.head = nn.Linear(c2 * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(make_opt, args, device) -> dict:
    torch.manual_seed(0)
    model = CNN(args.channels[0], args.channels[1]).to(device)
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    step_times, iter_times = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sync(device)
        mid = time.perf_counter()
        opt.step()
        sync(device)
        end = time.perf_counter()
        if i >= args.warmup:
            step_times.append(end - mid)
            iter_times.append(end - start)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "step_ms": 1e3 * statistics.median(step_times),
        "iter_ms": 1e3 * statistics.median(iter_times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--channels", type=int, nargs=2, default=[16, 32])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = ap.parse_args()
    if args.quick:
        args.batch_size, args.channels, args.steps, args.warmup = 8, [2, 4], 3, 1
    device = torch.device(args.device)

    torch.manual_seed(0)
    learned = {"mlp_lopt": MLPLOpt(), "l2o": LSTMOptimizer()}
    rows = {"adam": run(lambda ps: torch.optim.Adam(ps, lr=1e-3), args, device)}
    for name, net in learned.items():
        rows[name] = run(lambda ps, n=net: LearnedOptimizer(ps, learned_optimizer=n), args, device)

    adam = rows["adam"]["step_ms"]
    print(
        f"CNN {args.channels}, {rows['adam']['params']:,} parameters, batch {args.batch_size}, "
        f"{args.steps} timed steps, {device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    print(f"{'optimizer':<12} {'step ms':>10} {'x Adam':>8} {'iteration ms':>13}")
    for name, r in rows.items():
        print(f"{name:<12} {r['step_ms']:>10.3f} {r['step_ms'] / adam:>8.1f} {r['iter_ms']:>13.3f}")
    print(
        json.dumps(
            {
                "dropin_step_ratio_vs_adam": {n: rows[n]["step_ms"] / adam for n in learned},
                "step_ms": {n: r["step_ms"] for n, r in rows.items()},
                "iter_ms": {n: r["iter_ms"] for n, r in rows.items()},
                "params": rows["adam"]["params"],
                "batch_size": args.batch_size,
                "channels": args.channels,
                "steps": args.steps,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
