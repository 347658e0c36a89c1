"""Summary tables and figures of a meta-test experiment, from its one store.

    python -m l2o.report runs/eval/leaky_relu                   # re-make summary and figures
    python -m l2o.report runs/eval/leaky_relu --smoothing 0.8   # smoothed training loss

The store is the experiment folder's ``manifest.json`` (written by ``l2o.evaluation``: which
optimizers and runs belong to the experiment, the analyses' columns and figure specs) and each
listed run's ``record.npz`` (``l2o.records``). ``evaluate.py`` ends by calling
:func:`build_report` on the same folder, so a re-plot gives the same files. Folders that the
manifest does not list (another experiment's leftovers) are never read.

Numbers: per run, the final, summed and first-``criterion_steps`` mean training loss, the final
test accuracy, and for every analysis tag its run mean (``tag@mean``) and its value at each of
``report_steps`` (``tag@<step>``: the last value logged at or before it); then mean and std
(over seeds, ``ddof=0``) of each. A diverged run's loss is inf from its divergence step on, so
the loss statistics of an optimizer with a diverged seed are inf, and the run is listed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from l2o.analysis import FigureSpec, Panel
from l2o.meta_testing import DIVERGED_TAG
from l2o.records import Record, read_record

MANIFEST = "manifest.json"
MAIN = ("final_train_loss", "summed_train_loss", "mean_train_loss_first", "final_test_acc")
CORE_FIGURE = FigureSpec(
    "loss",
    "Meta-test: training loss and held-out test split",
    (
        Panel(
            "meta_test/train_loss",
            "Training loss (minibatch)",
            "cross-entropy (nats)",
            yscale="log",
            smooth=True,
        ),
        Panel("meta_test/test_acc", "Test accuracy", "accuracy (fraction correct)"),
        Panel("meta_test/test_loss", "Test loss", "cross-entropy (nats)", yscale="log"),
    ),
    ncols=3,
)


class ExperimentError(RuntimeError):
    """The folder is not a readable evaluate.py experiment."""


@dataclass
class Run:
    label: str
    seed: int
    record: Record

    @property
    def diverged_at(self) -> int | None:
        series = self.record.series(DIVERGED_TAG)
        return None if series is None else int(series[1][0])


# ----------------------------------------------------------------------------- the store
def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None: strict JSON (no NaN, Infinity)."""
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (``allow_nan=False``, non-finite -> null), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(finite_or_none(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_manifest(exp_dir: Path) -> dict[str, Any]:
    path = Path(exp_dir) / MANIFEST
    if not path.is_file():
        raise ExperimentError(
            f"{exp_dir} has no {MANIFEST}: not an evaluate.py experiment folder (give the "
            "folder evaluate.py printed, e.g. runs/eval/<name>)"
        )
    return json.loads(path.read_text())


def load_runs(exp_dir: Path, manifest: dict[str, Any]) -> dict[str, list[Run]]:
    """The finished runs the manifest lists, by optimizer label, in seed order."""
    runs: dict[str, list[Run]] = {}
    for entry in manifest.get("runs", []):
        if entry.get("status") not in ("complete", "diverged"):
            continue
        record = read_record(Path(exp_dir) / entry["dir"])
        runs.setdefault(entry["label"], []).append(Run(entry["label"], entry["seed"], record))
    return runs


# ----------------------------------------------------------------------------- summary
def _value_at(steps: np.ndarray, values: np.ndarray, step: int) -> float:
    """The last value logged at or before ``step`` (analyses log every n steps)."""
    i = int(np.searchsorted(steps, step, side="right")) - 1
    return float(values[i]) if i >= 0 else math.nan


def _stats(values: list[float]) -> dict[str, Any]:
    """Mean and std over seeds. A +inf (a diverged run's loss) makes the mean inf; NaNs (an
    estimate that could not be made) are left out."""
    arr = np.asarray(values, dtype=float)
    if np.isposinf(arr).any():
        return {"mean": math.inf, "std": math.nan, "values": [float(v) for v in arr]}
    ok = arr[np.isfinite(arr)]
    return {
        "mean": float(ok.mean()) if len(ok) else math.nan,
        "std": float(ok.std()) if len(ok) > 1 else 0.0,
        "values": [float(v) for v in arr],
    }


def _run_numbers(run: Run, exp: dict[str, Any], tags: list[str]) -> dict[str, float]:
    steps_total, k = exp["steps"], exp["criterion_steps"]
    series = run.record.series("meta_test/train_loss")
    train = series[1] if series is not None else np.zeros(0)
    if run.diverged_at is not None:  # a diverged run's loss is inf from that step on
        train = np.concatenate([train, np.full(steps_total - len(train), math.inf)])
    acc = run.record.series("meta_test/test_acc")
    out = {
        "final_train_loss": float(train[-1]) if len(train) else math.nan,
        "summed_train_loss": float(np.sum(train)),
        "mean_train_loss_first": float(np.mean(train[:k])),
        "final_test_acc": (
            float(acc[1][-1]) if acc is not None and run.diverged_at is None else math.nan
        ),
    }
    for tag in tags:
        s = run.record.series(tag)
        if s is None or not len(s[0]):
            continue
        steps, values = s
        with warnings.catch_warnings():  # an all-NaN series has a NaN mean
            warnings.simplefilter("ignore", RuntimeWarning)
            out[f"{tag}@mean"] = float(np.nanmean(values))
        for step in exp["report_steps"]:
            if steps[0] <= step <= steps[-1]:
                out[f"{tag}@{step}"] = _value_at(steps, values, step)
    return out


def summarize(manifest: dict[str, Any], runs: dict[str, list[Run]]) -> dict[str, Any]:
    """The summary (``summary.json``) from the manifest and the runs' records."""
    exp = manifest["experiment"]
    tags = [t for a in manifest["analyses"] for t in a["tags"]]
    summary: dict[str, Any] = {"optimizers": {}}
    for opt in manifest["optimizers"]:
        per: dict[str, list[float]] = {}
        diverged = []
        for run in runs.get(opt["label"], []):
            for key, value in _run_numbers(run, exp, tags).items():
                per.setdefault(key, []).append(value)
            if run.diverged_at is not None:
                diverged.append({"seed": run.seed, "step": run.diverged_at})
        row: dict[str, Any] = {k: _stats(v) for k, v in per.items()}
        row["lr"] = opt["lr"]
        row["lr_text"] = opt["lr_text"]
        row["kind"] = opt["kind"]
        row.update(opt.get("info", {}))
        row["diverged"] = diverged
        if opt.get("tuning"):
            row["lr_grid_scores"] = opt["tuning"]
        if opt.get("status", "ok") != "ok":
            row["status"] = opt["status"]
        summary["optimizers"][opt["label"]] = row
    summary["criterion_steps"] = exp["criterion_steps"]
    summary["experiment"] = exp
    summary["columns"] = [c for a in manifest["analyses"] for c in a["columns"]]
    return summary


def _fmt(stat: dict[str, Any] | float | None) -> str:
    if stat is None:
        return "-"
    if isinstance(stat, dict):
        m, s = stat["mean"], stat["std"]
        if m is None or not math.isfinite(m):
            return "nan" if m is None or math.isnan(m) else "inf"
        return f"{m:.4g} ± {s:.2g}"
    return f"{stat:g}"


def _diverged_text(row: dict[str, Any]) -> str:
    runs = row.get("diverged") or []
    n = len(row.get("final_train_loss", {}).get("values", []))
    if not runs:
        return "-"
    at = ", ".join(f"seed {d['seed']} at step {d['step']}" for d in runs)
    return f"{len(runs)}/{n} ({at})"


def markdown(summary: dict[str, Any]) -> str:
    k = summary.get("criterion_steps", 100)
    rows = summary["optimizers"]
    any_diverged = any(r.get("diverged") for r in rows.values())
    head = ["optimizer", "lr", "final train loss", "summed train loss"]
    head += [f"mean train loss, first {k}", "final test acc"]
    head += ["diverged"] if any_diverged else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in rows.items():
        lr = _fmt(row["lr"]) if row["lr"] is not None else row.get("lr_text", "-")
        if "status" in row:
            cells = [label, row["status"]] + ["-"] * (len(head) - 2)
        else:
            cells = [label, lr] + [_fmt(row.get(key)) for key in MAIN]
            cells += [_diverged_text(row)] if any_diverged else []
        lines.append("| " + " | ".join(cells) + " |")
    # The analyses' headline columns (every value is in summary.csv / summary.json).
    columns = [
        c for c in summary.get("columns", []) if any(f"{c['tag']}@mean" in r for r in rows.values())
    ]
    if columns:
        lines += [
            "",
            "Run means (mean ± std over seeds):",
            "",
            "| optimizer | " + " | ".join(c["header"] for c in columns) + " |",
            "|" + "---|" * (len(columns) + 1),
        ]
        for label, row in rows.items():
            cells = [_fmt(row.get(f"{c['tag']}@mean")) for c in columns]
            lines.append("| " + label + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(summary: dict[str, Any], out: Path) -> str:
    """``summary.json`` (strict JSON: non-finite numbers are null, a diverged run is listed
    under ``diverged``), ``summary.csv`` (``inf``/``nan`` spelled out), ``summary.md``."""
    write_json(out / "summary.json", summary)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "metric", "mean", "std", "values"])
        for label, row in summary["optimizers"].items():
            w.writerow(
                [label, "lr", row["lr"] if row["lr"] is not None else row["lr_text"], "", ""]
            )
            if row.get("diverged"):
                w.writerow([label, "diverged", _diverged_text(row), "", ""])
            for key, stat in row.items():
                if isinstance(stat, dict) and "mean" in stat:
                    values = " ".join(f"{v:.6g}" for v in stat["values"])
                    w.writerow([label, key, stat["mean"], stat["std"], values])
    table = markdown(summary)
    (out / "summary.md").write_text(table + "\n")
    return table


# ----------------------------------------------------------------------------- figures
def _ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: a debiased exponential moving average."""
    out, last = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        last = last * weight + (1 - weight) * v
        out[i] = last / (1 - weight ** (i + 1))
    return out


def _mean_curve(runs: list[Run], tag: str, smoothing: float = 0.0):
    """(steps, mean, std) over the seeds that logged each step (all of them, unless a seed
    diverged), or None."""
    series = [r.record.series(tag) for r in runs]
    series = [s for s in series if s is not None and len(s[0])]
    if not series:
        return None
    steps = np.unique(np.concatenate([s[0] for s in series]))
    grid = np.full((len(series), len(steps)), np.nan)
    for i, (st, vals) in enumerate(series):
        vals = _ema(vals, smoothing) if smoothing else vals
        grid[i, np.searchsorted(steps, st)] = vals
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return steps, np.nanmean(grid, 0), np.nanstd(grid, 0)


def _colors(labels: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _line_panel(ax, panel: Panel, runs: dict[str, list[Run]], colors, smoothing: float) -> bool:
    drawn = False
    for label, rs in runs.items():
        smooth = smoothing if panel.smooth else 0.0
        curve = _mean_curve(rs, panel.tag, smooth)
        if curve is None:
            continue
        steps, mean, std = curve
        if smooth:  # the raw curve stays visible behind the smoothed one
            raw = _mean_curve(rs, panel.tag)
            ax.plot(raw[0], raw[1], color=colors[label], lw=0.8, alpha=0.25)
        ax.plot(steps, mean, color=colors[label], lw=1.3, label=label)
        low = mean - std
        if panel.yscale == "log":  # a band below zero has no place on a log axis
            low = np.where(low > 0, low, np.nan)
        ax.fill_between(steps, low, mean + std, color=colors[label], alpha=0.18, lw=0)
        for r in rs:
            if r.diverged_at is not None:
                ax.axvline(r.diverged_at, color=colors[label], ls=":", lw=1)
        drawn = True
    if drawn and panel.yscale != "linear":
        ax.set_yscale(panel.yscale)
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    return drawn


def _distribution_panels(fig, panel: Panel, runs: dict[str, list[Run]], colors) -> bool:
    """Histograms of the recorded samples of ``panel.tag`` at up to four logged steps, on bins
    common to all optimizers, as fractions of each optimizer's coordinates."""
    steps = sorted(
        {s for rs in runs.values() for r in rs for s in r.record.arrays.get(panel.tag, {})}
    )
    if not steps:
        return False
    picks = (
        steps
        if len(steps) <= 4
        else [steps[0], steps[len(steps) // 3], steps[2 * len(steps) // 3], steps[-1]]
    )
    axes = fig.subplots(1, len(picks), squeeze=False)[0]
    for ax, step in zip(axes, picks):
        per = {
            label: np.concatenate(
                [
                    np.ravel(r.record.arrays[panel.tag][step])
                    for r in rs
                    if step in r.record.arrays.get(panel.tag, {})
                ]
                or [np.zeros(0)]
            )
            for label, rs in runs.items()
        }
        every = np.concatenate(list(per.values()))
        every = every[np.isfinite(every)]
        if not len(every):
            continue
        # From the 1st percentile up: momentum leaves astronomically small values on
        # coordinates whose gradient is always 0 (MNIST's black pixels).
        lo, hi = np.percentile(every, 1), every.max()
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 50)
        for label, vals in per.items():
            if len(vals):
                ax.hist(
                    vals,
                    bins=bins,
                    weights=np.full(len(vals), 1 / len(vals)),
                    histtype="step",
                    color=colors[label],
                    label=label,
                )
        ax.set_title(f"{panel.title} at step {step}", fontsize=9)
        ax.set_xlabel(panel.xlabel, fontsize=8)
        ax.set_ylabel(panel.ylabel, fontsize=8)
    return True


def _legend(fig, runs: dict[str, list[Run]], colors) -> None:
    from matplotlib.lines import Line2D

    handles, labels = [], []
    for label, rs in runs.items():
        div = [r for r in rs if r.diverged_at is not None]
        note = f" ({len(div)}/{len(rs)} seeds diverged: dotted line)" if div else ""
        handles.append(Line2D([], [], color=colors[label], lw=2))
        labels.append(f"{label}{note}")
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=8)


def draw_figure(
    spec: FigureSpec, runs: dict[str, list[Run]], colors, folder: Path, smoothing: float = 0.0
) -> list[Path]:
    """``folder/<spec.file>.png`` and ``.pdf``; panels with no data are left out, sanity
    panels come last. Returns the files written (none if nothing had data)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = sorted(spec.panels, key=lambda p: p.sanity)  # stable: main panels first
    lines = [p for p in panels if p.kind == "line"]
    present = {t for rs in runs.values() for r in rs for t in r.record.scalars}
    lines = [p for p in lines if p.tag in present]
    dists = [p for p in panels if p.kind == "distribution"]
    if not lines and not dists:
        return []
    if lines:
        ncols = min(spec.ncols, len(lines))
        nrows = math.ceil(len(lines) / ncols)
        fig = Figure(figsize=(4.6 * ncols, 3.3 * nrows + 0.6), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False).flat
        for ax, panel in zip(axes, lines):
            _line_panel(ax, panel, runs, colors, smoothing)
            title = panel.title + (
                f" (smoothed {smoothing:g})" if panel.smooth and smoothing else ""
            )
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(panel.xlabel, fontsize=8)
            ax.set_ylabel(panel.ylabel, fontsize=8)
            ax.tick_params(which="both", labelsize=7)
        for ax in list(axes)[len(lines) :]:
            ax.axis("off")
    else:
        fig = Figure(figsize=(4.2 * 4, 3.6), layout="constrained")
        FigureCanvasAgg(fig)
        for panel in dists[:1]:  # one distribution panel per figure
            if not _distribution_panels(fig, panel, runs, colors):
                return []
    fig.suptitle(spec.title, fontsize=11)
    _legend(fig, runs, colors)
    out = []
    for ext in ("png", "pdf"):
        path = folder / f"{spec.file}.{ext}"
        fig.savefig(path, dpi=150)
        out.append(path)
    return out


def make_figures(
    manifest: dict[str, Any], runs: dict[str, list[Run]], out: Path, smoothing: float = 0.0
) -> list[Path]:
    folder = Path(out) / "figures"
    folder.mkdir(exist_ok=True)
    colors = _colors([o["label"] for o in manifest["optimizers"]])
    runs = {o["label"]: runs[o["label"]] for o in manifest["optimizers"] if o["label"] in runs}
    specs = [CORE_FIGURE] + [
        FigureSpec.from_dict(a["figure"]) for a in manifest["analyses"] if a.get("figure")
    ]
    written = []
    for spec in specs:
        written += draw_figure(spec, runs, colors, folder, smoothing)
    return written


# ----------------------------------------------------------------------------- entry points
def build_report(exp_dir: str | Path, smoothing: float = 0.0, echo: bool = True) -> dict[str, Any]:
    """Summary files and figures of the experiment in ``exp_dir``, from its manifest and the
    records of the runs it lists. Returns the summary."""
    exp_dir = Path(exp_dir)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    manifest = read_manifest(exp_dir)
    runs = load_runs(exp_dir, manifest)
    summary = summarize(manifest, runs)
    table = write_summary(summary, exp_dir)
    make_figures(manifest, runs, exp_dir, smoothing)
    if echo:
        print(table)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m l2o.report",
        description="Re-make summary.{md,csv,json} and figures/ of an evaluate.py experiment "
        "from its manifest and run records.",
    )
    parser.add_argument("folder", help="the experiment folder, e.g. runs/eval/leaky_relu")
    parser.add_argument(
        "--smoothing",
        type=float,
        default=0.0,
        help="EMA weight in [0, 1) for the training-loss panel (TensorBoard's smoothing)",
    )
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    try:
        if not folder.is_dir():
            raise ExperimentError(f"{folder} is not a folder")
        manifest = read_manifest(folder)
        if manifest.get("status") != "complete":
            print(
                f"note: {folder} is {manifest.get('status', 'incomplete')!r}: reporting the "
                "runs that finished",
                file=sys.stderr,
            )
        build_report(folder, args.smoothing)
    except (ExperimentError, ValueError) as err:
        parser.error(str(err))
    print(f"summary and figures written to {folder} ({folder / 'figures'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
