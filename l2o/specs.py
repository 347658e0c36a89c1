"""Optimizer specs of an experiment, parsed in one place into objects of one interface.

A spec is a mapping from ``--optimizers`` (or a checkpoint path from ``--checkpoints``)::

    {name: adam, lr: tune}                                # a baseline, learning rate tuned
    {name: sgd, lr: 0.1, momentum: 0.9, label: sgd_m}     # a baseline with options
    {name: l2o, checkpoint: runs/.../last.ckpt, label: x} # a learned optimizer (name optional)
    {class_path: torch.optim.RAdam, init_args: {betas: [0.9, 0.99]}, lr: tune}  # any torch.optim

Every spec becomes an :class:`OptimizerSpec`; nothing downstream asks which kind it is: it asks
``spec.tunable`` and calls ``spec.build(lr)``. A learned optimizer is just an optimizer built
from a checkpoint, loaded once here through ``l2o.checkpoints.load_identified`` (the one
loader, whatever learned-optimizer class the checkpoint holds) and shared by every run (the
protocol's functions are pure: a run's state lives in the run).

A ``class_path`` spec runs any ``torch.optim.Optimizer`` subclass (torch's, or one of an
installed package: ``schedulefree.AdamWScheduleFree``, ``prodigyopt.Prodigy``) through the
functional adapter :mod:`l2o.torch_adapter`, so that every analysis, the per-sample replays of
the covariance included, sees its updates. ``init_args`` are the constructor's keyword
arguments except ``params`` and ``lr``; ``lr`` is ``tune`` (default) or a number. A class that
takes 2-D parameters only (``torch.optim.Muon``) gets the other tensors (biases, BatchNorm) by
``other`` (default: AdamW, lr 3e-4, weight decay 0.01, as torch's Muon documentation says)::

    {class_path: torch.optim.Muon, lr: tune, other: {class_path: torch.optim.AdamW, lr: 1e-3}}

Everything is validated when parsed, before any run or tuning: unknown names and options, a
learning rate that is not > 0, a checkpoint that cannot be read, duplicate labels; for a
class_path: a class that cannot be imported or is not an optimizer, one that cannot be
replayed functionally (L-BFGS), init_args its constructor refuses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from l2o.checkpoints import load_identified
from l2o.optimizees import Optimizee
from l2o.optimizers import BASELINES, Optimizer, make_baseline
from l2o.torch_adapter import ByNdim, make_torch_optimizer

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


@dataclass
class TorchSpec(OptimizerSpec):
    """A torch.optim-style class run through :func:`l2o.torch_adapter.make_torch_optimizer`;
    ``kind`` is its class path."""

    init_args: dict[str, Any] = field(default_factory=dict)
    other: dict[str, Any] | None = None

    def build(self, lr: float | None = None) -> Optimizer:
        return make_torch_optimizer(
            self.kind,
            self.lr if lr is None else lr,
            other=self.other,
            name=self.label,
            **self.init_args,
        )


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
        return _parse_class_path(spec, grid)
    name = spec.pop("name", "l2o" if "checkpoint" in spec else None)
    label = _label(spec.pop("label", name))
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
            loaded[path] = load_identified(path)
        net, trained_on, identity = loaded[path]
        # The path alone does not name the weights (a running meta-training rewrites its
        # last.ckpt): the hash of the bytes loaded does, in the summary and every run's hparams.
        info = {"checkpoint": path, "trained_on": trained_on.name, **identity}
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
    return _validated(out, grid)


def _label(value: Any) -> str:
    label = str(value)
    if not label or label.startswith(".") or any(c in label for c in '/\\:*?"<>|'):
        raise ValueError(
            f"optimizer label {label!r} must be a plain folder name (it names the runs' folders)"
        )
    return label


def _validated(out: OptimizerSpec, grid: list[float]) -> OptimizerSpec:
    """Build ``out`` with its rate, or with every grid rate when tuned: every option checked
    (and every rate it will be built with) before any run."""
    if out.lr is None:
        if not grid:
            raise ValueError("--tune_grid is empty: give at least one learning rate to try")
        bad = [r for r in grid if not (math.isfinite(r) and r > 0)]
        if bad:
            raise ValueError(f"--tune_grid rates must be > 0, got {bad}")
    for rate in [out.lr] if out.lr is not None else grid:
        try:
            out.build(rate)
        except (TypeError, ValueError) as err:
            raise ValueError(f"optimizer {out.label!r}: {err}") from err
    return out


CLASS_PATH_KEYS = ("class_path", "init_args", "lr", "label", "other")


def _parse_class_path(spec: dict[str, Any], grid: list[float]) -> OptimizerSpec:
    """``{class_path: torch.optim.RAdam, init_args: {...}, lr: tune|float, label, other}``."""
    path = spec.pop("class_path")
    if not isinstance(path, str) or not path:
        raise ValueError(
            f"class_path must be a dotted class name like torch.optim.RAdam, got {path!r}"
        )
    label = _label(spec.pop("label", path.rpartition(".")[2].lower()))
    unknown = sorted(set(spec) - set(CLASS_PATH_KEYS))
    if unknown:
        raise ValueError(
            f"optimizer {label!r}: unknown keys {unknown} in a class_path spec (it takes "
            f"{', '.join(CLASS_PATH_KEYS)}; the constructor's arguments go in init_args)"
        )
    init_args = spec.pop("init_args", None) or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"optimizer {label!r}: init_args must be a mapping, got {init_args!r}")
    init_args = dict(init_args)
    if "params" in init_args:
        raise ValueError(f"optimizer {label!r}: init_args must not hold params (the run's)")
    if "lr" in init_args:  # LightningCLI's habit: the rate among the constructor's arguments
        if "lr" in spec:
            raise ValueError(
                f"optimizer {label!r}: lr given twice (in the spec and in init_args); keep one"
            )
        spec["lr"] = init_args.pop("lr")
    lr = _learning_rate(label, spec.pop("lr", "tune"))
    other = _other(label, spec.pop("other", None))
    info = {"class_path": path, "init_args": init_args}
    if other is not None:
        info["other"] = other
    out = TorchSpec(label, path, lr, lr is None, info, init_args, other)
    _validated(out, grid)
    built = out.build(lr if lr is not None else grid[0])
    if other is None and isinstance(built, ByNdim):  # record the default (Muon's AdamW)
        rest = built.other
        info["other"] = {"class_path": rest.class_path, "lr": rest.lr, **rest.options}
    return out


def _other(label: str, other: Any) -> dict[str, Any] | None:
    """The optimizer of the tensors a matrix-only class (Muon) does not take, flattened to
    make_torch_optimizer's ``{class_path, lr, **options}``; init_args is accepted too."""
    if other is None:
        return None
    if not isinstance(other, dict) or "class_path" not in other:
        raise ValueError(
            f"optimizer {label!r}: other must be a mapping with a class_path, e.g. "
            "{class_path: torch.optim.AdamW, lr: 3e-4, init_args: {weight_decay: 0.01}}"
        )
    other = dict(other)
    init_args = dict(other.pop("init_args", None) or {})
    clash = sorted(set(init_args) & set(other))
    if clash:
        raise ValueError(f"optimizer {label!r}: other gives {clash} twice")
    flat = {**other, **init_args}
    if flat.get("lr") == "tune":
        raise ValueError(
            f"optimizer {label!r}: other's lr is fixed (only the main class's lr is tuned); "
            "give a number or leave it out for the class's default"
        )
    if flat.get("lr") is not None:
        flat["lr"] = _learning_rate(f"{label}.other", flat["lr"])
    return flat


def parse_optimizers(
    specs: list[dict[str, Any]], checkpoints: list[str] = (), grid: list[float] = (1.0,)
) -> list[OptimizerSpec]:
    """All specs of an experiment (``checkpoints`` become ``{name: l2o, checkpoint: ...}``),
    validated before anything runs.

    One checkpoint is labelled ``l2o``; several (the zoo's LSTM and MLP learned optimizers)
    are labelled by their learned optimizer's name (``l2o`` for the LSTM, ``mlp_lopt``), with
    ``_2``, ``_3``, ... where two share one, so that ``--checkpoints '[a, b]'`` just works."""
    specs = list(specs)
    if not specs and not checkpoints:
        raise ValueError("no optimizers to evaluate: give --optimizers and/or --checkpoints")
    loaded: dict[str, Any] = {}
    out: list[OptimizerSpec] = []
    for spec in specs:
        _add(out, parse_spec(spec, list(grid), loaded))
    for path in checkpoints:
        parsed = parse_spec({"name": "l2o", "checkpoint": path}, list(grid), loaded)
        if len(checkpoints) > 1:
            base = str(getattr(parsed.optimizer, "name", "l2o"))
            taken = {o.label for o in out}
            parsed.label = next(
                lab
                for k in range(1, len(taken) + 2)
                if (lab := base if k == 1 else f"{base}_{k}") not in taken
            )
        _add(out, parsed)
    return out


def _add(out: list[OptimizerSpec], parsed: OptimizerSpec) -> None:
    if parsed.label in {o.label for o in out}:
        raise ValueError(f"two optimizers are labelled {parsed.label!r}; give each a 'label'")
    out.append(parsed)
