"""Analysis presets: ``evaluate.py --preset none|economy|full``.

Each preset is a list of ``class_path``/``init_args`` dicts, the form of ``--analyses`` and
``configs/analyses.yaml``. Every analysis of a preset runs every 16 optimizee steps (plus
step 1), so their analysed steps coincide and work shared through the step's cache (the
per-sample gradients) is done once. What each costs, as a multiple of a plain meta-test step:
``python bench/analysis_overhead.py`` (README, "Analyses on a budget").

* ``none``: no analyses (the bare run).
* ``economy``: the analyses that cost at most ~1 plain step at each analysed step: symmetry
  breaking, the update-to-weight ratio, the |update| histogram, the step length and the
  gradient signal-to-noise (per-sample gradients of the step's minibatch only).
* ``full``: everything, adding the Hessian's curvature, the tail index of minibatch noise and
  the covariance of per-sample updates, the costly ones (tens of HVPs, replays of many
  minibatches or samples), at reduced sample sizes (see ``FULL``).
"""

from __future__ import annotations

import copy
import importlib
import inspect
from typing import Any

EVERY = 16


def _entry(class_path: str, **init_args: Any) -> dict[str, Any]:
    return {"class_path": class_path, "init_args": {"every_n_steps": EVERY, **init_args}}


ECONOMY = [
    _entry("callbacks.SymmetryBreaking"),
    _entry("callbacks.update_ratio.UpdateRatio"),
    _entry("callbacks.UpdateHistograms"),
    _entry("callbacks.step_length.StepLength"),
    _entry("callbacks.gsnr.GradientNoise"),
]
# The costly analyses at sample sizes that fit the budget (bench/analysis_overhead.py):
# covariance over the step's batch size of training samples instead of 1,024, the tail index
# over 8 minibatches (8 x 15,910 noise values pooled) instead of the whole split, the trace
# from 8 probes. configs/analyses.yaml keeps the study's sizes.
FULL = [
    *ECONOMY,
    _entry("callbacks.curvature.Curvature", num_probes=8),
    _entry("callbacks.TailIndex", analysis_batches=8),
    _entry("callbacks.UpdateCovariance", num_samples=128),
]
PRESETS: dict[str, list[dict[str, Any]]] = {"none": [], "economy": ECONOMY, "full": FULL}


def preset(
    name: str, every_n_steps: int | None = None, schedule: str | None = None
) -> list[dict[str, Any]]:
    """A copy of preset ``name``, with every analysis's ``every_n_steps`` and ``schedule``
    replaced where given (an analysis that takes no ``schedule`` is an error naming it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown analysis preset {name!r}; choose from {sorted(PRESETS)}")
    entries = copy.deepcopy(PRESETS[name])
    for entry in entries:
        if every_n_steps is not None:
            entry["init_args"]["every_n_steps"] = int(every_n_steps)
        if schedule is not None:
            params = inspect.signature(_class(entry["class_path"])).parameters
            if "schedule" not in params:
                raise ValueError(f"{entry['class_path']} takes no schedule (only every_n_steps)")
            entry["init_args"]["schedule"] = schedule
    return entries


def instantiate(entries: list[dict[str, Any]]) -> list:
    """The callback objects of a list of ``class_path``/``init_args`` dicts."""
    return [_class(e["class_path"])(**e.get("init_args", {})) for e in entries]


def _class(class_path: str) -> type:
    module, _, attr = class_path.rpartition(".")
    return getattr(importlib.import_module(module), attr)
