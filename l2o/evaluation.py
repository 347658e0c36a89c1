"""Meta-testing experiments: learned optimizers beside tuned baselines, many seeds, one folder.

``evaluate.py`` parses the command line and calls :func:`run_experiment`, which

1. checks everything before any work: the optimizer specs were validated by ``l2o.specs``; here
   the settings (steps, seeds, report steps, the tuning grid), the data against the optimizee
   and every analysis (``analysis.check``), and the output folder;
2. takes the folder ``out/name`` (see *Output folder* below), tunes the learning rates, then runs
   the seeds of each optimizer as one population run (``vectorise_seeds``, the default:
   ``l2o.population``, same numbers, same run folders), unless :func:`vectorisable` finds that
   the optimizer cannot be split into members; else (or with ``vectorise_seeds=False``) one
   ``Trainer.test`` of :class:`~l2o.meta_testing.MetaTestSystem` per optimizer and seed. Both
   log the analyses and the curves to TensorBoard (live) and to the run's record;
3. writes per optimizer a TensorBoard run of the seed means, and the summary and figures
   (``l2o.report.build_report``, from the records).

Divergence is a result: a run whose loss or update stops being finite ends there, marked
diverged (``l2o.meta_testing``); a tuning grid rate that diverges scores inf; an optimizer whose
every grid rate diverges is recorded as such and the others go on.

Output folder ``out/name``: a name in use is refused unless ``overwrite`` (then the old folder is
moved aside, and deleted once the new experiment is complete); a lock file (``out/.name.lock``,
an ``flock`` that the OS releases when the process dies) keeps two experiments from writing one
folder; ``manifest.json`` lists the optimizers and the finished runs and is rewritten
atomically after each run; the report reads only what it lists, and its ``status`` becomes
``complete`` last. TensorBoard can watch ``out/name`` live.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from l2o.analysis import AnalysisProtocol, FigureSpec
from l2o.inner import inner_step
from l2o.meta_testing import MetaTestSystem, init_optimizee
from l2o.optimizees import Optimizee
from l2o.optimizers import Optimizer
from l2o.population import log_seed_run, member_state, run_seeds
from l2o.records import RecordLogger, read_record
from l2o.report import CORE_FIGURE, MANIFEST, build_report, read_manifest, write_json
from l2o.seeds import TUNE_RUN
from l2o.specs import OptimizerSpec
from l2o.streams import MetaTestData, MinibatchStream

LR_GRID = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 3.0)
DEFAULT_REPORT_STEPS = (1, 10, 100, 1000)
RESERVED = {"figures"}  # folder names of the experiment that a label must not take


class FolderInUse(RuntimeError):
    """The experiment folder holds results, or another evaluate.py is writing it."""


# ----------------------------------------------------------------------------- settings
def default_report_steps(steps: int) -> list[int]:
    return [s for s in DEFAULT_REPORT_STEPS if s <= steps]


def check_settings(
    steps: int,
    seeds: int,
    eval_every: int,
    tune_grid: list[float],
    tune_steps: int,
    tune_seeds: int,
    report_steps: list[int],
    criterion_steps: int,
    any_tuned: bool,
) -> None:
    """Every numeric setting, with a message naming the flag (before any work)."""
    for flag, value in (("--steps", steps), ("--seeds", seeds), ("--eval_every", eval_every)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not 1 <= criterion_steps <= steps:
        raise ValueError(
            f"--criterion_steps must be between 1 and --steps ({steps}), got {criterion_steps}"
        )
    bad = [s for s in report_steps if not 1 <= s <= steps]
    if bad:
        raise ValueError(f"--report_steps {bad} outside 1..--steps ({steps})")
    if any_tuned:
        if not tune_grid:
            raise ValueError("--tune_grid is empty: give at least one learning rate to try")
        bad = [r for r in tune_grid if not (math.isfinite(r) and r > 0)]
        if bad:
            raise ValueError(f"--tune_grid rates must be > 0, got {bad}")
        if tune_steps < 1:
            raise ValueError(f"--tune_steps must be >= 1 (steps per tuning run), got {tune_steps}")
        if tune_seeds < 1:
            raise ValueError(f"--tune_seeds must be >= 1 (tuning runs per rate), got {tune_seeds}")


def check_analyses(analyses: list[AnalysisProtocol], data: MetaTestData) -> None:
    names = [a.name for a in analyses]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--analyses has two analyses named {dup}: their tags would mix")
    for a in analyses:
        a.check(data)


# ----------------------------------------------------------------------------- tuning
def plain_run(
    opt: Optimizer, optimizee: Optimizee, dm, seed: int, steps: int, device="cpu"
) -> list[float]:
    """Training losses of one run without Lightning (for tuning), same data as a test run;
    inf from the step where the loss stops being finite."""
    params = init_optimizee(optimizee, seed, device)
    state = opt.init_state(params)
    losses: list[float] = []
    stream = MinibatchStream(dm.train_x, dm.train_y, steps, dm.batch_size, seed)
    for x, y in stream:
        step = inner_step(optimizee, opt, params, state, x.to(device), y.to(device))
        if not bool(step.loss.isfinite().all()):
            return losses + [math.inf] * (steps - len(losses))
        params, state = step.params, step.state
        losses.append(step.loss.item())
    return losses


def tune_lr(
    spec: OptimizerSpec, optimizee: Optimizee, dm, grid, steps: int, seeds: int
) -> tuple[float | None, dict[float, float]]:
    """The grid rate with the lowest summed training loss of the first ``steps`` steps,
    averaged over ``seeds`` tuning runs (seeds disjoint from the reported runs); a rate whose
    run diverges scores inf. ``(None, scores)`` if every rate diverged."""
    scores = {}
    for lr in grid:
        opt = spec.build(lr)
        runs = [sum(plain_run(opt, optimizee, dm, TUNE_RUN + s, steps)) for s in range(seeds)]
        scores[lr] = float(np.mean(runs)) if all(map(math.isfinite, runs)) else math.inf
    best = min(scores, key=scores.get)
    return (best if math.isfinite(scores[best]) else None), scores


def checkpoint_note(s: OptimizerSpec) -> str:
    """Which weights a learned optimizer's run uses: path, meta-training epoch and step, hash.

    A ``last.ckpt`` is rewritten by its meta-training while that runs (every epoch end and
    every ``--checkpoint_minutes``), so two experiments naming it can meta-test different
    weights with nothing else differing; the note says so, and the hash (also in summary.json
    and every run's hparams) tells such runs apart.
    """
    info = s.info
    where = ", ".join(
        f"{what} {info[key]}"
        for what, key in (("epoch", "checkpoint_epoch"), ("meta-step", "checkpoint_step"))
        if info.get(key) is not None
    )
    text = f"{s.label}: {info['checkpoint']} ({where + ', ' if where else ''}sha256 "
    text += f"{info['checkpoint_sha256'][:12]})"
    if Path(info["checkpoint"]).name == "last.ckpt":
        text += (
            "; last.ckpt is rewritten while its meta-training runs: to meta-test these weights "
            "again, copy the file or use a best-*.ckpt (its name fixes its step)"
        )
    return text


# ----------------------------------------------------------------------------- population runs
def _same(a: Any, b: Any) -> bool:
    """Two optimizer states equal in structure, tensors to float rounding."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape:
            return False
        if not a.is_floating_point():
            return bool(torch.equal(a, b))
        return bool(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6, equal_nan=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return (
            isinstance(b, (tuple, list))
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b))
        )
    return a == b


@torch.no_grad()
def vectorisable(opt: Optimizer, optimizee: Optimizee, steps: int = 2) -> str | None:
    """``None`` if ``opt``'s seeds can run as one population (``l2o.population``), else why not.

    Probed on a population of two random optimizees, ``steps`` updates: each member's updates,
    and its state as ``member_state`` cuts it (what the per-seed analyses replay), must be
    those of the same member run alone. A state layout ``member_state`` does not know raises
    ``ValueError`` (e.g. per-member state dicts); a cut that silently gives another member's
    numbers fails the comparison. Cheap: a few updates of the optimizee's size.
    """
    g = torch.Generator().manual_seed(0)
    pop = optimizee.init(2, g)
    grads = [tuple(torch.randn(p.shape, generator=g, dtype=p.dtype) for p in pop)
             for _ in range(steps)]  # fmt: skip

    def pick(ts, member):
        return ts if member is None else tuple(t[member : member + 1] for t in ts)

    def run(params, member=None):
        params, ups = pick(params, member), []
        state = opt.init_state(params)
        for gr in grads:
            updates, state = opt.update(pick(gr, member), state, params)
            ups.append(updates)
            params = tuple(p + u for p, u in zip(params, updates))
        return params, state, ups

    try:
        params, state, ups = run(pop)
        for m in range(2):
            cut = member_state(state, params, m)
            _, alone, alone_ups = run(pop, m)
            same_updates = all(
                _same(tuple(u[m : m + 1] for u in us), a) for us, a in zip(ups, alone_ups)
            )
            if not same_updates:
                return "its population members are not independent runs"
            if not _same(cut, alone):
                return "member_state does not cut its state into one member's"
    except ValueError as err:
        return str(err)
    return None


# ----------------------------------------------------------------------------- the folder
@contextmanager
def experiment_folder(out: Path, name: str, overwrite: bool):
    """Lock ``out/name`` for this process and hand it over empty (see the module docstring)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    folder = out / name
    lock = open(out / f".{name}.lock", "a+")  # noqa: SIM115 (held for the whole experiment)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            who = lock.read().strip() or "another process"
            raise FolderInUse(
                f"{folder} is being written by another evaluate.py ({who}); wait for it or "
                "choose another --name"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        replaced = None
        if folder.exists():
            if not overwrite:
                raise FolderInUse(describe_existing(folder))
            replaced = out / f".{name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            folder.rename(replaced)
            print(f"moved the previous {folder} to {replaced} (deleted when this one completes)")
        folder.mkdir()
        yield folder
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def describe_existing(folder: Path) -> str:
    try:
        status = read_manifest(folder).get("status", "incomplete")
    except Exception:
        status = "not an experiment (no readable manifest)"
    what = {
        "complete": "holds a complete experiment",
        "running": "holds an experiment that was interrupted",
    }.get(status, f"exists ({status})")
    return (
        f"{folder} {what}: choose another --name, or pass --overwrite true to replace it "
        "(its results are deleted once the new experiment completes)"
    )


def check_folder(out: Path, name: str, overwrite: bool) -> None:
    """Early, read-only: refuse a name in use before any work (re-checked under the lock)."""
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ValueError(f"--name {name!r} must be a plain folder name")
    if (out / name).exists() and not overwrite:
        raise FolderInUse(describe_existing(out / name))


# ----------------------------------------------------------------------------- the runs
def custom_scalars_layout(
    optimizee: Optimizee, analyses: list[AnalysisProtocol]
) -> dict[str, dict[str, list]]:
    """TensorBoard's custom-scalars layout: one category per analysis, each chart overlaying
    every optimizer's and seed's runs. Written into every run (TensorBoard merges them; no
    empty extra run)."""
    layout = {
        "meta_test": {
            t: ["Multiline", [f"meta_test/{t}"]]
            for t in ("train_loss", "test_loss", "test_acc", "train_acc")
        }
    }
    for a in analyses:
        layout[a.title or a.name] = {c: ["Multiline", t] for c, t in a.charts(optimizee).items()}
    return layout


def write_mean_run(folder: Path, label: str, run_dirs: list[Path], layout: dict) -> None:
    """``<label>/mean``: every scalar averaged over the seeds that logged the step, so that
    each optimizer is one line beside its seeds' (filter TensorBoard's runs by ``mean``)."""
    from torch.utils.tensorboard import SummaryWriter

    records = [read_record(d) for d in run_dirs]
    tags = sorted({t for r in records for t in r.scalars if not t.startswith("hparams/")})
    with SummaryWriter(folder / label / "mean") as writer:
        writer.add_custom_scalars(layout)
        for tag in tags:
            sums: dict[int, list[float]] = {}
            for r in records:
                if tag in r.scalars:
                    for s, v in zip(*r.scalars[tag]):
                        sums.setdefault(int(s), []).append(float(v))
            for s in sorted(sums):
                writer.add_scalar(tag, float(np.mean(sums[s])), s)


def _analysis_entry(a: AnalysisProtocol, optimizee: Optimizee) -> dict[str, Any]:
    fig = a.figure(optimizee)
    return {
        "name": a.name,
        "title": a.title,
        "class_path": f"{type(a).__module__}.{type(a).__qualname__}",
        "every_n_steps": a.every_n_steps,
        "tags": a.scalar_tags(optimizee),
        "columns": [vars(c) for c in a.summary_columns(optimizee)],
        "figure": fig.to_dict() if isinstance(fig, FigureSpec) else None,
    }


def run_info(s: OptimizerSpec, lr: float | None, seed: int, optimizee: Optimizee) -> dict:
    """What identifies a run: its hyperparameters in TensorBoard and its record."""
    return {
        "optimizer": s.label,
        "kind": s.kind,
        "lr": f"{lr:g}" if lr is not None else s.lr_text,
        "seed": seed,
        "checkpoint": s.info.get("checkpoint", ""),
        # the weights, not just the path (l2o.checkpoints.checkpoint_identity)
        "checkpoint_sha256": s.info.get("checkpoint_sha256", ""),
        "optimizee": optimizee.name,
    }


def _population_device(base: dict[str, Any]) -> str:
    """The Trainer's device choice for a population run: CUDA if asked for (or ``auto``) and
    present, else the CPU."""
    cuda = base.get("accelerator") in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "cuda" if cuda else "cpu"


def run_population(
    s: OptimizerSpec,
    opt: Optimizer,
    lr: float | None,
    optimizee: Optimizee,
    dm,
    folder: Path,
    manifest: dict[str, Any],
    layout: dict,
    analyses: list[AnalysisProtocol],
    steps: int,
    seeds: int,
    eval_every: int,
    device: str,
) -> None:
    """Every seed of ``s`` as one population run (``l2o.population.run_seeds``), written as the
    per-seed ``Trainer.test`` runs write them: the same run folders, records, TensorBoard tags,
    manifest entries, divergence messages and mean run."""
    logs = []
    for seed in range(seeds):
        tb = TensorBoardLogger(
            folder, name=s.label, version=f"seed_{seed}", default_hp_metric=False, flush_secs=5
        )
        tb.experiment.add_custom_scalars(layout)
        logs.append([tb, RecordLogger(folder / s.label / f"seed_{seed}")])
    data = MetaTestData.of(dm, steps)
    runs = run_seeds(
        opt, optimizee, data, range(seeds), steps, eval_every, analyses, logs, device,
        progress=f"{s.label} seeds 0-{seeds - 1}",
    )  # fmt: skip
    for seed, (run, loggers) in enumerate(zip(runs, logs)):
        if run.diverged_at is not None:  # MetaTestSystem._diverge's message
            print(f"{s.label} seed {seed}: diverged at step {run.diverged_at} (a non-finite loss "
                  "or update); kept as a result, with loss = inf from this step on")  # fmt: skip
        log_seed_run(run, loggers, opt, run_info(s, lr, seed, optimizee))
        loggers[0].experiment.flush()
        manifest["runs"].append(
            {
                "label": s.label,
                "seed": seed,
                "dir": f"{s.label}/seed_{seed}",
                "status": "complete" if run.diverged_at is None else "diverged",
                "diverged_at": run.diverged_at,
            }
        )
    write_json(folder / MANIFEST, manifest)
    dirs = [folder / s.label / f"seed_{k}" for k in range(seeds)]
    write_mean_run(folder, s.label, dirs, layout)


def run_experiment(
    specs: list[OptimizerSpec],
    optimizee: Optimizee,
    dm,
    out: Path,
    name: str,
    analyses: list[AnalysisProtocol] = (),
    steps: int = 1000,
    seeds: int = 3,
    eval_every: int = 10,
    tune_grid: list[float] = LR_GRID,
    tune_steps: int = 50,
    tune_seeds: int = 3,
    report_steps: list[int] | None = None,
    criterion_steps: int = 100,
    trainer_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
    config_text: str | None = None,
    smoothing: float = 0.0,
    vectorise_seeds: bool = True,
) -> dict[str, Any]:
    """Check, tune, run and summarise (see the module docstring). Returns the summary, also
    written to ``out/name``. ``vectorise_seeds``: each optimizer's seeds as one population run
    (:func:`run_population`), where :func:`vectorisable` allows."""
    out, analyses = Path(out), list(analyses)
    report_steps = default_report_steps(steps) if report_steps is None else list(report_steps)
    tuned = [s for s in specs if s.tunable]
    check_settings(
        steps, seeds, eval_every, list(tune_grid), tune_steps, tune_seeds, report_steps,
        criterion_steps, bool(tuned),
    )  # fmt: skip
    clash = sorted(RESERVED & {s.label for s in specs})
    if clash:
        raise ValueError(f"optimizer label(s) {clash} are reserved folder names; rename them")
    check_folder(out, name, overwrite)
    dm.prepare_data()
    dm.setup("test")
    optimizee.check_input(dm.num_features)
    check_analyses(analyses, MetaTestData.of(dm, steps))
    for s in specs:
        if s.info.get("checkpoint_sha256"):
            print(checkpoint_note(s))
        trained_on = s.info.get("trained_on")
        if trained_on and trained_on != optimizee.name:
            print(f"note: {s.label} was meta-trained on {trained_on}; testing it on "
                  f"{optimizee.name} (generalisation)")  # fmt: skip

    with experiment_folder(out, name, overwrite) as folder:
        if config_text is not None:
            (folder / "config.yaml").write_text(config_text)
        manifest: dict[str, Any] = {
            "format": 1,
            "status": "running",
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "experiment": {
                "optimizee": optimizee.name,
                "steps": steps,
                "seeds": seeds,
                "eval_every": eval_every,
                "data": getattr(dm, "source", ""),
                "tuning": {"grid": list(tune_grid), "steps": tune_steps, "seeds": tune_seeds},
                "criterion_steps": criterion_steps,
                "report_steps": report_steps,
            },
            "optimizers": [
                {
                    "label": s.label,
                    "kind": s.kind,
                    "lr": s.lr,
                    "lr_text": s.lr_text,
                    "info": s.info,
                    "status": "ok",
                }
                for s in specs
            ],
            "analyses": [_analysis_entry(a, optimizee) for a in analyses],
            "core_figure": CORE_FIGURE.to_dict(),
            "runs": [],
        }
        write_json(folder / MANIFEST, manifest)

        # Tuning: every tuned optimizer first, so that a run never waits on a failed tuning.
        rates: dict[str, float | None] = {s.label: s.lr for s in specs}
        for s, entry in zip(specs, manifest["optimizers"]):
            if not s.tunable:
                continue
            t0 = time.time()
            best, scores = tune_lr(s, optimizee, dm, list(tune_grid), tune_steps, tune_seeds)
            rates[s.label] = best
            entry["lr"], entry["tuning"] = best, {f"{k:g}": v for k, v in scores.items()}
            if best is None:
                entry["status"] = "tuning failed: every grid rate diverged"
                print(f"tuning {s.label}: every learning rate of the grid diverged; it is "
                      "recorded as such and not run")  # fmt: skip
            else:
                print(f"tuned {s.label}: lr = {best:g} ({time.time() - t0:.0f} s; criterion: "
                      f"summed train loss of the first {tune_steps} steps)")  # fmt: skip
            write_json(folder / MANIFEST, manifest)

        layout = custom_scalars_layout(optimizee, analyses)
        jobs = [(s, seed) for s in specs if rates[s.label] is not None or not s.tunable
                for seed in range(seeds)]  # fmt: skip
        base = {"accelerator": "auto", "devices": 1, **(trainer_kwargs or {})}
        done: set[str] = set()
        if vectorise_seeds:
            device = _population_device(base)
            for s in [s for s in specs if any(t is s for t, _ in jobs)]:
                opt = s.build(rates[s.label])
                why = vectorisable(opt, optimizee)
                if why is not None:
                    print(f"note: {s.label} runs its seeds one at a time ({why})")
                    continue
                first = next(i for i, (t, _) in enumerate(jobs, 1) if t is s)
                print(f"[{first}-{first + seeds - 1}/{len(jobs)}] {s.label} seeds 0-{seeds - 1}: "
                      f"{steps} steps on {optimizee.name} (one population run)")  # fmt: skip
                run_population(
                    s, opt, rates[s.label], optimizee, dm, folder, manifest, layout, analyses,
                    steps, seeds, eval_every, device,
                )  # fmt: skip
                done.add(s.label)
        for i, (s, seed) in enumerate(jobs, 1):
            if s.label in done:
                continue
            print(f"[{i}/{len(jobs)}] {s.label} seed {seed}: {steps} steps on {optimizee.name}")
            run_dir = folder / s.label / f"seed_{seed}"
            opt = s.build(rates[s.label])
            info = run_info(s, rates[s.label], seed, optimizee)
            tb = TensorBoardLogger(
                folder, name=s.label, version=f"seed_{seed}", default_hp_metric=False,
                flush_secs=5,  # curves appear in a running TensorBoard within seconds
            )  # fmt: skip
            tb.experiment.add_custom_scalars(layout)
            trainer = L.Trainer(
                **base,
                inference_mode=False,
                logger=[tb, RecordLogger(run_dir)],
                callbacks=[copy.deepcopy(a) for a in analyses],
                enable_checkpointing=False,
                enable_model_summary=False,
            )
            module = MetaTestSystem(opt, optimizee, seed, eval_every, steps, run_info=info)
            trainer.test(module, datamodule=MetaTestData.of(dm, steps, seed), verbose=False)
            tb.experiment.flush()
            status = "complete" if module.diverged_at is None else "diverged"
            manifest["runs"].append(
                {
                    "label": s.label,
                    "seed": seed,
                    "dir": f"{s.label}/seed_{seed}",
                    "status": status,
                    "diverged_at": module.diverged_at,
                }
            )
            write_json(folder / MANIFEST, manifest)
            if seed == seeds - 1:
                dirs = [folder / s.label / f"seed_{k}" for k in range(seeds)]
                write_mean_run(folder, s.label, dirs, layout)

        summary = build_report(folder, smoothing)
        manifest["status"] = "complete"
        manifest["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        write_json(folder / MANIFEST, manifest)  # last: the experiment is complete
    print(
        f"\nResults: {folder}/ (summary.md, summary.json, summary.csv, figures/, config.yaml)\n"
        f"Next: tensorboard --logdir {folder}    or re-plot: python -m l2o.report {folder}"
    )
    return summary
