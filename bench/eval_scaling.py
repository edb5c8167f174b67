"""Evaluation throughput with 1 vs N processes (issue 24 item 4, target >= 0.9 x N).

The same checkpoint (AIM on a random toy LLaVA, its bank on) is evaluated on the same trials by `python -m mmict.eval
CKPT trainer.devices=N`, as a user runs it: Lightning starts the N processes, the batches are dealt to them
(`mmict.eval.ranks`). Each run's results.json gives the trials' wall time on rank 0 (`seconds`: from the first
draw to the last gathered answer, bank included; process start and model loading left out, as they do not grow
with the number of queries) and the trial-queries it answered. N is the GPU count on a GPU machine (one GPU: only
the 1-process figure, the target is not measured), else the CPU processes asked for (default 2), each with
cores / N threads, so 1 and N processes use the same cores. Both runs must give the same predictions (checked
here too: a speed-up that changed the numbers would be no speed-up).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from bench import Context, Result, markdown, register, target
from mmict.eval.ranks import local_launch_env

REPO = Path(__file__).resolve().parent.parent
TARGET = 0.9
WORDS = ["red", "blue", "green", "circle", "square", "left", "right", "top"]


def _write_task(root: Path, queries: int, pool: int) -> None:
    """An OK-VQA-shaped task: `queries` test and `pool` train examples with 32 px images."""
    import webdataset as wds
    from PIL import Image as PILImage

    rng = random.Random(0)
    folder = root / "okvqa"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("test", queries), ("train", pool)):
        with wds.TarWriter(str(folder / f"{split}-000000.tar")) as sink:
            for i in range(n):
                buf = io.BytesIO()
                PILImage.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3))).save(buf, format="PNG")
                meta = {"id": f"{split}{i}", "question": "what is it ?", "answers": [rng.choice(WORDS)]}
                sink.write({"__key__": f"{split}{i:05d}", "png": buf.getvalue(), "json": json.dumps(meta).encode()})
    (folder / "train.summary.json").write_text(json.dumps({"written": pool, "shards": ["train-000000.tar"]}))


def _checkpoint(workdir: Path, accelerator: str) -> Path:
    """A toy LLaVA (random weights) and an AIM checkpoint on it evaluating the task above."""

    from mmict.config import load_config
    from mmict.methods.aim.module import AIMModule
    from mmict.toy.backbone import ensure_toy_backbone

    backbone = workdir / "eval_scaling_backbone"
    ensure_toy_backbone(backbone, SimpleNamespace(
        image_size=32, patch_size=8, vision_hidden_size=64, vision_layers=2, text_hidden_size=128, text_layers=4,
        num_heads=4, intermediate_size=256, max_position_embeddings=1024, seed=0))
    cfg = load_config("toy_aim", [f"backbone.name_or_path={backbone}", "backbone.toy=null",
                                  f"data.root={workdir / 'eval_scaling_data'}", f"run_root={workdir / 'runs'}",
                                  "eval.task=okvqa", "eval.postprocess=vqa", "eval.num_queries=null",
                                  "eval.demo_modes=[fused,images]", "eval.bank.enabled=true",
                                  "eval.max_new_tokens=4", "eval.extra_tasks=[]", "logger.wandb=false",
                                  f"trainer.accelerator={accelerator}"])
    torch.manual_seed(0)
    module = AIMModule(cfg)
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(state)
    path = workdir / "eval_scaling_ckpt.ckpt"
    torch.save(state, path)
    return path


def evaluate(ckpt: Path, out: Path, processes: int, threads: int | None, overrides: list[str]) -> dict[str, Any]:
    """`python -m mmict.eval CKPT --out OUT trainer.devices=N`: its results.json."""
    # local processes started by Lightning, whatever cluster or rank settings this shell has
    env = {**local_launch_env(), "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "mmict.eval", str(ckpt), "--out", str(out), f"trainer.devices={processes}",
           f"eval.bank.dir={out / 'bank'}", *overrides]
    # its own process group: no rank Lightning started outlives a failed or timed-out run
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=1800)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
    return json.loads(next((out / "eval").glob("results*.json")).read_text())


def _predictions(results: dict[str, Any]) -> list:
    return [t["predictions"] for t in results["trials"]]


@register("eval_scaling", "evaluation throughput, 1 vs N processes (target >= 0.9 x N)")
def run(ctx: Context) -> Result:
    cuda = torch.cuda.is_available()
    n = torch.cuda.device_count() if cuda else int(os.environ.get("MMICT_BENCH_CPU_PROCESSES", "2"))
    cores = os.cpu_count() or 1
    queries, seeds, shots = (16, [0], [2]) if ctx.smoke else (64, [0], [4]) if ctx.quick else (256, [0, 1], [4, 8])
    _write_task(ctx.workdir / "eval_scaling_data", queries, 64)
    ckpt = _checkpoint(ctx.workdir, "gpu" if cuda else "cpu")
    overrides = [f"eval.seeds=[{','.join(map(str, seeds))}]", f"eval.shots=[{','.join(map(str, shots))}]",
                 "eval.batch_size=8"]
    rows, runs = [], {}
    for p in dict.fromkeys([1, n]):
        threads = None if cuda else max(1, cores // p)  # the same cores for 1 and N CPU processes
        out = ctx.workdir / f"eval_scaling_{p}"
        ctx.log(f"eval_scaling: {p} process(es) ...")
        runs[p] = evaluate(ckpt, out, p, threads, overrides)
        r = runs[p]
        rows.append({"processes": p, "device": "cuda" if cuda else "cpu", "threads_per_process": threads,
                     "trial_queries": r["queries_run"], "seconds": r["seconds"],
                     "queries_per_s": r["queries_run"] / r["seconds"]})
    base = rows[0]["queries_per_s"]
    for row in rows:
        row["speedup"] = row["queries_per_s"] / base
        row["efficiency"] = row["speedup"] / row["processes"]
    same = all(_predictions(r) == _predictions(runs[1]) for r in runs.values())
    notes = [f"predictions identical for 1 and {n} processes: {same}"]
    if n == 1:
        notes.append("one device: the N-process target is not measured here")
        targets = [target(f"evaluation throughput, N processes vs 1 (N = {n})", f">= {TARGET} x N", None, None)]
    else:
        eff = rows[-1]["efficiency"]
        targets = [target(f"evaluation throughput, {n} processes vs 1", f">= {TARGET} x N", eff, eff >= TARGET and same,
                          unit="x N")]
    if not cuda:
        notes.append(f"CPU: {cores} cores shared by the processes (1 process: {cores} threads; {n}: {cores // n} "
                     "each); the target is for N GPUs")
    table = markdown(rows, [("processes", "processes", "d"), ("device", "device", ""),
                            ("trial_queries", "trial-queries", "d"), ("seconds", "seconds", ".2f"),
                            ("queries_per_s", "queries/s", ".1f"), ("speedup", "speed-up", ".2f"),
                            ("efficiency", "speed-up / N", ".2f")])
    return Result(rows, table, targets, notes, settings={"queries": queries, "seeds": seeds, "shots": shots,
                                                          "demo_modes": ["fused", "images"], "batch_size": 8})
