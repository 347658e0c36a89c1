"""A meta-trained learned optimizer on your own model, as a torch.optim optimizer.

Trains a small CNN (two conv layers) on MNIST with ``l2o.LearnedOptimizer`` loaded from a
meta-training checkpoint, beside ``torch.optim.Adam``, from the same initialisation on the same
minibatches, and prints a table (training loss early and late, held-out loss and accuracy, time).

    python train.py fit --config configs/mlp_lopt.yaml --data.root ../shared/data
    python examples/cnn_dropin.py --data-root ../shared/data \\
        --checkpoint runs/mlp_lopt/version_0/checkpoints/last.ckpt \\
        --checkpoint runs/leaky_relu/version_0/checkpoints/last.ckpt     # the LSTM too

Defaults: 300 steps of batch 128 (about a minute on a 2-core CPU). Both learned optimizers were
meta-trained on a 784-20-10 MLP for 200 steps: a CNN, and steps past 200, are outside what they
have seen (the project's "generalisation beyond MLPs" question), so expect them to trail Adam.
The learned optimizer's ``lr`` scales its update (1.0 = as meta-trained).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from l2o import LearnedOptimizer  # noqa: E402
from l2o.data import load_mnist  # noqa: E402


class CNN(nn.Module):
    """conv(1->c1, 3x3) - ReLU - maxpool - conv(c1->c2, 3x3) - ReLU - maxpool - linear(->10)."""

    def __init__(self, c1: int = 8, c2: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.head = nn.Linear(c2 * 7 * 7, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def load_images(root: str, download: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train_x (N, 1, 28, 28) in [0, 1], train_y, test_x, test_y) from ``<root>/MNIST/raw``
    (the offline fallback of l2o.data.load_mnist when no MNIST is there)."""
    train_x, train_y, test_x, test_y, source = load_mnist(root, download)
    print(f"data: {source}")
    return train_x.view(-1, 1, 28, 28), train_y, test_x.view(-1, 1, 28, 28), test_y


def minibatches(n: int, steps: int, batch_size: int, seed: int) -> list[Tensor]:
    """The index of each step's minibatch: the same for every optimizer (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n, (batch_size,), generator=gen) for _ in range(steps)]


def make_model(seed: int, channels: tuple[int, int]) -> CNN:
    torch.manual_seed(seed)
    return CNN(*channels)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 2000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over all of x."""
    loss = correct = 0.0
    for i in range(0, len(x), chunk):
        logits = model(x[i : i + chunk])
        loss += F.cross_entropy(logits, y[i : i + chunk], reduction="sum").item()
        correct += (logits.argmax(1) == y[i : i + chunk]).sum().item()
    return loss / len(x), correct / len(x)


def train(model, opt, data, batches) -> dict:
    """The plain torch loop; returns the per-step training losses, held-out loss/acc, time."""
    train_x, train_y, test_x, test_y = data
    losses = []
    start = time.perf_counter()
    for idx in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    test_loss, test_acc = evaluate(model, test_x, test_y)
    return {"losses": losses, "test_loss": test_loss, "test_acc": test_acc, "seconds": seconds}


# The table's names: the LSTM's protocol name is the study's generic "l2o".
LABELS = {"LSTMOptimizer": "lstm", "MLPLOpt": "mlp_lopt"}


def label_of(opt: LearnedOptimizer, taken: set[str]) -> str:
    cls = type(opt.learned_optimizer).__name__
    base = LABELS.get(cls, getattr(opt.learned_optimizer, "name", cls))
    label, i = base, 2
    while label in taken:
        label, i = f"{base}_{i}", i + 1
    return label


def table(results: dict[str, dict], window: int) -> str:
    head = f"first {window}"
    lines = [
        f"{'optimizer':<12} {head:>10} {'last ' + str(window):>10} {'test loss':>10} "
        f"{'test acc':>9} {'time s':>7}",
    ]
    for label, r in results.items():
        first = sum(r["losses"][:window]) / len(r["losses"][:window])
        last = sum(r["losses"][-window:]) / len(r["losses"][-window:])
        lines.append(
            f"{label:<12} {first:>10.4f} {last:>10.4f} {r['test_loss']:>10.4f} "
            f"{r['test_acc']:>9.4f} {r['seconds']:>7.1f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="a meta-training checkpoint (train.py fit's last.ckpt or best-*.ckpt); repeat it "
        "to compare several learned optimizers",
    )
    ap.add_argument("--data-root", default="data/", help="folder holding MNIST/raw")
    ap.add_argument("--download", action="store_true", help="download MNIST if it is not there")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1.0, help="the learned update's scale")
    ap.add_argument("--adam-lr", type=float, default=1e-3)
    ap.add_argument("--channels", type=int, nargs=2, default=[8, 16], metavar=("C1", "C2"))
    ap.add_argument("--seed", type=int, default=0, help="the CNN's init and the minibatches")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        ap.error("--steps and --batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Runs the comparison; returns {label: results} (the models under "model")."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_images(args.data_root, args.download)
    batches = minibatches(len(data[0]), args.steps, args.batch_size, args.seed)
    channels = tuple(args.channels)
    runs = {}
    model = make_model(args.seed, channels)
    runs["adam"] = (model, torch.optim.Adam(model.parameters(), lr=args.adam_lr))
    for path in args.checkpoint:
        model = make_model(args.seed, channels)  # the same initialisation for every optimizer
        opt = LearnedOptimizer(model.parameters(), checkpoint=path, lr=args.lr)
        runs[label_of(opt, set(runs))] = (model, opt)
    results = {}
    for label, (model, opt) in runs.items():
        results[label] = {**train(model, opt, data, batches), "model": model}
        print(f"{label}: done in {results[label]['seconds']:.1f} s", flush=True)
    n = sum(p.numel() for p in runs["adam"][0].parameters())
    print(
        f"\nCNN {channels[0]}-{channels[1]} ({n:,} parameters), {args.steps} steps of batch "
        f"{args.batch_size}, seed {args.seed}; training loss = mean over the steps named"
    )
    print(table(results, window=min(20, args.steps)))
    return results


if __name__ == "__main__":
    main()
