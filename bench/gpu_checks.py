"""`python -m bench.gpu_checks`: every GPU check in one prepared command (< 8 minutes on one H100, no network).

Writes `bench/results_gpu.json` (`--out`), naming the device, with one section per check:
- `real_shapes` (issue 24 items 4-5, run first while the GPU is empty): `python -m bench --only real_shapes` on
  random-weight Qwen2-VL-7B and LLaVA-1.5-7B (bf16, SDPA): latency, queries/s and peak activation memory vs shots
  at batch 1 and 8, AIM + bank vs vanilla ICL vs the text floor, item 5's ratio targets; cells left when its time
  budget is spent are reported as skipped, so the whole command stays inside `--budget`;
- `bench_tiny`: `python -m bench --quick --only latency,floor` (the tiny-width models with real image-token counts);
- issue 9's training checks, each an ordinary `mmict.train.train` run of toy_aim (AIM's projector on the frozen
  toy LLaVA): `fp32` and `auto` (precision `auto` must pick bf16-mixed on a bf16 GPU and train like 32-true;
  steps/s and peak GPU memory of both) and `fsdp_bf16` (`trainer.strategy=fsdp` on one GPU trains and checkpoints);
- `eval_scaling`: evaluation throughput with 1 vs N processes (`python -m bench --quick --only eval_scaling`: the
  same AIM checkpoint evaluated by `mmict eval` on 1 and on every GPU; with one GPU only the 1-process figure, the
  target then not measured).

Without a GPU (or with `--quick`), the same code runs on the CPU at reduced shapes (`real_shapes` with `--shapes
reduced`); the training checks and the tiny benchmark are then reported as skipped (CPU precision is covered by
tests/mmict/training/test_precision.py; `make bench` runs the tiny benchmarks), and the default output is
`bench/results_cpu_reduced.json`, so a CPU run never replaces the GPU figures.

    python -m bench.gpu_checks                       # on the GPU machine: everything, < 8 minutes
    python -m bench.gpu_checks --only fp32,auto,fsdp_bf16 --out gpu_checks.json
    python -m bench.gpu_checks --quick               # CPU: reduced shapes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from mmict.config import load_config
from mmict.train import train


def run(root: Path, name: str, steps: int, *overrides: str) -> dict:
    cfg = load_config("toy_aim", [
        f"run_root={root / 'runs'}", f"name={name}", f"data.root={root / 'toy'}",
        f"backbone.name_or_path={root / 'backbone'}", "backbone.toy.pretrain_steps=0",  # random weights: speed only
        "trainer.accelerator=gpu", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
        f"trainer.checkpoint_every_n_steps={steps}", "trainer.progress_bar=false", "data.batch_size=16",
        "data.num_workers=4", "eval.enabled=false", "eval.companions=[]", "logger.wandb=false", *overrides,
    ])
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - start
    runtime = json.loads((Path(summary["run_dir"]) / "runtime.json").read_text())
    return {"overrides": list(overrides), "seconds": seconds, "steps_per_s": steps / seconds,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20, "val_loss": summary.get("val_loss"),
            "precision": runtime.get("precision"), "checkpoint": (Path(summary["run_dir"]) / "checkpoints"
                                                                    / "last.ckpt").exists()}


TRAINING = {"fp32": ("trainer.precision=32-true", "backbone.dtype=float32"),
            "auto": ("trainer.precision=auto", "backbone.dtype=auto"),
            "fsdp_bf16": ("trainer.precision=auto", "backbone.dtype=auto", "trainer.strategy=fsdp")}
SECTIONS = ("real_shapes", "bench_tiny", *TRAINING, "eval_scaling")
BENCH_DIR = Path(__file__).resolve().parent
def bench_section(root: Path, name: str, args: list[str]) -> dict:
    """One `python -m bench` run in this process; its results file, embedded."""
    from bench.__main__ import main as bench_main

    out = root / f"{name}.json"
    out.unlink(missing_ok=True)
    status = bench_main([*args, "--out", str(out)])
    payload = json.loads(out.read_text())
    return {"status": "ok" if status == 0 else "failed", "command": payload["command"],
            "summary": payload["summary"], "benchmarks": payload["benchmarks"]}


def training_section(root: Path, steps: int, wanted: list[str]) -> dict:
    out: dict = {}
    run(root, "warmup", 20)  # builds the toy world and backbone, warms CUDA; not reported
    for key in wanted:
        out[key] = run(root, key, steps, *TRAINING[key])
        print(key, json.dumps(out[key], default=str), flush=True)
    if "fp32" in out and "auto" in out:
        out["bf16_speedup"] = out["auto"]["steps_per_s"] / out["fp32"]["steps_per_s"]
        out["bf16_memory_ratio"] = out["auto"]["peak_gpu_mib"] / out["fp32"]["peak_gpu_mib"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_checks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="results file (default bench/results_gpu.json on a GPU, "
                                      "bench/results_cpu_reduced.json on a CPU)")
    parser.add_argument("--root", default="/tmp/mmict_gpu_checks", help="scratch folder (toy world, runs)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per training check (default 200)")
    parser.add_argument("--only", help=f"comma-separated sections (default: all): {','.join(SECTIONS)}")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds the whole command may take (default 450): real_shapes gets what the other "
                             "sections leave, skipping the cells it has no time for")
    parser.add_argument("--shapes", help="real_shapes' shapes (default: 7b on a GPU, reduced on a CPU)")
    parser.add_argument("--quick", action="store_true", help="the CPU path: reduced shapes, fewer shots and repeats")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and 1 repeat: checks the harness only")
    parser.add_argument("--past-context", action="store_true",
                        help="real_shapes: also time vanilla ICL past the LM's positions (a speed figure only)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a busy shared CPU)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    cuda = torch.cuda.is_available() and not (args.quick or args.smoke)
    wanted = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; available: {', '.join(SECTIONS)}")
    from bench.common import machine_info, versions

    machine = machine_info()
    device = (f"GPU {machine['gpu']}" if cuda else f"CPU {machine.get('cpu', '?')} ({machine['cpu_count']} cores)"
              + (" (a GPU is present; --quick/--smoke keep to the CPU path)" if machine["cuda"] else ""))
    out = Path(args.out) if args.out else BENCH_DIR / ("results_gpu.json" if cuda else "results_cpu_reduced.json")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": device, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "command": "python -m bench.gpu_checks " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "budget_s": args.budget, "machine": machine, "versions": versions(), "sections": {}}
    sections = results["sections"]
    training = [k for k in wanted if k in TRAINING]
    # what the sections after real_shapes take on an H100 (issue 9's checks: ~0.45 s per step for all three, plus
    # start-up; the tiny benchmarks ~15 s), kept free so the whole command ends inside the budget
    # eval_scaling: two `mmict eval` processes' start-up and 128 trial-queries of a toy model, ~60 s
    reserve = (30.0 + 0.45 * args.steps * len(training) + (20.0 if "bench_tiny" in wanted else 0.0)
               + (60.0 if "eval_scaling" in wanted else 0.0)) if cuda else 0.0
    if "real_shapes" in wanted:
        budget = max(60.0, args.budget - reserve - (time.monotonic() - start))
        mode = ["--smoke"] if args.smoke else ["--quick"] if args.quick or not cuda else []
        extra = ([f"--shapes={args.shapes}"] if args.shapes else []) + (["--past-context"] if args.past_context else [])
        extra += [f"--threads={args.threads}"] if args.threads else []
        sections["real_shapes"] = bench_section(root, "real_shapes", ["--only", "real_shapes", *mode, *extra,
                                                                      "--budget", f"{budget:.0f}"])
    if "bench_tiny" in wanted:
        sections["bench_tiny"] = (bench_section(root, "bench_tiny", ["--quick", "--only", "latency,floor"]) if cuda
                                  else {"status": "skipped: the CPU path runs real_shapes only (make bench runs it)"})
    if training:
        sections["training"] = (training_section(root, args.steps, training) if cuda else {
            "status": "skipped: needs a CUDA GPU (CPU precision: tests/mmict/training/test_precision.py)"})
    if "eval_scaling" in wanted:
        sections["eval_scaling"] = (bench_section(root, "eval_scaling", ["--quick", "--only", "eval_scaling"]) if cuda
                                    else {"status": "skipped: the CPU path runs real_shapes only "
                                                    "(make bench BENCH=eval_scaling runs it on CPU processes)"})
    results["seconds"] = round(time.monotonic() - start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    for name, section in sections.items():
        print(f"\n## {name}: {section.get('status', 'ok')}")
        if section.get("summary"):
            print(section["summary"])
    print(f"\n{device}: {results['seconds']} s (budget {args.budget:.0f} s); results: {out}")
    failed = any(str(s.get("status", "ok")) == "failed" for s in sections.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
