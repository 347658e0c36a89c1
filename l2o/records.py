"""The record of a meta-test run: the one store that the summary and the figures read.

A :class:`RecordLogger` sits in ``trainer.loggers`` beside the ``TensorBoardLogger``, so both
receive the very same ``log_metrics`` / ``log_hyperparams`` calls (they cannot drift apart), and
writes ``record.npz`` into the run's folder when the run ends. ``l2o.report`` reads only these
records (and the experiment's manifest), never the event files. Why a record of its own instead
of reading TensorBoard's event files back:

* event files keep scalars as float32 and distributions only as binned histograms; the record
  keeps every scalar as the float64 that was computed (summary numbers are exact, and
  reproducible bit for bit) and the raw samples of distributions (figures re-bin them on
  common bins across optimizers);
* it is written atomically, once, when the run ends: a run that was killed has no record, so a
  half-written run can never enter a summary (TensorBoard's files are the live view).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

RECORD_FILE = "record.npz"


@dataclass
class Record:
    """One run as recorded: ``scalars[tag] = (steps int64, values float64)``,
    ``arrays[tag][step] = samples``, the hyperparameters and the final metrics."""

    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    arrays: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    status: str = ""

    def series(self, tag: str) -> tuple[np.ndarray, np.ndarray] | None:
        return self.scalars.get(tag)


class RecordLogger(Logger):
    """A Lightning logger that keeps everything in memory and writes ``<run_dir>/record.npz``
    when the run ends (``finalize``), atomically (a temporary file renamed into place).

    Besides ``log_metrics`` and ``log_hyperparams`` it takes ``log_array(tag, values, step)``:
    raw samples of a distribution (``l2o.meta_testing.log_distribution`` sends them).
    """

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__()
        self._dir = Path(run_dir)
        self._scalars: dict[str, list[tuple[int, float]]] = {}
        self._arrays: dict[str, dict[int, np.ndarray]] = {}
        self._hparams: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return "record"

    @property
    def version(self) -> str:
        return ""

    @property
    def root_dir(self) -> str:
        return str(self._dir)

    @property
    def log_dir(self) -> str:
        return str(self._dir)

    @property
    def save_dir(self) -> str:
        return str(self._dir)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for tag, value in metrics.items():
            self._scalars.setdefault(tag, []).append((int(step or 0), float(value)))

    @rank_zero_only
    def log_hyperparams(self, params: Any, metrics: dict[str, Any] | None = None) -> None:
        params = dict(vars(params)) if not isinstance(params, dict) else dict(params)
        self._hparams.update(params)
        if metrics:
            self.log_metrics(metrics, 0)

    @rank_zero_only
    def log_array(self, tag: str, values: np.ndarray, step: int) -> None:
        self._arrays.setdefault(tag, {})[int(step)] = np.asarray(values).copy()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        tags = sorted(self._scalars)
        arrays = [(tag, step) for tag in sorted(self._arrays) for step in sorted(self._arrays[tag])]
        header = {"scalars": tags, "arrays": arrays, "hparams": self._hparams, "status": status}
        data: dict[str, np.ndarray] = {"header": np.array(json.dumps(header, default=str))}
        for i, tag in enumerate(tags):
            pairs = self._scalars[tag]
            data[f"s{i}_step"] = np.array([s for s, _ in pairs], dtype=np.int64)
            data[f"s{i}_value"] = np.array([v for _, v in pairs], dtype=np.float64)
        for j, (tag, step) in enumerate(arrays):
            data[f"a{j}"] = self._arrays[tag][step]
        self._dir.mkdir(parents=True, exist_ok=True)
        tmp = self._dir / f".{RECORD_FILE}.tmp"
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._dir / RECORD_FILE)


def read_record(run_dir: str | Path) -> Record:
    """The record of the run in ``run_dir`` (``FileNotFoundError`` if it has none)."""
    path = Path(run_dir) / RECORD_FILE
    with np.load(path) as npz:
        header = json.loads(str(npz["header"]))
        rec = Record(hparams=header["hparams"], status=header["status"])
        for i, tag in enumerate(header["scalars"]):
            rec.scalars[tag] = (npz[f"s{i}_step"], npz[f"s{i}_value"])
        for j, (tag, step) in enumerate(header["arrays"]):
            rec.arrays.setdefault(tag, {})[int(step)] = npz[f"a{j}"]
    return rec
