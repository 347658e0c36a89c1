"""Reading meta-training checkpoints, safely and with clear errors.

The checkpoint format (written by :class:`l2o.meta_training.MetaTrainingSystem`): a Lightning
checkpoint whose ``"l2o"`` entry holds

- ``learned_optimizer_class``: the qualified class name, one of :data:`LEARNED_OPTIMIZERS`;
- ``learned_optimizer_config``: plain dict, the class's ``config()`` (its constructor's kwargs);
- ``optimizee``: the optimizee family's spec (:func:`l2o.optimizees.spec_of`);
- ``run_config``: what a resume must match (see :mod:`l2o.checkpointing`), plus the carried
  optimizees and counters a resume needs.

The learned optimizer's weights are the ``state_dict`` keys prefixed ``learned_optimizer.``.
Checkpoints of older versions (``"optimizer_config"``, prefix ``optimizer.``) still load.
Files are read with ``torch.load(weights_only=True)``: loading a checkpoint cannot run code, and
a class is only ever imported when it is on the allow-list, never from a name found in a file.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from l2o.optimizees import Optimizee, build_optimizee

# The learned-optimizer classes a checkpoint may name. Imported lazily, only when named.
LEARNED_OPTIMIZERS = ("l2o.lstm.LSTMOptimizer", "l2o.mlp_lopt.MLPLOpt")
LEGACY_CLASS = "l2o.lstm.LSTMOptimizer"  # what checkpoints without a class name hold


class CheckpointError(ValueError):
    """The file is not a readable l2o-dynamics learned-optimizer checkpoint."""


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def learned_optimizer_class(name: str) -> type[nn.Module]:
    """The allow-listed learned-optimizer class ``name``, e.g. ``l2o.lstm.LSTMOptimizer``."""
    if name not in LEARNED_OPTIMIZERS:
        raise CheckpointError(
            f"unknown learned-optimizer class {name!r}; this version knows "
            f"{', '.join(LEARNED_OPTIMIZERS)}"
        )
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(
            f"the learned-optimizer class {name!r} is not available in this installation ({err})"
        ) from err


def build_learned_optimizer(name: str, config: dict[str, Any]) -> nn.Module:
    cls = learned_optimizer_class(name)
    try:
        return cls(**config)
    except TypeError as err:
        raise CheckpointError(f"{name} does not accept the saved config {config}: {err}") from err


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict, loaded with ``weights_only=True``. A missing file is
    a FileNotFoundError; an unreadable, truncated or foreign one a :class:`CheckpointError` that
    says which (and never suggests unsafe loading)."""
    return read_checkpoint_bytes(path)[0]


def read_checkpoint_bytes(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """:func:`read_checkpoint`, and the exact bytes it was loaded from.

    The file is read once and unpickled from memory, so that a hash of the bytes names exactly
    the weights that were loaded, even when the file is replaced meanwhile (a running
    meta-training rewrites its ``last.ckpt`` at every epoch end and every few minutes).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"could not read {path}: {err.strerror or err}") from err
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols of foreign files
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # foreign bytes fail in many ways inside the unpickler
        is_zip = data[:2] == b"PK"  # torch.save's format is a zip archive
        if is_zip or isinstance(err, (zipfile.BadZipFile, EOFError)):
            raise CheckpointError(
                f"could not read {path}: the file is truncated or corrupt "
                f"({len(data)} bytes, its archive is unreadable: an interrupted copy "
                "or save?). Use another checkpoint of the run."
            ) from err
        raise CheckpointError(
            f"could not read {path}: it is not a checkpoint written by `train.py fit` (not a "
            "PyTorch file at all, or it holds objects that safe loading refuses to import)"
        ) from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path} holds a {type(ckpt).__name__}, not a checkpoint written by `train.py fit`"
        )
    return ckpt, data


def read_l2o_checkpoint(path: str | Path) -> dict[str, Any]:
    """:func:`read_checkpoint`, and it must be an l2o-dynamics meta-training checkpoint."""
    return _read_l2o_checkpoint(path)[0]


def _read_l2o_checkpoint(path: str | Path) -> tuple[dict[str, Any], bytes]:
    ckpt, data = read_checkpoint_bytes(path)
    if not isinstance(ckpt.get("l2o"), dict) or not isinstance(ckpt.get("state_dict"), dict):
        keys = sorted(map(str, ckpt))[:8]
        raise CheckpointError(
            f"{path} is not an l2o-dynamics learned-optimizer checkpoint (no 'l2o' entry; "
            f"found {keys}); use a checkpoint written by `python train.py fit`"
        )
    return ckpt, data


def checkpoint_identity(ckpt: dict[str, Any], data: bytes) -> dict[str, Any]:
    """What names the weights a checkpoint holds, whatever its path: the SHA-256 of its bytes,
    and the meta-training epoch and step it was written at (None where the file has none).
    Two experiments that name the same path can load different weights (``last.ckpt`` of a
    meta-training that is still running); equal hashes say they did not."""
    epoch, step = ckpt.get("epoch"), ckpt.get("global_step")
    return {
        "checkpoint_sha256": hashlib.sha256(data).hexdigest(),
        "checkpoint_epoch": None if epoch is None else int(epoch),
        "checkpoint_step": None if step is None else int(step),
    }


def learned_optimizer_spec(ckpt: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(class name, config) of the checkpoint's learned optimizer, for every format version."""
    meta = ckpt["l2o"]
    if "learned_optimizer_class" in meta:
        return meta["learned_optimizer_class"], dict(meta["learned_optimizer_config"])
    return LEGACY_CLASS, dict(meta["optimizer_config"])


def load_learned_optimizer(path: str | Path) -> tuple[nn.Module, Optimizee]:
    """(the learned optimizer in eval mode, the optimizee family it was meta-trained on)."""
    net, optimizee, _ = load_identified(path)
    return net, optimizee


def load_identified(path: str | Path) -> tuple[nn.Module, Optimizee, dict[str, Any]]:
    """:func:`load_learned_optimizer`, and the :func:`checkpoint_identity` of the very bytes
    the weights came from."""
    ckpt, data = _read_l2o_checkpoint(path)
    name, config = learned_optimizer_spec(ckpt)
    net = build_learned_optimizer(name, config)
    # "optimizer." in checkpoints written before the learned optimizer got its own name
    prefix = next(
        (
            p
            for p in ("learned_optimizer.", "optimizer.")
            if any(k.startswith(p) for k in ckpt["state_dict"])
        ),
        "learned_optimizer.",
    )
    weights = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit {name}({config}): {err}") from err
    return net.eval(), build_optimizee(ckpt["l2o"]["optimizee"]), checkpoint_identity(ckpt, data)


def find_checkpoint(run_root: str | Path, which: str = "best") -> Path:
    """The newest run's ``best-*.ckpt`` (lowest meta-validation loss) or ``last.ckpt``
    below a logger folder such as ``runs/leaky_relu``."""
    runs = sorted(Path(run_root).glob("version_*/checkpoints"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no version_*/checkpoints below {run_root}: meta-train first")
    pattern = "last.ckpt" if which == "last" else "best-*.ckpt"
    found = sorted(runs[-1].glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {pattern} in {runs[-1]}")
    return found[-1]


if __name__ == "__main__":  # python -m l2o.checkpoints runs/leaky_relu [best|last]
    import sys

    print(find_checkpoint(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "best"))
