"""Loading learned optimizers from meta-training checkpoints, safely and with clear errors."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from l2o.lstm import LSTMOptimizer
from l2o.optimizees import MLPOptimizee, build_optimizee


class CheckpointError(ValueError):
    """The file is not a readable l2o-dynamics learned-optimizer checkpoint."""


def load_learned_optimizer(path: str | Path) -> tuple[LSTMOptimizer, MLPOptimizee]:
    """(the LSTM optimizer in eval mode, the optimizee family it was meta-trained on).

    Reads with ``weights_only=True``: a checkpoint cannot run code when it is loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError) as err:
        raise CheckpointError(
            f"could not read {path}: not a PyTorch checkpoint, corrupt, or it holds objects "
            f"that weights_only loading refuses ({type(err).__name__}: {str(err)[:200]})"
        ) from err
    if not isinstance(ckpt, dict) or "l2o" not in ckpt or "state_dict" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not an l2o-dynamics learned-optimizer checkpoint (no 'l2o' entry; "
            f"found {keys}); use a checkpoint written by `python train.py fit`"
        )
    meta = ckpt["l2o"]
    net = LSTMOptimizer(**meta["optimizer_config"])
    # "optimizer." in checkpoints written before the learned optimizer got its own name
    prefix = next(
        (
            p
            for p in ("learned_optimizer.", "optimizer.")
            if any(k.startswith(p) for k in ckpt["state_dict"])
        ),
        "learned_optimizer.",
    )
    weights = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the LSTM weights do not fit its config: {err}") from err
    return net.eval(), build_optimizee(meta["optimizee"])


def find_checkpoint(run_root: str | Path, which: str = "best") -> Path:
    """The newest run's ``best-*.ckpt`` (lowest meta-validation loss) or ``last.ckpt``
    below a logger folder such as ``runs/leaky_relu``."""
    runs = sorted(Path(run_root).glob("version_*/checkpoints"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no version_*/checkpoints below {run_root}: meta-train first")
    pattern = "last.ckpt" if which == "last" else "best-*.ckpt"
    found = sorted(runs[-1].glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {pattern} in {runs[-1]}")
    return found[-1]


if __name__ == "__main__":  # python -m l2o.checkpoints runs/leaky_relu [best|last]
    import sys

    print(find_checkpoint(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "best"))
