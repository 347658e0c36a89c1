"""Vectorised meta-testing: the seeds of one optimizer as the population dimension of one run.

Today's path (``l2o.evaluation``) runs every seed as its own ``Trainer.test`` of a
``MetaTestSystem`` with a population of one. The optimizee families are functional and carry
a population dimension P already (``l2o.optimizees``), and every optimizer of the protocol is
independent across members (elementwise baselines; the LSTM and MLP-LOpt are coordinatewise),
so S seeds can be one run with P = S: :func:`run_seeds`. Member s is seed ``seeds[s]``, with
exactly the one-seed run's initialisation (``init_optimizee``) and minibatch order (the
``MinibatchStream`` of that seed), so its numbers are the one-seed run's up to float rounding
of the batched kernels (tests: 1e-6).

Nothing in the step loop reads a tensor back to the host: losses, accuracies and the
divergence flags of every step are written into preallocated tensors (a GPU run never syncs
per step). With loggers, they are read back at every evaluated step and streamed to each
seed's loggers, so that TensorBoard shows the curves live (one sync per evaluation); analyses
sync on the steps they analyse, as they do today.

Analyses (the callbacks of ``callbacks/``, duck-typed: ``name``, ``every_n_steps``,
``compute``): those whose math is per member already are computed for all seeds in one call
(``BATCHED``: the symmetry deviations and the update-to-weight ratio); every other one is
called per seed on that seed's own :class:`~l2o.meta_testing.Snapshot` (its slice of the
population: params, gradient, update, minibatch, and the optimizer state cut to the member,
:func:`member_state`), with a stand-in trainer that gives it the data and the seed's loggers.
The observed run is unchanged by analyses (they replay, never advance).

Divergence is per seed, as in ``MetaTestSystem``: the first step whose loss or update is not
finite is the seed's ``diverged_at``; that step and every later one are left out of its
curves and analyses (the population keeps running for the other members, which the diverged
one cannot affect: members never mix).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from l2o.data import MinibatchSampler, seeded_generator
from l2o.inner import inner_step
from l2o.meta_testing import DIVERGED_TAG, Snapshot, eval_point, init_optimizee
from l2o.optimizees import Optimizee, Params
from l2o.optimizers import Optimizer, State
from l2o.symmetry import symmetry_metrics


@dataclass
class SeedRun:
    """One seed of a population run: what its one-seed ``MetaTestSystem`` run logs.

    ``train_loss`` / ``train_acc`` have one value per step up to (not including) the step it
    diverged at; ``test_steps`` are the evaluated steps (every ``eval_every`` and the last),
    ``scalars`` every analysis tag as ``{tag: {step: value}}`` and ``arrays`` the
    distributions an analysis logged (``{tag: {step: samples}}``).
    """

    seed: int
    train_loss: np.ndarray
    train_acc: np.ndarray
    test_steps: list[int]
    test_loss: np.ndarray
    test_acc: np.ndarray
    diverged_at: int | None
    params: Params  # final params (1, ...): after the last step (or at divergence)
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)
    arrays: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    streamed: bool = False  # meta_test/* already went to the run's loggers during the run

    def metrics(self) -> dict[int, dict[str, float]]:
        """``{step: {tag: value}}`` of ``meta_test/*``, exactly the tags ``MetaTestSystem``
        logs at each step (train every step, test at the evaluated ones)."""
        tested = dict(zip(self.test_steps, zip(self.test_loss, self.test_acc)))
        return {
            i + 1: step_metrics(loss, acc, tested.get(i + 1))
            for i, (loss, acc) in enumerate(zip(self.train_loss, self.train_acc))
        }


def step_metrics(train_loss, train_acc, test: tuple | None = None) -> dict[str, float]:
    """One step's ``meta_test/*`` as ``MetaTestSystem`` logs them; ``test``: the held-out
    (loss, accuracy) at an evaluated step."""
    out = {"meta_test/train_loss": float(train_loss), "meta_test/train_acc": float(train_acc)}
    if test is not None:
        out.update({"meta_test/test_loss": float(test[0]), "meta_test/test_acc": float(test[1])})
    return out


# --------------------------------------------------------------------------- members
def coordinate_index(shapes: Sequence[Sequence[int]], member: int) -> Tensor:
    """Indices of member ``member``'s coordinates in the concatenation of the flattened
    population tensors (shapes with the population dim first): the rows of a coordinatewise
    optimizer state (the LSTM's h and c, MLP-LOpt's accumulators)."""
    parts, offset = [], 0
    for shape in shapes:
        per = math.prod(shape[1:])
        parts.append(torch.arange(offset + member * per, offset + (member + 1) * per))
        offset += shape[0] * per
    return torch.cat(parts)


def member_state(state: State, params: Params, member: int) -> State:
    """The optimizer state of population member ``member`` alone, as a one-member run holds it.

    Leaves shaped like a parameter (``(P, ...)``: SGD's momentum, Adam's moments) are sliced
    on the population dim; leaves with a dim of the total coordinate count (a coordinatewise
    state, e.g. the LSTM's ``(layers, n, hidden)``) are indexed on that dim; the ``shapes``
    entry of a coordinatewise state becomes the member's; ints and other leaves are shared.
    A state layout it does not know raises ``ValueError``.
    """
    pop = params[0].shape[0]
    shapes = tuple(tuple(p.shape) for p in params)
    total = sum(p.numel() for p in params)
    index: Tensor | None = None

    def cut(leaf: Any) -> Any:
        nonlocal index
        if not isinstance(leaf, Tensor) or leaf.dim() == 0:
            return leaf
        if tuple(leaf.shape) in shapes:
            return leaf[member : member + 1]
        dims = [d for d, n in enumerate(leaf.shape) if n == total]
        if len(dims) == 1 and total != pop:
            if index is None:
                index = coordinate_index(shapes, member).to(leaf.device)
            return leaf.index_select(dims[0], index)
        raise ValueError(
            f"cannot cut an optimizer state leaf of shape {tuple(leaf.shape)} to one population "
            f"member (params {shapes}): run this optimizer's seeds one at a time"
        )

    def walk(node: Any, key: str | None = None) -> Any:
        if key == "shapes" and isinstance(node, tuple):
            return tuple((1, *s[1:]) for s in node)
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, (tuple, list)):
            items = [walk(v) for v in node]
            if isinstance(node, tuple) and hasattr(node, "_fields"):
                return type(node)(*items)
            return type(node)(items)
        return cut(node)

    return walk(state)


def member_snapshot(snapshot: Snapshot, member: int) -> Snapshot:
    """The :class:`Snapshot` that the one-seed run of member ``member`` hands its analyses."""
    s = slice(member, member + 1)
    return Snapshot(
        snapshot.step,
        tuple(p[s] for p in snapshot.params),
        member_state(snapshot.state, snapshot.params, member),
        tuple(g[s] for g in snapshot.grads),
        tuple(u[s] for u in snapshot.updates),
        snapshot.x[s],
        snapshot.y[s],
        snapshot.optimizee,
        snapshot.optimizer,
    )


# --------------------------------------------------------------------------- analyses
def should_run(step: int, every_n_steps: int) -> bool:
    """Step 1 always, then every ``every_n_steps`` (``callbacks.base.should_run``; ``l2o``
    does not import ``callbacks``)."""
    return step == 1 or step % every_n_steps == 0


def tensor_names(optimizee: Optimizee) -> list[str]:
    """``layer<l>/<role>`` per parameter tensor (``callbacks.update_ratio.tensor_names``)."""
    names, layer = [], 0
    for role, _, _ in optimizee.roles:
        layer += role == "weight"
        names.append(f"layer{layer}/{role}")
    return names


def batched_update_ratio(snapshot: Snapshot) -> dict[str, Tensor]:
    """``update_ratio/<tensor>`` of every member, ``(P,)`` each (float64), NaN where the
    tensor is 0: the ``UpdateRatio`` callback's numbers for all seeds in one pass."""
    out = {}
    for name, u, p in zip(tensor_names(snapshot.optimizee), snapshot.updates, snapshot.params):
        un = torch.linalg.vector_norm(u.double().reshape(u.shape[0], -1), dim=1)
        pn = torch.linalg.vector_norm(p.double().reshape(p.shape[0], -1), dim=1)
        out[f"update_ratio/{name}"] = torch.where(pn > 0, un / pn, torch.nan)
    return out


def batched_symmetry(snapshot: Snapshot) -> dict[str, Tensor]:
    """``symmetry/<update|grad>/<constraint>/<statistic>`` of every member, ``(P,)`` each:
    the ``SymmetryBreaking`` callback's numbers for all seeds in one pass (the deviations of
    ``l2o.symmetry`` are per member already)."""
    delta = tuple(-u for u in snapshot.updates)
    out = {}
    for kind, step in (("update", delta), ("grad", snapshot.grads)):
        for key, value in symmetry_metrics(snapshot.optimizee, snapshot.params, step).items():
            out[f"symmetry/{kind}/{key}"] = value
    return out


# Analyses (by their ``name``) computed for the whole population in one call.
BATCHED = {"update_ratio": batched_update_ratio, "symmetry": batched_symmetry}


class _Recorder:
    """A logger for one seed's analyses: keeps scalars and arrays in memory."""

    def __init__(self) -> None:
        self.scalars: dict[str, dict[int, float]] = {}
        self.arrays: dict[str, dict[int, np.ndarray]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.scalars.setdefault(tag, {})[int(step)] = float(value)

    def log_array(self, tag: str, values: np.ndarray, step: int) -> None:
        self.arrays.setdefault(tag, {})[int(step)] = np.asarray(values).copy()


class _SeedTrainer:
    """What an analysis reads of ``trainer``: the data and the loggers of its seed."""

    is_global_zero = True

    def __init__(self, datamodule: Any, loggers: list[Any]) -> None:
        self.datamodule, self.loggers = datamodule, loggers


# --------------------------------------------------------------------------- the run
def _test_metrics(optimizee: Optimizee, params: Params, x: Tensor, y: Tensor):
    """Held-out loss and accuracy of every member, ``(P,)`` each (``MetaTestSystem.evaluate``
    for all members: mean cross-entropy, micro accuracy), at ``params`` (the caller passes
    the optimizer's evaluation point, ``l2o.meta_testing.eval_point``)."""
    logits = optimizee.logits(params, x[None])  # (P, N, C): the test split shared by all
    pop = logits.shape[0]
    loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(pop), reduction="none")
    acc = (logits.argmax(-1) == y).float().mean(-1)
    return loss.view(pop, -1).mean(-1), acc


@torch.no_grad()
def run_seeds(
    optimizer: Optimizer,
    optimizee: Optimizee,
    data: Any,
    seeds: Sequence[int],
    steps: int | None = None,
    eval_every: int = 10,
    analyses: Sequence[Any] = (),
    loggers: Sequence[Sequence[Any]] | None = None,
    device: torch.device | str = "cpu",
    progress: str | None = None,
) -> list[SeedRun]:
    """Meta-test ``optimizer`` on ``optimizee`` for every seed of ``seeds`` in one run.

    Args:
        optimizer: any optimizer of the protocol.
        optimizee: the optimizee family.
        data: a ``MetaTestData`` (or anything with ``train_x, train_y, test_x, test_y,
            batch_size``, e.g. a set-up ``MNISTDataModule``); what the analyses read as
            ``trainer.datamodule``.
        seeds: the run seeds (initialisation and minibatch order of each, as one-seed runs).
        steps: optimizee steps (default ``data.steps``).
        eval_every: held-out loss and accuracy every this many steps and at the last.
        analyses: analysis callbacks (``callbacks.base.Analysis``); each seed gets its own
            deep copy, as each one-seed run gets its own Trainer's.
        loggers: per seed, extra loggers that receive the seed's analysis scalars and
            distributions as they are computed, and its ``meta_test/*`` step metrics at every
            evaluated step (what a one-seed run has logged by then: TensorBoard shows the
            curves live; one host sync per evaluation). :func:`log_seed_run` adds the rest.
        device: where the population lives.
        progress: a label: show a progress bar of the steps under it (``None``: none).

    Returns one :class:`SeedRun` per seed, in order.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty: give at least one run seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {seeds} repeat a seed: its runs would be identical")
    steps = int(getattr(data, "steps", 0) if steps is None else steps)
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps and eval_every must be >= 1, got {steps}, {eval_every}")
    if loggers is not None and len(loggers) != len(seeds):
        raise ValueError(f"loggers has {len(loggers)} entries for {len(seeds)} seeds")
    optimizee.check_input(data.train_x.shape[-1])
    pop, device = len(seeds), torch.device(device)

    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    # Each seed's sampler is that of its one-seed MinibatchStream.
    samplers = [
        MinibatchSampler(len(train_x), 1, data.batch_size, seeded_generator(s)) for s in seeds
    ]
    params = tuple(
        torch.cat(ts)
        for ts in zip(*(init_optimizee(optimizee, s, device) for s in seeds), strict=True)
    )
    state = optimizer.init_state(params)

    recorders = [_Recorder() for _ in seeds]
    trainers = [
        _SeedTrainer(data, [recorders[i], *(loggers[i] if loggers is not None else ())])
        for i in range(pop)
    ]
    batched = [a for a in analyses if a.name in BATCHED]
    per_seed = [[copy.deepcopy(a) for a in analyses if a.name not in BATCHED] for _ in seeds]
    for i, own in enumerate(per_seed):
        for a in own:
            a.setup(trainers[i], None, "test")

    losses = torch.empty(steps, pop, device=device)
    accs = torch.empty(steps, pop, device=device)
    finite = torch.empty(steps, pop, dtype=torch.bool, device=device)
    test_steps = [s for s in range(1, steps + 1) if s % eval_every == 0 or s == steps]
    test_losses = torch.empty(len(test_steps), pop, device=device)
    test_accs = torch.empty(len(test_steps), pop, device=device)
    alive = torch.ones(pop, dtype=torch.bool, device=device)  # not diverged before this step
    final = params
    k = 0
    streamed = 0  # steps whose meta_test/* went to the loggers
    stopped = [False] * pop  # a seed's curve ends at its first non-finite step
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=progress, unit="step", leave=False, dynamic_ncols=True)
    for step in range(1, steps + 1):
        idx = torch.cat([sampler.next(1)[0] for sampler in samplers]).to(device)  # (S, B)
        x, y = train_x[idx], train_y[idx]
        inner = inner_step(optimizee, optimizer, params, state, x, y)
        ok = torch.isfinite(inner.loss)
        for u in inner.updates:
            ok &= torch.isfinite(u.reshape(pop, -1)).all(-1)
        losses[step - 1] = inner.loss
        accs[step - 1] = optimizee.accuracy(params, x, y)
        finite[step - 1] = ok
        alive &= ok
        if analyses and any(should_run(step, a.every_n_steps) for a in analyses):
            live = alive.tolist()  # analyses sync anyway; a diverged seed is analysed no more
            snapshot = Snapshot(
                step, params, state, inner.grads, inner.updates, x, y, optimizee, optimizer
            )
            for a in batched:
                if should_run(step, a.every_n_steps):
                    values = {t: v.tolist() for t, v in BATCHED[a.name](snapshot).items()}
                    for i in range(pop):
                        if live[i]:
                            _log(trainers[i], {t: v[i] for t, v in values.items()}, step)
            for i in range(pop):
                due = [a for a in per_seed[i] if should_run(step, a.every_n_steps)]
                if live[i] and due:
                    one = member_snapshot(snapshot, i)  # one cache shared by its analyses
                    for a in due:
                        _log(trainers[i], a.compute(one, trainers[i]), step)
        params, state = inner.params, inner.state
        # a diverged member keeps its last finite params (as the one-seed run stops there)
        final = tuple(torch.where(_rows(alive, p), p, f) for p, f in zip(params, final))
        if k < len(test_steps) and step == test_steps[k]:
            at = eval_point(optimizer, params, state)  # schedule-free: x, not y
            test_losses[k], test_accs[k] = _test_metrics(optimizee, at, test_x, test_y)
            if loggers is not None:
                _stream(trainers, losses, accs, finite, test_losses[k], test_accs[k],
                        streamed, step, stopped)  # fmt: skip
                streamed = step
            k += 1
        if bar is not None:
            bar.update(1)

    if bar is not None:
        bar.close()
    finite_np = finite.cpu().numpy()
    losses_np, accs_np = losses.double().cpu().numpy(), accs.double().cpu().numpy()
    tl_np, ta_np = test_losses.double().cpu().numpy(), test_accs.double().cpu().numpy()
    runs = []
    for i, seed in enumerate(seeds):
        bad = np.flatnonzero(~finite_np[:, i])
        diverged_at = int(bad[0]) + 1 if len(bad) else None
        n = steps if diverged_at is None else diverged_at - 1
        keep = [j for j, s in enumerate(test_steps) if s <= n]
        runs.append(
            SeedRun(
                seed,
                losses_np[:n, i],
                accs_np[:n, i],
                [test_steps[j] for j in keep],
                tl_np[keep, i],
                ta_np[keep, i],
                diverged_at,
                tuple(p[i : i + 1] for p in final),
                recorders[i].scalars,
                recorders[i].arrays,
                streamed=loggers is not None,
            )
        )
    return runs


def _stream(trainers, losses, accs, finite, test_loss, test_acc, start, step, stopped) -> None:
    """Log steps ``start+1 .. step`` of every seed's ``meta_test/*`` to its loggers (``step`` is
    an evaluated one: its test metrics too), exactly the dicts of ``SeedRun.metrics``: a seed's
    curve stops before its first non-finite step (``stopped`` remembers it across calls)."""
    span = slice(start, step)
    loss_np, acc_np = losses[span].double().cpu().numpy(), accs[span].double().cpu().numpy()
    finite_np = finite[span].cpu().numpy()
    tl, ta = test_loss.double().cpu().tolist(), test_acc.double().cpu().tolist()
    for i, trainer in enumerate(trainers):
        for j in range(step - start):
            if stopped[i] or not finite_np[j, i]:
                stopped[i] = True
                break
            test = (tl[i], ta[i]) if start + j + 1 == step else None
            metrics = step_metrics(loss_np[j, i], acc_np[j, i], test)
            _log(trainer, metrics, start + j + 1, recorder=False)


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _log(trainer: _SeedTrainer, metrics: dict[str, float], step: int, recorder=True) -> None:
    if metrics:
        for logger in trainer.loggers:
            if recorder or not isinstance(logger, _Recorder):
                logger.log_metrics(metrics, step=step)


def log_seed_run(
    run: SeedRun,
    loggers: Sequence[Any],
    optimizer: Optimizer | None = None,
    run_info: dict[str, Any] | None = None,
    status: str = "success",
) -> None:
    """Write one seed's ``meta_test/*`` to Lightning loggers as its ``MetaTestSystem`` run
    does: ``meta_test/lr`` at step 0 (optimizers with a learning rate), the step metrics, the
    divergence step, and ``run_info`` as hyperparameters with the final loss and accuracy;
    then ``finalize(status)`` (the ``RecordLogger`` writes its record). The analysis scalars,
    and the step metrics of a ``run.streamed`` run, went to the same loggers during
    :func:`run_seeds` (pass them there as ``loggers``): they are not written again."""
    lr = getattr(optimizer, "lr", None)
    for logger in loggers:
        if lr is not None:
            logger.log_metrics({"meta_test/lr": float(lr)}, step=0)
        if not run.streamed:  # else run_seeds wrote them to these loggers as it went
            for step, metrics in run.metrics().items():
                logger.log_metrics(metrics, step=step)
        if run.diverged_at is not None:
            logger.log_metrics({DIVERGED_TAG: float(run.diverged_at)}, step=run.diverged_at)
    if run_info:
        diverged = run.diverged_at is not None
        last = run.metrics()
        final_metrics = last[max(last)] if last else {}
        final = {
            "hparams/final_train_loss": (
                math.inf if diverged else final_metrics.get("meta_test/train_loss", math.nan)
            ),
            "hparams/final_test_acc": (
                math.nan
                if diverged
                else (float(run.test_acc[-1]) if len(run.test_acc) else math.nan)
            ),
        }
        for logger in loggers:
            logger.log_hyperparams(run_info, final)
    for logger in loggers:
        logger.finalize(status)
