"""The plug-in API of a meta-test analysis, as plain data and a protocol.

An analysis is a Lightning callback (``callbacks/``, base class ``callbacks.base.Analysis``)
that is the single owner of everything about it: what it computes from each step's
``l2o.meta_testing.Snapshot``, its scalar tags, its TensorBoard custom-scalars charts, its
columns in ``summary.md`` and its figure. ``l2o`` never imports ``callbacks``: the experiment
(``l2o.evaluation``) receives the callback objects from ``evaluate.py`` and asks them through
:class:`AnalysisProtocol`; their charts, columns and figures travel as the plain data below into
the experiment's manifest, from which ``python -m l2o.report`` re-draws without the callbacks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from l2o.optimizees import Optimizee


@dataclass(frozen=True)
class Panel:
    """One panel of a figure.

    ``kind="line"``: ``tag`` is a scalar tag; one line per optimizer (mean over seeds, band
    +- one std). ``kind="distribution"``: ``tag`` is an array tag (``log_distribution``); one
    histogram per optimizer at each of up to four logged steps, on common bins.
    """

    tag: str
    title: str  # readable, e.g. "Rescale symmetry of the update"
    ylabel: str  # with units, e.g. "sum_j |d_j| (parameter^2)"
    yscale: str = "linear"  # "linear", "log" or "symlog"
    ylim: tuple[float, float] | None = None
    sanity: bool = False  # a sanity check (e.g. the gradient's ~0 line): drawn after the rest
    kind: str = "line"
    xlabel: str = "optimizee step"
    smooth: bool = False  # the report's --smoothing applies (training loss)


@dataclass(frozen=True)
class FigureSpec:
    """``figures/<file>.png`` and ``.pdf``: ``panels`` in order, main before sanity ones."""

    file: str
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)
    ncols: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> FigureSpec:
        panels = tuple(
            Panel(**{**p, "ylim": tuple(p["ylim"]) if p.get("ylim") else None}) for p in d["panels"]
        )
        return FigureSpec(d["file"], d["title"], panels, d.get("ncols", 2))


@dataclass(frozen=True)
class Column:
    """A column of ``summary.md``'s analysis table: the run mean of ``tag``."""

    tag: str
    header: str


@runtime_checkable
class AnalysisProtocol(Protocol):
    """What the experiment and the report ask of an analysis callback."""

    name: str  # its tag prefix, e.g. "symmetry" (tags "symmetry/..."); unique per experiment
    title: str  # e.g. "Symmetry breaking"
    every_n_steps: int

    def check(self, data: Any) -> None:
        """Raise ``ValueError`` naming the setting to change if ``data`` (its ``train_x``,
        ``train_y``, ``batch_size``) cannot be analysed: called before any run or tuning."""

    def scalar_tags(self, optimizee: Optimizee) -> list[str]:
        """Every scalar tag it logs for this optimizee family."""

    def charts(self, optimizee: Optimizee) -> dict[str, list[str]]:
        """TensorBoard custom-scalars charts: ``{chart title: [tags]}``."""

    def summary_columns(self, optimizee: Optimizee) -> list[Column]:
        """Its headline columns in ``summary.md`` (``summary.json``/``.csv`` get every tag)."""

    def figure(self, optimizee: Optimizee) -> FigureSpec | None:
        """Its figure, or None."""
