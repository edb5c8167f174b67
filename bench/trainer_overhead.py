"""Training throughput of the AIM LightningModule under Lightning vs the same step in a plain PyTorch loop.

Same module, same batches (one DataLoader over pre-built episode batches), same optimizer and schedule:
N steps under `L.Trainer(max_steps=N, logger=False, enable_checkpointing=False, enable_progress_bar=False)`
against a loop calling `training_step`, `backward`, `optimizer.step` and the scheduler. Per-step time is the
time between the starts of consecutive steps (data fetching, hooks and logging included), the first steps
of each run left out as warm-up; rounds alternate plain / Lightning so background load hits both alike.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from bench import Context, Result, markdown, register, target
from bench.common import env, median

TARGET = 0.05  # Lightning's overhead per step


def plan(ctx: Context) -> list[dict[str, Any]]:
    """The toy training batch (data.batch_size 8, up to 4 shots) at LLaVA-1.5's 576 image tokens per image, which
    the target is about; then a tiny step (2 x 2-patch images), where Lightning's fixed cost per step is not lost
    in the step's own noise."""
    tiny = {"model": "smoke", "steps": 24, "warmup": 3, "rounds": 3, "queries": 4, "shots": 2}
    if ctx.smoke:
        return [{**tiny, "steps": 4, "warmup": 1, "rounds": 1}]
    if ctx.quick:
        return [{"model": "llava-1.5", "steps": 8, "warmup": 2, "rounds": 2, "queries": 8, "shots": 4}, tiny]
    return [{"model": "llava-1.5", "steps": 12, "warmup": 2, "rounds": 3, "queries": 8, "shots": 4}, tiny]


def _loader(batches: list[dict[str, Any]]):
    from torch.utils.data import DataLoader

    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=0, collate_fn=lambda b: b)


def plain_loop(module, batches: list[dict[str, Any]]) -> tuple[list[float], float]:
    """Step start times (and the end) of a plain PyTorch training loop over `batches`; the time outside the steps
    (set-up before the first, tear-down after the last)."""
    begin = time.perf_counter()
    opt_cfg = module.configure_optimizers()
    optimizer, scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    module.train()
    stamps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer warns and does nothing
        for i, batch in enumerate(_loader(batches)):
            stamps.append(time.perf_counter())
            loss = module.training_step(batch, i)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    stamps.append(time.perf_counter())
    return stamps, (stamps[0] - begin) + (time.perf_counter() - stamps[-1])


def lightning_fit(module, batches: list[dict[str, Any]]) -> tuple[list[float], float]:
    """Step start times (and the end) under `Trainer.fit`; the time outside the steps (the Trainer's construction
    and set-up before the first step, its tear-down after the last)."""
    import lightning as L

    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            stamps.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            stamps.append(time.perf_counter())

    start = time.perf_counter()
    trainer = L.Trainer(max_steps=len(batches), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu"
                        if not torch.cuda.is_available() else "auto", devices=1, callbacks=[Stamp()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no val loader, few workers: Lightning's advice is beside the point here
        trainer.fit(module, train_dataloaders=_loader(batches))
    end = time.perf_counter()
    module.trainer = None  # the plain loop's self.log must not reach this finished trainer
    return stamps, (stamps[0] - start) + (end - stamps[-1])


@register("lightning", "AIM training step under Lightning vs a plain PyTorch loop (target: overhead <= 5%)")
def run(ctx: Context) -> Result:
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    rows = [measure(ctx, p) for p in plan(ctx)]
    table = markdown(rows, [
        ("model", "model", ""), ("batch", "batch", ""), ("plain_ms", "plain loop ms/step", ".1f"),
        ("lightning_ms", "Lightning ms/step", ".1f"), ("overhead_ms", "overhead ms/step", "+.2f"),
        ("overhead_pct", "overhead %", "+.1f"),
        ("fit_startup_ms", "Trainer set-up + tear-down ms (per fit)", ".0f"),
    ])
    main = rows[0]
    targets = [target(f"Lightning overhead per AIM training step ({main['model']}, {main['batch']})",
                      f"<= {100 * TARGET:.0f}%", main["overhead_pct"], main["overhead_pct"] <= 100 * TARGET, "%")]
    notes = [f"per-step time = time between consecutive step starts, median over {r['timed_steps']} steps per side "
             f"({r['rounds']} alternating rounds, the first {r['warmup']} steps of each run left out) for {r['model']}"
             for r in rows]
    if len(rows) > 1:
        notes.append(f"Lightning's fixed cost per step, measured on the tiny step: {rows[-1]['overhead_ms']:+.2f} ms, "
                     f"i.e. {100 * rows[-1]['overhead_ms'] / main['plain_ms']:+.1f}% of the {main['model']} step")
    return Result(rows, table, targets, notes, settings={"plans": plan(ctx)})


def measure(ctx: Context, p: dict[str, Any]) -> dict[str, Any]:
    e = env(ctx, p["model"])
    module = e.module
    module.bank = None
    batches = []
    for _ in range(p["steps"]):
        b = e.batch(p["shots"], queries=p["queries"])
        b.demo_ids = None  # training batches carry no ids: demos are read every step, as in training
        batches.append(b)
    per_step: dict[str, list[float]] = {"plain": [], "lightning": []}
    outside: dict[str, list[float]] = {"plain": [], "lightning": []}
    for _ in range(p["rounds"]):
        for name, fn in (("plain", plain_loop), ("lightning", lightning_fit)):
            stamps, rest = fn(module, batches)
            outside[name].append(rest)
            per_step[name] += [b - a for a, b in zip(stamps, stamps[1:])][p["warmup"]:]
    module.eval()
    plain_s, light_s = median(per_step["plain"]), median(per_step["lightning"])
    row = {"model": p["model"], "batch": f"{p['queries']} queries x {p['shots']} demos", "steps": p["steps"],
           "rounds": p["rounds"], "warmup": p["warmup"], "timed_steps": len(per_step["plain"]),
           "plain_ms": 1000 * plain_s, "lightning_ms": 1000 * light_s, "overhead_ms": 1000 * (light_s - plain_s),
           "overhead_pct": 100 * (light_s / plain_s - 1),
           "fit_startup_ms": 1000 * (median(outside["lightning"]) - median(outside["plain"])),
           "plain_ms_all": [round(1000 * t, 2) for t in per_step["plain"]],
           "lightning_ms_all": [round(1000 * t, 2) for t in per_step["lightning"]]}
    ctx.log(f"  {p['model']} step: plain {row['plain_ms']:.1f} ms, Lightning {row['lightning_ms']:.1f} ms "
            f"({row['overhead_pct']:+.1f}%)")
    return row
