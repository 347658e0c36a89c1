"""Summary tables and figures of a meta-testing experiment (mean +- std over seeds)."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

History = dict[str, list[tuple[int, float]]]
KEY_ANALYSES = tuple(
    f"{tag}@mean"
    for tag in (
        "symmetry/update/rescale/abs_sum",
        "symmetry/update/scale/abs_sum",
        "symmetry/update/translation/abs_sum",
        "tail_index/grad/pooled",
        "tail_index/update/pooled",
        "tail_index/grad/robust",
        "tail_index/update/robust",
        "covariance/update/top_eig",
    )
)
MAIN = ("lr", "final_train_loss", "summed_train_loss", "mean_train_loss_first", "final_test_acc")


def _value_at(series: list[tuple[int, float]], step: int) -> float:
    """The last value logged at or before ``step`` (analyses log every n steps)."""
    best = math.nan
    for s, v in series:
        if s > step:
            break
        best = v
    return best


def _stats(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    ok = arr[np.isfinite(arr)]
    return {
        "mean": float(ok.mean()) if len(ok) else math.nan,
        "std": float(ok.std()) if len(ok) > 1 else 0.0,
        "values": [float(v) for v in arr],
    }


def summarize_runs(
    entries,
    histories: dict[str, list[History]],
    report_steps,
    criterion_steps,
    tuning: dict[str, dict[float, float]],
) -> dict[str, Any]:
    summary: dict[str, Any] = {"optimizers": {}}
    for entry in entries:
        runs = histories.get(entry.label, [])
        per: dict[str, list[float]] = defaultdict(list)
        for h in runs:
            train = [v for _, v in h.get("meta_test/train_loss", [])]
            per["final_train_loss"].append(train[-1] if train else math.nan)
            per["summed_train_loss"].append(float(np.sum(train)))
            per["mean_train_loss_first"].append(float(np.mean(train[:criterion_steps])))
            acc = h.get("meta_test/test_acc", [])
            per["final_test_acc"].append(acc[-1][1] if acc else math.nan)
            for tag, series in h.items():
                if tag.startswith("meta_test/"):
                    continue
                per[f"{tag}@mean"].append(float(np.nanmean([v for _, v in series])))
                for s in report_steps:
                    if series and s <= series[-1][0] and s >= series[0][0]:
                        per[f"{tag}@{s}"].append(_value_at(series, s))
        row = {k: _stats(v) for k, v in per.items()}
        row["lr"] = entry.lr
        row["kind"] = entry.kind
        if entry.checkpoint:
            row["checkpoint"] = entry.checkpoint
            row["trained_on"] = entry.trained_on
        if entry.label in tuning:
            row["lr_grid_scores"] = {f"{k:g}": v for k, v in tuning[entry.label].items()}
        summary["optimizers"][entry.label] = row
    summary["criterion_steps"] = criterion_steps
    return summary


def _fmt(stat: dict[str, Any] | float | None) -> str:
    if stat is None:
        return "-"
    if isinstance(stat, dict):
        m, s = stat["mean"], stat["std"]
        return f"{m:.4g} ± {s:.2g}" if math.isfinite(m) else "nan"
    return f"{stat:g}"


def markdown(summary: dict[str, Any]) -> str:
    k = summary.get("criterion_steps", 100)
    head = [
        "optimizer",
        "lr",
        "final train loss",
        "summed train loss",
        f"mean train loss, first {k}",
        "final test acc",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in summary["optimizers"].items():
        lr = "learned" if row["kind"] == "l2o" else _fmt(row["lr"])
        cells = [label, lr] + [_fmt(row.get(key)) for key in MAIN[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    # The analyses' headline figures (every value is in summary.csv / summary.json).
    analysis = [
        key for key in KEY_ANALYSES if any(key in row for row in summary["optimizers"].values())
    ]
    if analysis:
        names = [
            a.replace("@mean", "")
            .replace("symmetry/", "")
            .replace("tail_index/", "α ")
            .replace("covariance/", "")
            for a in analysis
        ]
        lines += [
            "",
            "Run means (mean ± std over seeds):",
            "",
            "| optimizer | " + " | ".join(names) + " |",
            "|" + "---|" * (len(analysis) + 1),
        ]
        for label, row in summary["optimizers"].items():
            lines.append(
                "| " + label + " | " + " | ".join(_fmt(row.get(a)) for a in analysis) + " |"
            )
    return "\n".join(lines)


def write_summary(summary: dict[str, Any], out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "metric", "mean", "std", "values"])
        for label, row in summary["optimizers"].items():
            w.writerow([label, "lr", row["lr"], "", ""])
            for key, stat in row.items():
                if isinstance(stat, dict) and "mean" in stat:
                    w.writerow(
                        [
                            label,
                            key,
                            stat["mean"],
                            stat["std"],
                            " ".join(f"{v:.6g}" for v in stat["values"]),
                        ]
                    )
    table = markdown(summary)
    (out / "summary.md").write_text(table + "\n")
    print(table)


# ----------------------------------------------------------------------------- figures
def _curves(runs: list[History], tag: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    series = [dict(h[tag]) for h in runs if tag in h]
    if not series:
        return None
    steps = sorted(set.intersection(*(set(s) for s in series)))
    vals = np.array([[s[t] for t in steps] for s in series], dtype=float)
    return np.array(steps), np.nanmean(vals, 0), np.nanstd(vals, 0)


def _panel(ax, histories, tag, title, log=False):
    drawn = False
    for label, runs in histories.items():
        c = _curves(runs, tag)
        if c is None:
            continue
        steps, mean, std = c
        ax.plot(steps, mean, label=label, lw=1.2)
        low = mean - std
        if log:  # a band below zero has no place on a log axis
            low = np.where(low > 0, low, np.nan)
        ax.fill_between(steps, low, mean + std, alpha=0.2)
        drawn = True
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("optimizee step")
    if tag.startswith("tail_index/"):
        # alpha-stable tails have 0 < alpha <= 2; the estimator leaves that range (even < 0)
        # on noise that is not alpha-stable-like, e.g. Lion's few discrete update values.
        ax.set_ylim(0, 2.5)
    if log and drawn:
        ax.set_yscale("symlog" if "signed" in tag else "log")
    return drawn


def _figure(histories, panels, path: Path, ncols=2) -> None:
    tags = sorted({t for runs in histories.values() for h in runs for t in h})
    panels = [(t, title, log) for t, title, log in panels if t in tags]
    if not panels:
        return
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (tag, title, log) in zip(axes.flat, panels):
        _panel(ax, histories, tag, title, log)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def make_figures(
    histories: dict[str, list[History]], samples: dict[str, list[dict]], out: Path
) -> None:
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    _figure(
        histories,
        [
            ("meta_test/train_loss", "training loss", True),
            ("meta_test/test_acc", "test accuracy", False),
        ],
        fig_dir / "loss.png",
    )
    tags = sorted({t for runs in histories.values() for h in runs for t in h})
    sym = [
        (t, t.removeprefix("symmetry/"), True)
        for t in tags
        if t.startswith("symmetry/")
        and (t.endswith("abs_sum") or t.startswith("symmetry/update/") and t.endswith("normalized"))
    ]
    _figure(histories, sym, fig_dir / "symmetry.png")
    alpha = [
        (t, "α " + t.removeprefix("tail_index/"), False)
        for t in tags
        if t.startswith("tail_index/") and not t.endswith("zero_fraction")
    ]
    _figure(histories, alpha, fig_dir / "tail_index.png")
    cov = [(t, t.removeprefix("covariance/"), True) for t in tags if t.startswith("covariance/")]
    _figure(histories, cov, fig_dir / "covariance.png")
    _histograms(samples, fig_dir / "update_histograms.png")


def _histograms(samples: dict[str, list[dict]], path: Path) -> None:
    """|update| distributions per optimizer at the logged steps (the study's Fig. 9)."""
    if not samples:
        return
    steps = sorted({s for runs in samples.values() for r in runs for s in r})
    if not steps:
        return
    picks = (
        steps
        if len(steps) <= 4
        else [steps[0], steps[len(steps) // 3], steps[2 * len(steps) // 3], steps[-1]]
    )
    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 3.2), squeeze=False)
    for ax, step in zip(axes[0], picks):
        per = {}
        for label, runs in samples.items():
            vals = np.concatenate(
                [np.asarray(r[step]).ravel() for r in runs if step in r] or [np.zeros(0)]
            )
            per[label] = vals[vals > 0]
        every = np.concatenate(list(per.values()) or [np.zeros(0)])
        if not len(every):
            continue
        # Common log bins from the 1st percentile up: momentum leaves astronomically small
        # values on coordinates whose gradient is always 0 (MNIST's black pixels).
        bins = np.logspace(np.log10(np.percentile(every, 1)), np.log10(every.max()), 50)
        for label, vals in per.items():
            if len(vals):  # fraction of coordinates per bin, comparable across optimizers
                ax.hist(
                    vals,
                    bins=bins,
                    weights=np.full(len(vals), 1 / len(vals)),
                    histtype="step",
                    label=label,
                )
        ax.set_xscale("log")
        ax.set_ylabel("fraction of coordinates", fontsize=8)
        ax.set_title(f"|update| at step {step}", fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- re-plotting
def save_samples(samples: dict[str, list[dict]], out: Path) -> None:
    """|update| samples of the histogram callback, for re-plotting without re-running."""
    arrays = {
        f"{label}|{seed}|{step}": np.asarray(v)
        for label, runs in samples.items()
        for seed, run in enumerate(runs)
        for step, v in run.items()
    }
    np.savez_compressed(out / "update_samples.npz", **arrays)


def load_experiment(out: Path) -> tuple[dict[str, list[History]], dict[str, list[dict]]]:
    """Histories from the experiment's TensorBoard event files (the same data the module
    logged) and the saved |update| samples."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    histories: dict[str, list[History]] = {}
    for run in sorted(out.glob("*/seed_*")):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        histories.setdefault(run.parent.name, []).append(
            {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
        )
    samples: dict[str, list[dict]] = {}
    path = out / "update_samples.npz"
    if path.exists():
        runs: dict[tuple[str, int], dict] = {}
        with np.load(path) as npz:
            for key in npz.files:
                label, seed, step = key.split("|")
                runs.setdefault((label, int(seed)), {})[int(step)] = npz[key]
        for (label, _), run in sorted(runs.items()):
            samples.setdefault(label, []).append(run)
    return histories, samples


if __name__ == "__main__":  # python -m l2o.report runs/eval/<name>: re-make the figures
    import sys

    folder = Path(sys.argv[1])
    make_figures(*load_experiment(folder), folder)
    print(f"figures written to {folder / 'figures'}")
