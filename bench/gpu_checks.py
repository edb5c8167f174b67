"""GPU checks of issue 9 (run where a GPU is lent): bf16 against fp32 and FSDP, on the toy world.

Each check is an ordinary `mmict.train.train` run of toy_aim (AIM's projector on the frozen toy LLaVA):
- precision `auto` must pick bf16-mixed on a bf16 GPU, and train (validation loss falls) like 32-true;
- steps/s and peak GPU memory of the training loop, bf16-mixed against 32-true, in the same process;
- `trainer.strategy=fsdp` on one GPU trains and writes a checkpoint.

    python -m bench.gpu_checks --out gpu_checks.json [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import time
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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_checks")
    parser.add_argument("--out", default="gpu_checks.json")
    parser.add_argument("--root", default="/tmp/mmict_gpu_checks")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", help="comma-separated checks (default: all): fp32,auto,fsdp_bf16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: these checks need one "
                         "(CPU precision is covered by tests/mmict/training/test_precision.py)")
    root = Path(args.root)
    results: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    run(root, "warmup", 20)  # builds the toy world and backbone, warms CUDA; not reported
    checks = {"fp32": ("trainer.precision=32-true", "backbone.dtype=float32"),
              "auto": ("trainer.precision=auto", "backbone.dtype=auto"),
              "fsdp_bf16": ("trainer.precision=auto", "backbone.dtype=auto", "trainer.strategy=fsdp")}
    for key in args.only.split(",") if args.only else checks:
        results[key] = run(root, key, args.steps, *checks[key])
        print(key, json.dumps(results[key]), flush=True)
    if "fp32" in results and "auto" in results:
        results["bf16_speedup"] = results["auto"]["steps_per_s"] / results["fp32"]["steps_per_s"]
        results["bf16_memory_ratio"] = results["auto"]["peak_gpu_mib"] / results["fp32"]["peak_gpu_mib"]
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
