"""`python -m bench [--only latency,floor,lightning,data,pool,real_shapes] [--quick] [--shapes reduced]
[--out bench/results.json]` (`make bench`).

Runs the selected benchmarks in one process, prints their tables and the targets they check, and writes
everything (rows, every repeat's time, targets, machine, versions) to the results file. A benchmark that is
not written yet is reported as "not available"; one that fails is reported with its error, the others still
run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import MODULES, REGISTRY, Context, Result
from mmict.bookkeeping.folders import unique_path

DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"


def load_registry(log=print) -> dict[str, str]:
    """Import every benchmark module; those that fail to import are named with their error."""
    broken = {}
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others
            broken[name] = f"{type(e).__name__}: {e}"
            log(f"warning: could not import {name}: {broken[name]}")
    return broken


def _selected(only: str | None) -> list[str]:
    names = list(REGISTRY)
    if not only:
        return names
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; available: {', '.join(names)}")
    return wanted


def _summary(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| benchmark | target | goal | measured | met |", "|---|---|---|---:|---|"]
    for name, res in results.items():
        if res["status"] != "ok":
            lines.append(f"| {name} | ({res['status']}: {res.get('reason', '')}) | | | |")
            continue
        for t in res["targets"]:
            measured = "n/a" if t["measured"] is None else f"{t['measured']:.2f}{t['unit'] and ' ' + t['unit']}"
            met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
            lines.append(f"| {name} | {t['name']} | {t['target']} | {measured} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated benchmarks (default: all; --list names them)")
    parser.add_argument("--quick", action="store_true", help="fewer shots and repeats (a minute or two on a CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny images, 1 repeat: checks the harness only")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement (default 5; quick 3; smoke 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own, the core count)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"results file (default {DEFAULT_OUT})")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--shapes", help="real_shapes: comma-separated shapes or groups (7b, reduced, smoke, "
                                         "llava-1.5-7b, qwen2-vl-7b, ...); default 7b on a GPU, reduced on a CPU")
    parser.add_argument("--past-context", action="store_true",
                        help="real_shapes: also time vanilla ICL prompts longer than the LM's positions, labelled as a "
                             "speed figure past the limit (never counted for a target)")
    parser.add_argument("--budget", type=float, help="real_shapes: seconds after which the remaining cells are skipped")
    args = parser.parse_args(argv)

    import torch

    from bench.common import machine_info, versions

    if args.threads:
        torch.set_num_threads(args.threads)
    broken = load_registry()
    if args.list:
        for b in REGISTRY.values():
            print(f"{b.name:<10} {b.description}")
        return 0
    names = _selected(args.only)
    repeats = args.repeats or (1 if args.smoke else 3 if args.quick else 5)
    workdir = Path(tempfile.mkdtemp(prefix="mmict-bench-"))
    shapes = tuple(s.strip() for s in args.shapes.split(",") if s.strip()) if args.shapes else None
    ctx = Context(quick=args.quick, smoke=args.smoke, repeats=repeats, workdir=workdir, shapes=shapes,
                  past_context=args.past_context, budget_s=args.budget)
    payload: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full", "repeats": repeats,
        "machine": machine_info(), "versions": versions(), "import_errors": broken, "benchmarks": {},
    }
    print(f"# mmict bench ({payload['mode']}, {repeats} repeats) on {payload['machine'].get('cpu', '?')}, "
          f"{payload['machine']['torch_threads']} torch threads, torch {torch.__version__}"
          + (f", GPU {payload['machine']['gpu']}" if payload["machine"].get("gpu") else ", no GPU"))
    load, cores = payload["machine"].get("load_average_at_start", [0.0])[0], payload["machine"]["cpu_count"] or 1
    if load > 0.5 and torch.get_num_threads() > 1 and not torch.cuda.is_available():
        print(f"note: other processes keep the CPU busy (load {load:.2f} on {cores} cores): timings will be noisy; "
              "--threads 1 is steadier on a shared machine (a parallel op waits for its slowest thread)")
    failed = False
    try:
        for name in names:
            bench = REGISTRY[name]
            print(f"\n## {name}: {bench.description}")
            start = time.perf_counter()
            entry: dict[str, Any] = {"description": bench.description}
            try:
                result: Result = bench.run(ctx)
            except NotImplementedError as e:
                entry.update(status="not available", reason=str(e) or "not implemented")
                print(f"not available: {entry['reason']}")
            except Exception as e:  # noqa: BLE001 - report, go on with the other benchmarks
                failed = True
                entry.update(status="failed", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
                print(f"FAILED: {entry['reason']}\n{entry['traceback']}")
            else:
                entry.update(status="ok", rows=result.rows, table=result.table, targets=result.targets,
                             notes=result.notes, settings=result.settings)
                print(result.table)
                for note in result.notes:
                    print(f"- {note}")
            entry["seconds"] = round(time.perf_counter() - start, 2)
            payload["benchmarks"][name] = entry
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    with contextlib.suppress(OSError, AttributeError):
        payload["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    payload["summary"] = _summary(payload["benchmarks"])
    print(f"\n## targets\n{payload['summary']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # the previous results are kept, not overwritten: bench/history/results-<its time>.json
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(out.stat().st_mtime))
        kept = unique_path(out.parent / "history" / f"{out.stem}-{stamp}{out.suffix}")
        kept.parent.mkdir(parents=True, exist_ok=True)
        out.rename(kept)
        print(f"previous results moved to {kept}")
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nresults: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
