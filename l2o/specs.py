"""Optimizer specs of an experiment, parsed in one place into objects of one interface.

A spec is a mapping from ``--optimizers`` (or a checkpoint path from ``--checkpoints``)::

    {name: adam, lr: tune}                                # a baseline, learning rate tuned
    {name: sgd, lr: 0.1, momentum: 0.9, label: sgd_m}     # a baseline with options
    {name: l2o, checkpoint: runs/.../last.ckpt, label: x} # a learned optimizer (name optional)

Every spec becomes an :class:`OptimizerSpec`; nothing downstream asks which kind it is: it asks
``spec.tunable`` and calls ``spec.build(lr)``. A learned optimizer is just an optimizer built
from a checkpoint, loaded once here through ``l2o.checkpoints.load_learned_optimizer`` (the one
loader, whatever learned-optimizer class the checkpoint holds) and shared by every run (the
protocol's functions are pure: a run's state lives in the run).

Everything is validated when parsed, before any run or tuning: unknown names and options, a
learning rate that is not > 0, a checkpoint that cannot be read, duplicate labels.

Adding a kind of spec (e.g. ``{class_path: torch.optim.RAdam, init_args: {...}}`` through a
torch.optim adapter): one more branch in :func:`parse_spec` returning an ``OptimizerSpec``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from l2o.checkpoints import load_learned_optimizer
from l2o.optimizees import Optimizee
from l2o.optimizers import BASELINES, Optimizer, make_baseline

LEARNED_NAMES = ("l2o", "learned")


@dataclass
class OptimizerSpec:
    """One optimizer of an experiment.

    ``lr`` is the fixed learning rate, or None: tuned on the grid (``tunable``) or none at all
    (a learned optimizer). ``info`` is what the summary and the runs' hparams record about it.
    """

    label: str
    kind: str  # "sgd", "adam", ..., or "learned"
    lr: float | None = None
    tunable: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def build(self, lr: float | None = None) -> Optimizer:
        raise NotImplementedError

    @property
    def lr_text(self) -> str:
        """The learning-rate cell of the summary when there is no number."""
        return "tune"


@dataclass
class BaselineSpec(OptimizerSpec):
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, lr: float | None = None) -> Optimizer:
        return make_baseline(self.kind, self.lr if lr is None else lr, **self.options)


@dataclass
class LearnedSpec(OptimizerSpec):
    optimizer: Any = None  # the loaded learned optimizer (an nn.Module of the protocol)
    trained_on: Optimizee | None = None

    def build(self, lr: float | None = None) -> Optimizer:
        return self.optimizer

    @property
    def lr_text(self) -> str:
        return "learned"


def _learning_rate(label: str, value: Any) -> float | None:
    """``tune`` -> None; else a float > 0, or a clear error."""
    if value == "tune":
        return None
    try:
        lr = float(value)
    except (TypeError, ValueError):
        lr = math.nan
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"optimizer {label!r}: lr must be a number > 0 or 'tune', got {value!r}")
    return lr


def parse_spec(spec: dict[str, Any], grid: list[float], loaded: dict[str, Any]) -> OptimizerSpec:
    """One spec, validated. ``grid``: the tuning grid (a tuned baseline is checked with each
    rate); ``loaded``: checkpoints already loaded in this experiment, by path."""
    if not isinstance(spec, dict):
        raise ValueError(
            f"an optimizer spec is a mapping like {{name: adam, lr: tune}}, got {spec!r}"
        )
    spec = dict(spec)
    if "class_path" in spec:
        raise ValueError(
            f"{spec['class_path']}: class_path optimizer specs are not supported yet; use "
            f"{{name: <{'|'.join(sorted(BASELINES))}>, ...}} or {{name: l2o, checkpoint: PATH}}"
        )
    name = spec.pop("name", "l2o" if "checkpoint" in spec else None)
    label = str(spec.pop("label", name))
    if not label or label.startswith(".") or any(c in label for c in '/\\:*?"<>|'):
        raise ValueError(
            f"optimizer label {label!r} must be a plain folder name (it names the runs' folders)"
        )
    if name in LEARNED_NAMES:
        path = spec.pop("checkpoint", None)
        if not path:
            raise ValueError(
                f"optimizer {label!r}: a learned optimizer needs a checkpoint: "
                "{name: l2o, checkpoint: path/to/last.ckpt}"
            )
        if spec.get("lr", "learned") not in ("learned", "tune"):
            raise ValueError(
                f"optimizer {label!r}: a learned optimizer has no learning rate (got lr: "
                f"{spec['lr']!r}); leave lr out"
            )
        spec.pop("lr", None)
        if spec:
            raise ValueError(
                f"optimizer {label!r}: unknown options for a learned optimizer: {sorted(spec)} "
                "(it takes name, checkpoint, label)"
            )
        path = str(path)
        if path not in loaded:  # each checkpoint is read once per experiment
            loaded[path] = load_learned_optimizer(path)
        net, trained_on = loaded[path]
        info = {"checkpoint": path, "trained_on": trained_on.name}
        return LearnedSpec(label, "learned", None, False, info, net, trained_on)
    if name not in BASELINES:
        raise ValueError(
            f"unknown optimizer {name!r} in {spec}; use one of {sorted(BASELINES)}, or "
            "{name: l2o, checkpoint: PATH} for a learned optimizer"
        )
    lr = _learning_rate(label, spec.pop("lr", "tune"))
    if "checkpoint" in spec:
        raise ValueError(f"optimizer {label!r}: a {name} baseline takes no checkpoint")
    out = BaselineSpec(label, name, lr, lr is None, {"options": dict(spec)}, dict(spec))
    if lr is None:
        if not grid:
            raise ValueError("--tune_grid is empty: give at least one learning rate to try")
        bad = [r for r in grid if not (math.isfinite(r) and r > 0)]
        if bad:
            raise ValueError(f"--tune_grid rates must be > 0, got {bad}")
    for rate in [lr] if lr is not None else grid:
        try:  # validates every option (and, with the grid, every rate it will be built with)
            out.build(rate)
        except (TypeError, ValueError) as err:
            raise ValueError(f"optimizer {label!r}: {err}") from err
    return out


def parse_optimizers(
    specs: list[dict[str, Any]], checkpoints: list[str] = (), grid: list[float] = (1.0,)
) -> list[OptimizerSpec]:
    """All specs of an experiment (``checkpoints`` become ``{name: l2o, checkpoint: ...}``),
    validated before anything runs."""
    specs = list(specs) + [{"name": "l2o", "checkpoint": c} for c in checkpoints]
    if not specs:
        raise ValueError("no optimizers to evaluate: give --optimizers and/or --checkpoints")
    loaded: dict[str, Any] = {}
    out: list[OptimizerSpec] = []
    for spec in specs:
        parsed = parse_spec(spec, list(grid), loaded)
        if parsed.label in {o.label for o in out}:
            raise ValueError(f"two optimizers are labelled {parsed.label!r}; give each a 'label'")
        out.append(parsed)
    return out
