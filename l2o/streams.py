"""What one meta-test run reads: its seeded minibatch stream, and the splits its analyses use.

``evaluate.py`` loads MNIST once (``l2o.data.MNISTDataModule``) and gives every run a
:class:`MetaTestData` view of the same tensors: the run's seed fixes its minibatch order (the
same for every optimizer), and the analysis callbacks read ``train_x``/``train_y`` (their
analysis sets) and ``test_x``/``test_y`` from it as ``trainer.datamodule``.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from l2o.data import MinibatchSampler, seeded_generator


class MinibatchStream(IterableDataset):
    """``steps`` minibatches (1, B, D), (1, B), seeded by the run's seed alone."""

    def __init__(self, x: Tensor, y: Tensor, steps: int, batch_size: int, seed: int):
        super().__init__()
        self.x, self.y, self.steps, self.batch_size, self.seed = x, y, steps, batch_size, seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        sampler = MinibatchSampler(len(self.x), 1, self.batch_size, seeded_generator(self.seed))
        for _ in range(self.steps):
            idx = sampler.next(1)[0]
            yield self.x[idx], self.y[idx]


class MetaTestData(L.LightningDataModule):
    """One meta-test run's data: ``steps`` minibatches of run ``seed`` from the training split.

    Args:
        train_x, train_y: the training split (the optimizee's minibatches, the analyses' sets).
        test_x, test_y: the held-out split (test loss and accuracy).
        batch_size: optimizee minibatch size.
        steps: minibatches (optimizee steps) of the run.
        seed: the run's seed: its minibatch order.
    """

    def __init__(
        self,
        train_x: Tensor,
        train_y: Tensor,
        test_x: Tensor,
        test_y: Tensor,
        batch_size: int,
        steps: int,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size > len(train_x):
            raise ValueError(
                f"batch_size {batch_size} exceeds the {len(train_x)} training examples"
            )
        self.train_x, self.train_y, self.test_x, self.test_y = train_x, train_y, test_x, test_y
        self.batch_size, self.steps, self.seed = batch_size, steps, seed

    @classmethod
    def of(cls, dm, steps: int, seed: int = 0) -> MetaTestData:
        """The view of a set-up ``MNISTDataModule`` (or anything with the four splits and a
        ``batch_size``) for run ``seed``."""
        return cls(dm.train_x, dm.train_y, dm.test_x, dm.test_y, dm.batch_size, steps, seed)

    def test_dataloader(self) -> DataLoader:
        stream = MinibatchStream(self.train_x, self.train_y, self.steps, self.batch_size, self.seed)
        return DataLoader(stream, batch_size=None)
