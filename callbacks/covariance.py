"""Covariance of per-sample updates and gradients, logged under ``covariance/``."""

from __future__ import annotations

import math
import warnings

import lightning as L
import torch
from torch import Tensor

from callbacks.base import Analysis, per_sample_grads_cached
from l2o.analysis import Column, FigureSpec, Panel
from l2o.covariance import MODES, batchnorm_chunk, covariance_analysis
from l2o.meta_testing import Snapshot
from l2o.optimizees import Optimizee

STATISTICS = ("top_eig", "trace")


class UpdateCovariance(Analysis):
    """Top eigenvalue and trace of the covariance of per-sample updates (and of gradients).

    At an analysed step, ``N`` samples of the training split give per-sample gradients ``g_i``
    and, replayed through the optimizer protocol with the step's state (not advanced), per-sample
    updates ``u_i``. With ``g`` the full-batch gradient of the ``N`` samples and ``U(g)`` its
    update under the same state (``l2o.covariance.covariance_analysis``)::

        K_update = 1/N sum_i (u_i - U(g)) (u_i - U(g))^T      covariance/update/<top_eig|trace>
        K_grad   = 1/N sum_i (g_i - g) (g_i - g)^T            covariance/grad/<top_eig|trace>

    With BatchNorm each sample's gradient is taken inside the batch of the ``N`` samples (batch
    statistics couple them; see ``l2o.covariance.per_sample_grads``). For plain SGD without
    momentum ``K_update = lr^2 K_grad``.

    ``covariance_mode="minibatch"`` is the study's definition: the ``N`` samples are cut, in
    order, into ``N // B`` disjoint minibatches of the run's batch size ``B``, and ``g_i``,
    ``u_i`` are each minibatch's mean-loss gradient and its update (``g``: their mean). Use
    ``num_samples=None`` there (MNIST's 5,000-image subset gives 39 minibatches of 128; the
    default 1,024 samples only 8). The summary column names the mode.

    Args:
        every_n_steps: analyse every this many optimizee steps (and always step 1).
        schedule: ``linear`` or ``log`` (``callbacks.base.schedule_steps``).
        num_samples: N, at most the training split's size (``None``: the whole split); more
            is an error before any run. The same samples are used at every analysed step.
        seed: ``None`` takes the first N examples of the split; an integer a seeded random
            subset of N.
        chunk_size: samples per vectorized call (gradients' Jacobian with BatchNorm, optimizer
            replay); ``None`` lets ``l2o.covariance`` pick a memory-bounded default.
        method: spectrum method of ``l2o.covariance.update_covariance`` (``auto``, ``gram``,
            ``lanczos``).
        covariance_mode: ``per_sample`` (one gradient per sample) or ``minibatch`` (one per
            minibatch of the run's batch size, as in the study).
    """

    name = "covariance"
    title = "Covariance of per-sample updates"
    needs_training_split = True

    def __init__(
        self,
        every_n_steps: int = 50,
        num_samples: int | None = 1024,
        seed: int | None = None,
        chunk_size: int | None = None,
        method: str = "auto",
        covariance_mode: str = "per_sample",
        schedule: str = "linear",
    ) -> None:
        super().__init__(every_n_steps, schedule)
        if covariance_mode not in MODES:
            raise ValueError(f"covariance_mode must be one of {MODES}, got {covariance_mode!r}")
        if num_samples is not None and num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (or None), got {num_samples}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (or None), got {chunk_size}")
        if method not in ("auto", "gram", "lanczos"):
            raise ValueError(f"method must be 'auto', 'gram' or 'lanczos', got {method!r}")
        self.num_samples, self.seed = num_samples, seed
        self.chunk_size, self.method = chunk_size, method
        self.covariance_mode = covariance_mode
        self._cache: tuple[str, tuple[Tensor, Tensor]] | None = None
        self._workspace: dict = {}  # covariance_analysis's (N, D) buffer, kept between steps

    def scalar_tags(self, optimizee: Optimizee) -> list[str]:
        return [f"covariance/{k}/{s}" for k in ("update", "grad") for s in STATISTICS]

    def check(self, data) -> None:
        super().check(data)
        n = len(data.train_x)
        if n < 2:
            raise ValueError("UpdateCovariance needs at least 2 training examples")
        if self.num_samples is not None and self.num_samples > n:
            raise ValueError(
                f"UpdateCovariance: num_samples (--covariance_samples) is {self.num_samples} but "
                f"the training split has only {n} examples; use at most {n}"
            )
        used = n if self.num_samples is None else self.num_samples
        if self.covariance_mode == "minibatch" and used // data.batch_size < 2:
            raise ValueError(
                f"UpdateCovariance(covariance_mode='minibatch'): {used} samples make fewer than "
                f"2 minibatches of the run's batch size {data.batch_size}; raise num_samples "
                "(None: the whole training split) or use covariance_mode='per_sample'"
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._cache = None
        self._workspace = {}

    def charts(self, optimizee: Optimizee) -> dict[str, list[str]]:
        # Update and gradient covariances have different units: separate charts.
        return {
            f"{s} ({what})": [f"covariance/{k}/{s}"]
            for k, what in (("update", "update"), ("grad", "gradient"))
            for s in STATISTICS
        }

    def summary_columns(self, optimizee: Optimizee) -> list[Column]:
        # The mode in the header: per-sample and minibatch values differ by ~B for linear
        # optimizers and are not comparable across modes.
        return [Column("covariance/update/top_eig", f"update/top_eig ({self.covariance_mode})")]

    def figure(self, optimizee: Optimizee) -> FigureSpec:
        unit_of = "per-sample" if self.covariance_mode == "per_sample" else "minibatch"
        what = {"update": f"{unit_of} updates", "grad": f"{unit_of} gradients"}
        stat = {"top_eig": "Top eigenvalue", "trace": "Trace"}
        unit = {"update": "(parameter^2)", "grad": "(gradient^2)"}
        return FigureSpec(
            "covariance",
            self.title,
            tuple(
                Panel(
                    f"covariance/{k}/{s}",
                    f"{stat[s]} of the covariance of {what[k]}",
                    f"{'lambda_max' if s == 'top_eig' else 'tr'}(K_{k}) {unit[k]}",
                    yscale="log",
                )
                for k in ("update", "grad")
                for s in STATISTICS
            ),
        )

    def analysis_set(self, trainer: L.Trainer, device: torch.device) -> tuple[Tensor, Tensor]:
        """The N samples ``(N, D)``, ``(N,)`` (cached per device)."""
        if self._cache is not None and self._cache[0] == str(device):
            return self._cache[1]
        x, y = trainer.datamodule.train_x, trainer.datamodule.train_y
        n = len(x) if self.num_samples is None else self.num_samples  # check(): <= len(x)
        if self.seed is None:
            idx = torch.arange(n)
        else:
            idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))[:n]
        pair = (x[idx].to(device), y[idx].to(device))
        self._cache = (str(device), pair)
        return pair

    def compute(self, snapshot: Snapshot, trainer: L.Trainer) -> dict[str, float]:
        x, y = self.analysis_set(trainer, snapshot.params[0].device)
        per_sample = None
        if self.covariance_mode == "per_sample":
            # Through the step's cache: another analysis of these samples reuses them.
            chunk = self.chunk_size
            if chunk is None and snapshot.optimizee.batchnorm:
                chunk = batchnorm_chunk(len(x))
            key = ("train", len(x), self.seed)

            def grads() -> tuple[Tensor, ...]:
                return per_sample_grads_cached(snapshot, key, x, y, chunk)

            per_sample = grads  # lazily: the exact shortcuts (SGD on an MLP) need none
        res = covariance_analysis(
            snapshot.optimizee,
            snapshot.optimizer,
            snapshot.state,
            snapshot.params,
            x,
            y,
            chunk_size=self.chunk_size,
            method=self.method,
            mode=self.covariance_mode,
            batch_size=snapshot.x.shape[1],
            per_sample=per_sample,
            workspace=self._workspace,
        )
        out = {
            f"covariance/{k}/{s}": float(res[f"{k}_{s}"])
            for k in ("update", "grad")
            for s in STATISTICS
        }
        bad = [tag for tag, value in out.items() if not math.isfinite(value)]
        if bad:  # an optimizee overflowing on the analysis set: NaN logged, the run goes on
            warnings.warn(
                f"UpdateCovariance: non-finite per-sample gradients or updates at step "
                f"{snapshot.step} ({', '.join(bad)}); logging NaN",
                stacklevel=2,
            )
        return out
