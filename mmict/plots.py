"""PNG plots a person reads after a run: the loss curve and score vs shots."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402


def read_metric(metrics_csv: str | Path, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric from Lightning's CSVLogger file, in step order.

    A resumed run keeps the interrupted run's file as ``metrics.part-<n>.csv`` next to it (Lightning's CSV
    logger would delete it) and logs again the steps the interrupted run had logged after its last
    checkpoint: all parts are read in order, and the later value of a step (the one that counted) wins.
    """
    metrics_csv = Path(metrics_csv)
    parts = sorted(metrics_csv.parent.glob("metrics.part-*.csv"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    points: dict[int, float] = {}
    for path in [*parts, metrics_csv]:
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get(key) not in (None, ""):
                    points[int(row["step"])] = float(row[key])
    return sorted(points.items())


def keep_metrics_of_interrupted_run(log_dir: str | Path) -> Path | None:
    """Move ``metrics.csv`` aside as the next ``metrics.part-<n>.csv`` before a resumed run logs (Lightning's CSV
    logger deletes an existing file); `read_metric` reads the parts back in order."""
    current = Path(log_dir) / "metrics.csv"
    if not current.is_file():
        return None
    n = len(list(current.parent.glob("metrics.part-*.csv")))
    target = current.with_name(f"metrics.part-{n}.csv")
    current.rename(target)
    return target


def plot_losses(metrics_csv: str | Path, out_png: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("train/loss", "val/loss"):
        points = read_metric(metrics_csv, key)
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if key.startswith("val") else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (query target)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)


MARKERS = ("o", "s", "^", "D", "v")
DASHES = ("-", "--", ":", "-.")


def plot_score_vs_shots(rows: Sequence[dict], out_png: str | Path, metric: str = "accuracy",
                        chance: float | None = None, title: str | None = None) -> Path:
    """One line per method, each starting from the zero-shot point; mean +- spread over seeds; chance dashed.
    Rows without a score (over the LM's context) are not drawn; the legend names the shot counts they miss."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    missing: dict[str, list[int]] = {}
    for r in rows:
        if r.get("accuracy_mean") is None:
            missing.setdefault(r["method"], []).append(r["shots"])
    rows = [{**r, "accuracy_std": 0.0 if math.isnan(r["accuracy_std"]) else r["accuracy_std"]}
            for r in rows if r.get("accuracy_mean") is not None]
    zero = [r for r in rows if r["shots"] == 0]
    methods = sorted({r["method"] for r in rows if r["shots"] > 0} | {m for m, ks in missing.items() if max(ks) > 0})
    for i, method in enumerate(methods):
        pts = sorted((r["shots"], 100 * r["accuracy_mean"], 100 * r["accuracy_std"]) for r in rows
                     if r["method"] == method)
        pts = [(0, 100 * zero[0]["accuracy_mean"], 100 * zero[0]["accuracy_std"])] + pts if zero else pts
        label = method + (f" (over context at {sorted(missing[method])} shots)" if method in missing else "")
        if not pts:
            ax.plot([], [], marker=MARKERS[i % len(MARKERS)], linestyle="none", label=label)
            continue
        xs, ys, es = zip(*pts)
        # Its own marker and dash per method, so methods with equal scores stay visible on top of each other.
        ax.errorbar(xs, ys, yerr=es, marker=MARKERS[i % len(MARKERS)], linestyle=DASHES[i % len(DASHES)],
                    markersize=max(9 - 1.5 * i, 3), capsize=3, label=label)
    if zero and not methods:  # only zero-shot was evaluated: one point
        ax.errorbar([0], [100 * zero[0]["accuracy_mean"]], yerr=[100 * zero[0]["accuracy_std"]], marker="o",
                    capsize=3, label=zero[0]["method"])
    if chance is not None:
        ax.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label="chance")
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_xlabel("shots")
    ax.set_ylabel(f"{metric} (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)


def plot_cost_vs_shots(rows: Sequence[dict], out_png: str | Path, title: str | None = None) -> Path:
    """What a method pays per query: context tokens and peak accelerator memory against shots."""
    fig, (ax_ctx, ax_mem) = plt.subplots(1, 2, figsize=(9, 3.5))
    methods = sorted({r["method"] for r in rows})
    for method in methods:
        pts = sorted((r["shots"], r["context_tokens"], r.get("peak_memory_mb")) for r in rows
                     if r["method"] == method and r.get("context_tokens") is not None)  # None: not run
        xs = [p[0] for p in pts]
        ax_ctx.plot(xs, [p[1] for p in pts], marker="o", label=method)
        mem = [(x, m) for x, _, m in pts if m is not None]
        if mem:
            ax_mem.plot(*zip(*mem), marker="o", label=method)
    ax_ctx.set_xlabel("shots")
    ax_ctx.set_ylabel("context tokens / query")
    ax_ctx.legend(fontsize=8)
    ax_ctx.grid(alpha=0.3)
    ax_mem.set_xlabel("shots")
    ax_mem.set_ylabel("peak GPU memory (MiB)")
    if not any(r.get("peak_memory_mb") is not None for r in rows):
        ax_mem.text(0.5, 0.5, "not measured\n(evaluated on CPU)", ha="center", va="center", transform=ax_mem.transAxes)
    else:
        ax_mem.legend(fontsize=8)
    ax_mem.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
