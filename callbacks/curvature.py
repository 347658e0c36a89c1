"""Curvature of the training loss (the Hessian's top eigenvalue and trace), under
``curvature/``."""

from __future__ import annotations

import lightning as L
import torch

from callbacks.base import Analysis
from l2o.analysis import Column, FigureSpec, Panel
from l2o.curvature import HessianOperator, hessian_trace, top_eigenvalue
from l2o.meta_testing import Snapshot
from l2o.optimizees import Optimizee

LAMBDA_MAX = "curvature/lambda_max"
EDGE = "curvature/edge_of_stability"
TRACE = "curvature/trace"
TRACE_STDERR = "curvature/trace_stderr"


class Curvature(Analysis):
    """Top eigenvalue and trace of the Hessian of the step's minibatch loss, at the params
    the optimizer saw (``l2o.curvature``: HVPs by double backward, Lanczos, Hutchinson)::

        curvature/lambda_max          largest eigenvalue of H (Lanczos, to ``tol`` relative)
        curvature/edge_of_stability   2 / lr, where the optimizer has a learning rate
        curvature/trace               tr(H), Hutchinson with ``num_probes`` Rademacher probes
        curvature/trace_stderr        the standard error of that mean

    ``2 / lr`` is where gradient descent at rate lr becomes unstable on a quadratic (Cohen et
    al. 2021): it shares a chart with lambda_max. It is the exact threshold for plain SGD only
    (with heavy-ball momentum beta it is (2 + 2 beta) / lr, and preconditioned optimizers like
    Adam see the preconditioned Hessian); optimizers without ``lr`` (the learned ones) do not
    log it. BatchNorm optimizees work: the HVP differentiates through the batch statistics.
    Only reads the snapshot; the probes are seeded per step, so a run is reproducible.

    Args:
        every_n_steps: analyse every this many optimizee steps (and always step 1).
        max_iter, tol: Lanczos's limits (``l2o.curvature.top_eigenvalue``).
        num_probes: Hutchinson probes for the trace; 0 skips the trace.
        seed: seed of the Lanczos start vector and the probes (offset by the step).
        schedule: ``linear`` or ``log`` (``callbacks.base.schedule_steps``).
    """

    name = "curvature"
    title = "Curvature of the training loss"

    def __init__(
        self,
        every_n_steps: int = 50,
        max_iter: int = 50,
        tol: float = 1e-4,
        num_probes: int = 16,
        seed: int = 0,
        schedule: str = "linear",
    ) -> None:
        super().__init__(every_n_steps, schedule)
        if num_probes != 0 and num_probes < 2:
            raise ValueError(f"num_probes must be 0 (no trace) or >= 2, got {num_probes}")
        self.max_iter, self.tol = int(max_iter), float(tol)
        self.num_probes, self.seed = int(num_probes), int(seed)

    def scalar_tags(self, optimizee: Optimizee) -> list[str]:
        tags = [LAMBDA_MAX, EDGE]
        return tags + ([TRACE, TRACE_STDERR] if self.num_probes else [])

    def compute(self, snapshot: Snapshot, trainer: L.Trainer) -> dict[str, float]:
        x, y, optimizee = snapshot.x, snapshot.y, snapshot.optimizee
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + snapshot.step)
        with torch.enable_grad():
            op = HessianOperator(lambda ps: optimizee.loss(ps, x, y), snapshot.params)
            top = top_eigenvalue(op, self.max_iter, self.tol, generator=gen)
            # mean over population members (P = 1 at meta-test)
            out = {LAMBDA_MAX: float(top.value.double().mean())}
            if self.num_probes:
                tr = hessian_trace(op, self.num_probes, generator=gen)
                out[TRACE] = float(tr.value.double().mean())
                out[TRACE_STDERR] = float(tr.stderr.double().mean())
        lr = getattr(snapshot.optimizer, "lr", None)
        if lr is not None and float(lr) > 0:
            out[EDGE] = 2.0 / float(lr)
        return out

    def charts(self, optimizee: Optimizee) -> dict[str, list[str]]:
        charts = {"lambda_max of the Hessian and 2/lr (edge of stability)": [LAMBDA_MAX, EDGE]}
        if self.num_probes:
            charts["trace of the Hessian"] = [TRACE]
            charts["trace: standard error (Hutchinson)"] = [TRACE_STDERR]
        return charts

    def summary_columns(self, optimizee: Optimizee) -> list[Column]:
        cols = [Column(LAMBDA_MAX, "Hessian lambda_max")]
        return cols + ([Column(TRACE, "Hessian trace")] if self.num_probes else [])

    def figure(self, optimizee: Optimizee) -> FigureSpec:
        panels = [
            Panel(
                LAMBDA_MAX,
                "Top eigenvalue of the Hessian",
                "lambda_max(H) (loss / param^2)",
                yscale="log",
            ),
            Panel(
                EDGE, "Edge of stability 2 / lr (plain GD)", "2 / lr (loss / param^2)", yscale="log"
            ),
        ]
        if self.num_probes:
            panels.append(
                Panel(
                    TRACE,
                    "Trace of the Hessian (Hutchinson)",
                    "tr(H) (loss / param^2)",
                    yscale="symlog",
                )
            )
        return FigureSpec("curvature", self.title, tuple(panels), ncols=len(panels))
