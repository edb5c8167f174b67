"""`mmict compare RUN_DIR...`: the runs' comparison table, offline, from their folders.

The same numbers the W&B dashboard groups (method, backbone, shots, losses, eval score per shot count, and what
each evaluated method costs per query: context tokens and milliseconds, per shot count),
read from what every run writes: `config.yaml`, `logs/metrics.csv`, `eval/results.json` and `runtime.json`.
A folder that is not a run itself (a sweep folder, `runs/<exp>/`) stands for every run below it. Config keys
that differ between the runs (the grid axes of a sweep) get their own columns.

    mmict compare runs/sweeps/aim_okvqa/20250101-120000          # every run of a sweep
    mmict compare runs/toy_aim/2025* runs/toy_mmict_fused/2025*  # any runs
    mmict compare RUN... --format csv > table.csv                # md (default) | csv | json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

# Config keys never shown as "varying": where and how a run was launched, not what it trained.
IGNORED_PREFIXES = ("run_dir", "run_root", "logger.", "slurm.", "trainer.devices", "trainer.num_nodes",
                    "trainer.progress_bar", "eval.rices.", "eval.bank.dir", "data.num_workers")
MAX_VARYING = 8  # more differing keys than this (runs of different experiments): the rest are listed below the table
SHOWN_KEYS = ("name", "method.name", "backbone.family", "backbone.name_or_path", "data.shots", "data.min_shots",
              "data.max_shots", "seed")


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders (holding config.yaml) at or below each path, in the given order, without duplicates."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such run folder")
        if (path / "config.yaml").is_file():
            runs = [path]
        else:
            runs = sorted(p.parent for p in path.rglob("config.yaml") if "wandb" not in p.parts)
            if not runs:
                raise FileNotFoundError(f"{path}: no run folder (with a config.yaml) in it")
        found += [r for r in runs if r not in found]
    return found


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _last(metrics_csv: Path, key: str) -> tuple[int, float] | None:
    if not metrics_csv.is_file():
        return None
    last = None
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get(key) not in (None, ""):
                last = (int(row["step"]), float(row[key]))
    return last


def _results(run_dir: Path) -> dict[str, Any] | None:
    """The newest eval/results*.json (a re-evaluation writes results-1.json next to the first)."""
    files = sorted((run_dir / "eval").glob("results*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def load_run(run_dir: Path) -> dict[str, Any]:
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    runtime_path = run_dir / "runtime.json"
    runtime = json.loads(runtime_path.read_text()) if runtime_path.is_file() else {}
    results = _results(run_dir)
    metrics = run_dir / "logs" / "metrics.csv"
    commit = (runtime.get("versions") or {}).get("mmict_commit") or ((results or {}).get("versions") or {}).get(
        "mmict_commit")
    return {"run_dir": run_dir, "config": config, "flat": _flatten(config), "results": results,
            "train_loss": _last(metrics, "train/loss"), "val_loss": _last(metrics, "val/loss"),
            "commit": commit, "precision": (runtime.get("precision") or {}).get("precision")}


def _shots(flat: Mapping[str, Any]) -> str:
    if flat.get("data.shots") is not None:
        return str(flat["data.shots"])
    if flat.get("data.shot_schedule"):
        return "schedule"
    lo, hi = flat.get("data.min_shots"), flat.get("data.max_shots")
    return "-" if lo is None else (str(lo) if lo == hi else f"{lo}-{hi}")


def varying_keys(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Config keys whose values differ between the runs (launch details, keys already shown, and keys some
    runs' configs do not have, from older versions of the schema, left out)."""
    if len(runs) < 2:
        return []
    keys = sorted(set.intersection(*(set(r["flat"]) for r in runs)))
    out = []
    for key in keys:
        if key.startswith(IGNORED_PREFIXES) or key in SHOWN_KEYS:
            continue
        values = {json.dumps(r["flat"].get(key), sort_keys=True, default=str) for r in runs}
        if len(values) > 1:
            out.append(key)
    return out


def _common_prefix(paths: Sequence[Path]) -> Path | None:
    try:
        import os

        return Path(os.path.commonpath([str(p.absolute()) for p in paths]))
    except ValueError:
        return None


def compare(runs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows): one row per (run, evaluated demo mode), score columns per shot count."""
    varying = varying_keys(runs)[:MAX_VARYING]
    shot_counts = sorted({int(row["shots"]) for r in runs for row in (r["results"] or {}).get("summary", [])})
    metrics = {(r["results"] or {}).get("metric") for r in runs if r["results"]}
    metric = metrics.pop() if len(metrics) == 1 else "score"
    base = _common_prefix([r["run_dir"] for r in runs]) if len(runs) > 1 else None
    columns = ["run", "method", "backbone", "train shots", "seed", *varying, "steps", "train loss", "val loss",
               "commit", "eval", "protocol", *[f"{metric}@{k}" for k in shot_counts], "context tokens", "ms / query"]
    rows: list[dict[str, Any]] = []
    for r in runs:
        flat = r["flat"]
        name = str(r["run_dir"].absolute().relative_to(base)) if base and base != r["run_dir"].absolute() else str(
            r["run_dir"])
        backbone = f"{flat.get('backbone.family', '?')}:{Path(str(flat.get('backbone.name_or_path', '?'))).name}"
        steps = max((x[0] for x in (r["train_loss"], r["val_loss"]) if x), default=None)
        common = {"run": name, "method": flat.get("method.name", "?"), "backbone": backbone,
                  "train shots": _shots(flat), "seed": flat.get("seed"),
                  **{k: flat.get(k) for k in varying},
                  "steps": steps, "train loss": r["train_loss"][1] if r["train_loss"] else None,
                  "val loss": r["val_loss"][1] if r["val_loss"] else None, "commit": r["commit"]}
        summary = (r["results"] or {}).get("summary") or []
        modes = list(dict.fromkeys(row["method"] for row in summary))
        if not modes:
            rows.append({**common, "eval": None})
        for mode in modes:
            row = {**common, "eval": mode}
            row["protocol"] = (r["results"] or {}).get("protocol_label", "unrecorded (before eval.protocol)")
            # what each shot count of this method costs per query: "shots:value" pairs (a timing: run-to-run noise)
            mine = [s for s in summary if s["method"] == mode]
            row["context tokens"] = _per_shots(mine, "context_tokens", ".0f")
            row["ms / query"] = _per_shots(mine, "ms_per_query", ".1f")
            for s in summary:
                if s["method"] != mode:
                    continue
                if s.get("status", "ok") == "over_context" or s["accuracy_mean"] is None:
                    row[f"{metric}@{int(s['shots'])}"] = "over context"  # never a number beside the others
                else:
                    row[f"{metric}@{int(s['shots'])}"] = (s["accuracy_mean"], s.get("accuracy_std", 0.0),
                                                          s.get("seeds", 1))
            rows.append(row)
    return columns, rows


def _per_shots(rows: Sequence[Mapping[str, Any]], key: str, spec: str) -> str | None:
    """"0:20 2:62 8:188": `key` of each shot count's summary row (None where nothing was measured)."""
    pairs = [f"{int(r['shots'])}:{format(r[key], spec)}" for r in rows if r.get(key) is not None]
    return " ".join(pairs) or None


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):  # (mean, std, seeds) of a score in [0, 1]
        mean, std, seeds = value
        return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if seeds and seeds > 1 else "")
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def render(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], fmt: str = "md") -> str:
    if fmt == "json":
        def plain(v: Any) -> Any:
            return {"mean": v[0], "std": v[1], "seeds": v[2]} if isinstance(v, tuple) else v
        return json.dumps([{c: plain(r.get(c)) for c in columns} for r in rows], indent=2, default=str)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([_cell(r.get(c)) for c in columns])
        return buf.getvalue()
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmict compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders, or folders holding runs (a sweep folder)")
    parser.add_argument("--format", choices=["md", "csv", "json"], default="md")
    args = parser.parse_args(argv)
    runs = [load_run(p) for p in find_runs(args.runs)]
    columns, rows = compare(runs)
    print(render(columns, rows, args.format))
    more = varying_keys(runs)[MAX_VARYING:]
    if more:
        print(f"\nalso differ between the runs: {', '.join(more)}", file=sys.stderr)
    if args.format == "md":
        scores = [c for c in columns if "@" in c]
        note = "; score columns: mean x100 over eval seeds (± std)" if scores else "; no eval results found"
        print(f"\n{len(runs)} run(s){note}", file=sys.stderr)
    return 0
