"""Lightning callbacks that analyse a meta-test run step by step.

Attach any of them, alone or together, to ``Trainer(inference_mode=False, ...).test(
MetaTestSystem(...), datamodule=dm)``; they work for the learned optimizer and every baseline
through the optimizer protocol, and log through ``MetaTestSystem.log_scalars`` (TensorBoard and
the run's ``history``) under their own tag prefix:

=====================  ================  ==============  ==========================================
callback               prefix            every_n_steps   what
=====================  ================  ==============  ==========================================
``SymmetryBreaking``   ``symmetry/``     1               symmetry deviations of update, gradient
``TailIndex``          ``tail_index/``   10              alpha of minibatch gradient/update noise
``UpdateCovariance``   ``covariance/``   50              top eigenvalue, trace of update/grad cov.
``UpdateHistograms``   ``update_hist/``  50              histogram of |update|, its mean
=====================  ================  ==============  ==========================================

Step 1 is always analysed. ``emitted_tags`` lists the scalar tags a set of callbacks logs for an
optimizee, ``tags_by_category`` the same by category (every possible tag without an optimizee),
and ``custom_scalars_layout`` arranges them for TensorBoard's custom-scalars plugin.
"""

from __future__ import annotations

from collections.abc import Iterable

from callbacks.base import MetaTestCallback, should_run
from callbacks.covariance import UpdateCovariance
from callbacks.histograms import UpdateHistograms
from callbacks.symmetry import SymmetryBreaking
from callbacks.tail_index import TailIndex
from l2o.optimizees import MLPOptimizee

CALLBACKS: tuple[type[MetaTestCallback], ...] = (
    SymmetryBreaking,
    TailIndex,
    UpdateCovariance,
    UpdateHistograms,
)
# callback class name -> the prefix of every tag it writes (scalars and histograms)
TAG_PREFIXES: dict[str, str] = {cls.__name__: cls.tag_prefix for cls in CALLBACKS}
ALL_TAG_PREFIXES: tuple[str, ...] = tuple(TAG_PREFIXES.values())


def all_callbacks(**every_n_steps: int) -> list[MetaTestCallback]:
    """One of each callback with default settings; ``symmetry=5`` etc. override a frequency.

    Keys: ``symmetry``, ``tail_index``, ``covariance``, ``update_hist`` (tag prefixes).
    """
    unknown = set(every_n_steps) - {p.rstrip("/") for p in ALL_TAG_PREFIXES}
    if unknown:
        raise ValueError(f"unknown callback(s) {sorted(unknown)}")
    out = []
    for cls in CALLBACKS:
        n = every_n_steps.get(cls.tag_prefix.rstrip("/"))
        out.append(cls() if n is None else cls(every_n_steps=n))
    return out


def _instances(callbacks: Iterable[MetaTestCallback] | None) -> list[MetaTestCallback]:
    if callbacks is None:
        return [cls() for cls in CALLBACKS]
    return [cb for cb in callbacks if isinstance(cb, MetaTestCallback)]


def emitted_tags(
    optimizee: MLPOptimizee, callbacks: Iterable[MetaTestCallback] | None = None
) -> dict[str, list[str]]:
    """``{tag prefix: [scalar tags]}`` that ``callbacks`` (default: one of each) log.

    Symmetry tags depend on the optimizee (its constraints); histogram tags are not included
    (see ``MetaTestCallback.histogram_tags``). Other objects in ``callbacks`` are ignored.
    """
    out: dict[str, list[str]] = {}
    for cb in _instances(callbacks):
        out.setdefault(cb.tag_prefix, []).extend(cb.tags(optimizee))
    return out


def tags_by_category(
    optimizee: MLPOptimizee | None = None, callbacks: Iterable[MetaTestCallback] | None = None
) -> dict[str, list[str]]:
    """``{category: [scalar tags]}``, category = tag prefix without the slash.

    Without an optimizee, the symmetry tags of every constraint (``rescale``, ``scale``,
    ``translation``) are listed; a run logs those its optimizee has.
    """
    out: dict[str, list[str]] = {}
    for cb in _instances(callbacks):
        tags = cb.tags(optimizee) if optimizee is not None else cb.all_tags()
        out.setdefault(cb.tag_prefix.rstrip("/"), []).extend(tags)
    return out


def custom_scalars_layout(
    optimizee: MLPOptimizee, callbacks: Iterable[MetaTestCallback] | None = None
) -> dict[str, dict[str, list]]:
    """A layout for ``SummaryWriter.add_custom_scalars_layout``: one category per callback.

    Each chart is ``["Multiline", [tags]]`` with the update and gradient versions of a statistic
    on one chart (e.g. ``rescale/abs_sum``: ``symmetry/update/rescale/abs_sum`` and
    ``symmetry/grad/rescale/abs_sum``).
    """
    layout: dict[str, dict[str, list]] = {}
    for cb in _instances(callbacks):
        category = layout.setdefault(cb.tag_prefix.rstrip("/"), {})
        for title, tags in cb.layout(optimizee).items():
            category[title] = ["Multiline", tags]
    return layout


__all__ = [
    "ALL_TAG_PREFIXES",
    "CALLBACKS",
    "TAG_PREFIXES",
    "MetaTestCallback",
    "SymmetryBreaking",
    "TailIndex",
    "UpdateCovariance",
    "UpdateHistograms",
    "all_callbacks",
    "custom_scalars_layout",
    "emitted_tags",
    "tags_by_category",
    "should_run",
]
