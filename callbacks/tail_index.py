"""Tail index of minibatch gradient and update noise, logged under ``tail_index/``."""

from __future__ import annotations

import math
import warnings

import lightning as L
import torch
from torch import Tensor

from callbacks.base import Analysis, flatten_params
from l2o.analysis import Column, FigureSpec, Panel
from l2o.covariance import minibatch_grads
from l2o.meta_testing import Snapshot
from l2o.optimizees import Optimizee
from l2o.optimizers import replay
from l2o.tail_index import STATISTICS, layer_alphas, noise_alphas, tail_alphas

__all__ = ["CENTERS", "TailIndex", "minibatch_grads", "tensor_names"]


CENTERS = ("full_batch_update", "mean_update")
LAYER_STATISTICS = ("pooled", "robust", "standardized")  # per parameter tensor
KINDS = ("grad", "update")


def tensor_names(optimizee: Optimizee) -> list[str]:
    """``layer<k>.<role>`` per parameter tensor, e.g. ``layer0.weight``, ``layer1.bias``: k
    counts the layers (each starts with a weight), role is the family's (``weight``, ``bias``,
    ``gamma``, ``beta``)."""
    roles = getattr(optimizee, "roles", None)
    if roles is None:  # a family without roles: its tensors by position
        return [f"tensor{i}" for i in range(len(optimizee.shapes))]
    names, layer = [], -1
    for role, _, _ in roles:
        layer += role == "weight"
        names.append(f"layer{max(layer, 0)}.{role}")
    return names


class TailIndex(Analysis):
    """Tail index alpha of minibatch noise in the gradient and in the optimizer's update.

    At an analysed step, the analysis set (the datamodule's training split ``train_x, train_y``,
    in order, cut to ``n`` whole minibatches of the run's batch size ``B = snapshot.x.shape[1]``,
    at most ``analysis_batches`` of them) is split into its ``n`` disjoint minibatches, and

    * gradient noise: each minibatch's gradient minus the full-batch gradient;
    * update noise: the optimizer's update for each minibatch gradient (replayed through the
      protocol with the step's state and params, which advances nothing:
      ``l2o.optimizers.replay``, the optimizer's own fast ``replay`` where it has one) minus
      its update for the full-batch gradient (``noise_center="full_batch_update"``, the
      default) or minus the mean of the minibatch updates (``"mean_update"``, the seed code's
      centring). The two differ for nonlinear optimizers; only ``pooled`` and ``robust`` can
      tell: ``standardized`` works on differences of rows, where any per-coordinate centre
      cancels.

    The full-batch gradient is the **mean of the minibatch gradients**. The minibatches partition
    the analysis set with equal sizes, so without BatchNorm this is exactly the gradient of the
    mean loss over the set; with BatchNorm it is the gradient the optimizer sees on average
    (batch statistics of size ``B``), not that of one batch of ``n * B`` examples, whose
    statistics would differ. The noise rows therefore sum to zero in both cases.

    ``l2o.tail_index.noise_alphas`` of each ``(n, D)`` noise matrix is logged as::

        tail_index/<grad|update>/pooled          all coordinates (as in the seed code)
        tail_index/<grad|update>/robust          nonzero coordinates only
        tail_index/<grad|update>/standardized    each coordinate against itself (mixed scales)
        tail_index/<grad|update>/zero_fraction   fraction of exactly-zero noise coordinates
        tail_index/<grad|update>/atom_fraction   coordinates standardized drops (atoms)
        tail_index/<grad|update>/<pooled|robust|standardized>/<tensor>   per parameter tensor

    with ``<tensor>`` from ``tensor_names`` (``layer0.weight``, ...; ``l2o.tail_index.
    layer_alphas``; a tensor's estimate that cannot be made is NaN).

    An estimate that cannot be made (fewer than 4 nonzero noise coordinates, e.g. a sign-based
    update that is identical on every minibatch) is logged as NaN with a warning.

    Args:
        every_n_steps: analyse every this many optimizee steps (and always step 1).
        schedule: ``linear`` or ``log`` (``callbacks.base.schedule_steps``).
        analysis_batches: cap on the number of minibatches (``None``: all whole minibatches of
            the training split, e.g. 468 of 128 for MNIST's 60,000 images). Must be >= 2.
        chunk_size: minibatches per vectorized gradient call and per optimizer call of the
            replay (``None``: all gradients in one call, and ``l2o.covariance``'s memory-bounded
            default chunk for the replay).
        noise_center: ``full_batch_update`` or ``mean_update`` (see above); the summary
            columns name it.
        per_layer: also log the per-tensor alphas (about doubles the estimation cost).
    """

    name = "tail_index"
    title = "Tail index of minibatch noise"
    needs_training_split = True

    def __init__(
        self,
        every_n_steps: int = 10,
        analysis_batches: int | None = None,
        chunk_size: int | None = None,
        noise_center: str = "full_batch_update",
        per_layer: bool = True,
        schedule: str = "linear",
    ) -> None:
        super().__init__(every_n_steps, schedule)
        if noise_center not in CENTERS:
            raise ValueError(f"noise_center must be one of {CENTERS}, got {noise_center!r}")
        if analysis_batches is not None and analysis_batches < 2:
            raise ValueError(f"analysis_batches must be >= 2 (or None), got {analysis_batches}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (or None), got {chunk_size}")
        self.analysis_batches, self.chunk_size = analysis_batches, chunk_size
        self.noise_center, self.per_layer = noise_center, bool(per_layer)
        self._cache: tuple[tuple, tuple[Tensor, Tensor]] | None = None

    def layer_tags(self, optimizee: Optimizee) -> list[str]:
        if not self.per_layer:
            return []
        return [
            f"tail_index/{k}/{s}/{name}"
            for k in KINDS
            for s in LAYER_STATISTICS
            for name in tensor_names(optimizee)
        ]

    def scalar_tags(self, optimizee: Optimizee) -> list[str]:
        whole = [f"tail_index/{k}/{s}" for k in KINDS for s in STATISTICS]
        return whole + self.layer_tags(optimizee)

    def check(self, data) -> None:
        super().check(data)
        n = len(data.train_x) // data.batch_size
        if n < 2:
            raise ValueError(
                f"TailIndex: the training split has {len(data.train_x)} examples, fewer than 2 "
                f"minibatches of the run's batch size {data.batch_size}; minibatch noise needs "
                "at least 2 (a smaller --data.init_args.batch_size, or leave TailIndex out)"
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._cache = None

    def charts(self, optimizee: Optimizee) -> dict[str, list[str]]:
        # Both on one chart: the gradient's alpha is the reference the update's is read against.
        charts = {s: [f"tail_index/update/{s}", f"tail_index/grad/{s}"] for s in STATISTICS}
        if self.per_layer:
            for s in LAYER_STATISTICS:
                for name in tensor_names(optimizee):
                    charts[f"{s}/{name}"] = [f"tail_index/{k}/{s}/{name}" for k in KINDS[::-1]]
        return charts

    def summary_columns(self, optimizee: Optimizee) -> list[Column]:
        # The update's header names its centre: pooled and robust depend on it.
        def header(k: str, s: str) -> str:
            return f"α {k}/{s}" + (f" ({self.noise_center})" if k == "update" else "")

        return [
            Column(f"tail_index/{k}/{s}", header(k, s))
            for s in ("pooled", "robust", "standardized")
            for k in KINDS
        ]

    def figure(self, optimizee: Optimizee) -> FigureSpec:
        # alpha-stable tails have 0 < alpha <= 2; the estimator leaves that range (even < 0) on
        # noise that is not alpha-stable-like, e.g. Lion's few discrete update values.
        what = {"update": "update noise", "grad": "gradient noise"}
        how = {
            "standardized": "each coordinate against itself",
            "robust": "nonzero coordinates",
            "pooled": "all coordinates",
        }
        ylabel = "α (2: Gaussian; smaller: heavier tails)"
        panels = [
            Panel(
                f"tail_index/{k}/{s}",
                f"Tail index of the {what[k]} ({how[s]})",
                ylabel,
                ylim=(0.0, 2.5),
            )
            for k in ("update", "grad")
            for s in ("standardized", "robust", "pooled")
        ]
        # One panel per parameter tensor (and noise), the standardized estimate: the only one
        # right when a tensor's coordinates have different scales.
        if self.per_layer:
            panels += [
                Panel(
                    f"tail_index/{k}/standardized/{name}",
                    f"Tail index of the {what[k]}, {name} (standardized)",
                    ylabel,
                    ylim=(0.0, 2.5),
                )
                for name in tensor_names(optimizee)
                for k in ("update", "grad")
            ]
        title = f"{self.title} (update noise centred on the {self.noise_center.replace('_', ' ')})"
        return FigureSpec("tail_index", title, tuple(panels))

    def analysis_set(
        self, trainer: L.Trainer, batch_size: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """The training split as ``(n, B, D)``, ``(n, B)`` minibatches (cached per B, device)."""
        key = (batch_size, str(device))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        x, y = trainer.datamodule.train_x, trainer.datamodule.train_y
        n = len(x) // batch_size
        if self.analysis_batches is not None:
            n = min(n, self.analysis_batches)
        if n < 2:
            raise ValueError(
                f"TailIndex: the training split has {len(x)} examples, fewer than 2 minibatches "
                f"of the run's batch size {batch_size}; minibatch noise needs at least 2"
            )
        xb = x[: n * batch_size].reshape(n, batch_size, -1).to(device)
        yb = y[: n * batch_size].reshape(n, batch_size).to(device)
        self._cache = (key, (xb, yb))
        return xb, yb

    def compute(self, snapshot: Snapshot, trainer: L.Trainer) -> dict[str, float]:
        params, state = snapshot.params, snapshot.state
        xb, yb = self.analysis_set(trainer, snapshot.x.shape[1], params[0].device)
        grads = minibatch_grads(snapshot.optimizee, params, xb, yb, self.chunk_size)
        full = tuple(g.mean(dim=0) for g in grads)
        opt = snapshot.optimizer
        # The full-batch gradient rides along as the last row of one replay (the optimizer's
        # own fast replay where it has one, else chunked opt.update), so that every update takes
        # the same arithmetic path: a coordinate whose gradient is the same on every minibatch
        # (e.g. a blank pixel's weights) then has exactly zero update noise, as it should. A
        # separate opt.update call can differ from the fast path by float rounding (~1e-9), and
        # those fake nonzeros would drag the robust estimate down.
        both = tuple(torch.cat([g, f.unsqueeze(0)]) for g, f in zip(grads, full))
        updates = flatten_params(replay(opt, both, state, params, self.chunk_size), 1)
        center = updates[-1] if self.noise_center == "full_batch_update" else updates[:-1].mean(0)
        noise = {
            "grad": flatten_params(grads, 1) - flatten_params(full),
            "update": updates[:-1] - center,
        }
        names = tensor_names(snapshot.optimizee)
        sizes = [p[0].numel() for p in params]
        out: dict[str, float] = {}
        for kind, rows in noise.items():
            layers = None
            try:
                if self.per_layer:  # one pass for both: they share logs and per-coordinate terms
                    alphas, layers = tail_alphas(rows, sizes)
                else:
                    alphas = noise_alphas(rows)
            except ValueError as err:
                warnings.warn(
                    f"TailIndex: no {kind} tail index at step {snapshot.step} ({err}); logging NaN",
                    stacklevel=2,
                )
                alphas = {stat: math.nan for stat in STATISTICS}
                alphas["zero_fraction"] = float((rows == 0).double().mean())
            for stat in STATISTICS:
                out[f"tail_index/{kind}/{stat}"] = float(alphas[stat])
            if self.per_layer:
                if layers is None:  # the whole's estimate failed: each tensor on its own
                    try:
                        layers = layer_alphas(rows, sizes)
                    except ValueError:  # non-finite noise (warned above): no estimate anywhere
                        layers = [dict.fromkeys(LAYER_STATISTICS, math.nan) for _ in names]
                for name, layer in zip(names, layers, strict=True):
                    for stat in LAYER_STATISTICS:
                        out[f"tail_index/{kind}/{stat}/{name}"] = float(layer[stat])
        return out
